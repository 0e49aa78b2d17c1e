"""`nas.workers.materialise`: how a device actor gets an artifact compiled on another node.

A real local Ray (the object store carries the bundle) and a real eager artifact; the
compile summary says it was made on another node, as it would on a cluster."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import ray

from devices.agent.bundle import bundle_bytes
from devices.artifact import Artifact, ArtifactError
from devices.compile import compile
from lfm2.spec import ArchSpec
from nas.workers import RECEIVED_DIR, materialise

SPEC = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)


@pytest.fixture(scope="module")
def local_ray():
    import os

    # Set for this module's Ray only: a variable left set would change later tests' Ray.
    with pytest.MonkeyPatch.context() as patch:
        if "RAY_AUTH_MODE" not in os.environ:
            patch.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/lfm2-nas-ray-transfer")
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture
def remote_compile(tmp_path, local_ray):
    """An artifact compiled 'elsewhere': its folder is deleted once its bundle is in Ray."""
    artifact = compile(SPEC, "eager", "fp32", 32, (8,), cache_dir=tmp_path / "compile-node")
    sha, data = bundle_bytes(artifact)
    summary = {"ok": True, "path": str(artifact.path), "node": "another-node", "bundle_sha256": sha, "key": artifact.key}
    shutil.rmtree(tmp_path / "compile-node")
    return summary, data


def test_an_artifact_from_another_node_is_unpacked_by_its_sha256_and_verified(tmp_path, remote_compile):
    summary, data = remote_compile
    ref = ray.put(data)
    path = materialise(summary, [ref], cache_dir=tmp_path / "device-node")
    assert path == tmp_path / "device-node" / RECEIVED_DIR / summary["bundle_sha256"]
    artifact = Artifact.load(path, verify=True)
    assert artifact.key == summary["key"]
    assert bundle_bytes(artifact)[0] == summary["bundle_sha256"]  # the same bytes as on the compile node
    assert [p.name for p in (tmp_path / "device-node" / RECEIVED_DIR).iterdir()] == [summary["bundle_sha256"]]  # no staging left
    # The second time it is taken from the node's cache, without reading the object store.
    again = materialise(summary, [ray.put(b"not read")], cache_dir=tmp_path / "device-node")
    assert again == path


def test_a_bundle_damaged_in_transit_is_refused(tmp_path, remote_compile):
    summary, data = remote_compile
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(ArtifactError, match="damaged in transit"):
        materialise(summary, [ray.put(bytes(damaged))], cache_dir=tmp_path / "device-node")
    assert not (tmp_path / "device-node" / RECEIVED_DIR / summary["bundle_sha256"]).exists()


def test_a_damaged_local_copy_is_fetched_again(tmp_path, remote_compile):
    summary, data = remote_compile
    path = materialise(summary, [ray.put(data)], cache_dir=tmp_path / "device-node")
    weights = max((p for p in path.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    weights.write_bytes(b"\0" * weights.stat().st_size)  # bit rot on the device node's disk
    again = materialise(summary, [ray.put(data)], cache_dir=tmp_path / "device-node")
    Artifact.load(again, verify=True)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == Artifact.load(again).files[weights.name]["sha256"]
