"""The interval a report draws around a measured latency: the measurement's own, widened to
what the study's measurements together say one load of a model moves a figure.

A point timed after several loads of the model (the search's default: 3 loads, Protocol.loads)
combines its loads' figures (random effects, DerSimonian-Laird) and gives an interval whose
between-load variance was estimated from those few figures alone. With 3 loads that is too
narrow about as often as not: in four 20-architecture runs of `bench.repeatability` a second
measurement fell inside the first one's 95% interval for 47-80% of the points (median 58%),
where honest intervals give ~83% (two independent estimates of equal precision; BENCHMARKS.md,
"Eight loads, and honest intervals"). The spread between loads is a property of the device and the runtime (a decode
ratio moves ~6% from one load to the next here, whatever the architecture), so a study with
many measured points knows it far better than any one point does: `pooled_load_spread` pools
the points' log figures between loads (one standard deviation, many degrees of freedom), and
`measured_interval` widens each point's interval to at least z * pooled sd / sqrt(loads kept)
either side of its figure. With the pooled spread the same runs gave 62-100% (median 84%).

What it does not cover: a component of the spread between measurements minutes apart that
all loads of one measurement share (the host's state): the lowest coverages (62%, 72%) are
of the runs where that component was largest.

Plain data in, plain numbers out: the stats dicts a study stores per trial (`Stats.to_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

#: The confidence of the intervals drawn (the measurements' own are 95%).
LEVEL = 0.95
#: Fewer degrees of freedom than this (loads beyond the first, over all points) and the pooled
#: spread is not trusted: the measurement's own interval is drawn as it is.
MIN_DEGREES_OF_FREEDOM = 10


@dataclass(frozen=True)
class LoadSpread:
    """The standard deviation of a point's log figure between loads of the model, pooled."""

    sd: float  # log scale: ~ the relative spread of one load's figure
    degrees_of_freedom: int  # sum over points of (loads kept - 1)
    points: int  # points that had two loads or more


def _kept(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loads a point's figure combined: the undisturbed ones, or all if every one was disturbed."""
    clean = [e for e in entries if not e.get("disturbed")]
    return clean or entries


def _figure_key(stats: dict[str, Any]) -> str:
    """What is ranked: the anchored ratio when the point has one, else the median milliseconds."""
    return "ratio" if isinstance(stats.get("anchor"), dict) else "median_ms"


def load_groups(stats: dict[str, Any]) -> list[list[float]]:
    """The per-load figures of one point, one list per process: its own `loads`, or the
    `loads` of each of its `processes` (a point measured in several processes)."""
    key = _figure_key(stats)
    holders = [stats] if stats.get("loads") else [p for p in stats.get("processes") or [] if isinstance(p, dict) and p.get("loads")]
    groups = []
    for holder in holders:
        figures = [e.get(key) for e in _kept([e for e in holder["loads"] if isinstance(e, dict)])]
        groups.append([float(f) for f in figures if isinstance(f, (int, float)) and f > 0])
    return groups


def pooled_load_spread(points: Iterable[dict[str, Any] | None]) -> LoadSpread | None:
    """The between-load standard deviation of the log figure pooled over `points` (stats
    dicts): sqrt(sum of squared deviations from each group's mean / sum of (n - 1)). None
    with fewer than MIN_DEGREES_OF_FREEDOM."""
    squares, dof, counted = 0.0, 0, 0
    for stats in points:
        if not isinstance(stats, dict):
            continue
        used = False
        for figures in load_groups(stats):
            if len(figures) < 2:
                continue
            logs = [math.log(f) for f in figures]
            mean = sum(logs) / len(logs)
            squares += sum((y - mean) ** 2 for y in logs)
            dof += len(logs) - 1
            used = True
        counted += used
    if dof < MIN_DEGREES_OF_FREEDOM:
        return None
    return LoadSpread(sd=math.sqrt(squares / dof), degrees_of_freedom=dof, points=counted)


def loads_kept(stats: dict[str, Any]) -> int:
    """How many loads the point's figure combined (over all its processes); 0 without loads."""
    return sum(len(figures) for figures in load_groups(stats))


def measured_interval(stats: dict[str, Any] | None, value: float, spread: LoadSpread | None = None, level: float = LEVEL) -> tuple[float, float] | None:
    """(below, above) `value`, the plotted figure of a point with these stats: its measured
    interval (in an anchored study the objective is the ratio to the anchor times a reference,
    so the ratio's interval, scaled alike), widened to the pooled between-load spread over
    the loads it kept. None when the point stored no interval."""
    if not stats:
        return None
    anchor = stats.get("anchor")
    if isinstance(anchor, dict) and anchor.get("ratio") and anchor.get("ratio_ci_low") is not None and anchor.get("ratio_ci_high") is not None:
        figure, low, high = anchor["ratio"], anchor["ratio_ci_low"], anchor["ratio_ci_high"]
    elif stats.get("ci_low_ms") is not None and stats.get("ci_high_ms") is not None and stats.get("median_ms"):
        figure, low, high = stats["median_ms"], stats["ci_low_ms"], stats["ci_high_ms"]
    else:
        return None
    loads = loads_kept(stats)
    if spread is not None and loads >= 1:
        half = NormalDist().inv_cdf(0.5 + level / 2) * spread.sd / math.sqrt(loads)
        low, high = min(low, figure * math.exp(-half)), max(high, figure * math.exp(half))
    scale = value / figure
    return max(0.0, value - low * scale), max(0.0, high * scale - value)


__all__ = ["LEVEL", "MIN_DEGREES_OF_FREEDOM", "LoadSpread", "load_groups", "loads_kept", "measured_interval", "pooled_load_spread"]
