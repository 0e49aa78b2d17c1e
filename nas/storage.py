"""Where a study lives: the embedded SQLite default, any RDB URL, or a JournalStorage file.

Only the search driver opens storage for writing (see DESIGN.md, "The loop"): workers and
agents return plain data, so SQLite is safe as the default.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from lfm2.errors import UserError

DEFAULT_STORAGE = "sqlite:///lfm2-nas.db"
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")


def describe_storage_forms() -> str:
    return (
        "use sqlite:///PATH.db (the default is sqlite:///lfm2-nas.db in the working directory), "
        "an RDB URL such as postgresql://user@host/db, or a journal file PATH.log / journal:PATH"
    )


def missing_sqlite_file(url: str | None) -> Path | None:
    """The file of a `sqlite:///` URL when it does not exist (opening it would create an
    empty database, under a mistyped name as often as not), else None."""
    url = url or DEFAULT_STORAGE
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if str(path) not in ("", ":memory:") and not path.exists():
            return path
    return None


def open_storage(url: str | None, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Open (and check) the storage named by `url`, raising a `UserError` that says what
    forms are accepted when it cannot be used. Nothing is created for a URL that fails.
    `must_exist`: a command that only reads (or resumes) refuses a SQLite file that does not
    exist instead of creating an empty one."""
    url = url or DEFAULT_STORAGE
    missing = missing_sqlite_file(url) if must_exist else None
    if missing is not None:
        raise UserError(f"storage {url!r}: {missing} does not exist, so it holds no study; check --storage (or run the search first)")
    if url.startswith("journal:") or (url.endswith(JOURNAL_SUFFIXES) and "://" not in url):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"storage {url!r}: folder {path.parent} does not exist; create it or {describe_storage_forms()}")
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    if "://" not in url:
        raise UserError(f"storage {url!r} is not a URL; {describe_storage_forms()}")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) not in ("", ":memory:") and not path.expanduser().resolve().parent.is_dir():
            raise UserError(f"storage {url!r}: folder {path.parent} does not exist; create it or {describe_storage_forms()}")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except ImportError as exc:
        raise UserError(f"storage {url!r} needs a database driver that is not installed ({exc}); install it, or {describe_storage_forms()}") from exc
    except Exception as exc:  # sqlalchemy raises many kinds for an unreachable or malformed URL
        raise UserError(f"cannot open storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}; {describe_storage_forms()}") from exc


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # The driver writes while `lfm2-nas dashboard`/`optuna-dashboard` read: wait for locks.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def load_existing_study(name: str, storage_url: str | None) -> optuna.Study:
    missing = missing_sqlite_file(storage_url)
    if missing is not None:
        raise UserError(f"no study named {name!r}: {missing} does not exist; check --study and --storage (or run the search first)")
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise UserError(f"no study named {name!r} in {storage_url or DEFAULT_STORAGE} (studies there: {known}); check --study and --storage")
    return optuna.load_study(study_name=name, storage=storage)


__all__ = ["DEFAULT_STORAGE", "open_storage", "load_existing_study", "describe_storage_forms", "missing_sqlite_file"]
