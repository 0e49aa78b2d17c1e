"""An anchored measurement: every timed sample a pair (the candidate's run and a fixed anchor
artifact's, back to back), sampled until the ratio is pinned down, so that drift of the host
between measurements cancels. The sampling logic on synthetic clocks (drift made exactly);
the child end to end on real tiny artifacts. No test asserts a timing of this machine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from devices.compile import compile
from devices.measure import measure
from devices.protocol import Limits, Protocol, Stats
from devices.sampling import AnchoredRun, measure_anchored_point, measure_point
from lfm2.errors import UserError
from testkit.anchored import QUICK, SMALL, compile_pair, one_core_limits

SYNTHETIC = Protocol(warmup_runs=1, max_warmup_runs=2, min_runs=6, max_runs=200, max_seconds_per_point=60, ci_target=0.02, max_remeasures=0, disturbance_threshold=0, cv_threshold=100)

pytestmark = pytest.mark.usefixtures("private_core_locks")


class BurstyHost:
    """A clock for two workloads on a host whose neighbours burst: each run is, with
    probability `burst`, slowed by a random 1.3-3x (interference only ever adds time). The
    candidate costs `ratio` x the anchor; `speed` scales both (the host's drift); `jitter` adds
    up to that much (relative) to every run."""

    def __init__(self, ratio: float, burst: float, seed: int, speed: float = 1.0, jitter: float = 0.0):
        self.ratio, self.burst, self.speed, self.jitter = ratio, burst, speed, jitter
        self.rng = np.random.default_rng(seed)

    def _run(self, clean_ms: float) -> float:
        slowdown = self.rng.uniform(1.3, 3.0) if self.rng.random() < self.burst else 1.0
        if self.jitter:  # the runs the bursts missed are not all equal either
            slowdown *= 1 + self.jitter * self.rng.random()
        return clean_ms * self.speed * slowdown

    def candidate(self) -> float:
        return self._run(10.0 * self.ratio)

    def anchor(self) -> float:
        return self._run(10.0)


def test_pairs_alternate_which_runs_first_and_an_attempt_is_found_again():
    calls = []
    run = AnchoredRun(lambda: calls.append("c") or 4.0, lambda: calls.append("a") or 2.0)
    assert [run() for _ in range(4)] == [4.0] * 4  # the candidate's own time
    assert calls == ["c", "a", "a", "c", "c", "a", "a", "c"]
    times = itertools.count(1.0)
    run = AnchoredRun(lambda: next(times), lambda: 1.0)
    samples = [run() for _ in range(6)]
    assert run.pairs_of(samples[2:5]) == run.pairs[2:5]
    with pytest.raises(ValueError, match="not taken by this run"):
        run.pairs_of([99.0])


def test_the_quantile_interval_is_the_medians_at_one_half_and_covers_as_often_as_it_says():
    from devices.sampling import median_interval, quantile_interval

    values = list(np.random.default_rng(3).exponential(size=25))
    assert quantile_interval(values, 0.5)[:2] == median_interval(values)[:2]
    rng = np.random.default_rng(0)
    true_q25 = -np.log(0.75)  # of the exponential distribution
    hits = sum(low <= true_q25 <= high for low, high, _ in (quantile_interval(rng.exponential(size=30), 0.25) for _ in range(2000)))
    assert 0.94 <= hits / 2000 <= 0.995


def test_bursts_of_interference_leave_the_ratio_of_lower_quartiles_exact():
    """55% of runs slowed by bursts: the plain median is a burst (never settled, or off); the anchored
    point's ratio (of lower quartiles, the runs the bursts missed) is the true 3.0, tight."""
    plain = measure_point(BurstyHost(ratio=3.0, burst=0.55, seed=1).candidate, SYNTHETIC, tokens=1)
    host = BurstyHost(ratio=3.0, burst=0.55, seed=1)
    anchored = measure_anchored_point(host.candidate, host.anchor, SYNTHETIC, tokens=1)
    assert plain.noisy or abs(plain.median_ms / 30.0 - 1) > 0.02  # the median is the bursts' hostage
    assert not anchored.noisy and len(anchored.samples_ms) < SYNTHETIC.max_runs
    assert anchored.anchor_ratio == pytest.approx(3.0, rel=1e-9)
    assert anchored.anchor["ratio_ci_low"] <= anchored.anchor_ratio <= anchored.anchor["ratio_ci_high"]
    assert anchored.anchor_ratio_half_width_rel <= SYNTHETIC.ci_target
    # the milliseconds stay the candidate's own, from the same (kept) pairs as the ratio
    assert anchored.anchor["candidate_quantile_ms"] == pytest.approx(30.0) and len(anchored.anchor["anchor_samples_ms"]) == len(anchored.samples_ms)
    again = Stats.from_dict(anchored.to_dict())
    assert again.anchor == anchored.anchor and Stats.from_dict(plain.to_dict()).anchor is None


def test_two_measurements_an_hour_of_drift_apart_agree_on_the_ratio():
    """The same candidate measured on a quiet host and on one 1.6x slower (what this VM's
    host did between an afternoon and an evening pass): 60% apart in milliseconds, the same
    ratio."""

    def measured_at(speed: float) -> Stats:
        host = BurstyHost(ratio=1.4, burst=0.3, seed=2, speed=speed)
        return measure_anchored_point(host.candidate, host.anchor, SYNTHETIC, tokens=1)

    quiet, slow = measured_at(1.0), measured_at(1.6)
    assert slow.anchor["candidate_quantile_ms"] == pytest.approx(1.6 * quiet.anchor["candidate_quantile_ms"])
    assert slow.anchor_ratio == pytest.approx(quiet.anchor_ratio) == pytest.approx(1.4)


class ScriptedSlowdowns:
    """A calibration whose kernel reads the given slowdowns in turn (two per attempt: before, after)."""

    def __init__(self, *slowdowns: float):
        self.values = iter(slowdowns)

    def slowdown(self) -> float:
        return next(self.values)


def test_an_anchored_re_measure_extends_the_pool_and_a_disturbed_attempt_is_left_out():
    """A point whose ratio is not pinned down by one attempt's `max_runs` pairs is re-measured
    and the two attempts' pairs pooled (the ratio the host's drift does not move), judged by the
    pooled ratio, not the CV of the milliseconds; an attempt the calibration found disturbed
    is not pooled."""
    few = Protocol(warmup_runs=1, max_warmup_runs=2, min_runs=6, max_runs=12, max_seconds_per_point=60, ci_target=0.02, max_remeasures=2, disturbance_threshold=0.15, cv_threshold=100)
    host = BurstyHost(ratio=2.0, burst=0.4, seed=4, jitter=0.1)
    run = AnchoredRun(host.candidate, host.anchor)
    pooled = measure_point(run, few, tokens=1, calibration=ScriptedSlowdowns(1.0, 1.0, 1.0, 1.0, 1.0, 1.0), precision=run.precision, pool=True)
    assert pooled.remeasured == 2 and pooled.pooled_attempts == 3 and len(pooled.samples_ms) == 36  # 12 pairs an attempt were never enough
    assert run.pairs_of(pooled.samples_ms) == run.pairs[-36:]
    pooled_precision = run.precision(pooled.samples_ms)
    # the same draws without pooling keep one attempt's 12 pairs
    host = BurstyHost(ratio=2.0, burst=0.4, seed=4, jitter=0.1)
    run = AnchoredRun(host.candidate, host.anchor)
    single = measure_point(run, few, tokens=1, calibration=ScriptedSlowdowns(1.0, 1.0, 1.0, 1.0, 1.0, 1.0), precision=run.precision)
    assert single.pooled_attempts == 1 and len(single.samples_ms) == 12
    assert pooled_precision < run.precision(single.samples_ms)

    # the middle attempt ran beside a hog (kernel 1.6x slower after it): left out of the pool
    host = BurstyHost(ratio=2.0, burst=0.4, seed=4, jitter=0.1)
    run = AnchoredRun(host.candidate, host.anchor)
    stats = measure_point(run, few, tokens=1, calibration=ScriptedSlowdowns(1.0, 1.0, 1.0, 1.6, 1.0, 1.0), precision=run.precision, pool=True)
    assert stats.pooled_attempts == 2 and stats.disturbances == [1.6] and not stats.disturbed
    kept = run.pairs_of(stats.samples_ms)
    warmup = len(run.pairs) - 36
    assert kept == run.pairs[warmup : warmup + 12] + run.pairs[warmup + 24 :]
    assert Stats.from_dict(stats.to_dict()).pooled_attempts == 2


def test_an_anchored_point_tight_after_its_first_attempt_is_not_re_measured_whatever_its_cv():
    host = BurstyHost(ratio=3.0, burst=0.55, seed=1)
    noisy_ms = Protocol(warmup_runs=1, max_warmup_runs=2, min_runs=6, max_runs=200, max_seconds_per_point=60, ci_target=0.02, max_remeasures=1, disturbance_threshold=0, cv_threshold=0.05)
    stats = measure_anchored_point(host.candidate, host.anchor, noisy_ms, tokens=1)
    assert stats.cv > noisy_ms.cv_threshold  # the bursts' milliseconds: a plain point would be re-measured
    assert stats.remeasured == 0 and not stats.noisy and stats.anchor_ratio == pytest.approx(3.0)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return compile_pair(tmp_path_factory.mktemp("cache"))


def test_an_anchored_measurement_carries_the_ratio_at_every_point_and_keeps_its_own_footprint(artifacts):
    plain = measure(artifacts["larger"], QUICK, one_core_limits())
    anchored = measure(artifacts["larger"], QUICK, one_core_limits(), anchor=artifacts["small"])
    assert plain.ok and anchored.ok, (plain.error, anchored.error)
    assert anchored.stack["anchor"] == {"artifact_key": artifacts["small"].key, "spec_key": SMALL.key, "backend": "eager", "quant": "fp32"}
    assert "anchor" not in plain.stack
    for stats in [*anchored.prefill.values(), *anchored.decode.values()]:
        anchor = stats.anchor
        assert anchor is not None and anchor["ratio"] > 0 and anchor["anchor_median_ms"] > 0
        assert anchor["ratio_ci_low"] <= anchor["ratio"] <= anchor["ratio_ci_high"]
        assert len(anchor["anchor_samples_ms"]) == len(stats.samples_ms)  # one anchor run per candidate run
        # the ratio is the candidate's lower quartile over the anchor's, of the same pairs
        assert anchor["candidate_quantile_ms"] == pytest.approx(float(np.quantile(stats.samples_ms, anchor["quantile"])))
        assert anchor["anchor_quantile_ms"] == pytest.approx(float(np.quantile(anchor["anchor_samples_ms"], anchor["quantile"])))
        assert anchor["ratio"] == pytest.approx(anchor["candidate_quantile_ms"] / anchor["anchor_quantile_ms"])
    assert all(stats.anchor is None for stats in [*plain.prefill.values(), *plain.decode.values()])
    # the anchor is loaded after the memory pass: the footprint is the candidate's alone
    assert anchored.footprint_bytes == pytest.approx(plain.footprint_bytes, rel=0.1, abs=4 << 20)


def test_an_anchor_of_another_runtime_or_too_short_a_context_is_refused_before_anything_runs(artifacts, tmp_path):
    onnx_like = compile(SMALL, "eager", "fp32", QUICK.max_context + 1, QUICK.prompt_lengths, cache_dir=tmp_path)
    onnx_like.manifest["backend"] = "onnx"  # a different runtime, as far as the check can tell
    with pytest.raises(UserError, match="same runtime and precision"):
        measure(artifacts["larger"], QUICK, one_core_limits(), anchor=onnx_like)
    short = compile(SMALL, "eager", "fp32", 4, (4,), cache_dir=tmp_path)
    with pytest.raises(UserError, match="the anchor cannot run this protocol.*max_context >= "):
        measure(artifacts["larger"], QUICK, one_core_limits(), anchor=short)


# -- the anchor's identity in the protocol, and an agent measuring with it ----------------------


def test_the_protocol_names_its_anchor_by_bundle_sha_and_a_plain_protocol_is_unchanged():
    plain = Protocol(prompt_lengths=(8,), decode_depths=(6,))
    assert "anchor_sha256" not in plain.to_dict()  # the dict, the key and the wire form of before anchors
    assert Protocol.from_dict(plain.to_dict()) == plain
    anchored = Protocol(prompt_lengths=(8,), decode_depths=(6,), anchor_sha256="ab" * 32)
    assert Protocol.from_dict(anchored.to_dict()) == anchored and anchored.key != plain.key
    with pytest.raises(UserError, match="anchor_sha256 must be an artifact bundle's sha256"):
        Protocol(anchor_sha256="../../etc/passwd")
    with pytest.raises(UserError, match="names an anchor artifact .* none was given"):
        measure(__file__, anchored)  # refused before the (bogus) artifact is even opened


def test_an_agent_measures_with_the_anchor_it_was_sent_over_a_real_socket(artifacts, tmp_path):
    from devices.agent import start_local_agent

    with start_local_agent(name="anchored", workdir=tmp_path / "agent", job_timeout_s=300) as handle, handle.client() as client:
        measurement = client.measure(artifacts["larger"], QUICK, timeout=300, anchor=artifacts["small"])
        uploaded = {job["protocol"].get("anchor_sha256") for job in client.jobs()}
        again = client.measure(artifacts["larger"], QUICK, timeout=300)  # the same candidate, no anchor: another job
    assert measurement.ok, measurement.error
    assert measurement.stack["anchor"]["spec_key"] == SMALL.key
    assert all(stats.anchor is not None for stats in [*measurement.prefill.values(), *measurement.decode.values()])
    (sha,) = uploaded - {None}  # the job named the anchor by the bundle the client uploaded
    assert measurement.protocol["anchor_sha256"] == sha
    assert again.ok and all(stats.anchor is None for stats in again.prefill.values())


def test_a_phone_over_adb_refuses_an_anchored_measurement_with_the_flag_to_use():
    from devices.adb.measure import Phone

    phone = Phone.__new__(Phone)  # the refusal comes before the phone is touched
    phone.transport = type("Transport", (), {"serial": "emulator-5554"})()
    with pytest.raises(UserError, match="--no-anchor"):
        phone.measure(__file__, Protocol(anchor_sha256="cd" * 32))


def test_the_cap_holds_the_candidate_to_its_own_peak_and_the_anchors_memory_fails_no_candidate():
    """The anchor loads after the memory pass: the candidate is held to the cap by that pass's
    peak, and the child going over the cap only once the anchor is loaded is not an oom."""
    from devices.measure import ChildOutcome, _to_measurement

    def outcome(killed_for, own_peak, child_peak, phase):
        memory = {"peak_rss_bytes": own_peak, "peak_rss_end_bytes": child_peak}
        data = {"status": "ok", "memory": memory, "prefill": {}, "decode": {}} if killed_for is None else None
        return ChildOutcome(returncode=0 if killed_for is None else None, signal=None, killed_for=killed_for, max_rss_bytes=child_peak, watched_rss_bytes=child_peak,
                            watched_hwm_bytes=child_peak, wall_s=1.0, stdout=f'{{"phase": "{phase}"}}\n', stderr="", result=data, partial={"memory": memory})

    cap = 500 << 20
    facts = {"cap_method": "test", "lock_wait_s": 0.0, "device": {}, "wall_time_s": 1.0, "anchored": True}
    fits = _to_measurement(outcome(None, 450 << 20, 640 << 20, "decode"), Limits(memory_bytes=cap), facts)
    assert fits.status == "ok", fits.error  # 640 MiB with the anchor loaded; the candidate's own 450
    over = _to_measurement(outcome(None, 520 << 20, 700 << 20, "decode"), Limits(memory_bytes=cap), facts)
    assert over.status == "oom" and "520 MiB" in over.error  # its own memory pass went over the cap
    blamed = _to_measurement(outcome("oom", 450 << 20, 800 << 20, "load_anchor"), Limits(memory_bytes=cap), facts)
    assert blamed.status == "error" and "with the anchor loaded during load_anchor" in blamed.error and "measure without the anchor" in blamed.error
    plain = _to_measurement(outcome(None, 450 << 20, 640 << 20, "decode"), Limits(memory_bytes=cap), {**facts, "anchored": False})
    assert plain.status == "oom"  # without an anchor the child's whole peak is the candidate's
