"""The measurement protocol and the `Measurement` it produces: plain, JSON-serialisable data
that crosses process and network boundaries (agents, Ray workers, the study).

Nothing here runs a model; `devices.measure` does (see DESIGN.md, "Measurement protocol").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lfm2.errors import UserError

MEASUREMENT_STATUSES = ("ok", "oom", "error", "timeout", "lost")


@dataclass(frozen=True)
class Protocol:
    """How to measure an artifact. Part of every cache key: change it and results differ."""

    prompt_lengths: tuple[int, ...] = (128, 512, 2048)
    decode_depths: tuple[int, ...] = (128, 2048)
    decode_tokens: int = 16  # tokens generated per timed decode run
    warmup_runs: int = 1  # at least this many untimed runs; then more until two agree (devices.sampling.warm_up)
    max_warmup_runs: int = 10
    min_runs: int = 5
    max_runs: int = 60
    max_seconds_per_point: float = 10.0
    trim_fraction: float = 0.2
    ci_target: float = 0.02  # stop sampling once the median's 95% interval is within +-2% of it
    cv_threshold: float = 0.10  # re-measure a point whose coefficient of variation is above this
    disturbance_threshold: float = 0.15  # re-measure a point around which the calibration kernel ran >15% slower; 0: no check
    max_remeasures: int = 1
    measure_memory: bool = True
    threads: int | None = None  # None: the device's recommended thread count
    cpus: tuple[int, ...] | None = None  # CPU affinity; None: the device's recommended cores
    # the anchor artifact (its bundle's sha256, as an agent stores it) timed side by side with
    # the candidate, sample by sample (devices.sampling.measure_anchored_point): part of the key,
    # since an anchored point stops on the ratio's interval; None: no anchor
    anchor_sha256: str | None = None
    # at most this many fresh processes per point (devices.processes): after the first, another
    # process measures the points whose figure (the anchored ratio, else the median) is still less
    # sure than ci_target, and the processes' figures are combined; within a process a point is
    # then re-measured only when disturbed, not for precision (that time is better spent in a new
    # process, since process-to-process differences are what is left). 1: one process, as before
    processes: int = 1
    # at most this many loads of the model (and the anchor) inside each measuring process, every
    # point timed after each load and the loads' figures combined as processes' are
    # (devices.processes): where the weights and buffers land in memory moves a decode ratio by
    # ~5% from one load to the next, as much as a fresh process does, while a reload costs
    # ~0.1 s against a process's ~3-10 s (BENCHMARKS.md, "Load to load"). From the second load
    # on, a point whose combined figure is within ci_target is not timed again. 1: one load
    loads: int = 1
    # give the measuring process transparent huge pages for what it allocates (glibc's
    # malloc.hugetlb=1 tunable: large allocations are madvise(MADV_HUGEPAGE)d), the memory pass
    # excepted (devices.measure_child): the weights in 2 MiB pages, meant to take TLB misses and
    # part of the page placement out of a decode step (its own effect on the spread is not shown
    # yet: BENCHMARKS.md, "Load to load")
    huge_pages: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt_lengths", "decode_depths"):
            values = getattr(self, name)
            if isinstance(values, int):
                values = (values,)
            values = tuple(values)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise UserError(f"protocol {name} must be positive integers, got {values!r}")
            object.__setattr__(self, name, values)
        if self.cpus is not None:
            object.__setattr__(self, "cpus", tuple(self.cpus))
        for name in ("processes", "loads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"protocol {name} must be a whole number of {name} >= 1, got {value!r}")
        if not isinstance(self.huge_pages, bool):
            raise UserError(f"protocol huge_pages must be true or false, got {self.huge_pages!r}")
        for name in ("decode_tokens", "min_runs", "max_runs", "processes", "loads"):
            if getattr(self, name) < 1:
                raise UserError(f"protocol {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_runs", "max_warmup_runs", "max_remeasures"):
            if getattr(self, name) < 0:
                raise UserError(f"protocol {name} must be >= 0, got {getattr(self, name)}")
        for name in ("ci_target", "cv_threshold", "disturbance_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise UserError(f"protocol {name} must be a finite number >= 0, got {value!r}")
        if self.max_runs < self.min_runs:
            raise UserError(f"protocol max_runs ({self.max_runs}) must be >= min_runs ({self.min_runs})")
        if not 0 <= self.trim_fraction < 0.5:
            raise UserError(f"protocol trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.anchor_sha256 is not None and not (isinstance(self.anchor_sha256, str) and len(self.anchor_sha256) == 64 and all(c in "0123456789abcdef" for c in self.anchor_sha256)):
            raise UserError(f"protocol anchor_sha256 must be an artifact bundle's sha256 (64 lower-case hex digits), got {self.anchor_sha256!r}")

    @property
    def max_context(self) -> int:
        """The longest context the artifact must hold: a prefill, or a depth plus its decode."""
        return max(max(self.prompt_lengths), max(self.decode_depths) + self.decode_tokens)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["prompt_lengths"] = list(self.prompt_lengths)
        data["decode_depths"] = list(self.decode_depths)
        data["cpus"] = list(self.cpus) if self.cpus is not None else None
        if data["anchor_sha256"] is None:
            # absent rather than null: a protocol without an anchor keeps the dict, the key and
            # the wire form it had before anchors existed (cached results, stored jobs, agents)
            del data["anchor_sha256"]
        # the same for one process, one load, no huge pages: keys and wire form as before
        for name, default in (("processes", 1), ("loads", 1), ("huge_pages", False)):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown protocol field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @property
    def key(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Limits:
    """What a measurement child process may use: enforced by the OS, recorded in results."""

    cpus: tuple[int, ...] | None = None  # CPU affinity
    threads: int | None = None  # runtime threads
    memory_bytes: int | None = None  # a cap; going over it gives status "oom"
    timeout_s: float | None = None  # wall clock; going over it gives status "timeout"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cpus"] = list(self.cpus) if self.cpus is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        data = dict(data)
        if data.get("cpus") is not None:
            data["cpus"] = tuple(data["cpus"])
        return cls(**data)


@dataclass
class Stats:
    """Latency statistics of one measured point, in milliseconds, with the raw samples."""

    median_ms: float
    trimmed_mean_ms: float
    p10_ms: float
    p90_ms: float
    cv: float
    samples_ms: list[float]
    tokens: int  # tokens per sample: the prompt length for prefill; 1 for decode (a decode sample is the per-token latency of a run of decode_tokens)
    noisy: bool = False  # the median's interval still wider than ci_target after the allowed re-measures
    remeasured: int = 0
    # the median's distribution-free confidence interval and its exact coverage (devices.sampling)
    ci_low_ms: float | None = None
    ci_high_ms: float | None = None
    ci_level: float | None = None
    warmup_runs: int | None = None  # untimed runs made before the samples (warm-up until steady)
    calibration_slowdown: float | None = None  # the calibration kernel around the kept attempt, over its reference
    disturbed: bool = False  # every attempt ran while the cores were busy with something else
    disturbances: list[float] = field(default_factory=list)  # slowdowns of the attempts found disturbed
    pooled_attempts: int = 1  # attempts whose samples these are (an anchored point pools its undisturbed attempts)
    # with an anchor (devices.sampling.measure_anchored_point): the candidate/anchor ratio's
    # median and interval, its samples, the anchor's median and samples; None without one
    anchor: dict[str, Any] | None = None
    # with Protocol.processes > 1 (devices.processes): each fresh process's own figures for this
    # point (median and interval; the ratio and its interval when anchored), in the order run;
    # the figures above are their combination. None: measured in one process
    processes: list[dict[str, Any]] | None = None
    # with Protocol.loads > 1: the same, for each load of the model inside one process (the
    # figures above then combine the loads; `processes`, if any, the processes' combinations)
    loads: list[dict[str, Any]] | None = None

    @property
    def anchor_ratio(self) -> float | None:
        """The candidate's time over the anchor's, sampled side by side; None without an anchor."""
        return None if self.anchor is None else float(self.anchor["ratio"])

    @property
    def anchor_ratio_half_width_rel(self) -> float | None:
        """+-x of the anchor ratio (relative) at its interval's confidence."""
        if self.anchor is None or self.anchor.get("ratio_ci_low") is None or not self.anchor["ratio"]:
            return None
        return (self.anchor["ratio_ci_high"] - self.anchor["ratio_ci_low"]) / 2 / self.anchor["ratio"]

    @property
    def ci_half_width_rel(self) -> float | None:
        """+-x of the median (relative) at the interval's confidence."""
        if self.ci_low_ms is None or self.ci_high_ms is None or self.median_ms <= 0:
            return None
        return (self.ci_high_ms - self.ci_low_ms) / 2 / self.median_ms

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.median_ms / 1000.0) if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tokens_per_s"] = self.tokens_per_s
        data["ci_half_width_rel"] = self.ci_half_width_rel
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        data = {k: v for k, v in data.items() if k not in ("tokens_per_s", "ci_half_width_rel")}
        return cls(**data)


@dataclass
class Measurement:
    """What a device reports for one artifact under one protocol.

    `prefill[T]`: the latency of a prefill of T tokens. `decode[C]`: the latency of ONE
    decode step at context depth C (per token; the run generates `decode_tokens` tokens).
    Memory: `footprint_bytes` is the model's own (growth of the measuring process's peak RSS
    over the runtime's baseline before the model was loaded), the figure a memory budget
    is compared with; `peak_rss_bytes` is the absolute high-water mark.
    """

    status: str  # one of MEASUREMENT_STATUSES
    artifact_sha256: str = ""
    backend: str = ""
    quant: str = ""
    spec_key: str = ""
    protocol: dict[str, Any] = field(default_factory=dict)
    load_time_s: float | None = None
    prefill: dict[int, Stats] = field(default_factory=dict)
    decode: dict[int, Stats] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # footprint_bytes, peak_rss_bytes, baseline_rss_bytes, pss_bytes ...
    artifact_bytes: int | None = None
    stack: dict[str, Any] = field(default_factory=dict)  # runtime versions, delegate, threads, affinity, CPU, OS
    device: dict[str, Any] = field(default_factory=dict)  # name, profile, emulated, fingerprint
    thermal: dict[str, Any] = field(default_factory=dict)  # CPU frequency / temperature before and after
    error: str | None = None  # the reason, for any status but "ok"
    wall_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.status not in MEASUREMENT_STATUSES:
            raise ValueError(f"status must be one of {MEASUREMENT_STATUSES}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def footprint_bytes(self) -> int | None:
        return self.memory.get("footprint_bytes")

    def prefill_ms(self, length: int) -> float:
        return self.prefill[length].median_ms

    def decode_ms(self, depth: int) -> float:
        return self.decode[depth].median_ms

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["prefill"] = {str(k): v.to_dict() for k, v in self.prefill.items()}
        data["decode"] = {str(k): v.to_dict() for k, v in self.decode.items()}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        data = dict(data)
        data["prefill"] = {int(k): Stats.from_dict(v) for k, v in data.get("prefill", {}).items()}
        data["decode"] = {int(k): Stats.from_dict(v) for k, v in data.get("decode", {}).items()}
        return cls(**data)

    @classmethod
    def failure(cls, status: str, error: str, **facts: Any) -> Measurement:
        return cls(status=status, error=error, **facts)


__all__ = ["Protocol", "Limits", "Stats", "Measurement", "MEASUREMENT_STATUSES"]
