"""Creating, resuming and writing the study (the layout is docs/study-schema.md; its keys
live in `nas.study_schema`, which every write here goes through)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from lfm2.errors import UserError
from lfm2.presets import presets
from lfm2.spec import ArchSpec
from nas.objectives import directions, make_sampler, objective_names
from nas.study_schema import METADATA_KEY, StudyMetadata, TrialStatus, check_trial_attrs, write_trial_attrs, write_trial_attrs_by_id


def create_or_resume(name: str, storage: optuna.storages.BaseStorage, storage_url: str, quality: str, sampler_name: str, seed: int | None, n_trials: int, resume: bool, metadata: dict[str, Any], devices: list[str] | None = None) -> tuple[optuna.Study, bool]:
    """(study, resumed). A new study gets its directions, objective names and metadata; an
    existing one is only reopened with --resume, and then must match this search."""
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    sampler = make_sampler(sampler_name, seed, n_trials)
    if name in existing:
        if not resume:
            raise UserError(f"study {name!r} already exists in {storage_url}; add --resume to continue it, or choose another --study name")
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        previous = StudyMetadata.read(study).to_attrs()
        for field in ("budget_bytes", "context", "backend", "quant", "quality"):
            if previous.get(field) is not None and previous[field] != metadata[field]:
                raise UserError(
                    f"study {name!r} was run with {field}={previous[field]!r}, not {metadata[field]!r}; "
                    "resume it with the same settings, or start a new --study"
                )
        if previous.get("anchor") != metadata.get("anchor"):
            # anchored objectives are ratios times the study's reference, plain ones milliseconds
            # as measured: one study must not mix them
            was = "with the anchor " + ArchSpec.from_dict(previous["anchor"]).layout if previous.get("anchor") else "without an anchor"
            hint = "--no-anchor" if not previous.get("anchor") else "the anchor (drop --no-anchor)"
            raise UserError(f"study {name!r} was measured {was}; resume it with {hint}, or start a new --study")
        return study, True
    if resume:
        raise UserError(f"--resume: there is no study {name!r} in {storage_url} to resume; drop --resume to start it")
    # devices: a multi-device search's device names (each its own latency objectives)
    study = optuna.create_study(study_name=name, storage=storage, directions=directions(quality, devices), sampler=sampler)
    study.set_metric_names(objective_names(quality, devices))
    StudyMetadata.from_attrs(metadata).write(study)
    return study, False


def enqueue_presets(study: optuna.Study, space) -> list[str]:
    """Enqueue the LFM2 presets (and twins) that are points of the space, as reference points."""
    enqueued = []
    for name, spec in presets.items():
        if space.contains(spec):
            study.enqueue_trial(space.params_for(spec), user_attrs=check_trial_attrs({"preset": name}), skip_if_exists=True)
            enqueued.append(name)
    return enqueued


def fail_stale_trials(study: optuna.Study, numbers: list[int] | None = None, reason: str = "the search driver stopped while this trial ran; re-enqueued on --resume") -> list[int]:
    """Trials left RUNNING by a driver that died (or, given `numbers`, those of a driver
    that is stopping): fail them (status `lost`) and enqueue their parameters again, so
    that the candidate is still evaluated — from the result cache if its measurement had
    finished, never measured twice."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if numbers is None or t.number in numbers]
    for trial in stale:
        # Optuna has no public way to annotate a trial through its number alone; the storage
        # calls below are the ones `Trial.set_user_attr` makes.
        write_trial_attrs_by_id(study._storage, trial._trial_id, status=TrialStatus.LOST, reason=reason, requeued=True)
        study.tell(trial.number, state=TrialState.FAIL)
        user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "preset"}
        user_attrs["requeued_from"] = trial.number
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs=check_trial_attrs(user_attrs))
    return [t.number for t in stale]


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards --trials: finished ones, not those failed only to be re-run."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if not trial.user_attrs.get("requeued"):
            count += 1
    return count


def spec_attrs(trial: optuna.Trial, spec: ArchSpec, params: int, estimate: dict[str, Any]) -> None:
    write_trial_attrs(trial, spec=spec.to_dict(), spec_key=spec.key, layout=spec.layout, params=params, memory_estimate_bytes=estimate["total_bytes"], memory_estimate=estimate)


__all__ = ["create_or_resume", "enqueue_presets", "fail_stale_trials", "finished_trials", "spec_attrs", "METADATA_KEY"]
