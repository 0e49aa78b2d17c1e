"""bench.harness.precompile: compiles in separate processes, sized to the free memory, and a
compile the OS kills is a failed row, not a crashed benchmark."""

from __future__ import annotations

import os

from bench.harness import _compile_isolated, compile_memory_estimate, precompile
from devices.protocol import Protocol
from lfm2.presets import presets
from lfm2.spec import ArchSpec

TINY = ArchSpec(vocab_size=256, d_model=32, layers=("conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)


def test_precompile_fills_the_cache(tmp_path):
    protocol = Protocol(prompt_lengths=(8,), decode_depths=(8,), decode_tokens=2)
    rows = precompile([(TINY, "eager", "fp32"), (TINY.replace(d_model=64, ffn_dim=128), "eager", "fp32")], protocol, cache_dir=tmp_path, workers=2)
    assert [row["ok"] for row in rows] == [True, True] and all(os.path.isdir(row["path"]) for row in rows)


def test_a_killed_compile_is_a_failed_row():
    row = _compile_isolated((1,), worker=os._exit)  # the process ends abruptly, as under the OOM killer
    assert row["ok"] is False and "killed" in row["error"]


def test_the_memory_estimate_grows_with_the_model():
    small, large = compile_memory_estimate(TINY), compile_memory_estimate(presets["LFM2-350M"])
    assert small < 2 << 30 < 8 << 30 < large


def test_the_check_against_eager_runs_in_its_own_process(tmp_path):
    """The benchmark process must not keep the memory of loading every artifact it checks."""
    from bench.harness import check_against_eager
    from devices.compile import compile as compile_artifact

    artifact = compile_artifact(TINY, "onnx", "fp32", 16, (8,), cache_dir=tmp_path, verify=False)
    assert not artifact.manifest.get("verification")  # so the check has to run now
    check = check_against_eager(artifact)
    assert check["passed"] is True and check["min_cosine"] > 0.999


def test_a_failed_precompile_is_reported_not_compiled_again(tmp_path):
    from bench.harness import compile_and_measure

    protocol = Protocol(prompt_lengths=(8,), decode_depths=(8,), decode_tokens=2)
    row = compile_and_measure(TINY, "eager", "fp32", protocol, cache_dir=tmp_path, precompiled={"ok": False, "error": "the compile process died"})
    assert row["ok"] is False and row["stage"] == "compile" and "not compiled again" in row["error"]
    assert not any(tmp_path.iterdir())  # nothing was compiled here


def test_a_measurement_killed_part_way_keeps_the_points_it_finished():
    """An artifact OOM-killed at its longest prefill: the shorter prefill was timed in full and
    counts; the longer one and the footprint (the kill came after the memory pass) do not."""
    from bench.harness import footprint_bytes, measured_ms

    result = {"ok": False, "stage": "measure", "error": "oom: SIGKILLed during prefill (length 8192)",
              "measurement": {"prefill": {"4096": {"median_ms": 66884.1}}, "decode": {}, "memory": {"footprint_bytes": 16 << 30}}}
    assert measured_ms(result, "prefill", 4096) == 66884.1
    assert measured_ms(result, "prefill", 8192) is None and measured_ms(result, "decode", 512) is None
    assert footprint_bytes(result) is None
    assert measured_ms({"ok": False, "stage": "compile", "error": "export failed"}, "prefill", 4096) is None  # nothing was measured
