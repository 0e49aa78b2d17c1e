"""`lfm2-nas report`, `lfm2-nas dashboard` and `lfm2-nas pick`.

Exit status: 0 done; 1 `pick` found no architecture within the limits (a valid question
with no answer, as `grep` finding nothing); 2 bad input (a flag, a missing study, a bad
storage URL), raised as `UserError` and printed by `nas.cli`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lfm2.errors import UserError
from reports.defaults import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_REFRESH_S

# The commands import what they run (Optuna, plotly, the dashboard's server) when they run:
# `lfm2-nas --help` imports this module and must not pay for them.

EXIT_NOTHING_MEETS_LIMITS = 1

_STUDY = typer.Option(..., "--study", help="The study name the search used (--study of `lfm2-nas search`).")
_STORAGE = typer.Option(None, "--storage", help="Where the study lives: sqlite:///FILE.db (default sqlite:///lfm2-nas.db), an RDB URL, or a journal file PATH.log.")


def report_command(
    study: str = _STUDY,
    storage: Optional[str] = _STORAGE,
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write (self-contained: opens with no network)."),
) -> None:
    """Write a self-contained HTML report: Pareto fronts, hypervolume, the Pareto set, layouts, device facts."""
    if not out.parent.is_dir():  # checked before the study is read: a typo in the folder costs nothing
        raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it (mkdir -p {out.parent}) or choose another --out")
    from reports.html import write_report
    from reports.study_data import load_study_data

    data = load_study_data(study, storage)
    path = write_report(data, out)
    counts = data.outcome_counts()
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): study {study!r}, {len(data.trials)} trials ({summary}), {len(data.pareto_numbers)} in the Pareto set")


def dashboard_command(
    study: str = _STUDY,
    storage: Optional[str] = _STORAGE,
    port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65535, help="TCP port to listen on (0: any free port)."),
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on; the default is this machine only."),
    refresh: float = typer.Option(DEFAULT_REFRESH_S, "--refresh", help="Seconds between the page's checks for new trials."),
) -> None:
    """Serve a live report page that updates as trials complete (Ctrl-C stops it)."""
    from reports.dashboard import serve

    def ready(url: str) -> None:
        typer.echo(f"dashboard of study {study!r} at {url} (Ctrl-C to stop)")
        sys.stdout.flush()

    serve(study, storage, host=host, port=port, refresh_s=refresh, on_ready=ready)


def pick_command(
    study: str = _STUDY,
    storage: Optional[str] = _STORAGE,
    max_decode_ms: Optional[float] = typer.Option(None, "--max-decode-ms", help="Most decode latency per token, ms (median)."),
    max_prefill_ms: Optional[float] = typer.Option(None, "--max-prefill-ms", help="Most prefill latency at the search's context, ms (median)."),
    max_memory: Optional[str] = typer.Option(None, "--budget", "--max-memory", help="Most peak memory (footprint), e.g. 500MB, 1.5GiB, 800M: the name `search --budget` gives the same bound (--max-memory is the old name)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with the full ArchSpec) instead of a table."),
) -> None:
    """The best-quality architecture within the limits (lowest decode latency for --quality none studies).

    Exits 1 and says which limit nothing meets when no architecture qualifies."""
    from reports.pick import Limits, pick
    from reports.sizes import format_bytes, parse_size
    from reports.study_data import load_study_data

    limits = Limits(max_decode_ms=max_decode_ms, max_prefill_ms=max_prefill_ms, max_memory_bytes=parse_size(max_memory, "--budget", require_unit=True) if max_memory is not None else None)
    result = pick(load_study_data(study, storage), limits)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), sort_keys=True))
    elif result.trial is not None:
        t = result.trial
        typer.echo(f"study {study!r}: {result.message}")
        table = Table(show_header=False)
        rows = [
            ("trial", str(t.number) + (f" ({t.preset})" if t.preset else "")),
            ("layout", t.layout or "–"),
            ("spec key", t.spec_key or "–"),
            ("parameters", f"{t.params:,}" if t.params is not None else "–"),
            ("quality", f"{t.quality:.4f}" if t.quality is not None else "–"),
            ("prefill", f"{t.prefill_ms:.2f} ms"),
            ("decode", f"{t.decode_ms:.3f} ms/token"),
            ("peak memory", format_bytes(t.footprint_bytes)),
        ]
        if t.devices:  # several devices: the figures above are the slowest / largest; each device's own:
            rows[5:8] = [(k + " (worst device)", v) for k, v in rows[5:8]]
            for name, record in t.devices.items():
                figures = (record.get("prefill_ms"), record.get("decode_ms"))
                shown = f"{figures[0]:.2f} ms prefill, {figures[1]:.3f} ms/token, " if None not in figures else ""
                rows.append((f"on {name}", shown + f"{format_bytes(record.get('footprint_bytes'))}, {record.get('status') or '–'}"))
        for key, value in rows:
            table.add_row(key, value)
        Console(width=max(Console().width, 120)).print(table)
        typer.echo("the full ArchSpec: add --json")
    else:
        Console(stderr=True).print(f"[bold]nothing meets the limits:[/] {result.message}", highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(EXIT_NOTHING_MEETS_LIMITS)


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
    app.command("dashboard")(dashboard_command)
    app.command("pick")(pick_command)


__all__ = ["register", "EXIT_NOTHING_MEETS_LIMITS"]
