"""The benchmarks' models and arithmetic: comparison shapes, bytes per decode step, roofline rows."""

import pytest

from bench.models import LLAMA_3_2_1B_SHAPED, QWEN3_0_6B_SHAPED, by_size, decode_bytes_per_token, quick_models, sample_space
from search_space import costs


def test_comparison_shapes_match_their_public_parameter_counts():
    # Qwen3-0.6B: 596,049,920 parameters (tied); Llama-3.2-1B: 1,235,814,400 (tied)
    assert costs.parameters(QWEN3_0_6B_SHAPED) == 596_049_920
    assert costs.parameters(LLAMA_3_2_1B_SHAPED) == 1_235_814_400
    assert not LLAMA_3_2_1B_SHAPED.qk_norm and QWEN3_0_6B_SHAPED.qk_norm


def test_decode_bytes_count_the_tied_head_and_the_kv_of_the_context():
    spec = quick_models()["tiny-LFM2"]
    d, v = spec.d_model, spec.vocab_size
    linears = 4 * costs.linear_macs_per_token(spec)
    small = costs.weight_bytes_breakdown(spec, "fp32")["other"]
    kv = costs.kv_cache_bytes(spec, 100, 4)
    expected = linears + 4 * v * d + small + 4 * d + kv + costs.conv_state_bytes(spec, 4)
    assert decode_bytes_per_token(spec, "fp32", 100) == expected
    # deeper context: more K/V read, exactly
    assert decode_bytes_per_token(spec, "fp32", 200) - decode_bytes_per_token(spec, "fp32", 100) == costs.kv_cache_bytes(spec, 100, 4)
    # 8da4w reads fewer weight bytes than fp32
    assert decode_bytes_per_token(spec, "8da4w", 100) < decode_bytes_per_token(spec, "fp32", 100)


def test_sample_space_is_deterministic_distinct_and_in_the_space():
    from search_space import SearchSpace

    first, second = sample_space(6, seed=3), sample_space(6, seed=3)
    assert [s.key for s in first] == [s.key for s in second]
    assert len({s.key for s in first}) == 6
    space = SearchSpace.load("small")
    assert all(space.contains(s) for s in first)


def test_by_size_spans_smallest_to_largest():
    specs = sample_space(8, seed=0)
    picked = by_size(specs, 3)
    sizes = sorted(costs.parameters(s) for s in specs)
    assert costs.parameters(picked[0]) == sizes[0] and costs.parameters(picked[-1]) == sizes[-1]
    assert costs.parameters(picked[1]) == sizes[round(7 / 2)]  # the middle rank of 8
    assert by_size(specs, 20) == sorted(specs, key=costs.parameters)


def test_roofline_row_fractions():
    from bench.roofline import roofline_row

    spec = quick_models()["tiny-LFM2"]
    row = roofline_row(spec, "onnx", "fp32", prefill_ms=10.0, decode_ms=2.0, prefill_tokens=128, depth=128, bandwidth_GBps=20.0, gemm_GFLOPs=100.0)
    flops = costs.prefill_flops(spec, 128)
    assert row["prefill_GFLOPs"] == pytest.approx(flops / 0.010 / 1e9)
    assert row["prefill_fraction_of_gemm"] == pytest.approx(row["prefill_GFLOPs"] / 100.0)
    assert row["decode_GBps"] == pytest.approx(decode_bytes_per_token(spec, "fp32", 128) / 0.002 / 1e9)
    failed = roofline_row(spec, "onnx", "int8", None, None, 128, 128, 20.0, 100.0)
    assert "prefill_GFLOPs" not in failed and "decode_GBps" not in failed


def test_lfm2_ratio_table_is_lfm2_over_other():
    from bench.lfm2_vs_attention import ratio_table

    models = {"a": {"prefill": {512: 300.0, 2048: None}}, "b": {"prefill": {512: 100.0, 2048: 50.0}}}
    assert ratio_table(models, "a", "b", (512, 2048), "prefill") == [pytest.approx(3.0), None]


def test_roofline_draws_only_architectures_every_backend_can_run():
    pytest.importorskip("llama_cpp")  # the llamacpp backend's module loads its runtime
    from bench.roofline import runnable_draw
    from devices.backends.llamacpp_gguf import unsupported_reason

    specs = runnable_draw(20, 3, {"onnx", "llamacpp"})
    assert len(specs) >= 3
    assert all(unsupported_reason(spec) is None for spec in specs)
    # without llama.cpp nothing is filtered: the draw is the plain seeded one
    assert [s.key for s in runnable_draw(20, 3, {"onnx"})] == [s.key for s in sample_space(20, seed=0)]


def test_repeatability_variants_get_their_own_block_and_reproduce_command():
    from bench.repeatability import block_name, parse_args, title, variant_flags

    assert block_name(parse_args([])) == "repeatability"  # the block bench.memory_estimate reads
    et = parse_args(["--archs", "20", "--backend", "executorch", "--quant", "8da4w"])
    assert block_name(et) == "repeatability_executorch_8da4w" and "(executorch 8da4w)" in title(et)
    assert variant_flags(et) == ["--backend", "executorch", "--quant", "8da4w"]
    assert block_name(parse_args(["--order", "interleaved"])) == "repeatability_interleaved"
    # anchored is the default, as in a search: the plain protocol of before is a variant
    assert parse_args([]).anchor and variant_flags(parse_args(["--no-anchor"])) == ["--no-anchor"]
    assert block_name(parse_args(["--order", "interleaved", "--no-anchor"])) == "repeatability_interleaved_plain"
    assert "(plain)" in title(parse_args(["--no-anchor"]))


def test_repeatability_in_several_processes_is_a_variant_and_a_run_says_what_each_process_bought():
    from bench.repeatability import block_name, first_processes_ratio, parse_args, processes_used, protocol_for, variant_flags

    assert block_name(parse_args(["--processes", "3"])) == "repeatability_3_processes"
    assert block_name(parse_args(["--processes", "2", "--no-anchor"])) == "repeatability_2_processes_plain"
    # several loads in huge pages, as a search measures, is the default; the protocols of before are variants
    default = parse_args([])
    assert (default.processes, default.loads, default.huge_pages) == (1, 3, True)
    assert block_name(parse_args(["--loads", "1", "--no-huge-pages", "--processes", "3"])) == "repeatability_3_processes_1_load_4k_pages"
    assert variant_flags(parse_args(["--loads", "2", "--seconds", "2.5"])) == ["--loads", "2", "--seconds", "2.5"]
    several = protocol_for(512, 512, 2, False, 1, 3, True)
    assert several.loads == 3 and several.huge_pages and several.max_seconds_per_point == 1.5
    assert protocol_for(512, 512, 2, False, 3).processes == 3 and protocol_for(512, 512, 2, False, 3).max_seconds_per_point < protocol_for(512, 512, 2, False).max_seconds_per_point
    per_process = [{"ratio": 1.0, "ratio_ci_low": 0.97, "ratio_ci_high": 1.03, "disturbed": False},
                   {"ratio": 1.6, "ratio_ci_low": 1.55, "ratio_ci_high": 1.65, "disturbed": True},
                   {"ratio": 1.1, "ratio_ci_low": 1.07, "ratio_ci_high": 1.13, "disturbed": False}]
    result = {"measurement": {"decode": {"512": {"processes": per_process, "anchor": {"ratio": 1.05}}}}}
    assert first_processes_ratio(result, "decode", 512, 1) == pytest.approx(1.0)
    assert first_processes_ratio(result, "decode", 512, 2) == pytest.approx(1.0)  # the disturbed second left out
    assert 1.0 < first_processes_ratio(result, "decode", 512, 3) < 1.1
    assert first_processes_ratio({"measurement": {"decode": {"512": {"anchor": {"ratio": 1.0}}}}}, "decode", 512, 2) is None  # one process only
    assert processes_used([result, {"measurement": {"decode": {"512": {"samples_ms": [1.0]}}}}], "decode", 512) == {"median": 3, "min": 1, "max": 3}
    # the same for the loads of one process, and for those of a process among several
    loads = {"measurement": {"decode": {"512": {"loads": per_process, "anchor": {"ratio": 1.05}}}}}
    assert first_processes_ratio(loads, "decode", 512, 2, "loads") == pytest.approx(1.0)
    nested = {"measurement": {"decode": {"512": {"processes": [{"ratio": 1.0, "loads": per_process[:2]}]}}}}
    assert processes_used([loads, nested], "decode", 512, "loads") == {"median": 3, "min": 2, "max": 3}
