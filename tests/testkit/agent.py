"""Helpers for the device agent tests: small artifacts, hand-crafted (hostile) bundles,
a short measurement protocol, and reading an agent's devices and jobs back.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx

from devices.artifact import Artifact, write_manifest
from devices.protocol import Protocol
from lfm2.spec import ArchSpec

TINY_SPEC = ArchSpec(vocab_size=256, d_model=64, layers=("conv", "attn"), n_heads=2, n_kv_heads=1, ffn_dim=128)
#: A measurement of a tiny candidate that takes seconds (test_agent_service, test_agent_e2e).
PROTOCOL = Protocol(prompt_lengths=(16,), decode_depths=(8,), decode_tokens=4, warmup_runs=0, min_runs=1, max_runs=2, max_seconds_per_point=1.0, max_remeasures=0)


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


def list_devices(monkeypatch, config) -> dict[str, dict]:
    """`lfm2-nas devices list --json` against the registry `config`, rows by device name."""
    from typer.testing import CliRunner  # here: the modules that need only the helpers above import no CLI

    from devices.agent_cli import devices_app

    monkeypatch.setenv("LFM2_NAS_CONFIG", str(config))
    result = CliRunner().invoke(devices_app, ["list", "--json", "--timeout", "5"])
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in map(json.loads, result.output.splitlines())}


def check_one_at_a_time_in_order(jobs: list[dict]) -> None:
    """Jobs (in submission order) ran one after another, each started once and done once."""
    started = sorted(jobs, key=lambda job: job["started_at"])
    assert [job["job_id"] for job in started] == [job["job_id"] for job in jobs], "FIFO order broken"
    for before, after in zip(started, started[1:]):
        assert before["finished_at"] <= after["started_at"], f"{before['job_id']} and {after['job_id']} overlapped"
    for job in jobs:
        assert [e["event"] for e in job["events"]].count("done") == 1
