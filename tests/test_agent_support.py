"""Helpers for the device agent tests: small artifacts, hand-crafted (hostile) bundles,
and agents started as real processes. This module holds no tests.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx

from devices.artifact import Artifact, write_manifest
from lfm2.spec import ArchSpec

TINY_SPEC = ArchSpec(vocab_size=256, d_model=64, layers=("conv", "attn"), n_heads=2, n_kv_heads=1, ffn_dim=128)


def handmade_artifact(folder: Path, payload: bytes = b"weights" * 100, spec: ArchSpec = TINY_SPEC) -> Artifact:
    """A well-formed artifact folder (manifest + one data file) without compiling anything:
    enough for everything that moves bytes around (bundles, uploads), not for measuring."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(payload)
    return write_manifest(folder, spec, "eager", "fp32", 64, (16,), ["model.bin"])


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An uncompressed tar with exactly these members (for bundles a packer would never make)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def artifact_members(artifact: Artifact) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members of the artifact's honest bundle, to add hostile ones to."""
    names = sorted(set(artifact.files) | {"manifest.json"})
    return [regular(name, (artifact.path / name).read_bytes()) for name in names]


def sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def http(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def read_ready(path: Path) -> dict:
    return json.loads(path.read_text())
