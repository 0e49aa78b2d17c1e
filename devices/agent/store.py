"""The agent's content-addressed artifact store.

Layout under the workdir:
    artifacts/<sha256>/   a complete, verified artifact (the bundle's sha256 names it)
    tmp/                  uploads in progress and extractions; emptied at every start

An upload streams into `tmp/` while it is hashed and counted; only when the hash
matches, the tar unpacks safely and `Artifact.load` has verified every file is the
folder renamed into `artifacts/`. A rename is atomic, so a folder under `artifacts/`
is always complete: a crash, a full disk or a bad bundle leaves at most litter in
`tmp/`, which is removed, never a half-written artifact that a job could use.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from devices.agent.bundle import DISK_FULL_ERRNOS, BundleError, extract_bundle
from devices.artifact import Artifact, ArtifactError
from lfm2.sizes import format_size
from lfm2.errors import UserError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Room kept free besides the upload itself: the tar and its unpacked copy both need space.
FREE_SPACE_MARGIN = 1 << 20


class UploadError(UserError):
    """An upload was refused; `status` is the HTTP status that says why."""

    status = 400


class UploadTooLarge(UploadError):
    status = 413


class DiskFull(UploadError):
    status = 507


class HashMismatch(UploadError):
    status = 422


class BadBundle(UploadError):
    status = 422


class Upload:
    """One upload in progress: a temp file that hashes, counts and bounds what it gets, and
    that reserves its room on disk (see `ArtifactStore.reserve`) before every write."""

    def __init__(self, path: Path, max_bytes: int, store: ArtifactStore | None = None, declared: int | None = None):
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.declared = declared
        self.digest = hashlib.sha256()
        self._store = store
        self._file = open(path, "xb")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.max_bytes:
            raise UploadTooLarge(f"the upload is larger than this agent's limit of {format_size(self.max_bytes)}; start the agent with a larger --max-upload")
        if self._store is not None:
            self._store.reserve(self, max(self.declared or 0, self.size + len(data)))
        try:
            self._file.write(data)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFull(f"the agent's disk is full ({exc.strerror}) after {format_size(self.size)}; free space in its --workdir and upload again") from None
            raise
        self.digest.update(data)
        self.size += len(data)

    def finish(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFull(f"the agent's disk is full ({exc.strerror}); free space in its --workdir and upload again") from None
            raise
        finally:
            self._file.close()

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # closing a file on a full disk may fail: it is deleted next anyway
        self.path.unlink(missing_ok=True)
        if self._store is not None:
            self._store.release(self)


class ArtifactStore:
    def __init__(self, workdir: Path, max_upload: int):
        self.root = Path(workdir) / "artifacts"
        self.tmp = Path(workdir) / "tmp"
        self.max_upload = max_upload
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Room promised to uploads in progress: what each may still write (the rest of its
        # tar, then its unpacked copy). Free space minus the others' promises is what one
        # upload may count on, so concurrent uploads cannot each see the same free bytes.
        self._reserved: dict[int, int] = {}
        self._reserve_lock = threading.Lock()

    def clean_tmp(self) -> int:
        """Remove what interrupted uploads left behind; returns how many entries."""
        removed = 0
        for entry in self.tmp.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def path(self, sha256: str) -> Path | None:
        if not SHA256.match(sha256):
            return None
        path = self.root / sha256
        return path if path.is_dir() else None

    def has(self, sha256: str) -> bool:
        return self.path(sha256) is not None

    def load(self, sha256: str, verify: bool = False) -> Artifact | None:
        path = self.path(sha256)
        if path is None:
            return None
        try:
            return Artifact.load(path, verify=verify)
        except ArtifactError as exc:  # a damaged stored artifact: say so without the agent's paths
            raise ArtifactError(str(exc).replace(f"{path}/", "").replace(str(path), f"artifact {sha256[:12]}")) from None

    def describe(self, sha256: str) -> dict[str, Any] | None:
        artifact = self.load(sha256)
        if artifact is None:
            return None
        return {
            "sha256": sha256,
            "key": artifact.key,
            "backend": artifact.backend,
            "quant": artifact.quant,
            "spec_key": artifact.manifest.get("spec_key", ""),
            "max_context": artifact.max_context,
            "prompt_lengths": list(artifact.prompt_lengths),
            "bytes": artifact.size_bytes,
        }

    def count(self) -> int:
        return sum(1 for entry in self.root.iterdir() if entry.is_dir())

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_room(self, declared_bytes: int | None) -> None:
        """Refuse early what cannot fit: over the limit (413) or over the free space (507)."""
        if declared_bytes is None:
            return
        if declared_bytes > self.max_upload:
            raise UploadTooLarge(
                f"the upload ({format_size(declared_bytes)}) is larger than this agent's limit of {format_size(self.max_upload)}; start the agent with a larger --max-upload"
            )
        needed = 2 * declared_bytes + FREE_SPACE_MARGIN
        free = self.free_bytes()
        if free < needed:
            raise DiskFull(f"the agent's disk has {format_size(free)} free, the upload needs about {format_size(needed)}; free space in its --workdir")

    def reserve(self, upload: Upload, expected_bytes: int) -> None:
        """Promise `upload` the room it needs once it holds `expected_bytes` (its tar, and its
        unpacked copy); `DiskFull` if the free space, less what other uploads in progress
        were promised, is smaller. Called before each write, so an upload without a
        Content-Length (chunked) is refused as soon as what it sent so far cannot fit twice,
        long before the disk is full."""
        needed = 2 * expected_bytes + FREE_SPACE_MARGIN - upload.size  # what is on disk already is not needed again
        with self._reserve_lock:
            others = sum(room for key, room in self._reserved.items() if key != id(upload))
            free = self.free_bytes()
            if free - others < needed:
                raise DiskFull(
                    f"the agent's disk has {format_size(free)} free ({format_size(others)} of it promised to other uploads); "
                    f"this upload needs about {format_size(needed)} more after {format_size(upload.size)}; free space in its --workdir"
                )
            self._reserved[id(upload)] = needed

    def release(self, upload: Upload) -> None:
        with self._reserve_lock:
            self._reserved.pop(id(upload), None)

    def begin(self, declared_bytes: int | None = None) -> Upload:
        try:
            upload = Upload(self.tmp / f"upload-{uuid.uuid4().hex}.tar", self.max_upload, store=self, declared=declared_bytes)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFull(f"the agent's disk is full ({exc.strerror}); free space in its --workdir") from None
            raise
        try:
            self.reserve(upload, declared_bytes or 0)
        except DiskFull:
            upload.discard()
            raise
        return upload

    def commit(self, upload: Upload, sha256: str) -> tuple[Path, bool]:
        """Verify and install a finished upload; returns (path, created). Always removes the temp file."""
        staging = self.tmp / f"extract-{uuid.uuid4().hex}"
        try:
            upload.finish()
            actual = upload.digest.hexdigest()
            if actual != sha256:
                raise HashMismatch(f"the upload's sha256 is {actual}, not {sha256}: damaged in transit or a wrong name; upload it again")
            if self.has(sha256):
                return self.root / sha256, False
            try:
                extract_bundle(upload.path, staging)
            except (BundleError, ArtifactError) as exc:
                # the staging folder is no business of the client's: name the bundle instead
                raise BadBundle(str(exc).replace(f"{staging}/", "").replace(str(staging), "the bundle")) from None
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    raise DiskFull(f"the agent's disk filled up while unpacking ({exc.strerror}); free space in its --workdir and upload again") from None
                raise
            target = self.root / sha256
            try:
                os.rename(staging, target)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and self.has(sha256):
                    return target, False  # a concurrent upload of the same bundle won
                raise
            return target, True
        finally:
            upload.discard()
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


__all__ = ["ArtifactStore", "Upload", "UploadError", "UploadTooLarge", "DiskFull", "HashMismatch", "BadBundle", "SHA256"]
