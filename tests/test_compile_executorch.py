"""compile() to ExecuTorch/XNNPACK: a real export, lowering and check against eager for a
tiny conv + attention + sliding-window model. Lowering is slow (tens of seconds per
program on 2 cores), so one fp32 artifact is shared by the default tests and 8da4w is slow.

The program has one computing method, `forward(tokens [1, T <= chunk], pos)`: a prefill is a
loop of chunks through it, so prompts that are not a multiple of the chunk (and longer than
one chunk) are what the tests run."""

from __future__ import annotations

import numpy as np
import pytest

from devices.artifact import Artifact, ArtifactError
from devices.backends import open_runner
from devices.backends.executorch import PREFILL_CHUNK
from devices.compile import VerificationError, compare_logits, compile, eager_reference, reference_model, step_logits
from lfm2.spec import ArchSpec

SPEC = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "swa"), n_heads=4, n_kv_heads=2, ffn_dim=128, swa_window=8, max_seq_len=4096)
MAX_CONTEXT = 200
PROMPT = 16
#: Longer than one chunk and not a multiple of it: two chunks, the second one short.
LONG_PROMPT = PREFILL_CHUNK + 37


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory) -> Artifact:
    return compile(SPEC, "executorch", "fp32", MAX_CONTEXT, (PROMPT,), cache_dir=tmp_path_factory.mktemp("cache"))


def test_fp32_artifact_matches_eager_and_records_the_facts(fp32_artifact):
    manifest = fp32_artifact.manifest
    assert list(manifest["files"]) == ["model.pte"]
    assert manifest["methods"] == ["forward", "reset"]
    assert manifest["prefill_chunk"] == PREFILL_CHUNK and manifest["dynamic_prompt_lengths"] is True
    assert manifest["packed_weight_copies"] == 1
    assert {"import", "build", "export", "lower", "serialize"} <= set(manifest["stages_s"])
    assert all(seconds >= 0 for seconds in manifest["stages_s"].values())
    # XNNPACK partitions in the computing method, none in reset; the llama ops run outside.
    assert manifest["partitions"]["forward"] >= 1 and manifest["partitions"]["reset"] == 0
    assert "llama.custom_sdpa.default" in manifest["not_delegated_ops"]
    assert "aten.embedding.default" in manifest["not_delegated_ops"]
    assert manifest["decode_cost_follows_context"] is True
    check = manifest["verification"]
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]["max_abs_diff"]
    assert check["top1_agreement"] == 1.0


def test_the_dynamic_token_dimension_leaves_no_reshape_outside_xnnpack(fp32_artifact):
    # A reshape whose target names the token count's symbolic size is refused by XNNPACK and
    # cut the forward graph into a partition per layer piece (48 in one small-space
    # candidate, 12 once no reshape was left out); every reshape infers that dimension (-1).
    outside = fp32_artifact.manifest["not_delegated_by_method"]["forward"]
    assert not [op for op in outside if "view" in op], outside


def test_runner_prefill_in_chunks_decode_reset_and_stack(fp32_artifact):
    tokens = np.random.default_rng(7).integers(0, SPEC.vocab_size, size=(1, LONG_PROMPT + 4), dtype=np.int64)
    with open_runner(fp32_artifact, threads=1) as runner:
        stack = runner.stack()
        assert stack["backend"] == "executorch" and stack["delegate"] == "XNNPACK" and stack["threads"] == 1
        # Prompt lengths are a runtime choice: shorter than the sliding window (1, 5), longer, and two
        # chunks with a short tail.
        for prompt in (PROMPT, 1, 5, LONG_PROMPT):
            reference = eager_reference(SPEC, 0, MAX_CONTEXT, tokens[:, : prompt + 4], prompt)
            for _ in range(2):  # a second prefill starts again from an empty state
                got = [runner.prefill(tokens[:, :prompt])[0]]
                got += [runner.decode(tokens[:, p : p + 1], p)[0] for p in range(prompt, prompt + 4)]
                assert np.abs(np.stack(got) - reference).max() < 1e-4, prompt
        runner.reset()
        assert np.isfinite(runner.decode(tokens[:, :1], 40)).all()
        with pytest.raises(ValueError, match="does not fit"):
            runner.prefill(np.zeros((1, MAX_CONTEXT + 1), dtype=np.int64))
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
def test_8da4w_artifact_matches_its_quantised_reference_in_chunks(tmp_path):
    artifact = compile(SPEC, "executorch", "8da4w", MAX_CONTEXT, (PROMPT, 32), cache_dir=tmp_path)
    manifest = artifact.manifest
    check = manifest["verification"]
    assert check["passed"] and check["min_cosine"] >= check["tolerance"]["min_cosine"] == 0.999
    assert check["reference"].startswith("eager 8da4w") and check["fp32_distance"]["min_cosine"] < check["min_cosine"]
    assert "quantise" in manifest["stages_s"]
    assert manifest["quantization"]["scheme"] == "8da4w" and manifest["quantization"]["embedding"].startswith("int4")
    assert manifest["methods"] == ["forward", "reset"]
    # 4-bit linears, head and embedding: the program is well under the fp32 parameters' bytes
    # (a tiny model: the program's own tables weigh as much as its weights).
    assert manifest["files"]["model.pte"]["bytes"] < 2 * manifest["parameters"]
    # No quantisation op was left outside XNNPACK but the 4-bit embedding lookup.
    assert "quantized_decomposed.embedding_4bit.default" in manifest["not_delegated_ops"]
    assert not [op for op in manifest["not_delegated_ops"] if ("quantize" in op or "choose_qparams" in op) and "embedding" not in op]
    # A prompt of two chunks (the second short), then decode steps: the same numbers as the
    # same quantised model run eagerly.
    tokens = np.random.default_rng(11).integers(0, SPEC.vocab_size, size=(1, LONG_PROMPT + 6), dtype=np.int64)
    model, _ = reference_model(artifact, 0)
    expected = step_logits(model, MAX_CONTEXT, tokens, LONG_PROMPT)
    with open_runner(artifact) as runner:
        got = [runner.prefill(tokens[:, :LONG_PROMPT])[0]]
        got += [runner.decode(tokens[:, p : p + 1], p)[0] for p in range(LONG_PROMPT, LONG_PROMPT + 6)]
    report = compare_logits(expected, np.stack(got))
    assert report["min_cosine"] >= 0.999 and report["top1_agreement"] == 1.0


@pytest.mark.slow
def test_a_wrong_scale_in_the_program_fails_verification_with_both_numbers(tmp_path, monkeypatch):
    """Break the exported program only (not the reference): one linear's int4 scales x4."""
    import torch

    from devices.backends.executorch_model import ExecuTorchLFM2

    real_export = torch.export.export

    def export_with_a_wrong_scale(module, *args, **kwargs):
        if isinstance(module, ExecuTorchLFM2) and module.mode == "forward":
            module.model.layers[0].feed_forward.w1.weight.scale.mul_(4.0)
        return real_export(module, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export_with_a_wrong_scale)
    with pytest.raises(VerificationError) as caught:
        compile(SPEC, "executorch", "8da4w", MAX_CONTEXT, (PROMPT,), cache_dir=tmp_path)
    message, report = str(caught.value), caught.value.report
    assert caught.value.stage == "verify" and not report["passed"]
    assert report["min_cosine"] < report["tolerance"]["min_cosine"] <= 0.999
    assert f"min cosine {report['min_cosine']:.4f} (needs {report['tolerance']['min_cosine']:.4g})" in message
    assert f"against fp32: min cosine {report['fp32_distance']['min_cosine']:.4f}" in message
    assert not list((tmp_path / "artifacts").glob("[!.]*"))  # nothing entered the cache


def test_quantised_tolerance_widens_only_to_the_references_own_floor():
    """A quantised reference that cannot meet 0.999 against itself (an input nudged by 1e-7)
    sets the bound: QUANT_FLOOR_FACTOR times its own distance, never looser than that."""
    from devices.compile import QUANT_FLOOR_FACTOR, QUANT_MIN_COSINE, _tolerance

    report = {"min_cosine": 0.991, "top1_agreement": 1.0}
    bounds, ok, why = _tolerance("8da4w", None, dict(report))
    assert not ok and bounds["min_cosine"] == QUANT_MIN_COSINE and "needs 0.999" in why
    floor = {"perturbation": 1e-7, "min_cosine": 0.9929, "top1_agreement": 1.0}
    bounds, ok, why = _tolerance("8da4w", None, {**report, "reference_floor": floor})
    assert ok and bounds["min_cosine"] == pytest.approx(1 - QUANT_FLOOR_FACTOR * 0.0071)
    _, ok, why = _tolerance("8da4w", None, {**report, "min_cosine": 0.95, "reference_floor": floor})
    assert not ok and "the reference against itself" in why
    # a floor better than 0.999 never tightens the fixed bound
    bounds, _, _ = _tolerance("8da4w", None, {**report, "reference_floor": {**floor, "min_cosine": 0.99999}})
    assert bounds["min_cosine"] == QUANT_MIN_COSINE
