"""compile() to ExecuTorch/XNNPACK: a real export, lowering and check against eager for a
tiny conv + attention + sliding-window model. Lowering is slow (tens of seconds per
program on 2 cores), so one fp32 artifact is shared by the default tests and 8da4w is slow."""

from __future__ import annotations

import numpy as np
import pytest

from devices.artifact import Artifact, ArtifactError
from devices.backends import open_runner
from devices.compile import compile, eager_reference
from lfm2.spec import ArchSpec

SPEC = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "swa"), n_heads=4, n_kv_heads=2, ffn_dim=128, swa_window=8, max_seq_len=4096)
MAX_CONTEXT = 64
PROMPT = 16


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory) -> Artifact:
    return compile(SPEC, "executorch", "fp32", MAX_CONTEXT, (PROMPT,), cache_dir=tmp_path_factory.mktemp("cache"))


def test_fp32_artifact_matches_eager_and_records_the_facts(fp32_artifact):
    manifest = fp32_artifact.manifest
    assert list(manifest["files"]) == ["model.pte"]
    assert manifest["methods"] == [f"prefill_{PROMPT}", "decode", "reset"]
    assert {"import", "build", "export", "lower", "serialize"} <= set(manifest["stages_s"])
    assert all(seconds >= 0 for seconds in manifest["stages_s"].values())
    # One XNNPACK partition at least per method that computes; the llama ops run outside.
    assert manifest["partitions"][f"prefill_{PROMPT}"] >= 1 and manifest["partitions"]["decode"] >= 1
    assert "llama.custom_sdpa.default" in manifest["not_delegated_ops"]
    assert "aten.embedding.default" in manifest["not_delegated_ops"]
    assert manifest["decode_cost_follows_context"] is True
    check = manifest["verification"]
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]["max_abs_diff"]
    assert check["top1_agreement"] == 1.0


def test_runner_prefill_decode_reset_and_stack(fp32_artifact):
    tokens = np.random.default_rng(7).integers(0, SPEC.vocab_size, size=(1, PROMPT + 4), dtype=np.int64)
    reference = eager_reference(SPEC, 0, MAX_CONTEXT, tokens, PROMPT)
    with open_runner(fp32_artifact, threads=1) as runner:
        stack = runner.stack()
        assert stack["backend"] == "executorch" and stack["delegate"] == "XNNPACK" and stack["threads"] == 1
        for _ in range(2):  # a second prefill starts again from an empty state
            got = [runner.prefill(tokens[:, :PROMPT])[0]]
            got += [runner.decode(tokens[:, p : p + 1], p)[0] for p in range(PROMPT, PROMPT + 4)]
            assert np.abs(np.stack(got) - reference).max() < 1e-4
        runner.reset()
        assert np.isfinite(runner.decode(tokens[:, :1], 40)).all()
        with pytest.raises(ValueError, match="prefill graphs for \\[16\\]"):
            runner.prefill(tokens[:, :8])
        with pytest.raises(ValueError, match="outside"):
            runner.decode(tokens[:, :1], MAX_CONTEXT)


def test_cache_hit_and_tampered_program(fp32_artifact, monkeypatch):
    import devices.backends.executorch as backend

    monkeypatch.setattr(backend, "export", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recompiled")))
    again = compile(SPEC, "executorch", "fp32", MAX_CONTEXT, (PROMPT,), cache_dir=fp32_artifact.path.parent.parent)
    assert again.path == fp32_artifact.path and again.manifest == fp32_artifact.manifest
    program = fp32_artifact.path / "model.pte"
    data = bytearray(program.read_bytes())
    try:
        data[len(data) // 2] ^= 0xFF
        program.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="sha256"):
            Artifact.load(fp32_artifact.path)
    finally:
        data[len(data) // 2] ^= 0xFF
        program.write_bytes(bytes(data))
    Artifact.load(fp32_artifact.path)


@pytest.mark.slow
def test_8da4w_artifact_is_close_to_eager(tmp_path):
    artifact = compile(SPEC, "executorch", "8da4w", MAX_CONTEXT, (PROMPT, 32), cache_dir=tmp_path)
    manifest = artifact.manifest
    check = manifest["verification"]
    assert check["passed"] and check["min_cosine"] >= check["tolerance"]["min_cosine"]
    assert "quantise" in manifest["stages_s"]
    assert manifest["quantization"]["scheme"] == "8da4w"
    assert manifest["methods"] == [f"prefill_{PROMPT}", "prefill_32", "decode", "reset"]
    # Quantised weights: the program is much smaller than the fp32 parameters.
    assert manifest["files"]["model.pte"]["bytes"] < 4 * manifest["parameters"]
    # No quantisation op was left outside XNNPACK.
    assert not [op for op in manifest["not_delegated_ops"] if "quantize" in op or "choose_qparams" in op]
