"""The project's ExecuTorch 8da4w LFM2-350M side by side with ExecuTorch's own LFM2 recipe.

The executorch wheel exports LFM2 itself (`executorch.extension.llm.export.export_llm` with
`examples/models/lfm2/config/lfm2_xnnpack_q8da4w.yaml`, model class `lfm2_350m`). This
script exports the same seeded weights both ways and measures the two programs with the
project's protocol (`devices.measure`, fresh child process each, alternately, so that both
see the same machine):

1. the seeded model as a Hugging Face folder (`lfm2-nas export --to hf`, or `--hf DIR`), its
   weights converted to ExecuTorch's names by `executorch.examples.models.lfm2.convert_weights`
   and its shape written as ExecuTorch's params JSON: nothing is downloaded;
2. the recipe's export (`export_llm`, its config, `max_seq_length` = the prefill chunk + 1,
   `max_context_length` = the project's context), skipped when `--recipe-pte` is given;
3. the recipe's `.pte` wrapped as a project artifact (`write_manifest`; methods `forward`
   only, prefill chunk = the longest token dimension the recipe's `forward` takes) so that
   `devices.measure` runs it: the recipe's `forward(tokens [1, T], input_pos [1])` is the
   project's `forward(tokens, pos)` signature; it has no `reset` (a prefill from position 0
   overwrites the cache positions it attends to, and the conv state is rebuilt from the
   prompt; latency and memory do not depend on it);
4. the project's artifact: `devices.compile` (cached) or `--project-artifact DIR`.

    python -m bench.experiments.executorch_recipe                       # export everything, measure, write BENCHMARKS.md
    python -m bench.experiments.executorch_recipe --recipe-pte X.pte --project-artifact DIR

The recipe's program is not verified here (its quantisation differs: group size, fp32
embedding), only timed and weighed.
"""

from __future__ import annotations

import json
import os
from statistics import median
import shutil
import subprocess
import sys
from pathlib import Path

from bench.harness import BenchRun, base_parser, log
from bench.report import markdown_table, mib
from lfm2.spec import ArchSpec

NAME = "executorch_recipe"
PRESET = "LFM2-350M"
CONFIG = "examples/models/lfm2/config/lfm2_xnnpack_q8da4w.yaml"
MODEL_CLASS = "lfm2_350m"
#: The recipe's `max_seq_length` is the token dimension's bound + 1 (`export_llama_lib`:
#: Dim max = max_seq_len - 1); 128 gives chunks of 127, next to the project's 128.
RECIPE_MAX_SEQ_LEN = 128


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0], package=__package__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lfm2-nas-executorch-recipe"), help="folder for the HF export, checkpoint, params and the recipe's .pte")
    parser.add_argument("--hf", type=Path, default=None, help="a Hugging Face LFM2 folder to convert (default: `lfm2-nas export --preset LFM2-350M --to hf` into --work)")
    parser.add_argument("--recipe-pte", type=Path, default=None, help="the recipe's .pte, already exported (skips the ~15-minute export)")
    parser.add_argument("--project-artifact", type=Path, default=None, help="the project's 8da4w artifact folder (default: devices.compile, cached)")
    parser.add_argument("--prefill", default="512,2048")
    parser.add_argument("--decode", default="512,2048")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each program, alternating")
    return parser.parse_args(argv)


def params_from_hf(config: dict) -> dict:
    """ExecuTorch's model-args JSON (`examples/models/llama/model_args.py`) for a Hugging
    Face Lfm2 config."""
    rope = config.get("rope_parameters") or {}
    return {
        "dim": config["hidden_size"],
        "hidden_dim": config["intermediate_size"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config["num_key_value_heads"],
        "n_layers": config["num_hidden_layers"],
        "norm_eps": config["norm_eps"],
        "rope_theta": rope.get("rope_theta", config.get("rope_theta")),
        "vocab_size": config["vocab_size"],
        "use_hf_rope": True,
        "use_qk_norm": True,
        "qk_norm_before_rope": True,
        "layer_types": config["layer_types"],
    }


def _run(command: list[str], log_path: Path) -> None:
    log(f"[{NAME}] {' '.join(map(str, command))}")
    with open(log_path, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{command[2] if len(command) > 2 else command[0]} failed (exit {done.returncode}); see {log_path}")


def prepare_checkpoint(work: Path, hf: Path | None) -> tuple[Path, Path]:
    """(checkpoint, params) in ExecuTorch's form, from the seeded Hugging Face folder."""
    work.mkdir(parents=True, exist_ok=True)
    if hf is None:
        _run([sys.executable, "-m", "nas.cli", "export", str(work / "hf"), "--preset", PRESET, "--to", "hf", "--seed", "0", "--overwrite"], work / "hf_export.log")
        hf = next(p.parent for p in (work / "hf").glob("*/config.json"))
    params = work / "params.json"
    params.write_text(json.dumps(params_from_hf(json.loads((hf / "config.json").read_text())), indent=1))
    checkpoint = work / "checkpoint.pth"
    _run([sys.executable, "-m", "executorch.examples.models.lfm2.convert_weights", str(hf), str(checkpoint)], work / "convert.log")
    return checkpoint, params


def export_recipe(work: Path, checkpoint: Path, params: Path, max_context: int) -> Path:
    import executorch

    config = Path(next(iter(executorch.__path__))) / CONFIG
    out = work / f"{MODEL_CLASS}_q8da4w.pte"
    _run(
        [
            sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config", str(config),
            f"+base.model_class={MODEL_CLASS}", f"+base.params={params}", f"+base.checkpoint={checkpoint}",
            f"+export.max_seq_length={RECIPE_MAX_SEQ_LEN}", f"+export.max_context_length={max_context}", f"+export.output_name={out}",
        ],
        work / "export_llm.log",
    )
    return out


def wrap_recipe(pte: Path, spec: ArchSpec, max_context: int, prompt_lengths: tuple[int, ...], out_dir: Path):
    """The recipe's program as a project artifact, so that `devices.measure` runs it."""
    from devices.artifact import write_manifest

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    try:
        os.link(pte, out_dir / "model.pte")
    except OSError:
        shutil.copyfile(pte, out_dir / "model.pte")
    facts = {
        "methods": ["forward"],
        "prefill_chunk": RECIPE_MAX_SEQ_LEN - 1,
        "seed": 0,
        "imported": {"from": "executorch.extension.llm.export.export_llm", "config": CONFIG, "model_class": MODEL_CLASS, "pte": str(pte)},
    }
    return write_manifest(out_dir, spec, "executorch", "8da4w", max_context, prompt_lengths, ["model.pte"], **facts)


def project_artifact(spec: ArchSpec, max_context: int, prompt_lengths: tuple[int, ...], path: Path | None, cache_dir: Path | None):
    from devices.artifact import Artifact
    from devices.compile import compile as compile_artifact

    if path is not None:
        return Artifact.load(path)
    return compile_artifact(spec, "executorch", "8da4w", max_context=max_context, prompt_lengths=prompt_lengths, cache_dir=cache_dir, verify=True)


def _summary(measurement) -> dict:
    data = measurement.to_dict()
    return {
        "status": data["status"],
        "error": data.get("error"),
        "prefill_ms": {int(k): v["median_ms"] for k, v in data["prefill"].items()},
        "decode_ms": {int(k): v["median_ms"] for k, v in data["decode"].items()},
        "footprint_bytes": (data.get("memory") or {}).get("footprint_bytes"),
        "load_time_s": data.get("load_time_s"),
        "measurement": data,
    }


def main(argv=None) -> int:
    from devices.measure import measure
    from devices.protocol import Protocol
    from lfm2.presets import LFM2_PRESETS

    args = parse_args(argv)
    run = BenchRun(NAME, "ExecuTorch: the project's 8da4w LFM2-350M against ExecuTorch's own LFM2 recipe", args, package=__package__)
    prefill = tuple(int(x) for x in args.prefill.split(","))
    decode = tuple(int(x) for x in args.decode.split(","))
    # few runs per point (a 2,048-token prefill of a 350M model takes 10-30 s here): the rounds repeat them
    protocol = Protocol(prompt_lengths=prefill, decode_depths=decode, decode_tokens=8, threads=args.threads, min_runs=3, max_seconds_per_point=5.0)
    spec = LFM2_PRESETS[PRESET]
    # the project's usual context: the longest prompt, or the deepest decode and its tokens
    max_context = protocol.max_context
    ours = project_artifact(spec, max_context, prefill, args.project_artifact, args.cache_dir)
    max_context = ours.max_context  # the recipe gets the same KV-cache length
    pte = args.recipe_pte
    if pte is None:
        checkpoint, params = prepare_checkpoint(args.work, args.hf)
        pte = export_recipe(args.work, checkpoint, params, max_context)
    theirs = wrap_recipe(pte, spec, max_context, prefill, args.work / "recipe-artifact")
    programs = {"project": ours, "recipe": theirs}
    rounds: dict[str, list[dict]] = {name: [] for name in programs}
    for number in range(args.rounds):
        for name, artifact in programs.items():
            log(f"[{NAME}] round {number + 1}/{args.rounds}: {name} ({artifact.path})")
            result = _summary(measure(artifact, protocol))
            log(f"[{NAME}]   {result['status']} footprint {mib(result['footprint_bytes'])} prefill {result['prefill_ms']} decode {result['decode_ms']}")
            rounds[name].append(result)
    sizes = {name: artifact.size_bytes for name, artifact in programs.items()}
    run.save({"protocol": protocol.to_dict(), "max_context": max_context, "artifacts": {name: str(a.path) for name, a in programs.items()}, "sizes": sizes, "rounds": rounds})
    run.finish(render(rounds, sizes, prefill, decode, max_context), "python -m bench.experiments.executorch_recipe")
    return 0


def _point(results: list[dict], kind: str, point: int) -> list[float]:
    return [r[f"{kind}_ms"][point] for r in results if point in r.get(f"{kind}_ms", {})]


def render(rounds: dict[str, list[dict]], sizes: dict[str, int], prefill: tuple[int, ...], decode: tuple[int, ...], max_context: int) -> str:
    how = (
        f"How: LFM2-350M, seeded random weights (seed 0), context {max_context}. The project's artifact is "
        "`devices.compile(spec, 'executorch', '8da4w')`; the recipe's is `export_llm` with ExecuTorch's "
        f"`{CONFIG}` (model class `{MODEL_CLASS}`, `max_seq_length` {RECIPE_MAX_SEQ_LEN}, the same context), from the "
        "same weights via `lfm2-nas export --to hf` and ExecuTorch's `convert_weights`. Both measured by "
        "`devices.measure` in fresh processes, alternately, "
        f"{len(next(iter(rounds.values())))} rounds each; figures are the medians of the rounds' medians; "
        "ratio = project / recipe throughput (> 1: the project is faster), or recipe / project bytes (> 1: the project is smaller)."
    )
    headers = ["", "project 8da4w", "ExecuTorch recipe q8da4w", "ratio"]
    rows = [["file", mib(sizes["project"]), mib(sizes["recipe"]), f"{sizes['recipe'] / sizes['project']:.2f}x"]]
    feet = {name: [r["footprint_bytes"] for r in results if r.get("footprint_bytes")] for name, results in rounds.items()}
    if feet["project"] and feet["recipe"]:
        a, b = median(feet["project"]), median(feet["recipe"])
        rows.append(["footprint (peak RSS growth)", mib(a), mib(b), f"{b / a:.2f}x"])
    for kind, points, unit in (("prefill", prefill, "prefill {} tok/s"), ("decode", decode, "decode @{} tok/s")):
        for point in points:
            ours, theirs = _point(rounds["project"], kind, point), _point(rounds["recipe"], kind, point)
            if not ours or not theirs:
                rows.append([unit.format(point), "-", "-", "-"])
                continue
            tokens = point if kind == "prefill" else 1  # a prefill point processes `point` tokens, a decode step one
            ours_m, theirs_m = median(ours), median(theirs)
            rows.append([unit.format(point), f"{tokens / ours_m * 1e3:.1f}", f"{tokens / theirs_m * 1e3:.1f}", f"{theirs_m / ours_m:.2f}x"])
    per_round = []
    for name, results in rounds.items():
        for number, r in enumerate(results):
            per_round.append([name, number + 1, r["status"], mib(r["footprint_bytes"])] + [f"{r['prefill_ms'].get(p, float('nan')):.0f}" for p in prefill] + [f"{r['decode_ms'].get(d, float('nan')):.1f}" for d in decode])
    detail = markdown_table(["program", "round", "status", "footprint"] + [f"prefill {p} ms" for p in prefill] + [f"decode @{d} ms" for d in decode], per_round)
    return "\n\n".join([how, markdown_table(headers, rows), "<details><summary>Every round</summary>\n\n" + detail + "\n\n</details>"])


if __name__ == "__main__":
    raise SystemExit(main())
