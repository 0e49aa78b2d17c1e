"""Which trials an export takes: one trial, the feasible Pareto set (one member per
architecture), or a family of K spread over memory or latency (see `nas.export`). Trials are
read through the study schema (`TrialRecord`); a family of one is the best trial as
`lfm2-nas pick` ranks them (`reports.pick.preference_key`: quality, then decode latency)."""

from __future__ import annotations

from dataclasses import dataclass


import optuna
from optuna.trial import FrozenTrial

from lfm2.errors import UserError
from lfm2.spec import ArchSpec
from nas.study_schema import TrialRecord, TrialStatus, metric_names
from reports.pick import preference_key

TIER_METRICS = {"memory": "footprint_bytes", "latency": "decode_ms"}


@dataclass
class Member:
    """One architecture to export: its trial (`record`: as the study schema reads it), spec,
    and (in a family) its tier."""

    trial: FrozenTrial
    spec: ArchSpec
    record: TrialRecord  # read by `member` (with the study's metric names)
    tier: int | None = None
    tier_value: float | None = None

    @property
    def default_name(self) -> str:
        return f"trial-{self.trial.number}-{self.spec.layout}-{self.spec.key}"


def member(trial: FrozenTrial, names: list[str]) -> Member:
    """`trial` as an export member; a `UserError` when it has no architecture."""
    record = TrialRecord.read(trial, names)
    if record.spec is None:
        raise UserError(f"trial {trial.number} has no 'spec' user attr (it failed before an architecture was sampled); pick another trial")
    return Member(trial, ArchSpec.from_dict(record.spec), record=record)


def select_trial(study: optuna.Study, number: int) -> Member:
    trials = study.get_trials(deepcopy=False)
    matching = [t for t in trials if t.number == number]
    if not matching:
        raise UserError(f"study {study.study_name!r} has no trial {number} (it has trials 0..{len(trials) - 1}); see `lfm2-nas study` or the dashboard")
    return member(matching[0], metric_names(study))


def pareto_members(study: optuna.Study) -> list[Member]:
    """The feasible Pareto set (`study.best_trials`), one member per architecture (the
    first trial of each spec key), ordered by trial number."""
    names = metric_names(study)
    seen: dict[str, Member] = {}
    for trial in sorted(study.best_trials, key=lambda t: t.number):
        record = TrialRecord.read(trial, names)
        if record.status is not TrialStatus.OK or record.spec is None:
            continue
        chosen = member(trial, names)
        seen.setdefault(chosen.spec.key, chosen)
    if not seen:
        raise UserError(f"study {study.study_name!r} has no feasible completed trial yet, so no Pareto set; run (or resume) the search first, or export one --trial")
    return list(seen.values())


def _tier_value(m: Member, metric: str) -> float:
    record = m.record
    value: float | None
    if metric == "memory":
        value = record.footprint_bytes if record.footprint_bytes is not None else record.memory_estimate_bytes
    else:
        value = record.decode_ms
    if value is None:
        raise UserError(f"trial {m.trial.number} has no {TIER_METRICS[metric]} to place it in a {metric} tier; use --tier-by {'latency' if metric == 'memory' else 'memory'}")
    return float(value)


def pick_family(members: list[Member], k: int, tier_by: str = "memory") -> list[Member]:
    """K members spread evenly over the range of `tier_by` the Pareto set covers (see
    `nas.export`); fewer when the set is smaller. Returned smallest/fastest first with
    `tier` 1..K. Between members equally near a target, the one `lfm2-nas pick` prefers."""
    if k < 1:
        raise UserError(f"--family must be >= 1, got {k}")
    if tier_by not in TIER_METRICS:
        raise UserError(f"--tier-by must be one of {', '.join(TIER_METRICS)}, got {tier_by!r}")
    values = {m.trial.number: _tier_value(m, tier_by) for m in members}
    low, high = min(values.values()), max(values.values())
    targets = [high] if k == 1 else [low + (high - low) * i / (k - 1) for i in range(k)]
    if k == 1:
        # One member: the one `lfm2-nas pick` would choose (best quality, fastest decode among equals).
        chosen = [min(members, key=lambda m: preference_key(m.record))]
    else:
        chosen, free = [], list(members)
        for target in targets[: len(members)]:
            best = min(free, key=lambda m: (abs(values[m.trial.number] - target), *preference_key(m.record)))
            chosen.append(best)
            free.remove(best)
    chosen.sort(key=lambda m: (values[m.trial.number], m.trial.number))
    return [Member(m.trial, m.spec, tier=i + 1, tier_value=values[m.trial.number], record=m.record) for i, m in enumerate(chosen)]


__all__ = ["Member", "TIER_METRICS", "member", "pareto_members", "pick_family", "select_trial"]
