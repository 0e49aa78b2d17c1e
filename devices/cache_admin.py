"""Looking after the compile cache: what it holds, and pruning it.

A search compiles every candidate once and keeps the artifact (a 350M-parameter fp32 ONNX
model is 1.2 GB), so the cache only grows. Pruning removes whole artifacts, least recently
used first (`compile` touches an artifact's manifest on every cache hit), and never one
whose lock is held: a compile or check in progress keeps its artifact. A search that meets
a pruned artifact compiles it again; measurements and quality scores (results.sqlite) are
kept, since they are small and cost minutes each.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.artifact import MANIFEST
from devices.compile import WORK_PREFIX, artifact_lock, artifact_of_work_folder, lock_path
from lfm2.errors import UserError
from lfm2.spec import ArchSpec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90m', '12h', '30d', '2w' -> seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise UserError(f"cannot read the duration {text!r}: give a number and a unit of s, m, h, d or w, e.g. 30d or 12h")
    return float(match.group(1)) * _UNIT_S[match.group(2).lower()]


@dataclass(frozen=True)
class CachedArtifact:
    name: str
    path: Path
    bytes: int
    last_used: float  # the manifest's mtime: compile touches it on every cache hit
    backend: str | None
    quant: str | None
    layout: str | None
    complete: bool  # False: a work folder or a folder without a manifest

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "bytes": self.bytes, "last_used": self.last_used, "backend": self.backend,
                "quant": self.quant, "layout": self.layout, "complete": self.complete}


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _describe(path: Path) -> CachedArtifact:
    manifest_path = path / MANIFEST
    backend = quant = layout = None
    complete = manifest_path.is_file() and not path.name.startswith(".")
    if complete:
        try:
            manifest = json.loads(manifest_path.read_text())
            backend, quant = manifest.get("backend"), manifest.get("quant")
            layout = ArchSpec.from_dict(manifest["spec"]).layout
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            complete = False
    stamp = manifest_path if manifest_path.is_file() else path
    return CachedArtifact(path.name, path, _folder_bytes(path), stamp.stat().st_mtime, backend, quant, layout, complete)


def list_artifacts(cache_dir: Path) -> list[CachedArtifact]:
    """Every folder under `cache_dir/artifacts`, least recently used first."""
    root = Path(cache_dir) / "artifacts"
    if not root.is_dir():
        return []
    return sorted((_describe(p) for p in root.iterdir() if p.is_dir()), key=lambda a: a.last_used)


def prune(cache_dir: Path, *, older_than_s: float | None = None, max_bytes: int | None = None, dry_run: bool = False,
          now: float | None = None) -> tuple[list[CachedArtifact], list[CachedArtifact]]:
    """Remove artifacts unused for `older_than_s`, then the least recently used until the
    rest fit in `max_bytes`. Returns (removed, skipped because busy); `dry_run` removes nothing."""
    if older_than_s is None and max_bytes is None:
        raise UserError("say what to prune: --older-than (e.g. 30d), --max-size (e.g. 20GB), or both")
    if max_bytes is not None and max_bytes < 0:
        raise UserError(f"--max-size must be >= 0, got {max_bytes}")
    now = time.time() if now is None else now
    artifacts = list_artifacts(cache_dir)
    total = sum(a.bytes for a in artifacts)
    chosen = []
    for artifact in artifacts:  # least recently used first
        too_old = older_than_s is not None and now - artifact.last_used > older_than_s
        too_big = max_bytes is not None and total > max_bytes
        if too_old or too_big:
            chosen.append(artifact)
            total -= artifact.bytes
    removed, busy = [], []
    for artifact in chosen:
        name = artifact_of_work_folder(artifact.name) if artifact.name.startswith(WORK_PREFIX) else artifact.name
        with artifact_lock(lock_path(artifact.path.parent, name), wait=False) as free:
            if not free:
                busy.append(artifact)
                continue
            if not dry_run:
                shutil.rmtree(artifact.path, ignore_errors=True)
            removed.append(artifact)
    return removed, busy


__all__ = ["CachedArtifact", "list_artifacts", "prune", "parse_duration"]
