"""A candidate and an anchor as tiny eager artifacts, a quick protocol and one core: what the
anchored-measurement tests (test_measure_anchor.py), the several-processes tests
(test_measure_processes.py) and the several-loads tests (test_measure_loads.py) measure end to
end; and one anchored point's `Stats` as a process or a load would report it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from devices.protocol import Limits, Protocol, Stats
from devices.sampling import summarize
from lfm2.spec import ArchSpec

SMALL = ArchSpec(vocab_size=256, d_model=32, layers=("conv", "attn", "conv"), n_heads=2, n_kv_heads=1, ffn_dim=64)
LARGER = ArchSpec(vocab_size=256, d_model=64, layers=("conv", "attn", "conv", "conv", "attn", "conv"), n_heads=2, n_kv_heads=1, ffn_dim=192)
QUICK = Protocol(prompt_lengths=(8,), decode_depths=(6,), decode_tokens=2, warmup_runs=1, min_runs=3, max_runs=6, max_seconds_per_point=0.5, max_remeasures=0)


def compile_pair(cache: Path) -> dict:
    """{"small": the anchor, "larger": the candidate}, compiled eager fp32 for QUICK."""
    from devices.compile import compile

    return {name: compile(spec, "eager", "fp32", QUICK.max_context, QUICK.prompt_lengths, cache_dir=cache) for name, spec in (("small", SMALL), ("larger", LARGER))}


def one_core_limits() -> Limits:
    """The last usable core, one thread, five minutes."""
    return Limits(cpus=(sorted(os.sched_getaffinity(0))[-1],), threads=1, timeout_s=300)


def anchored_stats(ratio: float, half: float, disturbed: bool = False, seed: int = 0) -> Stats:
    """An anchored point's Stats: 12 samples around 10 ms x `ratio`, the ratio `ratio` with a
    relative half-width `half`, disturbed (calibration 1.5x) or not."""
    stats = summarize(list(np.random.default_rng(seed).normal(10.0 * ratio, 0.1, size=12)), 1, 0.2)
    stats.anchor = {"quantile": 0.25, "ratio": ratio, "ratio_ci_low": ratio * (1 - half), "ratio_ci_high": ratio * (1 + half), "anchor_samples_ms": [10.0] * 12}
    stats.disturbed = disturbed
    stats.calibration_slowdown = 1.5 if disturbed else 1.01
    stats.disturbances = [1.5] if disturbed else []
    return stats
