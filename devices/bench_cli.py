"""`lfm2-nas bench SPEC.json|PRESET`: compile one architecture and measure it here, printed
as a llama-bench-like table (prefill `pp<N>` and decode `tg<N>@<depth>` tokens/s).

It is the same path a search takes for one candidate: `devices.compile.compile` (cached,
checked against eager), then `devices.measure.measure` in a fresh child process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from lfm2.backends import BACKENDS, DEFAULT_BACKEND, DEFAULT_QUANT
from lfm2.errors import UserError
from lfm2.sizes import format_size
from lfm2.spec import ArchSpec



def parse_lengths(text: str, what: str) -> tuple[int, ...]:
    """`128,512` -> (128, 512); raises UserError with the accepted spelling."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"{what} {text!r}: {part!r} is not a positive integer; write e.g. 128,512")
        values.append(int(part))
    return tuple(dict.fromkeys(values))


def load_target(target: str) -> tuple[str, ArchSpec]:
    """A preset name, or a JSON file holding an ArchSpec (or an object with a "spec" key,
    as `lfm2-nas presets --json` prints)."""
    from lfm2.presets import presets

    if target in presets:
        return target, presets[target]
    path = Path(target)
    if not path.is_file():
        raise UserError(f"{target!r} is neither a preset ({', '.join(presets)}) nor a JSON file; pass a preset name or the path of a spec file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); write an ArchSpec as JSON (see `lfm2-nas presets --json`)") from exc
    if isinstance(data, dict) and isinstance(data.get("spec"), dict):
        data = data["spec"]
    return path.stem, ArchSpec.from_dict(data)


def _mib(n: int | None) -> str:
    return format_size(n, unit="MiB", digits=1)


def rate_mean_std(samples_ms: list[float], tokens: int) -> tuple[float, float]:
    """llama-bench's figure: the mean and sample std over runs of each run's tokens/s."""
    rates = [tokens * 1000.0 / ms for ms in samples_ms if ms > 0]
    if not rates:
        return 0.0, 0.0
    mean = sum(rates) / len(rates)
    std = (sum((r - mean) ** 2 for r in rates) / (len(rates) - 1)) ** 0.5 if len(rates) > 1 else 0.0
    return mean, std


def bench_rows(measurement) -> list[dict[str, Any]]:
    decode_tokens = (getattr(measurement, "protocol", None) or {}).get("decode_tokens")
    rows = []
    for label, points in (("pp{}", measurement.prefill), ("tg@{}", measurement.decode)):
        for key in sorted(points):
            stats = points[key]
            mean, std = rate_mean_std(stats.samples_ms, stats.tokens)
            llama_bench = f"pp{key}" if label.startswith("pp") else f"tg{decode_tokens or ''} @ d{key}"
            rows.append(
                {
                    "test": label.format(key),
                    "llama_bench_test": llama_bench,
                    "llama_bench_tokens_per_s": mean,
                    "llama_bench_tokens_per_s_std": std,
                    "tokens_per_s": stats.tokens_per_s,
                    "median_ms": stats.median_ms,
                    "ci_low_ms": stats.ci_low_ms,
                    "ci_high_ms": stats.ci_high_ms,
                    "ci_level": stats.ci_level,
                    "trimmed_mean_ms": stats.trimmed_mean_ms,
                    "p10_ms": stats.p10_ms,
                    "p90_ms": stats.p90_ms,
                    "cv": stats.cv,
                    "runs": len(stats.samples_ms),
                    "noisy": stats.noisy,
                    "disturbed": stats.disturbed,
                    "remeasured": stats.remeasured,
                }
            )
    return rows


def verification_line(verification: dict | None) -> str:
    """What the compile's check found, in one line (a compile that fails it raises instead)."""
    if not verification:
        return "not verified (the artifact was compiled without its check)"
    top1 = f"top-1 {verification['top1_agreement']:.2f}"
    if "decisive_steps" in verification:
        top1 += f" ({verification.get('top1_agreement_decisive', 1.0):.2f} on {verification['decisive_steps']} decisive of {verification['steps']} steps)"
    line = (
        f"verified against {verification.get('reference', 'the eager model')}: {'passed' if verification.get('passed') else 'FAILED'}, "
        f"max |logit diff| {verification['max_abs_diff']:.3g}, min cosine {verification['min_cosine']:.5f}, {top1}"
    )
    distance = verification.get("fp32_distance")
    if distance:
        line += f"; against fp32: min cosine {distance['min_cosine']:.4f} (quantisation error, for information)"
    return line


def print_table(name: str, spec: ArchSpec, artifact, measurement) -> None:
    from lfm2.model import build_model, count_parameters

    console = Console(width=max(Console().width, 170))
    params = count_parameters(build_model(spec, device="meta"))
    memory = measurement.memory
    console.print(
        f"[bold]{name}[/] {spec.layout}  params {params / 1e6:.1f}M  backend {artifact.backend}/{artifact.quant}  "
        f"artifact {_mib(artifact.size_bytes)}  threads {measurement.stack.get('threads')}  cpus {measurement.stack.get('affinity')}",
        highlight=False,
    )
    table = Table()
    for column in ("test", "t/s", "median ms", "95% CI ms", "p10-p90 ms", "CV", "runs", "llama-bench test", "t/s ± std", ""):
        table.add_column(column, justify="left" if column in ("test", "llama-bench test", "") else "right")
    for row in bench_rows(measurement):
        table.add_row(
            row["test"],
            f"{row['tokens_per_s']:.1f}",
            f"{row['median_ms']:.2f}",
            "-" if row["ci_low_ms"] is None else f"{row['ci_low_ms']:.2f}-{row['ci_high_ms']:.2f}",
            f"{row['p10_ms']:.2f}-{row['p90_ms']:.2f}",
            f"{row['cv'] * 100:.1f}%",
            str(row["runs"]),
            row["llama_bench_test"],
            f"{row['llama_bench_tokens_per_s']:.2f} ± {row['llama_bench_tokens_per_s_std']:.2f}",
            " ".join(flag for flag, on in (("noisy", row["noisy"]), ("disturbed", row["disturbed"]), (f"remeasured x{row['remeasured']}", row["remeasured"])) if on),
        )
    console.print(table)
    console.print(
        f"load {measurement.load_time_s:.2f} s   footprint {_mib(memory.get('footprint_bytes'))}   peak RSS {_mib(memory.get('peak_rss_bytes'))}   "
        f"baseline {_mib(memory.get('baseline_rss_bytes'))}   PSS {_mib(memory.get('pss_bytes'))}   "
        f"compile {artifact.manifest.get('compile_s', 0):.1f} s   decode cost follows context: {artifact.manifest.get('decode_cost_follows_context')}",
        highlight=False,
    )
    console.print(
        "tg@N: one decode step at context depth N (tokens/s = 1000 / median ms per token); pp: a prefill of N tokens. 95% CI: the median's "
        "distribution-free interval. llama-bench columns: ppN, and tgM @ dN (M tokens generated after an N-token context), as the mean ± std over "
        "runs of each run's tokens/s. noisy: the median's interval is wider than the protocol's target; disturbed: the calibration kernel ran "
        "slower around the point (other work on these cores).",
        style="dim",
        highlight=False,
    )


def bench(
    target: str = typer.Argument(..., help="A preset name (see `lfm2-nas presets`) or a JSON file with an ArchSpec."),
    backend: str = typer.Option(DEFAULT_BACKEND, "--backend", help="executorch, onnx, llamacpp or eager (the search's default; onnx compiles in seconds, executorch in minutes)."),
    quant: str = typer.Option(None, "--quant", help="Precision: executorch 8da4w|fp32, onnx int8|fp32, llamacpp q4_0|q8_0|f16, eager fp32 (default: the first, what ships; as search)."),
    prompt: str = typer.Option("128,512", "--prompt", help="Prefill lengths, comma-separated."),
    depth: str = typer.Option("128", "--depth", help="Decode context depths, comma-separated."),
    tokens: int = typer.Option(16, "--tokens", help="Tokens generated per timed decode run."),
    threads: int = typer.Option(None, "--threads", help="Runtime threads (default: one per CPU used)."),
    cpus: str = typer.Option(None, "--cpus", help="Cores to pin to, e.g. 0-1 or 2,3 (default: all usable)."),
    memory_cap: str = typer.Option(None, "--memory-limit", "--memory-cap", help="Kill the measurement over this RSS, e.g. 2GiB (status oom); the name `agent serve` uses (--memory-cap still works)."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Wall-clock limit of the measurement in seconds."),
    max_seconds: float = typer.Option(10.0, "--max-seconds", help="Time budget of each point after its minimum runs."),
    processes: int = typer.Option(1, "--processes", help="Fresh processes a point may use: the points still less sure than +-2% after one are measured again in another, "
                                  "and the figures combined (worth it where process-to-process differences dominate, as for decode on a shared host: BENCHMARKS.md)."),
    loads: int = typer.Option(1, "--loads", help="Loads of the model inside each process: every point is timed after each, and the figures combined (where the weights land "
                              "in memory moves a decode figure from load to load: BENCHMARKS.md, \"Load to load\"); from the second load on, a point within +-2% is not timed again."),
    huge_pages: bool = typer.Option(False, "--huge-pages/--no-huge-pages", help="Allocate the measuring process's memory in transparent huge pages (glibc.malloc.hugetlb=1): "
                                    "meant to cut TLB misses and page-placement noise; the memory pass still counts 4 KiB pages (its effect on the spread is not shown yet: BENCHMARKS.md, \"Load to load\")."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Artifact cache (default: $LFM2_NAS_CACHE or ~/.cache/lfm2-nas)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (artifact facts + the Measurement)."),
) -> None:
    """Compile an architecture and measure prefill/decode latency and memory on this machine."""
    from devices.agent.config import parse_cpus
    from devices.artifact import check_backend_quant
    from devices.compile import compile
    from devices.measure import measure
    from devices.protocol import Limits, Protocol
    from lfm2.sizes import parse_size

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    quant = quant or DEFAULT_QUANT[backend]
    check_backend_quant(backend, quant)
    if tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {tokens}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if processes < 1:
        raise UserError(f"--processes must be >= 1 (1: one process per measurement), got {processes}")
    if not 1 <= loads <= 16:
        raise UserError(f"--loads must be a whole number from 1 to 16 (1: one load per process), got {loads}")
    if timeout <= 0 or max_seconds <= 0:
        raise UserError("--timeout and --max-seconds must be positive seconds")
    name, spec = load_target(target)
    protocol = Protocol(prompt_lengths=parse_lengths(prompt, "--prompt"), decode_depths=parse_lengths(depth, "--depth"), decode_tokens=tokens, max_seconds_per_point=max_seconds,
                        processes=processes, loads=loads, huge_pages=huge_pages)
    if protocol.max_context > spec.max_seq_len:
        raise UserError(f"the benchmark needs {protocol.max_context} tokens of context, the spec allows {spec.max_seq_len}: use shorter --prompt/--depth")
    limits = Limits(
        cpus=parse_cpus(cpus),
        threads=threads,
        memory_bytes=parse_size(memory_cap, "--memory-limit", require_unit=True) if memory_cap else None,
        timeout_s=timeout,
    )
    console = Console(stderr=True)
    console.print(f"compiling {name} ({spec.key}) for {backend}/{quant}, max_context {protocol.max_context} ...", highlight=False)
    artifact = compile(spec, backend, quant, protocol.max_context, protocol.prompt_lengths, cache_dir=cache_dir)
    console.print(verification_line(artifact.manifest.get("verification")), highlight=False)
    console.print(f"measuring {artifact.path} ...", highlight=False)
    measurement = measure(artifact, protocol, limits)
    if as_json:
        payload = {
            "name": name,
            "spec": spec.to_dict(),
            "artifact": {"path": str(artifact.path), "key": artifact.key, "bytes": artifact.size_bytes, "compile_s": artifact.manifest.get("compile_s"), "stages_s": artifact.manifest.get("stages_s"), "verification": artifact.manifest.get("verification")},
            "rows": bench_rows(measurement) if measurement.ok else [],
            "measurement": measurement.to_dict(),
        }
        typer.echo(json.dumps(payload, sort_keys=True))
    elif measurement.ok:
        print_table(name, spec, artifact, measurement)
    if not measurement.ok:
        console.print(f"[bold red]measurement {measurement.status}:[/] {measurement.error}", highlight=False)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


__all__ = ["register", "bench", "load_target", "parse_lengths", "bench_rows"]
