"""`lfm2-nas predict SPEC --study NAME`: an architecture's latency and footprint predicted
from a study's own measurements (same device, stack and protocol), with intervals."""

from __future__ import annotations

import json
from typing import Optional

import typer

from lfm2.errors import UserError


def predict(
    target: str = typer.Argument(..., help="A preset name (see `lfm2-nas presets`) or a JSON file with an ArchSpec."),
    study: str = typer.Option(..., "--study", help="The study whose measured trials the predictor learns from (its device, backend, quant and context)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="sqlite:///FILE.db (default sqlite:///lfm2-nas.db), an RDB URL, or a journal file PATH.log."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: the prediction, its intervals and the predictor's held-out accuracy."),
) -> None:
    """Predict prefill and decode latency and the footprint of SPEC on a study's device,
    from the study's measurements: each figure with its interval, and the predictor's
    leave-one-out accuracy on those measurements."""
    from devices.bench_cli import load_target
    from nas.predictor import Predictor, observations_from_study
    from nas.storage import load_existing_study

    name, spec = load_target(target)
    loaded = load_existing_study(study, storage)
    observations, meta = observations_from_study(loaded)
    protocol = meta.get("protocol") or {}
    if not protocol.get("prompt_lengths") or not meta.get("backend"):
        raise UserError(f"study {study!r} has no lfm2-nas metadata (protocol, backend): was it written by `lfm2-nas search`?")
    context = meta.get("context") or max(protocol["prompt_lengths"])
    predictor = Predictor.fit(
        observations,
        prompt_tokens=context,
        decode_depth=context,
        backend=meta["backend"],
        quant=meta["quant"],
        context=context + int(protocol.get("decode_tokens", 0)),
    )
    prediction = predictor.predict(spec)
    device = (meta.get("device") or {}).get("name", "?")
    from search_space.costs import parameters

    sizes = [parameters(o.spec) for o in observations]
    outside = not (min(sizes) / 1.5 <= parameters(spec) <= max(sizes) * 1.5)
    warning = (
        f"warning: {name} has {parameters(spec) / 1e6:.1f}M parameters, outside the measured {min(sizes) / 1e6:.1f}-{max(sizes) / 1e6:.1f}M: "
        "the intervals come from held-out errors inside that range and do not cover extrapolation"
        if outside
        else None
    )
    if as_json:
        typer.echo(json.dumps({"target": name, "spec_key": spec.key, "study": study, "device": device, "prediction": prediction.to_dict(), "extrapolated": outside, "predictor": predictor.describe()}, indent=2))
        return
    if warning:
        typer.echo(warning, err=True)
    typer.echo(f"{name} ({spec.layout}) on {device}, {meta['backend']}/{meta['quant']}, context {context}: predicted from {len(observations)} measured trials of {study!r}")
    units = {"prefill_ms": ("prefill", "ms", 1.0), "decode_ms": ("decode per token", "ms", 1.0), "footprint_bytes": ("footprint", "MiB", 2**20)}
    for target_name, value in prediction.values.items():
        label, unit, scale = units[target_name]
        low, high = prediction.intervals[target_name]
        accuracy = predictor.accuracy[target_name]
        typer.echo(
            f"  {label:<17} {value / scale:10.2f} {unit}   90% interval {low / scale:.2f}-{high / scale:.2f} {unit}   "
            f"(held out: {accuracy['within_10pct']:.0%} of {accuracy['n']} within ±10%, median error {accuracy['median_abs_error']:.1%})"
        )


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
