"""The analytic cost model against instantiated models and hand-computed cases."""

import json
import random

import optuna
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lfm2
from lfm2 import LFM2_PRESETS, ArchSpec, build_model, count_parameters
from lfm2.errors import UserError
from search_space import SearchSpace, costs

MIB = 1 << 20
#: LFM2-350M int8 at prefill 2,048 + decode at 2,048, 128-token steps, K/V in fp16 updated in
#: place by GroupQueryAttention, the table read by the runner, ONNX Runtime's memory pattern off,
#: measured by the harness's child (BENCHMARKS.md "ONNX int8 fifth pass"): 432.4 MiB through
#: `lfm2-nas bench` (bench/results/memory_full/lfm2_350m_onnx_int8_2048_format5_nopattern.json),
#: 431.6-431.7 MiB in three runs of the measuring child alone; was 454.5 with the pattern on
#: (fourth pass), 516.5 and 487.8 MiB with fp32 K/V
ONNX_INT8_2048_MIB = (432.4, 431.7)
#: the same at prefill 8,192 (context 8,192, decode at 512), memory pattern off (BENCHMARKS.md
#: "ONNX int8 fifth pass"; 1,280 MiB in the second pass with 256-token steps and fp32 K/V)
ONNX_INT8_8192_MIB = 557.8

optuna.logging.set_verbosity(optuna.logging.WARNING)


def meta_model(spec):
    return build_model(spec, device="meta")


def sampled(space_name, n, seed):
    space = SearchSpace.load(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


# Shapes the spaces do not hold: an untied head, no qk norm, odd widths, kernel 2, MHA.
ODD_SPECS = [
    ArchSpec(vocab_size=1000, d_model=96, layers=("conv", "swa", "attn"), n_heads=3, n_kv_heads=1, ffn_dim=200,
             conv_kernel=2, tie_embeddings=False, qk_norm=False, swa_window=7, max_seq_len=300),
    ArchSpec(vocab_size=77, d_model=48, layers=("attn",) * 3, n_heads=4, n_kv_heads=4, head_dim=20, ffn_dim=50, max_seq_len=20),
    ArchSpec(vocab_size=300, d_model=64, layers=("conv",) * 5, n_heads=2, n_kv_heads=2, ffn_dim=64, conv_kernel=5,
             tie_embeddings=False),
]


@pytest.mark.parametrize("space_name,n", [("default", 25), ("small", 60)])
def test_parameters_equal_the_instantiated_model_over_random_samples(space_name, n):
    for spec in sampled(space_name, n, seed=11):
        assert costs.parameters(spec) == count_parameters(meta_model(spec)), spec.to_json()


def test_parameters_equal_the_model_for_odd_specs_and_presets():
    for spec in ODD_SPECS:
        assert costs.parameters(spec) == count_parameters(meta_model(spec)), spec.to_json()
    for name, spec in LFM2_PRESETS.items():
        assert costs.parameters(spec) == lfm2.PUBLISHED_PARAMETERS[name]


def counted_decode_flops(model, context):
    """FLOPs that torch's FlopCounterMode sees in one decode step (matmuls, bmm, conv).
    With a cache of exactly context + 1 slots, the portable attention scores as many keys
    as a causal decode at that depth does."""
    state = model.init_state(1, max_context=context + 1)
    with FlopCounterMode(display=False) as counter:
        model.step(torch.zeros(1, 1, dtype=torch.long, device="meta"), torch.tensor([context], device="meta"), *state)
    return counter.get_total_flops()


def counted_prefill_flops(spec, tokens):
    model = meta_model(spec)
    with FlopCounterMode(display=False) as counter:
        model.step(torch.zeros(1, tokens, dtype=torch.long, device="meta"), torch.tensor([0], device="meta"), *model.init_state(1, max_context=tokens))
    return counter.get_total_flops()


def test_decode_flops_equal_torch_flop_counter_for_full_attention_models():
    specs = [s for s in sampled("small", 30, seed=2) if "swa" not in s.layers][:6] + [ODD_SPECS[1], ODD_SPECS[2]]
    specs.append(LFM2_PRESETS["LFM2-350M"])
    for spec in specs:
        model = meta_model(spec)
        for context in (0, 17):
            assert costs.decode_flops(spec, context) == counted_decode_flops(model, context), spec.to_json()


def test_prefill_flops_equal_torch_flop_counter_for_conv_only_models():
    spec = ODD_SPECS[2]
    for tokens in (1, 9):
        assert costs.prefill_flops(spec, tokens) == counted_prefill_flops(spec, tokens)


def test_flops_hand_computed():
    # d=64, one attn layer, H=2 (head_dim 32), Hkv=1, ffn 128, vocab 100, T=4 tokens
    spec = ArchSpec(vocab_size=100, d_model=64, layers=("attn",), n_heads=2, n_kv_heads=1, ffn_dim=128)
    linears = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k+v, out, swiglu = 36864 MACs/token
    attention = 2 * 2 * 32 * (1 + 2 + 3 + 4)  # scores + values, 2 heads x 32, causal keys 1+2+3+4
    head = 64 * 100
    assert costs.prefill_flops(spec, 4) == 2 * (4 * linears + attention + head)
    assert costs.prefill_flops(spec, 4, all_logits=True) == 2 * (4 * linears + attention + 4 * head)
    assert costs.decode_flops(spec, 4) == 2 * (linears + 2 * 2 * 32 * 5 + head)
    # the same layer as sliding window of 2: keys seen 1, 2, 2, 2 in prefill; 2 in decode
    swa = spec.replace(layers=("swa",), swa_window=2)
    assert costs.prefill_flops(swa, 4) == 2 * (4 * linears + 2 * 2 * 32 * (1 + 2 + 2 + 2) + head)
    assert costs.decode_flops(swa, 4) == 2 * (linears + 2 * 2 * 32 * 2 + head)
    # a conv layer: in_proj 3d*d, out_proj d*d, depthwise kernel 3 per channel
    conv = spec.replace(layers=("conv",))
    assert costs.decode_flops(conv, 100) == 2 * (4 * 64 * 64 + 3 * 64 * 128 + 64 * 3 + head)
    # LFM2-350M, one decode token at context 0: 2 x (non-embedding weights + head)
    preset = LFM2_PRESETS["LFM2-350M"]
    per_token_macs = costs.linear_macs_per_token(preset) + 10 * 1024 * 3 + 6 * 16 * 64 * 2 + 1024 * 65536
    assert costs.decode_flops(preset, 0) == 2 * per_token_macs


def test_kv_cache_and_conv_state_hand_computed():
    preset = LFM2_PRESETS["LFM2-350M"]  # 6 attention layers, 8 kv heads of 64, 10 conv layers
    assert costs.kv_cache_bytes(preset, 2048) == 6 * 2 * 8 * 64 * 2048 * 4
    assert costs.kv_cache_bytes(preset, 2048, bytes_per_element=2) == 6 * 2 * 8 * 64 * 2048 * 2
    assert costs.kv_cache_bytes(preset, 1) == preset.kv_cache_bytes_per_token(4)
    assert costs.conv_state_bytes(preset) == 10 * 1024 * 2 * 4
    swa = preset.replace(layers=tuple("swa" if op == "attn" else op for op in preset.layers), swa_window=512)
    assert costs.kv_cache_bytes(swa, 100) == 6 * 2 * 8 * 64 * 100 * 4
    assert costs.kv_cache_bytes(swa, 4096) == costs.kv_cache_bytes(swa, 512) == 6 * 2 * 8 * 64 * 512 * 4


def test_state_bytes_equal_the_models_state_shapes():
    for spec in [*ODD_SPECS, *sampled("small", 10, seed=4)]:
        for max_context in (1, 50):
            shapes = meta_model(spec).state_shapes(1, max_context)
            elements = sum(torch.Size(shape).numel() for shape in shapes)
            assert costs.state_bytes(spec, max_context) == 4 * elements


def test_weight_bytes_hand_computed():
    spec = ArchSpec(vocab_size=100, d_model=64, layers=("conv",), n_heads=1, n_kv_heads=1, ffn_dim=96, conv_kernel=3)
    params = costs.parameters(spec)
    assert costs.weight_bytes(spec, "fp32") == 4 * params
    assert costs.weight_bytes(spec, "bf16") == 2 * params
    linears = [(192, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    small = 2 * 64 + 64 * 3 + 64  # norms, conv kernel, final norm
    embed = 100 * 64
    # int8 (ONNX Runtime): one scale per tensor; the table int8 too, and the tied head a second int8 copy
    int8 = sum(o * i + 4 for o, i in linears) + (embed + 4) + (embed + 4)
    assert costs.weight_bytes(spec, "int8") == int8 + 4 * small
    # 8da4w, group 32: half a byte per weight, one fp32 scale per 32 inputs; group 64 pads 96 to 128
    # ... and the embedding is a 4-bit table too, stored apart from the (tied) packed head
    q4 = sum(o * i // 2 + o * (i // 32) * 4 for o, i in linears) + 2 * (embed // 2 + 100 * 2 * 4)
    assert costs.weight_bytes(spec, "8da4w", group_size=32) == q4 + 4 * small
    assert costs.weight_bytes_breakdown(spec, "8da4w", group_size=64)["linears"] == (
        192 * (32 + 4) + 64 * (32 + 4) + 2 * 96 * (32 + 4) + 64 * 2 * (32 + 4)
    )
    with pytest.raises(ValueError, match="precision"):
        costs.weight_bytes(spec, "int4")


def test_memory_estimate_parts_and_bounds():
    preset = LFM2_PRESETS["LFM2-350M"]
    for backend, quants in costs.BACKEND_QUANTS.items():
        for quant in quants:
            estimate = costs.estimate_peak_memory(preset, 2048, backend, quant)
            parts = (estimate.weights_bytes, estimate.state_bytes, estimate.activation_bytes, estimate.runtime_overhead_bytes)
            assert all(part > 0 for part in parts)
            assert estimate.total_bytes == sum(parts)
            assert 0 < estimate.lower_bound_bytes < estimate.weights_bytes
            assert json.loads(json.dumps(estimate.to_dict()))["total_bytes"] == estimate.total_bytes
    fp32 = costs.estimate_peak_memory(preset, 2048, "executorch", "fp32")
    q4 = costs.estimate_peak_memory(preset, 2048, "executorch", "8da4w")
    assert q4.weights_bytes < fp32.weights_bytes / 2 and q4.lower_bound_bytes < fp32.lower_bound_bytes / 6
    # the lower bound never exceeds what any runtime must read: the layers' linear weights and the head, once
    assert fp32.lower_bound_bytes == int(0.9 * 4 * (costs.linear_macs_per_token(preset) + 65536 * 1024))
    assert q4.lower_bound_bytes == int(0.9 * 0.5 * (costs.linear_macs_per_token(preset) + 65536 * 1024))
    longer = costs.estimate_peak_memory(preset, 8192, "executorch", "fp32")
    assert longer.state_bytes > fp32.state_bytes and longer.lower_bound_bytes == fp32.lower_bound_bytes
    # ONNX Runtime's one session and ExecuTorch's one computing method each pack the weights
    # once, however many methods a measurement loads; ExecuTorch plans one 128-token chunk's
    # activations whatever the prompt
    assert costs.estimate_peak_memory(preset, 2048, "onnx", "fp32", loaded_methods=1).weights_bytes == costs.estimate_peak_memory(preset, 2048, "onnx", "fp32").weights_bytes
    assert costs.estimate_peak_memory(preset, 2048, "executorch", "fp32", loaded_methods=1).weights_bytes == fp32.weights_bytes
    short = costs.estimate_peak_memory(preset, 2048, "executorch", "8da4w", prefill_tokens=128)
    from search_space.costs.memory import MEASUREMENT_BYTES

    assert short.activation_bytes == q4.activation_bytes == costs.activation_workspace_bytes(preset, 128, 2048, "flash") + MEASUREMENT_BYTES


def test_memory_estimate_refuses_bad_backend_quant_and_context():
    preset = LFM2_PRESETS["LFM2-350M"]
    with pytest.raises(UserError, match="backend 'onnx' compiles fp32, int8"):
        costs.estimate_peak_memory(preset, 128, "onnx", "8da4w")
    with pytest.raises(UserError, match="unknown backend"):
        costs.estimate_peak_memory(preset, 128, "tflite", "fp32")
    with pytest.raises(UserError, match="context"):
        costs.estimate_peak_memory(preset, 0, "eager", "fp32")


def test_the_cost_model_and_the_compiler_read_one_backend_table():
    from devices.artifact import QUANTS
    from lfm2.backends import QUANTS as TABLE

    assert costs.BACKEND_QUANTS is TABLE and QUANTS is TABLE  # derived, not kept in sync


def test_describe_is_json_and_consistent():
    spec = random.Random(0).choice(sampled("small", 5, seed=9))
    described = costs.describe(spec, 512, "onnx", "int8")
    assert json.loads(json.dumps(described)) == described
    assert described["parameters"] == costs.parameters(spec)
    assert described["memory"]["quant"] == "int8"
    assert described["weight_bytes"]["fp32"] == 4 * described["parameters"]


EAGER_FOOTPRINT = """
import resource, sys, psutil, torch
import lfm2
torch.set_num_threads(1)
spec = lfm2.ArchSpec.from_json(sys.argv[1])
context = int(sys.argv[2])
def peak():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and
    # exec, so a child of a large pytest process would report the parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = psutil.Process().memory_info().rss  # the RSS just before loading, as the measurement takes it
with torch.no_grad():
    model = lfm2.build_model(spec, seed=0).eval()
    out = model.step(torch.zeros(1, context, dtype=torch.long), torch.tensor([0]), *model.init_state(1, max_context=context))
    model.step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([context - 1]), *out[1:])
print(peak() - base)
"""


@pytest.mark.slow
def test_eager_footprint_is_above_the_lower_bound_and_near_the_estimate():
    """A real measurement in a fresh process: peak RSS growth of building a model, a
    prefill of `context` tokens and one decode step."""
    import subprocess
    import sys

    spec = ArchSpec(vocab_size=8192, d_model=512, layers=("conv", "conv", "attn", "conv", "conv", "attn", "conv", "conv"),
                    n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1536, max_seq_len=4096)
    for context in (256, 2048):
        result = subprocess.run([sys.executable, "-c", EAGER_FOOTPRINT, spec.to_json(), str(context)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        measured = int(result.stdout.strip())
        estimate = costs.estimate_peak_memory(spec, context, "eager", "fp32")
        assert estimate.lower_bound_bytes <= measured
        assert 0.7 * measured <= estimate.total_bytes <= 1.4 * measured, (context, measured, estimate)


def test_onnx_estimate_follows_the_chunked_step_graph():
    """ONNX Runtime prefills in steps of 128 tokens: the rows of every activation stop
    growing at 128, a step's scores are against the K/V buffer of `context` positions, which
    is held once (updated in place); the table is read by the runner (not resident) and one
    session packs the weights once."""
    preset = LFM2_PRESETS["LFM2-350M"]
    whole = costs.activation_workspace_bytes(preset, 8192, 8192, "prefix")
    chunked = costs.activation_workspace_bytes(preset, 8192, 8192, "prefix", chunk=128)
    assert chunked * 20 < whole  # [128, 8192] scores instead of [8192, 8192]
    short = costs.estimate_peak_memory(preset, 2064, "onnx", "int8", prefill_tokens=2048)
    long = costs.estimate_peak_memory(preset, 8208, "onnx", "int8", prefill_tokens=8192)
    assert short.weights_bytes == long.weights_bytes == costs.weight_bytes_breakdown(preset, "int8")["linears"] + costs.weight_bytes_breakdown(preset, "int8")["head"] + costs.weight_bytes_breakdown(preset, "int8")["other"]
    assert long.total_bytes < 2 << 30  # measured 1,280 MiB with 256-token steps (BENCHMARKS.md); 12.4 GiB with T x T scores
    estimate_8192 = costs.estimate_peak_memory(preset, 8192, "onnx", "int8", prefill_tokens=8192)
    assert estimate_8192.lower_bound_bytes < ONNX_INT8_8192_MIB * MIB and abs(estimate_8192.total_bytes / MIB - ONNX_INT8_8192_MIB) < 0.1 * ONNX_INT8_8192_MIB
    assert short.state_bytes == costs.kv_cache_bytes(preset, 2064, 2) + costs.conv_state_bytes(preset)  # one fp16 copy, in place
    fp32 = costs.estimate_peak_memory(preset, 2064, "onnx", "fp32", prefill_tokens=2048)
    assert fp32.state_bytes == costs.kv_cache_bytes(preset, 2064) + costs.conv_state_bytes(preset)  # an fp32 artifact's cache is fp32
    for estimate, measured in ((short, ONNX_INT8_2048_MIB[0]), (short, ONNX_INT8_2048_MIB[1])):
        assert estimate.lower_bound_bytes < measured * MIB
        assert abs(estimate.total_bytes / MIB - measured) < 0.1 * measured
    assert costs.estimate_peak_memory(preset, 2064, "onnx", "int8", prefill_tokens=2048, loaded_methods=1).total_bytes == short.total_bytes  # one session


ONNX_FOOTPRINT_SPEC = ArchSpec(vocab_size=8192, d_model=512, layers=("conv", "conv", "attn", "conv", "conv", "attn", "conv", "conv"),
                               n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1536, max_seq_len=4096)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8"])
def test_onnx_footprint_is_above_the_lower_bound_and_near_the_estimate(quant, tmp_path, monkeypatch):
    """A real ONNX artifact measured by the harness (fresh child process): a prefill of
    1,000 tokens (four chunks) and decode at that depth."""
    from devices.compile import compile
    from devices.measure import measure
    from devices.protocol import Limits, Protocol

    monkeypatch.setenv("LFM2_NAS_LOCKS", str(tmp_path / "core-locks"))
    artifact = compile(ONNX_FOOTPRINT_SPEC, "onnx", quant, 1024, (1000,), cache_dir=tmp_path, verify=False)
    protocol = Protocol(prompt_lengths=(1000,), decode_depths=(1000,), decode_tokens=4, min_runs=1, max_runs=1, max_seconds_per_point=0.5, threads=1)
    m = measure(artifact, protocol, Limits(threads=1, timeout_s=600))
    assert m.status == "ok", m.error
    measured = m.memory["footprint_bytes"]
    estimate = costs.estimate_peak_memory(ONNX_FOOTPRINT_SPEC, 1004, "onnx", quant, prefill_tokens=1000)
    assert estimate.lower_bound_bytes <= measured
    assert 0.85 * measured <= estimate.total_bytes <= 1.2 * measured, (measured, estimate)


def test_the_cards_budget_admits_lfm2_350m_on_the_default_backend():
    """`lfm2-nas search --device pixel8 --budget 500MB` (defaults: ExecuTorch 8da4w, context
    2,048 + 8 decode tokens, the default space): LFM2-350M is in the space, the prefilter's
    lower bound lets it through, and both the estimate and the measured footprint fit."""
    from lfm2.sizes import parse_size
    from nas.search import SearchConfig

    config = SearchConfig(device="pixel8", budget_bytes=parse_size("500MB", what="--budget", require_unit=True))
    preset = LFM2_PRESETS["LFM2-350M"]
    assert SearchSpace.load(config.space).contains(preset)
    estimate = costs.estimate_peak_memory(preset, config.context + config.decode_tokens, config.backend, config.quant, prefill_tokens=config.context)
    measured = 367 * MIB  # BENCHMARKS.md, "ExecuTorch artifacts shaped like what ships" (context 2,064)
    assert estimate.lower_bound_bytes < measured < config.budget_bytes
    assert estimate.total_bytes < config.budget_bytes and abs(estimate.total_bytes - measured) < 0.1 * measured
