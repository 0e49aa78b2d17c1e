"""Results that are never computed twice: measurements and quality scores, on disk.

A measurement is keyed by (spec.key, backend, quant, protocol, device fingerprint,
toolchain versions, and the backend's artifact format and runner revision where revised),
a quality score by the proxy's own key (DESIGN.md, "The loop").
The cache is one SQLite file beside the compiled artifacts, shared by every study on
this machine; only the search driver writes it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """The compile cache's root (`$LFM2_NAS_CACHE`, else `~/.cache/lfm2-nas`): results sit
    beside the artifacts they were measured from."""
    from devices.compile import default_cache_dir

    return default_cache_dir().expanduser()


def measurement_key(spec_key: str, backend: str, quant: str, protocol_key: str, device_fingerprint: str, toolchain: dict[str, str], revision: dict[str, int] | None = None) -> str:
    """`revision`: the backend's artifact format and runner revision
    (`devices.artifact.measurement_revision`), so that a runner change that alters what a
    measurement gives misses the old results; empty or None leaves the key as it was before
    revisions were keyed."""
    payload: list = [spec_key, backend, quant, protocol_key, device_fingerprint, sorted(toolchain.items())]
    if revision:
        payload.append(sorted(revision.items()))
    return "measure-" + hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]


class ResultCache:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_root() / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL, study TEXT, trial INTEGER, created REAL)")
        self._db.commit()

    def get(self, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(value, provenance) for `key`, or None."""
        row = self._db.execute("SELECT value, study, trial, created FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), {"study": row[1], "trial": row[2], "created": row[3]}

    def put(self, key: str, value: dict[str, Any], study: str | None = None, trial: int | None = None) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO results (key, value, study, trial, created) VALUES (?, ?, ?, ?, ?)",
            (key, json.dumps(value, sort_keys=True), study, trial, time.time()),
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


__all__ = ["ResultCache", "cache_root", "measurement_key"]
