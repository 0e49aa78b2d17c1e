"""A candidate and an anchor as tiny eager artifacts, a quick protocol and one core: what the
anchored-measurement tests (test_measure_anchor.py) and the several-processes tests
(test_measure_processes.py) measure end to end."""

from __future__ import annotations

import os
from pathlib import Path

from devices.protocol import Limits, Protocol
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
