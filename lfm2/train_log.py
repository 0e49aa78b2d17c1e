"""A training run's log: `out/train/log.jsonl`, one JSON record per step (`kind` "train":
loss, lr, grad norm, tokens/s, MFU) and per evaluation (`kind` "val"), and the loss curves
drawn from it (`out/train/loss.html`, plotly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run writes the later ones again)."""
    records = [r for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def plot_log(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import plotly.graph_objects as go

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["loss"] for r in train], name="train loss", mode="lines"))
    figure.add_trace(go.Scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], name="validation loss", mode="lines+markers"))
    figure.update_layout(title=title, xaxis_title="step", yaxis_title="cross-entropy (nats/token)", template="plotly_white")
    figure.write_html(str(path), include_plotlyjs=True)


__all__ = ["append_record", "plot_log", "read_log", "truncate_log"]
