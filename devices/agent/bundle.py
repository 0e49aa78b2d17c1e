"""Artifact bundles: an artifact folder as one uncompressed tar, named by its sha256.

`pack_bundle` writes exactly the files the manifest lists plus `manifest.json`, sorted,
with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same artifact always gives
the same bytes and the same hash: a client can ask an agent "do you have <sha256>?"
before sending anything.

`extract_bundle` is the receiving side and trusts nothing: it reads the tar member by
member and refuses absolute paths, `..`, odd characters, links of either kind, devices,
FIFOs, sparse files and duplicates; it writes only regular files, each created fresh
(O_EXCL | O_NOFOLLOW) inside a new folder, so nothing can point outside it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from devices.artifact import MANIFEST, MAX_MANIFEST_BYTES, Artifact, ArtifactError, check_manifest_paths
from devices.artifact import check_member_name as _check_artifact_member
from lfm2.errors import UserError

#: A short name (key, backend, quant): what compile writes, nothing a shell or OS treats specially.
_SAFE_PART = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,254}$")
MAX_MEMBERS = 10_000
#: Errors that mean "no room": the caller reports them as such (HTTP 507), not as a bad bundle.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_CHUNK = 1 << 20


class BundleError(UserError):
    """A bundle is malformed or unsafe: refused, nothing of it kept."""


def bundle_members(artifact: Artifact) -> list[str]:
    """The files a bundle holds: the manifest's files and the manifest, sorted."""
    names = sorted(set(artifact.files) | {MANIFEST})
    for name in names:
        check_member_name(name)
    return names


def check_member_name(name: str) -> PurePosixPath:
    """The relative path `name` stands for, or `BundleError` if it could escape or confuse
    (the same rule as `devices.artifact.check_member_name`, which every load applies)."""
    try:
        return _check_artifact_member(name)
    except ArtifactError as exc:
        raise BundleError(f"bundle {exc}") from None


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, target: BinaryIO):
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)


def pack_bundle(artifact: Artifact | str | Path, out: BinaryIO) -> tuple[str, int]:
    """Write the bundle of `artifact` to the binary file `out`; return (sha256, bytes)."""
    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact, verify=False)
    writer = _HashingWriter(out)
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in bundle_members(artifact):
            source = artifact.path / name
            if source.is_symlink() or not source.is_file():
                raise BundleError(f"{source} is not a regular file; an artifact holds regular files only (compile it again)")
            info = tarfile.TarInfo(name)
            info.size = source.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(source, "rb") as handle:
                tar.addfile(info, handle)
    return writer.digest.hexdigest(), writer.size


def bundle_bytes(artifact: Artifact | str | Path) -> tuple[str, bytes]:
    """The whole bundle in memory (small artifacts and tests); (sha256, bytes)."""
    buffer = io.BytesIO()
    sha, _ = pack_bundle(artifact, buffer)
    return sha, buffer.getvalue()


def check_manifest(manifest: dict) -> None:
    """Refuse a manifest whose fields are not what `devices.artifact.write_manifest` writes.

    `Artifact.load` checks that the fields exist and the files match their hashes; this
    checks what they hold, so that a stored artifact always describes itself within the
    API's schema and reaches `measure` as a sound request (a bundle is made by hand as
    easily as by `pack_bundle`)."""
    from devices.artifact import check_backend_quant
    from lfm2.spec import ArchSpec

    def refuse(field: str, what: str) -> BundleError:
        return BundleError(f"the bundle's {MANIFEST}: {field!r} must be {what}, got {str(manifest.get(field))[:80]!r}; compile the artifact again")

    def positive_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 40

    for field in ("key", "backend", "quant"):
        if not isinstance(manifest[field], str) or not _SAFE_PART.match(manifest[field]):
            raise refuse(field, "a short name of [A-Za-z0-9._+=-]")
    if not isinstance(manifest.get("spec_key", ""), str):
        raise refuse("spec_key", "a string")
    if not positive_int(manifest["max_context"]):
        raise refuse("max_context", "a positive integer")
    lengths = manifest["prompt_lengths"]
    if not isinstance(lengths, list) or len(lengths) > 1024 or not all(positive_int(n) for n in lengths):
        raise refuse("prompt_lengths", "a list of positive integers")
    try:
        check_manifest_paths(manifest)
    except ArtifactError as exc:
        raise BundleError(f"the bundle's {exc}") from None
    try:
        check_backend_quant(manifest["backend"], manifest["quant"])
        ArchSpec.from_dict(manifest["spec"])
    except UserError as exc:
        raise BundleError(f"the bundle's {MANIFEST} does not describe an artifact this agent can measure: {exc}") from None


def extract_bundle(tar_path: str | Path, dest: str | Path) -> Artifact:
    """Unpack the bundle at `tar_path` into the new folder `dest` and verify the artifact.

    `dest` must not exist. Raises `BundleError` for anything unsafe or malformed and
    `ArtifactError` when the files do not match the manifest; `OSError` (disk full)
    passes through. On any error the caller removes `dest`.
    """
    dest = Path(dest)
    dest.mkdir(mode=0o755)
    written: set[str] = set()
    try:
        tar = tarfile.open(tar_path, mode="r:")  # "r:": uncompressed only, no decompression bombs
    except tarfile.TarError as exc:
        raise BundleError(f"the upload is not an uncompressed tar ({exc}); pack it with devices.agent.bundle.pack_bundle") from None
    with tar:
        try:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise BundleError(f"bundle has more than {MAX_MEMBERS} members; refused")
                relative = check_member_name(member.name)
                key = relative.as_posix()
                if key in written:
                    raise BundleError(f"bundle member {member.name!r} appears twice; refused")
                if member.isdir():
                    (dest / relative).mkdir(parents=True, exist_ok=True)
                    continue
                if member.issym() or member.islnk():
                    raise BundleError(f"bundle member {member.name!r} is a link (to {member.linkname!r}); bundles may not hold links")
                if not member.isreg() or member.issparse():
                    raise BundleError(f"bundle member {member.name!r} is not a regular file (type {member.type!r}); refused")
                if key == MANIFEST and member.size > MAX_MANIFEST_BYTES:  # refused before a byte of it is parsed
                    raise BundleError(f"the bundle's {MANIFEST} has {member.size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit of a manifest; refused")
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular member always has data
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as handle:
                    while block := source.read(_CHUNK):
                        handle.write(block)
                written.add(key)
        except tarfile.TarError as exc:
            raise BundleError(f"the bundle is a damaged tar ({exc}); upload it again") from None
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise
            # e.g. a member nested under a name that an earlier member made a file
            raise BundleError(f"the bundle cannot be unpacked: {exc.strerror} ({Path(exc.filename or '').name}); refused") from None
    if MANIFEST not in written:
        raise BundleError(f"the bundle has no {MANIFEST}; it is not an artifact bundle")
    try:
        artifact = Artifact.load(dest, verify=True)
        check_manifest(artifact.manifest)
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        if isinstance(exc, UserError):
            raise
        raise BundleError(f"the bundle's {MANIFEST} is malformed ({type(exc).__name__}: {str(exc)[:200]}); compile the artifact again") from None
    extra = sorted(written - set(artifact.files) - {MANIFEST})
    if extra:
        raise BundleError(f"the bundle holds files its manifest does not list: {extra[:5]}; refused")
    return artifact


__all__ = ["BundleError", "pack_bundle", "bundle_bytes", "extract_bundle", "check_manifest", "check_member_name", "bundle_members"]
