"""`lfm2-nas search` and `lfm2-nas study list|show|pareto|export` (studies read through
`nas.study_schema`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from lfm2.backends import DEFAULT_BACKEND, default_quant
from lfm2.errors import UserError


study_app = typer.Typer(help="Look into stored studies.", no_args_is_help=True)


def search(
    device: str = typer.Option(..., "--device", help="A registered device name, or 'local' for this machine; several separated by commas (pixel8,rpi5,local) measure every candidate on each."),
    budget: str = typer.Option(..., "--budget", help="Memory budget for the model's footprint: 500MB, 1.5GiB, 800M ...; per device: pixel8=500MB,rpi5=1GB."),
    trials: int = typer.Option(20, "--trials", help="Finished trials the study should hold (presets included)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: DEVICE-BACKEND-QUANT)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="sqlite:///FILE.db (default sqlite:///lfm2-nas.db), an RDB URL, or a journal file PATH.log."),
    space: str = typer.Option("default", "--space", help="default, small, lfm2_350m (HF-exportable, around LFM2-350M), or a space file (.toml)."),
    backend: str = typer.Option(DEFAULT_BACKEND, "--backend", help="executorch, onnx or llamacpp."),
    quant: Optional[str] = typer.Option(None, "--quant", help="executorch: 8da4w|fp32; onnx: int8|fp32; llamacpp: q4_0|q8_0|f16 (default: the first, what ships; as bench)."),
    context: int = typer.Option(2048, "--context", help="Prefill length and decode depth the latencies are measured at."),
    quality: str = typer.Option("layout", "--quality", help="layout (free: predicted from the layout, as good as any trained proxy measured; see `lfm2-nas quality --help`), mad (synthetic tasks), lm (bits per byte), or none."),
    quality_settings: str = typer.Option("default", "--quality-settings", help="default (sized for a GPU) or cpu_small."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe (the default: best on the tabular benchmark, BENCHMARKS.md), nsga2, gp or random."),
    seed: int = typer.Option(0, "--seed"),
    in_flight: int = typer.Option(2, "--in-flight", help="Candidates in the pipeline at once."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join an existing Ray cluster (ray start --head) instead of a local one."),
    compile_resource: Optional[str] = typer.Option(None, "--compile-resource", help="Run compiles only on Ray nodes offering this custom resource (ray start --resources '{\"compile\": 4}')."),
    measure_timeout: float = typer.Option(900.0, "--measure-timeout", help="Seconds one measurement may take, queueing on the device included, before that device's result is given up on as lost (an agent that went away is polled until then)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an existing study after a stop or crash."),
    emulate: bool = typer.Option(False, "--emulate", help="Emulate DEVICE's profile (threads, memory cap) on this machine."),
    prescreen: bool = typer.Option(True, "--prescreen/--no-prescreen", help="Once 10 candidates are measured, skip (as 'skipped', not compiled) those the latency/memory predictor says are surely over budget or dominated."),
    processes: int = typer.Option(1, "--processes", help="Fresh processes a measured point may use: the points still less sure than +-2% after one are measured again in another and the figures combined (a decode ratio's spread between measurements is process to process on a shared host: BENCHMARKS.md, \"A point in several processes\"). Each then takes at most 3 s a point instead of 5."),
    loads: Optional[int] = typer.Option(None, "--loads", help="Loads of the model inside each measuring process: every point is timed after each (1.5 s at most each) and the figures combined; where the weights land in memory moves a decode figure from load to load (BENCHMARKS.md, \"Load to load\"). Default: 3, except on phones over adb (1: not supported yet) and as a resumed study was."),
    huge_pages: Optional[bool] = typer.Option(None, "--huge-pages/--no-huge-pages", help="Allocate the measuring processes' memory in transparent huge pages (glibc.malloc.hugetlb=1; the memory pass still counts 4 KiB pages): meant to cut TLB misses and page-placement noise (not shown yet: BENCHMARKS.md, \"Load to load\"). Default: on, except on phones over adb and as a resumed study was."),
    anchor: Optional[bool] = typer.Option(None, "--anchor/--no-anchor", help="Time the space's anchor architecture beside every candidate, sample by sample, and rank by the ratio of their lower quartiles (x the study's anchor reference): the machine's drift between measurements cancels. About doubles the time a point takes. Default: on, except on phones over adb (not supported yet) and as a resumed study was."),
) -> None:
    """Search LFM2-style layouts for the fastest, best models that fit DEVICE's memory budget."""
    from lfm2.sizes import format_size
    from nas.device_list import parse_budgets, parse_devices
    from nas.progress import pareto_table
    from nas.search import SearchConfig, SearchInterrupted, run_search

    budget_bytes, budgets = parse_budgets(budget, parse_devices(device))
    config = SearchConfig(
        device=device, budget_bytes=budget_bytes, budgets=budgets, trials=trials, study=study, storage=storage, space=space,
        backend=backend, quant=quant or default_quant(backend), context=context, quality=quality, quality_settings=quality_settings, sampler=sampler,
        seed=seed, in_flight=in_flight, ray_address=ray_address, resume=resume, emulate=emulate, compile_resource=compile_resource,
        prescreen=prescreen, anchor=anchor, processes=processes, loads=loads, huge_pages=huge_pages,
        measure_timeout_s=measure_timeout,
    )
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says it better
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    console = Console()
    try:
        result = run_search(config, console=console)
    except SearchInterrupted as stop:
        console.print(f"[yellow]stopped by {stop}[/]: in-flight trials were failed and re-enqueued; continue with the same command plus --resume")
        raise typer.Exit(128 + stop.signum) from None
    budget_text = ", ".join(f"{name} {format_size(config.budget_for(name))}" for name in config.devices) if config.multi_device else format_size(config.budget_for(config.devices[0]))
    console.print(pareto_table(result, title=f"Pareto front of {config.study} (budget {budget_text})"))
    storage_flag = f" --storage {storage}" if storage else ""
    console.print(f"report: [bold]lfm2-nas report --study {config.study}{storage_flag} --out {config.study}.html[/]")
    # --to lfm2 exports every winner, sliding-window layers included (the same files as --to hf where Lfm2 can express it).
    console.print(f"export the winners to train them: [bold]lfm2-nas export --study {config.study}{storage_flag} --pareto --to lfm2 winners[/]")


def _device_summaries(record) -> dict | None:
    """A multi-device trial's figures per device (None for a single-device trial)."""
    if not record.devices:
        return None
    keys = ("status", "prefill_ms", "decode_ms", "footprint_bytes", "reason")
    return {name: {k: v for k, v in r.to_attrs().items() if k in keys} for name, r in record.devices.items()}


def _trial_row(trial, names: list[str], with_spec: bool = False) -> dict:
    """One trial as `study show --json` / `study pareto --json` print it (the schema's record;
    a multi-device trial's figures per device under `devices`)."""
    from nas.study_schema import TrialRecord

    record = TrialRecord.read(trial, names)
    devices = _device_summaries(record)
    row = {
        "number": record.number,
        "state": record.state,
        "status": record.written_status,  # as stored: None while the search has written none
        "values": trial.values,
        "layout": record.layout,
        "preset": record.preset,
        "params": record.params,
        "footprint_bytes": record.largest_footprint_bytes,  # several devices: the largest
        "memory_estimate_bytes": record.memory_estimate_bytes,
        "reason": record.reason,
        "spec_key": record.spec_key,
    }
    if devices is not None:
        row["devices"] = devices
    if with_spec:
        row["spec"] = record.spec
    return row


def _metric_cells(row: dict, metrics: list[str]) -> list[str]:
    """One cell per objective; a multi-device trial that has no values (a device failed,
    or the pre-filter kept it off one) shows what the other devices measured."""
    if row["values"]:
        return [f"{v:.4g}" for v in row["values"]]
    cells = []
    for metric in metrics:
        name, _, device = metric.partition("@")
        value = ((row.get("devices") or {}).get(device) or {}).get(name) if device else None
        cells.append(f"{value:.4g}" if isinstance(value, (int, float)) else "-")
    return cells


@study_app.command("list")
def study_list(storage: Optional[str] = typer.Option(None, "--storage"), as_json: bool = typer.Option(False, "--json")) -> None:
    """The studies in a storage, with their trial counts."""
    import optuna

    from nas.study_schema import DEFAULT_STORAGE, open_storage

    summaries = optuna.get_all_study_summaries(open_storage(storage), include_best_trial=False)
    rows: list[dict[str, Any]] = [{"study": s.study_name, "trials": s.n_trials, "directions": [d.name.lower() for d in s.directions], "started": str(s.datetime_start)} for s in summaries]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no studies in {storage or DEFAULT_STORAGE}")
    for row in rows:
        typer.echo(f"{row['study']}: {row['trials']} trials ({', '.join(row['directions'])})")


@study_app.command("show")
def study_show(study: str = typer.Option(..., "--study"), storage: Optional[str] = typer.Option(None, "--storage"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Every trial of a study: status, values, layout, memory, reason."""
    from nas.study_schema import StudyMetadata, load_study, metric_names

    loaded = load_study(study, storage)
    names = metric_names(loaded)
    rows = [_trial_row(t, names) for t in loaded.get_trials(deepcopy=False)]
    if as_json:
        metadata = StudyMetadata.read(loaded)
        typer.echo(json.dumps({"study": study, "metadata": metadata.to_attrs() if metadata.written else None, "metric_names": loaded.metric_names, "trials": rows}, indent=2, default=str))
        return
    from rich.table import Table

    # one labelled column per objective (the names the search stored), not an unnamed list
    metrics = loaded.metric_names or [f"objective {i}" for i in range(len(loaded.directions))]
    table = Table(title=f"{study}: {len(rows)} trials")
    for column in ("#", "state", "status", "layout", *metrics, "footprint MiB", "reason"):
        table.add_column(column, justify="right" if column in metrics else "left")
    for row in rows:
        values = _metric_cells(row, list(metrics))
        footprint = f"{row['footprint_bytes'] / 2**20:.0f}" if row["footprint_bytes"] else "-"
        table.add_row(str(row["number"]), row["state"], row["status"] or "", (row["preset"] or "") + " " + (row["layout"] or ""), *values, footprint, (row["reason"] or "")[:80])
    Console(width=160).print(table)


EXPORT_FORMATS = ("csv", "parquet", "json")


@study_app.command("export")
def study_export(
    study: str = typer.Option(..., "--study"),
    storage: Optional[str] = typer.Option(None, "--storage"),
    fmt: str = typer.Option("csv", "--format", help="csv, parquet (needs pyarrow) or json (one object per trial, a JSON array)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The file to write (its folder must exist). Default: standard output (csv and json only)."),
) -> None:
    """Every trial of a study as one table (pandas): number, state, status, layout,
    objectives, footprint, estimate, reason ... one row per trial."""
    from nas.study_schema import load_study, trials_table

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "parquet":
        if out is None:
            raise UserError("--format parquet writes a binary file: give --out FILE.parquet")
        try:
            import pyarrow  # noqa: F401  (pandas writes Parquet through it)
        except ImportError:
            raise UserError('--format parquet needs pyarrow, which is not installed: pip install -e ".[parquet]" (pyarrow, pinned), or use --format csv or json') from None
    if out is not None and not out.expanduser().resolve().parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it first")
    table = trials_table(load_study(study, storage))
    if fmt == "parquet":
        table.to_parquet(out)
    elif fmt == "csv":
        text = table.to_csv()
    else:
        text = table.reset_index().to_json(orient="records", indent=2, double_precision=15) + "\n"
    if fmt != "parquet":
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text)
    if out is not None:
        Console(stderr=True).print(f"wrote {len(table)} trials of {study} to {out}", highlight=False)


@study_app.command("pareto")
def study_pareto(study: str = typer.Option(..., "--study"), storage: Optional[str] = typer.Option(None, "--storage"), as_json: bool = typer.Option(False, "--json")) -> None:
    """The Pareto set of the feasible trials."""
    from nas.progress import pareto_table
    from nas.study_schema import load_study, metric_names

    loaded = load_study(study, storage)
    if as_json:
        names = metric_names(loaded)
        typer.echo(json.dumps([_trial_row(t, names, with_spec=True) for t in loaded.best_trials], indent=2))
        return
    Console(width=160).print(pareto_table(loaded))


def register(app: typer.Typer) -> None:
    app.command("search")(search)
    app.add_typer(study_app, name="study")


__all__ = ["register"]
