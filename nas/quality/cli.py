"""`lfm2-nas quality`: score one architecture with a quality proxy, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lfm2.errors import UserError


def quality(
    architecture: str = typer.Argument(..., help="A preset name (see `lfm2-nas presets`) or the path of an ArchSpec JSON file."),
    kind: str = typer.Option("layout", "--kind", help="layout (free, the search's default), mad (mean accuracy on the synthetic suite) or lm (minus bits per byte on stdlib text)."),
    settings: str = typer.Option("cpu_small", "--settings", help="QualitySettings preset: cpu_small (seconds on a CPU) or default (for a GPU)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and the data."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as one JSON object."),
) -> None:
    from lfm2.presets import presets
    from lfm2.spec import ArchSpec
    from nas.quality import QualitySettings, score

    if architecture in presets:
        spec = presets[architecture]
    elif Path(architecture).is_file():
        spec = ArchSpec.from_json(Path(architecture).read_text())
    else:
        raise UserError(f"{architecture!r} is neither a preset ({', '.join(presets)}) nor an ArchSpec JSON file")
    chosen = QualitySettings.named(settings, "--settings")

    def progress(step: int, value: float) -> None:
        if not as_json:
            typer.echo(f"  step {step}: {value:.4f}")

    result = score(spec, kind, device=device, settings=chosen, seed=seed, report=progress)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    d = result.detail
    if kind == "layout":
        features = ", ".join(f"{name} {value:.3g}" for name, value in d["features"].items())
        typer.echo(f"layout score {result.score:.4f}  ({spec.layout}: predicted reference bits per byte {d['predicted_reference_bpb']:.3f}; "
                   f"signal {d['signal_version']}, no training)")
        typer.echo(f"  features: {features}")
        return
    typer.echo(f"{kind} score {result.score:.4f}  ({spec.layout}, proxy d_model {d['proxy_spec']['d_model']}, {d['proxy_parameters']:,} parameters, "
               f"lr {d['lr']}, {d['steps']} steps, {d['wall_s']:.1f} s on {d['device']})")
    for task, accuracy in d.get("task_accuracy", {}).items():
        typer.echo(f"  {task:15s} {accuracy:.3f}  (chance {d['chance'][task]:.3f})")
    if "bpb" in d:
        typer.echo(f"  bits per byte {d['bpb']:.3f} on {d['corpus']['name']} (fingerprint {d['corpus']['fingerprint']}, Python {d['corpus']['python_version']})")


def _help() -> str:
    """The command's help: what each signal costs and how well it ranks layouts. The layout
    signal's figures are read from the fit shipped with it (nas/quality/layout_signal.json:
    plain JSON, so `--help` stays free of torch); the proxies' are BENCHMARKS.md's, measured
    in the same run (bench/results/fidelity_signals23)."""
    data = json.loads((Path(__file__).with_name("layout_signal.json")).read_text())
    held, count = data["fidelity_held_out"], data["fidelity_attention_count"]

    def ci(interval) -> str:
        return f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"

    return f"""Score an architecture with a quality signal and print it (higher is better).

How well each signal ranks layouts (Spearman against references trained on
20x the MAD proxy's tokens; {held['n']} sampled architectures, {held['n_hybrids']} of them hybrids;
bootstrap 95% intervals; BENCHMARKS.md):
  layout (default) {held['spearman']:+.2f} {ci(held['ci95'])}, hybrids {held['spearman_hybrids']:+.2f}; free, no GPU
  attention count  {count['spearman']:+.2f} {ci(count['ci95'])}, hybrids {count['spearman_hybrids']:+.2f}; free
  mad              +0.51 [+0.06, +0.76], hybrids +0.03; ~104 s of an H200
  lm               +0.30 [-0.16, +0.66], hybrids +0.30; ~18 s of an H200
layout is {data['signal_version']}, fitted on {data['fitted_on']['run']} (held-out figures).
No trained proxy measured ranked layouts clearly better than the free
signals, so the search uses layout unless told otherwise."""


def register(app: typer.Typer) -> None:
    app.command("quality", help=_help())(quality)
