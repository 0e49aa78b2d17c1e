"""Where a study lives: the embedded SQLite default, any RDB URL, or a JournalStorage file.

Storage has one home, `nas.study_schema` (one `open_storage`, one rule: only the command
that starts a search creates storage); these names stay importable from here for code
written before it.

Only the search driver opens storage for writing (see DESIGN.md, "The loop"): workers and
agents return plain data, so SQLite is safe as the default.
"""

from __future__ import annotations

from nas.study_schema import DEFAULT_STORAGE, JOURNAL_SUFFIXES, STORAGE_FORMS, missing_sqlite_file, open_storage
from nas.study_schema import load_study as load_existing_study


def describe_storage_forms() -> str:
    return STORAGE_FORMS


__all__ = ["DEFAULT_STORAGE", "JOURNAL_SUFFIXES", "open_storage", "load_existing_study", "describe_storage_forms", "missing_sqlite_file"]
