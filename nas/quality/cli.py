"""`lfm2-nas quality`: score one architecture with a quality proxy, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lfm2.errors import UserError


def quality(
    architecture: str = typer.Argument(..., help="A preset name (see `lfm2-nas presets`) or the path of an ArchSpec JSON file."),
    kind: str = typer.Option("mad", "--kind", help="mad (mean accuracy on the synthetic suite) or lm (minus bits per byte on stdlib text)."),
    settings: str = typer.Option("cpu_small", "--settings", help="QualitySettings preset: cpu_small (seconds on a CPU) or default (for a GPU)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and the data."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as one JSON object."),
) -> None:
    """Train the architecture's narrow proxy and print its quality score (higher is better)."""
    from lfm2.presets import presets
    from lfm2.spec import ArchSpec
    from nas.quality import QualitySettings, score

    if architecture in presets:
        spec = presets[architecture]
    elif Path(architecture).is_file():
        spec = ArchSpec.from_json(Path(architecture).read_text())
    else:
        raise UserError(f"{architecture!r} is neither a preset ({', '.join(presets)}) nor an ArchSpec JSON file")
    if settings not in ("cpu_small", "default"):
        raise UserError(f"--settings {settings!r}: use cpu_small or default")
    chosen = getattr(QualitySettings, settings)()

    def progress(step: int, value: float) -> None:
        if not as_json:
            typer.echo(f"  step {step}: {value:.4f}")

    result = score(spec, kind, device=device, settings=chosen, seed=seed, report=progress)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    d = result.detail
    typer.echo(f"{kind} score {result.score:.4f}  ({spec.layout}, proxy d_model {d['proxy_spec']['d_model']}, {d['proxy_parameters']:,} parameters, "
               f"lr {d['lr']}, {d['steps']} steps, {d['wall_s']:.1f} s on {d['device']})")
    for task, accuracy in d.get("task_accuracy", {}).items():
        typer.echo(f"  {task:15s} {accuracy:.3f}  (chance {d['chance'][task]:.3f})")
    if "bpb" in d:
        typer.echo(f"  bits per byte {d['bpb']:.3f} on {d['corpus']['name']} (fingerprint {d['corpus']['fingerprint']}, Python {d['corpus']['python_version']})")


def register(app: typer.Typer) -> None:
    app.command("quality")(quality)
