"""Pareto fronts, hypervolume, HTML reports and a live dashboard, read from Optuna studies.

`reports` reads a search's study through Optuna's public API as `docs/study-schema.md`
lays it out, through the schema's one module `nas.study_schema` (the bottom of `nas/`,
which imports only Optuna and `lfm2`); it imports `lfm2` (for `ArchSpec`) and nothing
else of `nas`, and never `devices`.

    from reports import load_study_data, write_report, pick, Limits
    data = load_study_data("my-search", "sqlite:///lfm2-nas.db")
    write_report(data, "report.html")
    pick(data, Limits(max_decode_ms=10, max_memory_bytes=parse_size("500MB"))).trial
"""

from lfm2.lazy import lazy_attributes

# Loaded on first use (PEP 562): Optuna and plotly, which `lfm2-nas --help` (it imports
# `reports.cli`, so this file) must not pay for.
_LAZY = {
    **dict.fromkeys(("ReportSource", "make_server", "serve"), "reports.dashboard"),
    **dict.fromkeys(("render_report", "report_payload", "write_report"), "reports.html"),
    **dict.fromkeys(("front_2d", "hypervolume_history", "reference_point"), "reports.pareto"),
    **dict.fromkeys(("Limits", "PickResult", "pick"), "reports.pick"),
    **dict.fromkeys(("format_bytes", "parse_size"), "reports.sizes"),
    **dict.fromkeys(("StudyData", "TrialRow", "load_study", "load_study_data", "open_storage", "read_study"), "reports.study_data"),
}
__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "StudyData",
    "TrialRow",
    "open_storage",
    "load_study",
    "load_study_data",
    "read_study",
    "reference_point",
    "hypervolume_history",
    "front_2d",
    "report_payload",
    "render_report",
    "write_report",
    "ReportSource",
    "make_server",
    "serve",
    "Limits",
    "PickResult",
    "pick",
    "parse_size",
    "format_bytes",
]
