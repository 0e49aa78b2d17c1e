"""`lfm2-nas cache show|prune`: what the compile cache holds, and making room."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from devices.cache_admin import list_artifacts, parse_duration, prune
from devices.compile import default_cache_dir
from lfm2.sizes import format_size, parse_size

cache_app = typer.Typer(help="The compile cache ($LFM2_NAS_CACHE, else ~/.cache/lfm2-nas): show it, prune it.", no_args_is_help=True)


def _root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir().expanduser()


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


@cache_app.command("show")
def show(
    cache_dir: str = typer.Option(None, "--cache-dir", help="The cache's root (default: $LFM2_NAS_CACHE, else ~/.cache/lfm2-nas)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the compiled artifacts, least recently used first, with their sizes."""
    root = _root(cache_dir)
    artifacts = list_artifacts(root)
    if as_json:
        typer.echo(json.dumps({"cache_dir": str(root), "bytes": sum(a.bytes for a in artifacts), "artifacts": [a.to_dict() for a in artifacts]}, indent=1))
        return
    table = Table(title=f"{root / 'artifacts'}: {len(artifacts)} folders, {format_size(sum(a.bytes for a in artifacts))}")
    for column in ("artifact", "backend", "quant", "layout", "size", "last used"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for a in artifacts:
        name = a.name if a.complete else f"{a.name} (incomplete)"
        table.add_row(name, a.backend or "-", a.quant or "-", a.layout or "-", format_size(a.bytes), _when(a.last_used))
    Console().print(table)


@cache_app.command("prune")
def prune_command(
    older_than: str = typer.Option(None, "--older-than", help="Remove artifacts unused for this long: 30d, 12h, 90m ..."),
    max_size: str = typer.Option(None, "--max-size", help="Then remove the least recently used until the rest fit: 20GB, 500MiB ..."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; remove nothing."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="The cache's root (default: $LFM2_NAS_CACHE, else ~/.cache/lfm2-nas)."),
) -> None:
    """Remove compiled artifacts, least recently used first; busy ones (a compile holds their lock) stay.
    A search that needs a removed artifact compiles it again; cached measurements stay."""
    root = _root(cache_dir)
    removed, busy = prune(root, older_than_s=parse_duration(older_than) if older_than else None,
                          max_bytes=parse_size(max_size, "--max-size", require_unit=True) if max_size else None, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for a in removed:
        typer.echo(f"{verb} {a.name} ({a.backend or '?'} {a.quant or ''} {a.layout or ''}, {format_size(a.bytes)}, last used {_when(a.last_used)})")
    for a in busy:
        typer.echo(f"kept {a.name}: in use (its compile lock is held)")
    left = sum(a.bytes for a in list_artifacts(root))
    typer.echo(f"{verb} {len(removed)} artifact(s), {format_size(sum(a.bytes for a in removed))}; the cache holds {format_size(left)}")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")


__all__ = ["register", "cache_app"]
