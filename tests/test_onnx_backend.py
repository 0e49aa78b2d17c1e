"""The ONNX Runtime backend: export through devices.compile (which checks every artifact
against eager at its precision), one step graph whose chunked prefill and decode match the
static-buffer eager model at any depth, an int8 artifact checked against the eager model
with its own quantised weights (and a broken one rejected), and a measurement."""

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
#: A prefill step of at most 5 tokens, so that the prompts here run in several chunks.
CHUNK = 5


# measurements here assert no timing: they lock cores of their own (conftest.py)
pytestmark = pytest.mark.usefixtures("private_core_locks")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def small_prefill_chunk():
    """Artifacts of this module record a prefill chunk of CHUNK tokens in their manifest."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("devices.backends.onnx_export.PREFILL_CHUNK", CHUNK)
        yield


@pytest.fixture(scope="module")
def int8_artifact(cache):
    # prompt 16: verification prefills 16 tokens, four chunks
    return compile(TINY, "onnx", "int8", MAX_CONTEXT, (16,), cache_dir=cache)


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
    assert set(artifact.files) == {"step.onnx", "weights.bin", "weights_index.json", "embedding.bin"}
    assert manifest["onnx"]["embedding"]["shape"] == [TINY.vocab_size, TINY.d_model]
    assert manifest["decode_cost_follows_context"] is True and manifest["weights_stored_once"] is True
    assert manifest["onnx"]["prefill_chunk"] == CHUNK
    assert _external_locations(artifact.file("step.onnx")) == {"weights.bin"}
    assert {"export", "pack_weights"} <= set(manifest["stages_s"])


def test_fp32_export_is_checked_against_eager_and_stores_weights_once(fp32_artifact):
    _check_artifact(fp32_artifact)
    assert fp32_artifact.manifest["verification"]["max_abs_diff"] <= fp32_artifact.manifest["verification"]["tolerance"]["max_abs_diff"]


@pytest.mark.slow
def test_int8_export_passes_tightly_against_its_own_precision(int8_artifact, fp32_artifact):
    _check_artifact(int8_artifact)
    verification = int8_artifact.manifest["verification"]
    assert verification["reference"].startswith("eager int8") and verification["prompt_length"] == 16
    assert verification["tolerance"] == {"max_abs_diff_rel": 1e-3, "min_cosine": 0.999, "top1_agreement": 0.95}
    # ONNX Runtime's integer GEMMs reproduce the eager int8 reference to float rounding,
    # far closer than the fp32 model is (quantisation error, recorded for information)
    assert verification["max_abs_diff"] < 1e-4 and verification["top1_agreement"] == 1.0
    assert verification["fp32_distance"]["max_abs_diff"] > 10 * verification["max_abs_diff"]
    assert int8_artifact.manifest["onnx"]["quantization"]["weight_type"] == "QInt8"
    assert int8_artifact.file("weights.bin").stat().st_size < fp32_artifact.file("weights.bin").stat().st_size


@pytest.mark.slow
def test_the_int8_reference_holds_the_artifacts_own_weights(int8_artifact):
    """Every quantised tensor in the artifact, dequantised with its own scale and zero point,
    is exactly a weight of the eager reference (a MatMul's transposed; the table in
    embedding.bin, as the runner reads it)."""
    import onnx
    from onnx import numpy_helper

    from devices.backends.onnx import reference_model
    from devices.backends.onnx_runner import EmbeddingRows

    reference, _ = reference_model(int8_artifact, 0)
    weights = [p.detach().numpy() for p in reference.parameters() if p.dim() == 2]
    graph = onnx.load(str(int8_artifact.file("step.onnx")))  # with weights.bin
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    quantized = [name[: -len("_quantized")] for name in tensors if name.endswith("_quantized")]
    assert len(quantized) == 1 + 2 + 4 * 2 + 3 * 3  # head; conv in/out; q k v out per attention; 3 per FFN
    facts = int8_artifact.manifest["onnx"]["embedding"]
    assert facts["dtype"] == "uint8"
    table = EmbeddingRows(int8_artifact.file(facts["file"]), facts)(np.arange(TINY.vocab_size)[None])[0]
    np.testing.assert_array_equal(table, reference.model.embed_tokens.weight.detach().numpy())
    for base in quantized:
        steps = (tensors[f"{base}_quantized"].astype(np.int32) - tensors[f"{base}_zero_point"].astype(np.int32)).astype(np.float32)
        dequantized = steps * tensors[f"{base}_scale"].astype(np.float32)  # in float32, as DequantizeLinear
        matches = [w for w in weights if w.shape == dequantized.shape and np.array_equal(w, dequantized)]
        matches += [w for w in weights if w.T.shape == dequantized.shape and np.array_equal(w.T, dequantized)]
        assert matches, f"{base}: no weight of the reference equals the artifact's dequantised tensor"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["the embedding table's scale", "the last linear's weight scale"])
def test_an_int8_artifact_with_a_wrong_scale_fails_verification(int8_artifact, tmp_path, damage):
    """A scale doubled (the files re-hashed, so the artifact loads): the embedding table's
    (in the manifest, which the runner reads it with), or a layer's linear in step.onnx
    (which moves the logits less than quantisation noise does, so only the bound on the
    largest difference sees it). Verification rejects it and names both distances."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from devices.artifact import write_manifest
    from devices.compile import VerificationError, verify_against_eager

    copy = tmp_path / "wrong-scale"
    shutil.copytree(int8_artifact.path, copy)
    manifest = json.loads(json.dumps(int8_artifact.manifest))
    facts = {k: v for k, v in manifest.items() if k not in ("manifest_version", "key", "spec", "spec_key", "backend", "quant", "max_context", "prompt_lengths", "files", "toolchain")}
    if "embedding" in damage:
        facts["onnx"]["embedding"]["scale"] *= 2
    else:
        graph = onnx.load(str(copy / "step.onnx"), load_external_data=False)
        scale = [t for t in graph.graph.initializer if t.name.endswith("_scale")][-1]
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))
        onnx.save(graph, str(copy / "step.onnx"))
    broken = write_manifest(copy, TINY, "onnx", "int8", MAX_CONTEXT, (16,), list(manifest["files"]), **facts)
    with pytest.raises(VerificationError, match=r"max \|logit diff\| .*min cosine [01]\.\d+.*against fp32: min cosine [01]\.\d+") as failure:
        verify_against_eager(broken, 0)
    report = failure.value.report
    assert report["passed"] is False and report["max_abs_diff"] > report["tolerance"]["max_abs_diff_rel"] * max(1.0, report["max_abs_logit"])


def test_the_same_request_returns_the_cached_artifact(fp32_artifact, cache):
    again = compile(TINY, "onnx", "fp32", MAX_CONTEXT, (4, 16), cache_dir=cache)
    assert again.path == fp32_artifact.path and again.manifest["compile_s"] == fp32_artifact.manifest["compile_s"]


def test_prefill_and_decode_at_any_depth_match_eager(fp32_artifact):
    """A decode at depth P after reset() sees P zero cache entries: what the static
    buffer of the eager model holds there (the runner's cache buffers are zeroed by reset)."""
    model = build_model(TINY, seed=0).eval()
    rng = np.random.default_rng(1)
    with open_runner(fp32_artifact, threads=1) as runner, torch.no_grad():
        tokens = rng.integers(0, TINY.vocab_size, size=(1, 11), dtype=np.int64)  # any length: three chunks of at most 5
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


def test_the_kv_cache_is_one_buffer_updated_in_place_by_group_query_attention(fp32_artifact):
    """Every full-attention layer runs com.microsoft.GroupQueryAttention, whose present K/V
    is the graph's new state; the runner binds one buffer per cache as the op's input and
    output, so a prefill and decode steps write into the same memory (no copy of the cache
    per step), and the logits still match eager over a prefill and several decode steps."""
    import onnx

    graph = onnx.load(str(fp32_artifact.file("step.onnx")), load_external_data=False)
    attention = [node for node in graph.graph.node if node.op_type == "GroupQueryAttention"]
    assert len(attention) == TINY.layers.count("attn") and all(node.domain == "com.microsoft" for node in attention)
    outputs = {o.name for o in graph.graph.output}
    assert all(set(node.output[1:]) <= outputs for node in attention)  # present K/V are graph outputs
    model = build_model(TINY, seed=0).eval()
    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, size=(1, 14), dtype=np.int64)
    with open_runner(fp32_artifact, threads=1) as runner, torch.no_grad():
        shared = [i for i, entry in enumerate(runner.layout) if entry["kind"].startswith("kv_shared")]
        assert len(shared) == 2 * TINY.layers.count("attn")
        assert all(runner.state[i].shape()[2] == MAX_CONTEXT for i in shared)
        got = runner.prefill(tokens[:, :9])  # a prefill starts from reset: fresh buffers
        pointers = [runner.state[i].data_ptr() for i in shared]
        want, *state = model.step(torch.from_numpy(tokens[:, :9]), torch.tensor([0]), *model.init_state(1, max_context=MAX_CONTEXT))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        for pos in range(9, 14):
            want, *state = model.step(torch.from_numpy(tokens[:, pos : pos + 1]), torch.tensor([pos]), *state)
            np.testing.assert_allclose(runner.decode(tokens[:, pos : pos + 1], pos), want.numpy(), atol=1e-4)
        assert [runner.state[i].data_ptr() for i in shared] == pointers  # the same buffers through the decode steps
        written = runner.state[shared[0]].numpy()[0, :, :14]
        np.testing.assert_allclose(written, state[TINY.layers.index("attn")].numpy()[0, :, :14], atol=1e-5)  # eager's K cache
        runner.reset()
        assert not runner.state[shared[0]].numpy().any()  # emptied in place
        assert [runner.state[i].data_ptr() for i in shared] == pointers  # the same buffers after a reset
        np.testing.assert_allclose(runner.prefill(tokens[:, :9]), got, atol=1e-6)  # and they serve again


def test_a_kv_buffer_is_resident_only_as_far_as_written_and_a_reset_gives_its_pages_back():
    """`KVBuffer`: its own anonymous mapping; untouched or emptied pages read as zeros and are
    not resident, whatever the allocator did before (np.zeros through malloc was resident
    whole when calloc reused heap memory); emptying keeps the address ONNX Runtime binds."""
    from devices import stack
    from devices.backends.onnx_runner import KVBuffer

    mib = 1 << 20
    buffer = KVBuffer({"shape": [1, 8, 4096, 256], "dtype": "float16"})  # 16 MiB
    address = buffer.value.data_ptr()
    before = stack.rss_bytes()
    assert not buffer.array.any()  # reads the zero page: nothing becomes resident
    assert stack.rss_bytes() - before < 2 * mib
    buffer.array[:, :, :2048] = 1.0  # half the positions written
    assert 7 * mib < stack.rss_bytes() - before < 10 * mib
    buffer.empty()
    assert stack.rss_bytes() - before < 2 * mib
    assert not buffer.array.any() and buffer.value.data_ptr() == address and buffer.value.numpy().dtype == np.float16


@pytest.mark.slow
def test_an_int8_artifact_with_an_fp16_kv_cache_passes_against_a_reference_that_rounds_alike(cache, monkeypatch):
    """The fp16 K/V variant (`KV_DTYPES`): GroupQueryAttention in fp16, the int8 reference
    rounding q, k, v and the attention output to fp16; verification at int8's tight bound."""
    monkeypatch.setitem(__import__("devices.backends.onnx_export", fromlist=["KV_DTYPES"]).KV_DTYPES, "int8", "float16")
    artifact = compile(TINY, "onnx", "int8", MAX_CONTEXT + 1, (16,), cache_dir=cache)  # another context: its own cache entry
    assert artifact.manifest["onnx"]["kv_dtype"] == "float16"
    assert {entry["dtype"] for entry in artifact.manifest["onnx"]["state"] if entry["kind"].startswith("kv_shared")} == {"float16"}
    verification = artifact.manifest["verification"]
    assert verification["passed"] and verification["max_abs_diff"] < 1e-4 and verification["top1_agreement"] == 1.0


def test_runner_reports_its_stack(fp32_artifact):
    import onnxruntime

    from devices.backends.onnx_runner import MEMORY_PATTERN

    with open_runner(fp32_artifact, threads=1) as runner:
        facts = runner.stack()
        # the session runs with the memory pattern the stack facts record (MEMORY_PATTERN)
        assert runner.session.get_session_options().enable_mem_pattern == MEMORY_PATTERN == facts["memory_pattern"]
    assert facts["onnxruntime"] == onnxruntime.__version__ and facts["providers"] == ["CPUExecutionProvider"]
    assert facts["threads"] == 1 and facts["prefill_chunk"] == CHUNK


#: Opens two sessions of one artifact in a fresh process (ONNX Runtime makes its global
#: pools with its environment, at the first session) and prints the threads the second added.
TWO_SESSIONS = """
import os, sys
from devices.artifact import Artifact
from devices.backends import backend_module, open_runner
if sys.argv[2] == "shared":
    backend_module("onnx").share_threads(2)
artifact = Artifact.load(sys.argv[1], verify=False)
first = open_runner(artifact, 2)
before = len(os.listdir("/proc/self/task"))
second = open_runner(artifact, 2)
print(len(os.listdir("/proc/self/task")) - before, second.stack()["thread_pool"])
"""


@pytest.mark.parametrize("pool", ["shared", "per-session"])
def test_a_process_that_shares_its_pool_runs_a_second_session_on_it(fp32_artifact, pool):
    """What the measuring child does before it loads a candidate and its anchor: with the pool
    shared, the anchor's session starts no threads of its own (its own pool's threads, idle or
    spinning, slowed each run right after the other session's by 20-40%)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TWO_SESSIONS, str(fp32_artifact.path), pool], capture_output=True, text=True, timeout=120, check=True)
    added, what = done.stdout.split(" ", 1)
    if pool == "shared":
        assert int(added) == 0 and what.startswith("the process's")
    else:  # the control: a second pool of its own (one worker beside the calling thread)
        assert int(added) >= 1 and what.startswith("the session's own")


def test_measuring_an_onnx_artifact(fp32_artifact):
    protocol = Protocol(prompt_lengths=(4, 16), decode_depths=(4, 16), decode_tokens=4, min_runs=2, max_runs=4, max_seconds_per_point=0.3)
    m = measure(fp32_artifact, protocol, Limits(threads=1, timeout_s=300))
    assert m.status == "ok", m.error
    assert m.stack["runtime"].startswith("onnxruntime") and m.stack["threads"] == 1
    assert m.stack["thread_pool"].startswith("the process's")  # the child shared it before loading (share_threads)
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
    (copy / "step.onnx").write_bytes(b"not an onnx graph")
    manifest = fp32_artifact.manifest
    facts = {k: v for k, v in manifest.items() if k not in ("manifest_version", "key", "spec", "spec_key", "backend", "quant", "max_context", "prompt_lengths", "files", "toolchain")}
    write_manifest(copy, TINY, "onnx", "fp32", MAX_CONTEXT, (4, 16), list(manifest["files"]), **facts)
    protocol = Protocol(prompt_lengths=(4,), decode_depths=(4,), decode_tokens=2, min_runs=1, max_runs=1)
    m = measure(copy, protocol, Limits(timeout_s=300))
    assert m.status == "error"
    assert "step.onnx" in m.error or "Protobuf" in m.error or "INVALID" in m.error, m.error
    json.loads(m.to_json())


def test_the_int8_reference_follows_the_runtimes_rounding_only_within_one_step():
    """Where the runtime's uint8 input is within one step of the reference's own rounding,
    the reference takes it (float noise upstream must not flip a rounding and cascade);
    further away it keeps its own, so a wrong artifact still shows."""
    from devices.backends.onnx_export import DynamicInt8Linear, _dynamic_quantize_params

    linear = DynamicInt8Linear(torch.eye(4), name="x_quantized")
    x = torch.tensor([[[-1.0, 0.31, 0.72, 2.0]]])  # no value on a rounding tie
    scale, zero_point = _dynamic_quantize_params(x)
    own = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    theirs = own.clone()
    theirs[..., 1] += 1  # a neighbouring rounding: followed
    theirs[..., 2] += 5  # five steps off: not followed
    linear.decisions = {"x_quantized": (theirs, scale, zero_point)}
    got = linear(x)
    expected = (torch.where(torch.tensor([True, True, False, True]), theirs, own) - zero_point) * scale
    torch.testing.assert_close(got, expected)
    assert (linear.steps_followed, linear.steps_own) == (3, 1)
    linear.decisions = None
    torch.testing.assert_close(linear(x), (own - zero_point) * scale)  # no runtime: its own rounding
