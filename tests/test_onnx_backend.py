"""The ONNX Runtime backend: export through devices.compile (which checks every artifact
against eager), one shared weights file, a growing K/V cache whose decode matches the
static-buffer eager model at any depth, and a measurement of an ONNX artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from devices.artifact import Artifact
from devices.backends import open_runner
from devices.compile import compile
from devices.measure import measure
from devices.protocol import Limits, Protocol
from lfm2.model import build_model
from lfm2.spec import ArchSpec

# conv, full attention and sliding-window attention: every kind of state
TINY = ArchSpec(vocab_size=256, d_model=32, layers=("conv", "attn", "swa"), n_heads=2, n_kv_heads=1, ffn_dim=64, swa_window=6)
MAX_CONTEXT = 24


@pytest.fixture(autouse=True)
def private_core_locks(tmp_path_factory, monkeypatch):
    """Measurements lock their cores host-wide; these tests assert no timing, so they take
    locks of their own instead of queueing behind other suites' measurements."""
    monkeypatch.setenv("LFM2_NAS_LOCKS", str(tmp_path_factory.getbasetemp() / "core-locks"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fp32_artifact(cache):
    return compile(TINY, "onnx", "fp32", MAX_CONTEXT, (4, 16), cache_dir=cache)


def _external_locations(path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"}


def _check_artifact(artifact: Artifact) -> None:
    manifest = artifact.manifest
    assert manifest["verification"]["passed"]
    assert set(artifact.files) == {"prefill.onnx", "decode.onnx", "weights.bin", "weights_index.json"}
    assert manifest["decode_cost_follows_context"] is True and manifest["weights_stored_once"] is True
    for name in ("prefill.onnx", "decode.onnx"):
        assert _external_locations(artifact.file(name)) == {"weights.bin"}
    sharing = manifest["onnx"]["weights_sharing"]
    assert sharing["stored_bytes"] < sharing["referenced_bytes"]  # both graphs point at one copy
    assert {"export_prefill", "export_decode", "pack_weights"} <= set(manifest["stages_s"])


def test_fp32_export_is_checked_against_eager_and_stores_weights_once(fp32_artifact):
    _check_artifact(fp32_artifact)
    assert fp32_artifact.manifest["verification"]["max_abs_diff"] <= fp32_artifact.manifest["verification"]["tolerance"]["max_abs_diff"]


@pytest.mark.slow
def test_int8_export_is_checked_against_eager(cache):
    artifact = compile(TINY, "onnx", "int8", MAX_CONTEXT, (4, 16), cache_dir=cache)
    _check_artifact(artifact)
    verification = artifact.manifest["verification"]
    assert verification["min_cosine"] >= 0.98
    assert artifact.manifest["onnx"]["quantization"]["weight_type"] == "QInt8"
    fp32 = compile(TINY, "onnx", "fp32", MAX_CONTEXT, (4, 16), cache_dir=cache)
    assert artifact.file("weights.bin").stat().st_size < fp32.file("weights.bin").stat().st_size


def test_the_same_request_returns_the_cached_artifact(fp32_artifact, cache):
    again = compile(TINY, "onnx", "fp32", MAX_CONTEXT, (4, 16), cache_dir=cache)
    assert again.path == fp32_artifact.path and again.manifest["compile_s"] == fp32_artifact.manifest["compile_s"]


def test_prefill_and_decode_at_any_depth_match_eager(fp32_artifact):
    """A decode at depth P after reset() sees P zero cache entries: what the static
    buffer of the eager model holds there (the growing cache is cut or padded to P)."""
    model = build_model(TINY, seed=0).eval()
    rng = np.random.default_rng(1)
    with open_runner(fp32_artifact, threads=1) as runner, torch.no_grad():
        tokens = rng.integers(0, TINY.vocab_size, size=(1, 11), dtype=np.int64)  # a length not compiled for: dynamic
        got = runner.prefill(tokens)
        want, *state = model.step(torch.from_numpy(tokens), torch.tensor([0]), *model.init_state(1, max_context=MAX_CONTEXT))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        for pos in (11, 12):
            token = rng.integers(0, TINY.vocab_size, size=(1, 1), dtype=np.int64)
            want, *state = model.step(torch.from_numpy(token), torch.tensor([pos]), *state)
            np.testing.assert_allclose(runner.decode(token, pos), want.numpy(), atol=1e-4)
        for depth in (1, 9, MAX_CONTEXT - 1):
            runner.reset()
            token = np.array([[7]], dtype=np.int64)
            want, *_ = model.step(torch.from_numpy(token), torch.tensor([depth]), *model.init_state(1, max_context=MAX_CONTEXT))
            np.testing.assert_allclose(runner.decode(token, depth), want.numpy(), atol=1e-4)
        with pytest.raises(ValueError, match="max_context"):
            runner.decode(token, MAX_CONTEXT)


def test_runner_reports_its_stack(fp32_artifact):
    import onnxruntime

    with open_runner(fp32_artifact, threads=1) as runner:
        facts = runner.stack()
    assert facts["onnxruntime"] == onnxruntime.__version__ and facts["providers"] == ["CPUExecutionProvider"]
    assert facts["threads"] == 1 and facts["shared_weight_tensors"] > 0


def test_measuring_an_onnx_artifact(fp32_artifact):
    protocol = Protocol(prompt_lengths=(4, 16), decode_depths=(4, 16), decode_tokens=4, min_runs=2, max_runs=4, max_seconds_per_point=0.3)
    m = measure(fp32_artifact, protocol, Limits(threads=1, timeout_s=300))
    assert m.status == "ok", m.error
    assert m.stack["runtime"].startswith("onnxruntime") and m.stack["threads"] == 1
    assert "onnxruntime" in m.memory["modules_in_baseline"]
    assert m.memory["footprint_bytes"] > 0 and m.artifact_bytes == fp32_artifact.size_bytes
    assert all(s > 0 for stats in m.decode.values() for s in stats.samples_ms)


@pytest.mark.slow
def test_a_damaged_model_file_gives_an_error_with_the_runtime_message(fp32_artifact, tmp_path):
    """Files consistent with the manifest (hashes rewritten) but a graph ONNX Runtime
    cannot load: the child fails, the parent returns `error` with the reason."""
    import shutil

    from devices.artifact import write_manifest

    copy = tmp_path / "broken"
    shutil.copytree(fp32_artifact.path, copy)
    (copy / "decode.onnx").write_bytes(b"not an onnx graph")
    manifest = fp32_artifact.manifest
    facts = {k: v for k, v in manifest.items() if k not in ("manifest_version", "key", "spec", "spec_key", "backend", "quant", "max_context", "prompt_lengths", "files", "toolchain")}
    write_manifest(copy, TINY, "onnx", "fp32", MAX_CONTEXT, (4, 16), list(manifest["files"]), **facts)
    protocol = Protocol(prompt_lengths=(4,), decode_depths=(4,), decode_tokens=2, min_runs=1, max_runs=1)
    m = measure(copy, protocol, Limits(timeout_s=300))
    assert m.status == "error"
    assert "decode.onnx" in m.error or "Protobuf" in m.error or "INVALID" in m.error, m.error
    json.loads(m.to_json())
