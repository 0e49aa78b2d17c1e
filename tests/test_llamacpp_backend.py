"""The llama.cpp backend: GGUF files written from a spec's seeded weights and run by llama.cpp
(llama-cpp-python's low-level API), checked against the eager model at the GGUF's own
precision, refused with a reason where llama.cpp's lfm2 cannot run the layout, measured
by `lfm2-nas bench`, and estimated by the cost model.

Tests that run llama.cpp skip when the optional extra is not installed
(`pip install -e ".[llamacpp]"`); the writer, the refusal message and the cost model do not
need it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from devices.artifact import Artifact, write_manifest
from devices.compile import CompileError, VerificationError, compile, step_logits, verify_against_eager
from lfm2.errors import UserError
from lfm2.model import build_model
from lfm2.spec import ArchSpec

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason='llama-cpp-python is not installed (pip install -e ".[llamacpp]")')

# conv and attention layers, widths that are whole 32-weight blocks (so q4_0 applies), kernel 4
TINY = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=128, conv_kernel=4)
MAX_CONTEXT = 48
PROMPTS = (12, 32)
#: the random sampler's seed for the search test: its six draws include both runnable and refused layouts
SEARCH_SEED = 5


# measurements here assert no timing: they lock cores of their own (conftest.py)
pytestmark = pytest.mark.usefixtures("private_core_locks")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _eager_logits(model, tokens: np.ndarray, prompt: int) -> np.ndarray:
    """A prefill of `prompt` tokens, then one token at a time, as compile's check runs eager."""
    return step_logits(model, MAX_CONTEXT, tokens, prompt)


def _runner_logits(artifact: Artifact, tokens: np.ndarray, prompt: int) -> np.ndarray:
    from devices.backends import open_runner

    with open_runner(artifact, 1) as runner:
        rows = [runner.prefill(tokens[:, :prompt])[0]]
        for pos in range(prompt, tokens.shape[1]):
            rows.append(runner.decode(tokens[:, pos : pos + 1], pos)[0])
    return np.stack(rows)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q4_0"])
def test_gguf_logits_equal_eager_at_the_gguf_precision(cache, quant):
    from devices.backends.llamacpp import reference_model

    artifact = compile(TINY, "llamacpp", quant, MAX_CONTEXT, PROMPTS, cache_dir=cache)
    verification = artifact.manifest["verification"]
    assert verification["passed"] and verification["decode_steps"] == 8 and verification["min_cosine"] >= 0.999
    assert set(artifact.files) == {"model.gguf"}
    assert artifact.manifest["llamacpp"]["tensor_types"].get("Q4_0" if quant == "q4_0" else "F16")

    # Our own check, independent of compile's: the longer prompt and 10 decode steps.
    tokens = np.random.default_rng(7).integers(0, TINY.vocab_size, size=(1, 32 + 10), dtype=np.int64)
    got = _runner_logits(artifact, tokens, 32)
    want = _eager_logits(reference_model(artifact, 0)[0], tokens, 32)
    assert got.shape == want.shape == (11, TINY.vocab_size)
    assert _cosines(got, want).min() >= 0.999
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    if quant == "f16":
        assert np.abs(got - want).max() <= 5e-3 * max(1.0, np.abs(want).max())
    else:  # the reference is the dequantised model, not fp32: quantisation noise is not in the check
        fp32 = _eager_logits(build_model(TINY, seed=0).eval(), tokens, 32)
        assert _cosines(got, want).min() > _cosines(got, fp32).min()


@needs_llama_cpp
def test_decode_after_reset_continues_from_a_context_of_that_depth(cache):
    """The measurement's decode at depth C: reset, then decode at C-1 and on. The runner
    builds a C-token context once and restores it; the logits must not depend on the jump."""
    from devices.backends import open_runner

    artifact = compile(TINY, "llamacpp", "f16", MAX_CONTEXT, PROMPTS, cache_dir=cache)
    token = np.array([[5]], dtype=np.int64)
    with open_runner(artifact, 1) as runner:
        first = [runner.decode(token, 20), runner.decode(token, 21)]
        runner.reset()
        again = [runner.decode(token, 20), runner.decode(token, 21)]
        with pytest.raises(ValueError, match="max_context"):
            runner.decode(token, MAX_CONTEXT)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def _swap_tensors(path, a: str, b: str) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    tensors = {t.name: t for t in reader.tensors}
    first, second = np.array(tensors[a].data), np.array(tensors[b].data)
    tensors[a].data[...] = second
    tensors[b].data[...] = first
    reader.data.flush()


def _scale_blocks(path, name: str, factor: float) -> None:
    """Multiply the f16 scale of every Q4_0 block of tensor `name` (bytes 0-1 of each 18)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    blocks = tensor.data.reshape(-1, 18)
    scales = blocks[:, :2].copy().view(np.float16) * np.float16(factor)
    blocks[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    reader.data.flush()


@needs_llama_cpp
@pytest.mark.parametrize("damage", ["ffn_down of blocks 1 and 3 swapped", "attn_output scales of block 1 negated"])
def test_a_broken_gguf_fails_the_check(tmp_path, damage):
    """Damage the check must see. (Random weights make the logits depend mostly on the tied
    embedding: damage that moves them less than the runtime's own 8-bit noise, such as a
    conv layer's output scaled x2 (cosine 0.99998), is out of any logits check's reach.)"""
    artifact = compile(TINY, "llamacpp", "q4_0", MAX_CONTEXT, PROMPTS, cache_dir=tmp_path, verify=False)
    work = tmp_path / "broken"
    shutil.copytree(artifact.path, work)
    if "swapped" in damage:
        _swap_tensors(work / "model.gguf", "blk.1.ffn_down.weight", "blk.3.ffn_down.weight")
    else:
        _scale_blocks(work / "model.gguf", "blk.1.attn_output.weight", -1.0)
    facts = {k: v for k, v in artifact.manifest.items() if k not in ("manifest_version", "key", "spec", "spec_key", "backend", "quant", "max_context", "prompt_lengths", "files", "toolchain")}
    broken = write_manifest(work, TINY, "llamacpp", "q4_0", MAX_CONTEXT, PROMPTS, ["model.gguf"], **facts)
    with pytest.raises(VerificationError, match="disagrees with its reference") as caught:
        verify_against_eager(broken, 0)
    assert caught.value.report["passed"] is False
    assert verify_against_eager(artifact, 0)["passed"]  # the undamaged file passes the same check


@needs_llama_cpp
def test_mixed_full_and_sliding_window_attention_is_refused_with_the_reason(tmp_path):
    mixed = TINY.replace(layers=("conv", "attn", "conv", "swa"), swa_window=8)
    with pytest.raises(CompileError, match="mixes full .* sliding-window .* onnx or executorch") as caught:
        compile(mixed, "llamacpp", "q4_0", MAX_CONTEXT, PROMPTS, cache_dir=tmp_path)
    assert caught.value.stage == "inputs"
    assert not list((tmp_path / "artifacts").glob("[!.]*"))  # nothing half-written is left


@needs_llama_cpp
def test_sliding_window_only_layouts_run_and_match_eager(cache):
    """Every attention layer sliding-window: llama.cpp's lfm2 runs that (one window for all)."""
    only_swa = TINY.replace(layers=("conv", "swa", "conv", "swa"), swa_window=8)
    artifact = compile(only_swa, "llamacpp", "f16", MAX_CONTEXT, PROMPTS, cache_dir=cache)  # prompt 12 > window 8
    assert artifact.manifest["verification"]["passed"]


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q4_0"])
def test_an_all_attention_stack_with_wide_heads_runs_as_qwen3_and_matches_eager(cache, quant):
    """Qwen3-0.6B's shape (heads of 128 whose width is twice d_model): llama.cpp's lfm2 cannot
    size it, so it is written as llama.cpp's qwen3, and llama.cpp's logits must still equal
    eager's at the GGUF's precision; a hybrid keeps the lfm2 architecture."""
    from devices.backends.llamacpp_gguf import architecture

    wide = ArchSpec(vocab_size=512, d_model=64, layers=("attn",) * 3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128, qk_norm=True)
    assert architecture(wide) == "qwen3" and architecture(TINY) == "lfm2"
    artifact = compile(wide, "llamacpp", quant, MAX_CONTEXT, PROMPTS, cache_dir=cache)
    assert artifact.manifest["verification"]["passed"]
    assert artifact.manifest["llamacpp"]["architecture"] == "qwen3"


@needs_llama_cpp
def test_an_all_attention_stack_whose_heads_tile_d_model_is_measured_not_aborted(cache, tmp_path):
    """LFM2-350M's all-attention twin as llama.cpp's lfm2 passed its check and then aborted the
    measuring child (its hybrid memory had no recurrent buffer): written as qwen3, the whole
    measurement (memory pass, prefills, decode at depth) completes."""
    from devices.backends.llamacpp_gguf import architecture
    from devices.measure import measure
    from devices.protocol import Protocol

    twin = TINY.replace(layers=("attn",) * 4, qk_norm=True)
    assert architecture(twin) == "qwen3"
    artifact = compile(twin, "llamacpp", "q4_0", MAX_CONTEXT, PROMPTS, cache_dir=cache)
    assert artifact.manifest["verification"]["passed"]
    protocol = Protocol(prompt_lengths=PROMPTS, decode_depths=(24,), decode_tokens=2, warmup_runs=1, min_runs=1, max_runs=1, max_seconds_per_point=0.2, measure_memory=True, threads=1)
    result = measure(artifact, protocol)
    assert result.status == "ok", result.error
    assert set(result.prefill) == set(PROMPTS) and result.memory["footprint_bytes"] > 0


def test_a_stack_without_attention_has_a_reason_without_the_runtime_installed():
    """The refusal is a fact about the layout: it needs no llama-cpp-python to be said."""
    from devices.backends.llamacpp_gguf import unsupported_reason

    reason = unsupported_reason(TINY.replace(layers=("conv",) * 4))
    assert reason is not None and "no attention layer" in reason and "onnx or executorch" in reason
    assert unsupported_reason(TINY) is None


@needs_llama_cpp
def test_a_stack_without_attention_is_refused_before_llama_cpp_aborts_on_it(tmp_path):
    """llama.cpp's lfm2 with no attention layer has no K/V buffer and aborts the process in
    llama_decode (seen on a 4-conv stack): refused with the reason and the way out instead."""
    with pytest.raises(CompileError, match="no attention layer.*onnx or executorch") as caught:
        compile(TINY.replace(layers=("conv",) * 4), "llamacpp", "q4_0", MAX_CONTEXT, PROMPTS, cache_dir=tmp_path)
    assert caught.value.stage == "inputs"


def test_without_llama_cpp_python_the_backend_names_the_install_command(monkeypatch):
    from devices.backends import backend_module

    for name in ("devices.backends.llamacpp", "devices.backends.llamacpp_runner"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails
    with pytest.raises(UserError, match=r'pip install -e "\.\[llamacpp\]"'):
        backend_module("llamacpp")


def test_the_cost_model_counts_the_gguf_tensor_bytes_exactly(tmp_path):
    from devices.backends.llamacpp_gguf import write_gguf
    from search_space.costs import estimate_peak_memory
    from search_space.costs.llamacpp import gguf_bytes_breakdown

    state = build_model(TINY, seed=0).state_dict()
    for quant in ("f16", "q8_0", "q4_0"):
        facts = write_gguf(TINY, state, quant, tmp_path / f"{quant}.gguf")
        assert facts["tensor_data_bytes"] == sum(gguf_bytes_breakdown(TINY, quant).values()), quant
        assert (tmp_path / f"{quant}.gguf").stat().st_size > facts["tensor_data_bytes"]
    estimate = estimate_peak_memory(TINY, MAX_CONTEXT, "llamacpp", "q4_0")
    assert estimate.lower_bound_bytes < estimate.total_bytes
    assert estimate.assumptions["file_bytes"] == sum(gguf_bytes_breakdown(TINY, "q4_0").values())


@needs_llama_cpp
def test_bench_cli_prints_llama_bench_columns_after_a_passed_check(tmp_path):
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(TINY.to_json())
    exe = shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"
    args = [exe, "bench", str(spec_file), "--backend", "llamacpp", "--quant", "q4_0", "--prompt", "16,32", "--depth", "24", "--tokens", "4", "--max-seconds", "0.2", "--threads", "1", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    payload = json.loads(result.stdout)
    assert payload["artifact"]["verification"]["passed"]
    tests = {row["test"]: row for row in payload["rows"]}
    assert set(tests) == {"pp16", "pp32", "tg@24"}
    assert tests["tg@24"]["llama_bench_test"] == "tg4 @ d24" and tests["pp32"]["llama_bench_test"] == "pp32"
    assert all(row["llama_bench_tokens_per_s"] > 0 and row["llama_bench_tokens_per_s_std"] >= 0 for row in payload["rows"])
    measurement = payload["measurement"]
    assert measurement["status"] == "ok" and measurement["memory"]["footprint_bytes"] > 0
    assert measurement["stack"]["backend"] == "llamacpp" and measurement["stack"]["n_ubatch"] == 512

    table = subprocess.run(args, capture_output=True, text=True, timeout=600)  # cached artifact: the printed table
    assert table.returncode == 0, table.stderr[-3000:]
    assert "llama-bench test" in table.stdout and "tg4 @ d24" in table.stdout and "footprint" in table.stdout


@needs_llama_cpp
@pytest.mark.slow
def test_search_on_the_small_space_through_the_local_agent(tmp_path):
    """`lfm2-nas search --backend llamacpp --quant q4_0` end to end: Ray, a local agent, real
    GGUF compiles checked against eager, measurements, a SQLite study. The small space mixes
    full and sliding-window attention in most layouts: those trials fail with llama.cpp's
    reason, the others are measured."""
    import os

    import optuna

    from nas.storage import open_storage

    env = dict(os.environ, LFM2_NAS_CACHE=str(tmp_path / "cache"), LFM2_NAS_CONFIG=str(tmp_path / "devices.toml"))
    exe = shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"
    args = ["search", "--device", "local", "--budget", "400MB", "--space", "small", "--context", "64", "--backend", "llamacpp", "--quant", "q4_0",
            "--quality", "none", "--sampler", "random", "--seed", str(SEARCH_SEED), "--in-flight", "2", "--trials", "6", "--study", "ll"]
    result = subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, timeout=1500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = optuna.load_study(study_name="ll", storage=open_storage(f"sqlite:///{tmp_path}/lfm2-nas.db"))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    refused = [t for t in finished if "mixes full" in (t.user_attrs.get("reason") or "")]
    assert complete and refused, [(t.number, t.state, t.user_attrs.get("layout"), (t.user_attrs.get("reason") or "")[:120]) for t in finished]
    for trial in complete:
        assert trial.user_attrs["measurement"]["status"] == "ok" and trial.user_attrs["footprint_bytes"] > 0
        assert trial.user_attrs["artifact"]["backend"] == "llamacpp" and trial.user_attrs["artifact"]["quant"] == "q4_0"
        assert "S" not in trial.user_attrs.get("layout", "") or "A" not in trial.user_attrs.get("layout", "")
    for trial in refused:
        assert trial.user_attrs["status"] == "compile_error" and "onnx or executorch" in trial.user_attrs["reason"]

    # The measured GGUF of a trial, exported as it was measured.
    out = tmp_path / "exported"
    exported = subprocess.run([exe, "export", str(out), "--study", "ll", "--trial", str(complete[0].number), "--to", "llamacpp"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    artifact = Artifact.load(folder)  # every file matches its sha256
    assert artifact.backend == "llamacpp" and artifact.key == complete[0].user_attrs["artifact"]["key"]
    assert (folder / "model.gguf").is_file() and (folder / "ARCH.md").is_file()
