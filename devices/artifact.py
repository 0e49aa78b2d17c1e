"""`Artifact`: a folder with a compiled model and its `manifest.json`.

The manifest says what the files are (spec, backend, quant, max_context, the static
prefill lengths), how they were made (toolchain versions, export time per stage, the
operators XNNPACK did not take) and how far they may be trusted (the check against eager).
Every file is listed with its sha256 and size; `Artifact.load` re-checks them, so a
truncated or tampered artifact is refused before it is run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lfm2.backends import BACKENDS, QUANTS, check_backend_quant
from lfm2.errors import UserError
from lfm2.spec import ArchSpec

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: one computing graph per artifact (ONNX step graph, ExecuTorch forward), prefill in chunks
#: Each backend's artifact layout revision, part of the compile cache key: bump a backend's
#: number when what its compile writes changes without a toolchain version changing, so that
#: no cache (nor a cached refusal) of the old layout is reused.
#: onnx 2: prefill steps of 128 tokens (were 256); llamacpp 2: all-attention stacks with wide
#: heads written as qwen3 (were refused); onnx 3: initialisers named as transformers' Lfm2
#: (`model.layers.0.self_attn.q_proj.weight`, was `...op.q_proj...`), same values;
#: onnx 4: full-attention K/V in one max_context buffer updated in place by
#: GroupQueryAttention (was a growing, concatenated cache), the embedding table in
#: embedding.bin, looked up by the runner (was a Gather in the graph).
#: onnx 5: an int8 artifact's full-attention K/V cache (and its GroupQueryAttention) in fp16.
#: llamacpp 3: every all-attention stack with q/k norm written as qwen3 (as lfm2 with no conv
#: layer, llama_decode aborted).
#: executorch 2: reshapes on the token dimension infer it (-1), so XNNPACK takes them: one
#: small-space forward in 12 delegate partitions (was 48), decode ~0.8x the time, same numbers.
BACKEND_FORMATS = {"eager": 1, "onnx": 5, "executorch": 2, "llamacpp": 3}
#: Each backend's runner revision, part of a cached measurement's key (`measurement_revision`,
#: `nas.cache.measurement_key`): bump a backend's number when its runner changes what a
#: measurement of the same artifact gives (a session option, how state is held) without the
#: artifact or a toolchain version changing, so that no measurement the old runner took is
#: reused as the new one's. A backend absent here was never revised: its keys stay as they were.
#: onnx 2: ONNX Runtime's memory pattern off (`devices.backends.onnx_runner.MEMORY_PATTERN`;
#: LFM2-350M int8 at 2,048 tokens: footprint 453.5 -> 431.7 MiB).
#: onnx 3: one thread pool per measuring process, shared by the candidate's and the anchor's
#: sessions (`devices.backends.onnx_runner.share_threads`): with a pool per session, each
#: run right after the other session's was 20-40% slower, which moved the anchored ratio.
RUNNER_REVISIONS = {"onnx": 3}
#: The largest manifest read: it is checked before the file is parsed (a manifest names
#: files and facts; compile writes a few KiB to tens of KiB). A larger one is refused, so
#: that a hostile manifest cannot make every reader hold hundreds of MiB of parsed JSON.
MAX_MANIFEST_BYTES = 1 << 20

#: Path components an artifact's member names may use: what compile writes, nothing a
#: shell or OS treats specially.
_SAFE_PART = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,254}$")
MAX_MEMBER_DEPTH = 16

#: Manifest fields (dotted paths) that hold member names a runner opens, per backend. Each
#: must be a member name listed in `files`: checked at upload and at every load, and again
#: by `Artifact.file` where a runner joins it onto the folder. A backend that keeps a file
#: name in its manifest facts adds it here.
MANIFEST_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx.step", "onnx.weights", "onnx.weights_index", "onnx.embedding.file"),
}

# Backends and the precisions each one compiles (QUANTS, BACKENDS, check_backend_quant): one
# table, `lfm2.backends`, which the cost model reads too; re-exported here.

_TOOLCHAIN_PACKAGES = ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxscript", "numpy", "gguf", "llama_cpp_python")


class ArtifactError(UserError):
    """An artifact folder is missing, incomplete, or does not match its manifest."""


def check_member_name(name: object) -> PurePosixPath:
    """The relative path that the member name `name` stands for, or `ArtifactError` if it
    could leave the artifact folder or confuse a reader: not a string, absolute, `..`,
    a backslash or NUL, a component outside [A-Za-z0-9._+=-], or nested too deep."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/"):
        raise ArtifactError(f"member name {str(name)[:80]!r} is absolute or malformed; an artifact names its files by relative paths only")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise ArtifactError(f"member name {name[:80]!r} climbs out of the artifact with '..'; refused")
    if not all(_SAFE_PART.match(part) for part in path.parts) or len(path.parts) > MAX_MEMBER_DEPTH:
        raise ArtifactError(f"member name {name[:80]!r} has a path component outside [A-Za-z0-9._+=-] (or is nested too deep); refused")
    return path


def manifest_paths(manifest: dict[str, Any]) -> dict[str, object]:
    """The member names a manifest's backend facts hold, by dotted field (see
    `MANIFEST_PATH_FIELDS`); a field that is absent maps to None."""
    found: dict[str, object] = {}
    for dotted in MANIFEST_PATH_FIELDS.get(manifest.get("backend"), ()):  # type: ignore[arg-type]
        value: object = manifest
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        found[dotted] = value
    return found


def check_manifest_paths(manifest: dict[str, Any]) -> None:
    """Every path a manifest holds is a safe member name listed in its `files` (with a
    hash): the file names themselves, and the backend facts that name files."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"the {MANIFEST}'s 'files' must be an object of name -> {{sha256, bytes}}; compile the artifact again")
    for name, entry in files.items():
        try:
            check_member_name(name)
        except ArtifactError as exc:
            raise ArtifactError(f"the {MANIFEST}'s 'files': {exc}") from None
        if name == MANIFEST:
            raise ArtifactError(f"the {MANIFEST} lists itself among its files; compile the artifact again")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int) or isinstance(entry.get("bytes"), bool):
            raise ArtifactError(f"the {MANIFEST}'s entry for {name!r} must be {{sha256, bytes}}; compile the artifact again")
    for field, value in manifest_paths(manifest).items():
        if value is None:
            continue  # a backend's runner refuses an artifact without its facts, naming them
        try:
            check_member_name(value)
        except ArtifactError as exc:
            raise ArtifactError(f"the {MANIFEST}'s {field!r}: {exc}") from None
        if value not in files:
            raise ArtifactError(f"the {MANIFEST}'s {field!r} names {str(value)[:80]!r}, which is not one of its listed files; compile the artifact again")


def toolchain_versions() -> dict[str, str]:
    from importlib import metadata  # ~50 ms: paid when versions are read, not at every import
    versions = {"python": platform.python_version()}
    for package in _TOOLCHAIN_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def measurement_revision(backend: str) -> dict[str, int]:
    """What besides the toolchain decides a measurement of `backend`'s artifact: its artifact
    format and its runner revision. Empty for a backend whose runner was never revised, so
    that its measurements cached before revisions existed keep their keys."""
    if backend not in RUNNER_REVISIONS:
        return {}
    return {"backend_format": BACKEND_FORMATS.get(backend, 1), "runner": RUNNER_REVISIONS[backend]}


def artifact_key(spec: ArchSpec, backend: str, quant: str, max_context: int, prompt_lengths: tuple[int, ...], toolchain: dict[str, str] | None = None) -> str:
    """The compile cache key: the same inputs and toolchain give the same artifact."""
    payload = {
        "spec": spec.key,
        "backend": backend,
        "quant": quant,
        "max_context": max_context,
        "prompt_lengths": sorted(set(prompt_lengths)),
        "toolchain": toolchain or toolchain_versions(),
        "manifest_version": MANIFEST_VERSION,
        "backend_format": BACKEND_FORMATS.get(backend, 1),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def spec(self) -> ArchSpec:
        return ArchSpec.from_dict(self.manifest["spec"])

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def quant(self) -> str:
        return self.manifest["quant"]

    @property
    def max_context(self) -> int:
        return self.manifest["max_context"]

    @property
    def prompt_lengths(self) -> tuple[int, ...]:
        return tuple(self.manifest["prompt_lengths"])

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def size_bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.files.values())

    def file(self, name: str) -> Path:
        """The path of the member `name`: a safe name, listed in the manifest's `files`
        (so its hash was checked), that resolves inside the artifact folder. Every runner
        opens the artifact's files through this, so a manifest cannot make one read
        anything else (an absolute path would otherwise replace the folder)."""
        check_member_name(name)
        if name not in self.files:
            raise ArtifactError(f"{name!r} is not one of the artifact's listed files; compile it again")
        path = self.path / name
        root = self.path.resolve()
        if not path.resolve().is_relative_to(root):
            raise ArtifactError(f"{name!r} resolves outside the artifact folder (a link?); refused")
        return path

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Artifact:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{path} is not an artifact: it has no {MANIFEST} (compile it again with devices.compile)")
        size = manifest_path.stat().st_size
        if size > MAX_MANIFEST_BYTES:  # before parsing: the size of a parsed JSON is several times its text
            raise ArtifactError(f"{manifest_path} has {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit of a manifest; the artifact is damaged, compile it again")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); the artifact is damaged, compile it again") from exc
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{manifest_path} is not a JSON object; the artifact is damaged, compile it again")
        for required in ("spec", "backend", "quant", "max_context", "prompt_lengths", "files", "key"):
            if required not in manifest:
                raise ArtifactError(f"{manifest_path} lacks {required!r}; the artifact is damaged, compile it again")
        artifact = cls(path=path, manifest=manifest)
        if verify:
            artifact.verify()
        return artifact

    def verify(self) -> None:
        """Check that every path in the manifest is a safe listed member, and that every
        listed file exists with its recorded size and sha256."""
        check_manifest_paths(self.manifest)
        for name, entry in self.files.items():
            file = self.file(name)
            if file.is_symlink() or not file.is_file():
                raise ArtifactError(f"artifact {self.path} is missing {name}; compile it again")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise ArtifactError(f"{file} has {size} bytes, the manifest says {entry['bytes']}: truncated or replaced; compile it again")
            if sha256_file(file) != entry["sha256"]:
                raise ArtifactError(f"{file} does not match its sha256 in the manifest: tampered or corrupted; compile it again")


def write_manifest(path: Path, spec: ArchSpec, backend: str, quant: str, max_context: int, prompt_lengths: tuple[int, ...], files: list[str], **facts: Any) -> Artifact:
    """Hash the listed files and write `manifest.json` last, so that a folder with a
    manifest is a complete artifact (compile writes into a temporary folder and renames)."""
    toolchain = toolchain_versions()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "key": artifact_key(spec, backend, quant, max_context, prompt_lengths, toolchain),
        "spec": spec.to_dict(),
        "spec_key": spec.key,
        "backend": backend,
        "quant": quant,
        "max_context": max_context,
        "prompt_lengths": sorted(set(prompt_lengths)),
        "files": {name: {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size} for name in sorted(files)},
        "toolchain": toolchain,
        **facts,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Artifact(path=path, manifest=manifest)


__all__ = ["Artifact", "ArtifactError", "BACKENDS", "QUANTS", "MANIFEST", "MAX_MANIFEST_BYTES", "MANIFEST_PATH_FIELDS", "check_member_name", "check_manifest_paths", "manifest_paths", "artifact_key", "check_backend_quant", "toolchain_versions", "write_manifest", "sha256_file"]
