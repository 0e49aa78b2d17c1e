"""`lfm2-nas presets`: the LFM2 family at a glance."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from lfm2.presets import PUBLISHED_PARAMETERS, presets


def presets_table() -> list[dict]:
    from lfm2.flops import parameters  # counted from the spec: no torch, no model built

    rows = []
    for name, spec in presets.items():
        rows.append(
            {
                "name": name,
                "layout": spec.layout,
                "layers": spec.n_layers,
                "attention_layers": list(spec.attention_layers),
                "d_model": spec.d_model,
                "parameters": parameters(spec),
                "published_parameters": PUBLISHED_PARAMETERS.get(name),
                "kv_bytes_per_token_fp32": spec.kv_cache_bytes_per_token(4),
                "kv_bytes_per_token_bf16": spec.kv_cache_bytes_per_token(2),
                "key": spec.key,
                "spec": spec.to_dict(),
            }
        )
    return rows


def show_presets(as_json: bool = typer.Option(False, "--json", help="One JSON object per preset, with its full spec.")) -> None:
    """The LFM2 family and the all-attention twins: layout, parameters, KV bytes per token."""
    rows = presets_table()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table(title="LFM2 presets (C conv, A attention)")
    for column in ("name", "layout", "parameters", "KV B/token bf16", "KV B/token fp32", "key"):
        table.add_column(column, justify="right" if column.startswith(("param", "KV")) else "left")
    for row in rows:
        table.add_row(
            row["name"], row["layout"], f"{row['parameters']:,}", f"{row['kv_bytes_per_token_bf16']:,}", f"{row['kv_bytes_per_token_fp32']:,}", row["key"]
        )
    console = Console()
    Console(width=max(console.width, 132)).print(table)  # a pipe reports 80 columns: too narrow for the layouts


def register(app: typer.Typer) -> None:
    app.command("presets")(show_presets)
