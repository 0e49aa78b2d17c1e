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

from reports.dashboard import ReportSource, make_server, serve
from reports.html import render_report, report_payload, write_report
from reports.pareto import front_2d, hypervolume_history, reference_point
from reports.pick import Limits, PickResult, pick
from reports.sizes import format_bytes, parse_size
from reports.study_data import StudyData, TrialRow, load_study, load_study_data, open_storage, read_study

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
