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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from lfm2.errors import UserError
from lfm2.spec import ArchSpec

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2

#: Backends and the precisions each one compiles.
QUANTS: dict[str, tuple[str, ...]] = {
    "executorch": ("fp32", "8da4w"),
    "onnx": ("fp32", "int8"),
    "eager": ("fp32",),
}
BACKENDS = tuple(QUANTS)

_TOOLCHAIN_PACKAGES = ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxscript", "numpy")


class ArtifactError(UserError):
    """An artifact folder is missing, incomplete, or does not match its manifest."""


def check_backend_quant(backend: str, quant: str) -> None:
    if backend not in QUANTS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if quant not in QUANTS[backend]:
        raise UserError(f"backend {backend!r} compiles {', '.join(QUANTS[backend])}, not {quant!r}")


def toolchain_versions() -> dict[str, str]:
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
        return self.path / name

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Artifact:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{path} is not an artifact: it has no {MANIFEST} (compile it again with devices.compile)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); the artifact is damaged, compile it again") from exc
        for required in ("spec", "backend", "quant", "max_context", "prompt_lengths", "files", "key"):
            if required not in manifest:
                raise ArtifactError(f"{manifest_path} lacks {required!r}; the artifact is damaged, compile it again")
        artifact = cls(path=path, manifest=manifest)
        if verify:
            artifact.verify()
        return artifact

    def verify(self) -> None:
        """Check that every listed file exists with its recorded size and sha256."""
        for name, entry in self.files.items():
            file = self.path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ArtifactError(f"manifest lists an unsafe file name {name!r}")
            if not file.is_file():
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


__all__ = ["Artifact", "ArtifactError", "BACKENDS", "QUANTS", "MANIFEST", "artifact_key", "check_backend_quant", "toolchain_versions", "write_manifest", "sha256_file"]
