"""devices.measure: a fresh child per artifact, the full Measurement structure, and every
way a child can fail (over the memory cap, crash, allocation failure, timeout, tampered
artifact) coming back as data while the parent carries on. No test asserts a timing."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from devices.artifact import ArtifactError
from devices.compile import compile
from devices.measure import _to_measurement, measure, supervise
from devices.measure_child import is_out_of_memory
from devices.sampling import measure_point, summarize
from devices.protocol import Limits, Measurement, Protocol
from devices.stack import device_fingerprint, machine_facts
from lfm2.errors import UserError
from lfm2.spec import ArchSpec

TINY = ArchSpec(vocab_size=256, d_model=32, layers=("conv", "attn", "conv"), n_heads=2, n_kv_heads=1, ffn_dim=64)
QUICK = Protocol(prompt_lengths=(8, 12), decode_depths=(4, 9), decode_tokens=2, warmup_runs=1, min_runs=2, max_runs=3, max_seconds_per_point=0.2, max_remeasures=0)


# measurements here assert no timing: they lock cores of their own (conftest.py)
pytestmark = pytest.mark.usefixtures("private_core_locks")


@pytest.fixture(scope="module")
def eager_artifact(tmp_path_factory):
    return compile(TINY, "eager", "fp32", QUICK.max_context, QUICK.prompt_lengths, cache_dir=tmp_path_factory.mktemp("cache"))


def test_measurement_has_the_full_structure_and_round_trips(eager_artifact):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    m = measure(eager_artifact, QUICK, Limits(cpus=(cpu,), threads=1, timeout_s=300))
    assert m.status == "ok", m.error
    assert m.backend == "eager" and m.spec_key == TINY.key and m.load_time_s > 0
    assert sorted(m.prefill) == [8, 12] and sorted(m.decode) == [4, 9]
    for length, stats in m.prefill.items():
        assert stats.tokens == length
    for stats in [*m.prefill.values(), *m.decode.values()]:
        assert QUICK.min_runs <= len(stats.samples_ms) <= QUICK.max_runs
        assert all(s > 0 for s in stats.samples_ms)
        assert stats.median_ms > 0 and stats.trimmed_mean_ms > 0 and stats.cv >= 0
        assert stats.p10_ms <= stats.median_ms <= stats.p90_ms
        assert stats.remeasured == 0 and stats.ci_low_ms <= stats.median_ms <= stats.ci_high_ms and 0 < stats.ci_level <= 1
        assert stats.calibration_slowdown > 0 and stats.warmup_runs >= QUICK.warmup_runs
    assert all(stats.tokens == 1 for stats in m.decode.values())  # per-token samples
    memory = m.memory
    assert memory["baseline_rss_bytes"] > 0 and memory["peak_rss_bytes"] >= memory["baseline_rss_bytes"]
    assert memory["footprint_bytes"] == memory["peak_rss_bytes"] - memory["baseline_rss_bytes"]
    assert memory["child_max_rss_bytes"] >= memory["peak_rss_bytes"] and "method" in memory
    for key in ("cpu_model", "logical_cores", "os", "runtimes", "affinity", "threads", "backend", "quant"):
        assert key in m.stack, key
    assert m.stack["affinity"] == [cpu] and m.stack["threads"] == 1  # set in the child, recorded
    assert m.stack["calibration"]["reference_ms"] > 0
    assert m.stack["thread_env"]["OMP_NUM_THREADS"] == "1"
    assert m.stack["runtimes"]["torch"] != "absent"
    assert set(m.thermal) == {"before", "after"} and "cpu_freq_source" in m.thermal["before"]
    assert m.device["fingerprint"] and m.artifact_bytes == eager_artifact.size_bytes
    again = Measurement.from_dict(json.loads(m.to_json()))
    assert again.to_dict() == m.to_dict()


def test_a_tiny_memory_cap_gives_oom_and_the_parent_survives(eager_artifact):
    m = measure(eager_artifact, QUICK, Limits(memory_bytes=48 << 20, timeout_s=300))
    assert m.status == "oom"
    assert "cap" in m.error and m.memory["cap_bytes"] == 48 << 20
    assert m.memory["child_max_rss_bytes"] > 48 << 20


def test_a_timeout_gives_timeout(eager_artifact):
    m = measure(eager_artifact, QUICK, Limits(timeout_s=0.5))
    assert m.status == "timeout"
    assert "0.5 s" in m.error


def test_a_tampered_artifact_is_refused_before_measuring(eager_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(eager_artifact.path, copy)
    (copy / "eager.json").write_text('{"seed": 1}')
    with pytest.raises(ArtifactError, match="truncated or replaced|tampered"):
        measure(copy, QUICK)


def test_a_protocol_the_artifact_cannot_hold_is_a_user_error(eager_artifact):
    with pytest.raises(UserError, match="max_context"):
        measure(eager_artifact, Protocol(prompt_lengths=(8,), decode_depths=(64,), decode_tokens=2))


# -- children that fail, through the real supervisor ------------------------------------------


def _run(tmp_path, code: str, **limits):
    outcome = supervise([sys.executable, "-c", code], tmp_path, memory_bytes=limits.get("memory_bytes"), timeout_s=limits.get("timeout_s"))
    facts = {"cap_method": "test", "lock_wait_s": 0.0, "device": {}, "wall_time_s": outcome.wall_s}
    return outcome, _to_measurement(outcome, Limits(**limits), facts)


def test_a_crashing_child_gives_error_with_its_stderr(tmp_path):
    outcome, m = _run(tmp_path, "import os, sys; print('about to crash', file=sys.stderr, flush=True); os.abort()")
    assert outcome.signal == signal.SIGABRT
    assert m.status == "error" and "SIGABRT" in m.error and "about to crash" in m.error


def test_an_exception_without_a_result_gives_error_with_its_stderr(tmp_path):
    _, m = _run(tmp_path, "raise RuntimeError('the runtime refused the model')")
    assert m.status == "error" and "the runtime refused the model" in m.error


def test_an_allocation_failure_in_the_child_gives_oom(tmp_path):
    _, m = _run(tmp_path, "x = bytearray(1 << 62)")
    assert m.status == "oom" and "MemoryError" in m.error


def test_a_child_killed_from_outside_is_taken_for_the_oom_killer(tmp_path):
    _, m = _run(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert m.status == "oom" and "OOM killer" in m.error


def test_the_watchdog_kills_a_child_over_the_cap(tmp_path):
    outcome, m = _run(tmp_path, "import time; x = b\"\\x01\" * (400 << 20); time.sleep(30)", memory_bytes=200 << 20, timeout_s=60)
    assert outcome.killed_for == "oom" and m.status == "oom" and outcome.wall_s < 30


def test_runtime_allocation_failures_count_as_out_of_memory():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes"))
    assert not is_out_of_memory(ValueError("shape mismatch"))


# -- statistics -------------------------------------------------------------------------------


def test_summarize_median_trimmed_mean_percentiles_and_cv():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 100.0, 3.0, 2.0, 4.0, 3.0], tokens=7, trim_fraction=0.2)
    assert stats.median_ms == 3.0
    assert stats.trimmed_mean_ms == pytest.approx(19 / 6)  # 2,3,3,3,4,4 after cutting 2 from each end
    assert stats.p10_ms < stats.median_ms < stats.p90_ms
    assert stats.cv > 1.0  # the 100 ms outlier
    assert stats.samples_ms[0] == 5.0  # raw samples kept in order
    assert stats.tokens_per_s == pytest.approx(7 / 0.003)


def test_a_noisy_point_is_remeasured_and_flagged():
    values = iter([1.0, 50.0] * 100)
    protocol = Protocol(warmup_runs=1, min_runs=4, max_runs=4, max_remeasures=2, cv_threshold=0.1)
    stats = measure_point(lambda: next(values), protocol, tokens=1)
    assert stats.remeasured == 2 and stats.noisy
    steady = measure_point(lambda: 2.0, protocol, tokens=1)
    assert steady.remeasured == 0 and not steady.noisy and steady.cv == 0.0


def test_device_fingerprint_is_stable_and_follows_limits():
    facts = machine_facts()
    assert facts["logical_cores"] >= 1 and facts["memory_bytes"] > 0 and "onnxruntime" in facts["runtimes"]
    assert device_fingerprint(facts) == device_fingerprint(machine_facts())
    assert device_fingerprint({**facts, "limits": {"memory_bytes": 1}}) != device_fingerprint(facts)
    assert device_fingerprint({**facts, "hostname": "elsewhere"}) == device_fingerprint(facts)


def test_a_small_child_of_a_large_parent_is_not_taken_for_oom(tmp_path):
    # On Linux the exec'ed child's ru_maxrss starts at its parent's peak RSS; the cap must be
    # judged on the child's own peak. Make this process's peak clearly larger than the cap.
    ballast = bytearray(320 << 20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page: it is resident
    code = f"import json, pathlib; pathlib.Path({str(tmp_path / 'result.json')!r}).write_text(json.dumps({{'status': 'ok', 'memory': {{}}}}))"
    outcome = supervise([sys.executable, "-c", code], tmp_path, memory_bytes=200 << 20, timeout_s=60)
    del ballast
    facts = {"cap_method": "test", "lock_wait_s": 0.0, "device": {}, "wall_time_s": outcome.wall_s}
    m = _to_measurement(outcome, Limits(memory_bytes=200 << 20, timeout_s=60), facts)
    assert m.status == "ok", m.error
    if sys.platform.startswith("linux"):
        assert outcome.max_rss_bytes > 200 << 20  # the inherited figure the cap must not use
        assert outcome.peak_rss_bytes < 200 << 20 and m.memory["child_peak_rss_bytes"] == outcome.peak_rss_bytes


def test_a_spike_between_polls_is_still_oom(tmp_path):
    # allocate, touch and free 300 MiB, possibly between two polls, then report ok with the
    # child's own last VmHWM, as devices.measure_child does
    code = ("import json, pathlib\n"
            "from devices.stack import peak_rss_bytes\n"
            "x = bytearray(300 << 20); x[::4096] = b'\\x01' * len(x[::4096]); del x\n"
            f"pathlib.Path({str(tmp_path / 'result.json')!r}).write_text(json.dumps({{'status': 'ok', 'memory': {{'peak_rss_end_bytes': peak_rss_bytes()[0]}}}}))")
    outcome, m = _run(tmp_path, code, memory_bytes=200 << 20, timeout_s=60)
    assert m.status == "oom" and "cap" in m.error
