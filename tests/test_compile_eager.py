"""compile() with the eager backend: the dispatcher, its cache and its errors, cheaply."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from devices.artifact import Artifact, ArtifactError
from devices.backends import BACKEND_MODULES, open_runner
from devices.compile import CompileError, VerificationError, _tolerance, compare_logits, compile
from lfm2.errors import UserError
from lfm2.spec import ArchSpec

SPEC = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "conv", "swa"), n_heads=4, n_kv_heads=2, ffn_dim=128, swa_window=8, max_seq_len=4096)


def test_eager_compile_verifies_and_records_the_facts(tmp_path):
    artifact = compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    manifest = artifact.manifest
    assert artifact.path == tmp_path / "artifacts" / artifact.key
    assert manifest["backend"] == "eager" and manifest["quant"] == "fp32"
    assert manifest["max_context"] == 64 and manifest["prompt_lengths"] == [16]
    assert manifest["seed"] == 0
    assert set(manifest["stages_s"]) == {"export"}
    check = manifest["verification"]
    assert check["passed"] and check["max_abs_diff"] == 0.0 and check["steps"] == 9
    assert check["prompt_length"] == 16 and check["decode_steps"] == 8


def test_cache_hit_returns_the_same_artifact_without_recompiling(tmp_path, monkeypatch):
    first = compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    import devices.backends.eager as eager

    def fail(*args, **kwargs):
        raise AssertionError("compiled again despite a cached artifact")

    monkeypatch.setattr(eager, "export", fail)
    second = compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    assert second.path == first.path and second.manifest == first.manifest
    # A different seed is a different artifact (same key, other weights).
    monkeypatch.undo()
    other = compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path, seed=3)
    assert other.path != first.path and other.key == first.key and other.manifest["seed"] == 3


def test_concurrent_compiles_of_one_key_agree(tmp_path):
    results: list = []
    errors: list = []

    def work():
        try:
            results.append(compile(SPEC, "eager", "fp32", 32, (8,), cache_dir=tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({r.path for r in results}) == 1
    entries = [p.name for p in (tmp_path / "artifacts").iterdir() if not p.name.startswith(".")]
    assert entries == [results[0].path.name]
    assert not [p for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".tmp-")]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM2_NAS_CACHE", str(tmp_path / "env-cache"))
    artifact = compile(SPEC, "eager", "fp32", 32, (8,))
    assert artifact.path.parent == tmp_path / "env-cache" / "artifacts"


def test_tampered_or_truncated_artifacts_are_refused(tmp_path):
    artifact = compile(SPEC, "eager", "fp32", 32, (8,), cache_dir=tmp_path)
    config = artifact.path / "eager.json"
    original = config.read_bytes()
    config.write_bytes(original[:-5])
    with pytest.raises(ArtifactError, match="truncated"):
        Artifact.load(artifact.path)
    config.write_bytes(original.replace(b'"seed": 0', b'"seed": 1'))
    with pytest.raises(ArtifactError, match="sha256"):
        Artifact.load(artifact.path)
    # compile() notices the damage and rebuilds the entry.
    rebuilt = compile(SPEC, "eager", "fp32", 32, (8,), cache_dir=tmp_path)
    assert json.loads((rebuilt.path / "eager.json").read_text())["seed"] == 0
    Artifact.load(rebuilt.path)


def test_eager_runner_matches_a_full_forward(tmp_path):
    import torch

    from lfm2.model import build_model

    artifact = compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    tokens = np.random.default_rng(1).integers(0, SPEC.vocab_size, size=(1, 20), dtype=np.int64)
    with open_runner(artifact, threads=1) as runner:
        assert runner.stack()["threads"] == 1
        logits = [runner.prefill(tokens[:, :16])]
        logits += [runner.decode(tokens[:, p : p + 1], p) for p in range(16, 20)]
    with torch.no_grad():
        full = build_model(SPEC, seed=0).eval()(torch.from_numpy(tokens))[0, 15:].numpy()
    assert np.abs(np.concatenate(logits) - full).max() < 1e-4


def test_requests_that_cannot_compile_say_why(tmp_path):
    with pytest.raises(CompileError, match="prompt length 128 does not fit in max_context=64") as info:
        compile(SPEC, "eager", "fp32", 64, (16, 128), cache_dir=tmp_path)
    assert info.value.stage == "inputs"
    with pytest.raises(CompileError, match="exceeds the spec's max_seq_len"):
        compile(SPEC.replace(max_seq_len=32), "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    with pytest.raises(UserError, match="compiles fp32, not 'int8'"):
        compile(SPEC, "eager", "int8", 64, (16,), cache_dir=tmp_path)
    with pytest.raises(UserError, match="unknown backend"):
        compile(SPEC, "tflite", "fp32", 64, (16,), cache_dir=tmp_path)
    assert not (tmp_path / "artifacts").exists() or not any(p for p in (tmp_path / "artifacts").iterdir() if not p.name.startswith("."))


def test_a_toolchain_failure_names_its_stage(tmp_path, monkeypatch):
    import devices.backends.eager as eager
    from devices.compile import Stages

    def broken_export(spec, quant, max_context, prompt_lengths, out_dir, seed):
        stages = Stages()
        with stages("lower"):
            raise RuntimeError("operator foo is not supported")

    monkeypatch.setattr(eager, "export", broken_export)
    with pytest.raises(CompileError, match="stage 'lower'.*RuntimeError: operator foo") as info:
        compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    assert isinstance(info.value.cause, RuntimeError)
    assert not [p for p in (tmp_path / "artifacts").iterdir() if not p.name.startswith(".") or p.name.startswith(".tmp-")]


def test_verification_rejects_a_wrong_artifact(tmp_path, monkeypatch):
    # An eager artifact whose runner rebuilds other weights (seed 1) than the check uses (0).
    import devices.backends.eager as eager

    real_export = eager.export

    def wrong_seed(spec, quant, max_context, prompt_lengths, out_dir, seed):
        files, facts = real_export(spec, quant, max_context, prompt_lengths, out_dir, seed + 1)
        return files, facts

    monkeypatch.setattr(eager, "export", wrong_seed)
    with pytest.raises(VerificationError, match="disagrees with its reference") as info:
        compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    assert info.value.stage == "verify" and not info.value.report["passed"]


def test_compare_logits_measures_what_it_says():
    reference = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    same = compare_logits(reference, reference)
    assert same["max_abs_diff"] == 0 and same["top1_agreement"] == 1 and same["min_cosine"] == pytest.approx(1)
    flipped = compare_logits(reference, reference[:, ::-1].copy())
    assert flipped["top1_agreement"] == 0.5 and flipped["min_cosine"] < 0.8
    # the reversed row's differences dwarf its margin, so only the cosine judges it (and fails it)
    assert flipped["decisive_steps"] == 1 and flipped["top1_agreement_decisive"] == 1.0


def test_top1_is_judged_on_decisive_steps_only():
    """A near-tie flipped by rounding is not a disagreement; a flip of a clear choice is."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(9, 4096))
    reference[:8, 7] = reference[:8].max(-1) + 1.0  # eight steps with a clear winner
    reference[8, 1], reference[8, 2] = 5.0, 4.9999  # one near-tie
    noisy = reference + rng.normal(scale=1e-3, size=reference.shape)
    noisy[8, 2] = 5.001  # the rounding flips the near-tie
    report = compare_logits(reference, noisy)
    assert report["top1_agreement"] == pytest.approx(8 / 9) and report["decisive_steps"] == 8 and report["top1_agreement_decisive"] == 1.0
    _bounds, ok, _why = _tolerance("q4_0", {"min_cosine": 0.995, "top1_agreement": 0.95}, report)
    assert ok
    clear_flip = noisy.copy()
    clear_flip[0, 3] = reference[0, 7] + 0.5  # a decisive step's choice changed
    report = compare_logits(reference, clear_flip)
    assert report["top1_agreement_decisive"] == pytest.approx(7 / 8)
    _bounds, ok, why = _tolerance("q4_0", {"min_cosine": 0.9, "top1_agreement": 0.95}, report)
    assert not ok and "top-1 agreement 0.88 on 8 decisive step(s) of 9" in why


def test_eager_compile_does_not_import_executorch(tmp_path):
    # `import executorch` costs ~355 MiB and ~7 s: only the executorch backend may pay it.
    assert set(BACKEND_MODULES) == {"eager", "executorch", "onnx", "llamacpp"}
    code = (
        "import sys, devices; from lfm2.spec import ArchSpec; "
        f"spec = ArchSpec.from_json({SPEC.to_json()!r}); "
        f"devices.compile(spec, 'eager', 'fp32', 32, (8,), cache_dir={str(tmp_path)!r}); "
        "assert not {'executorch', 'onnxruntime', 'llama_cpp'} & set(sys.modules), 'imported too much'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _wrong_seed_export(monkeypatch):
    """Make the eager backend build an artifact that fails the check (seed + 1 weights)."""
    import devices.backends.eager as eager

    real_export = eager.export
    calls = []

    def wrong_seed(spec, quant, max_context, prompt_lengths, out_dir, seed):
        calls.append(spec.key)
        return real_export(spec, quant, max_context, prompt_lengths, out_dir, seed + 1)

    monkeypatch.setattr(eager, "export", wrong_seed)
    return calls


def test_a_failure_that_would_repeat_is_cached_per_toolchain(tmp_path, monkeypatch):
    from devices.compile import CachedCompileError

    calls = _wrong_seed_export(monkeypatch)
    with pytest.raises(VerificationError):
        compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    assert len(calls) == 1
    with pytest.raises(CachedCompileError, match="cached: this request failed the same way.*retry_failed=True") as info:
        compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    assert info.value.stage == "verify" and "disagrees with its reference" in str(info.value) and len(calls) == 1  # no second export
    with pytest.raises(VerificationError):
        compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path, retry_failed=True)
    assert len(calls) == 2
    # only the check failed: a compile that does not ask for it still gets its artifact
    assert compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path, verify=False).manifest["verification"] is None
    # another toolchain may do better: a record of another version is dropped and compiled again
    record_path = next((tmp_path / "artifacts").glob(".*.failed.json"))
    record = json.loads(record_path.read_text())
    record["toolchain"] = {**record["toolchain"], "torch": "0.0.1"}
    record_path.write_text(json.dumps(record))
    monkeypatch.undo()
    import shutil

    shutil.rmtree(next(p for p in (tmp_path / "artifacts").iterdir() if not p.name.startswith(".")))  # the unverified artifact
    assert compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path).manifest["verification"]["passed"]
    assert not record_path.exists()


def test_running_out_of_memory_is_not_cached(tmp_path, monkeypatch):
    import devices.backends.eager as eager
    from devices.compile import Stages

    def out_of_memory(spec, quant, max_context, prompt_lengths, out_dir, seed):
        with Stages()("export"):
            raise MemoryError("cannot allocate")

    monkeypatch.setattr(eager, "export", out_of_memory)
    with pytest.raises(CompileError, match="MemoryError"):
        compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    assert not list((tmp_path / "artifacts").glob(".*.failed.json"))
    monkeypatch.undo()
    assert compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path).manifest["verification"]["passed"]


def test_work_folders_of_a_killed_compile_are_removed(tmp_path):
    from devices.artifact import artifact_key

    key = artifact_key(SPEC, "eager", "fp32", 64, (16,))
    leftover = tmp_path / "artifacts" / f".tmp-{key}-abc123"
    (leftover / "partial").mkdir(parents=True)
    other = tmp_path / "artifacts" / ".tmp-someotherkey-xyz"  # another artifact's: its compile may be running
    other.mkdir()
    compile(SPEC, "eager", "fp32", 64, (16,), cache_dir=tmp_path)
    assert not leftover.exists() and other.exists()


def test_a_backend_layout_revision_changes_the_cache_key(monkeypatch):
    """A backend whose artifact layout changed (ONNX's prefill step, llama.cpp's qwen3 writer)
    bumps its BACKEND_FORMATS entry, and nothing compiled (or refused) before is reused."""
    from devices import artifact

    before = artifact.artifact_key(SPEC, "onnx", "fp32", 64, (16,))
    monkeypatch.setitem(artifact.BACKEND_FORMATS, "onnx", artifact.BACKEND_FORMATS["onnx"] + 1)
    assert artifact.artifact_key(SPEC, "onnx", "fp32", 64, (16,)) != before
    assert artifact.artifact_key(SPEC, "eager", "fp32", 64, (16,)) == artifact.artifact_key(SPEC, "eager", "fp32", 64, (16,))
