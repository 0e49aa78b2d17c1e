"""The study the export tests read (tests/testkit/export_study.py) follows docs/study-schema.md."""

from __future__ import annotations

import optuna
import pytest
from testkit.export_study import small_study

from lfm2 import ArchSpec, build_model, count_parameters
from nas.study_schema import StudyMetadata, TrialRecord, TrialStatus, check_trial_attrs, metric_names


@pytest.fixture(scope="module")
def study_url(tmp_path_factory):
    return small_study(tmp_path_factory.mktemp("study"))


def test_the_study_follows_the_schema(study_url):
    """Read through `nas.study_schema`: every trial attr of the (real) study is a schema key
    holding the schema's type, and the typed records agree with the Pareto set."""
    url, name = study_url
    study = optuna.load_study(study_name=name, storage=url)
    assert study.metric_names in (["quality", "prefill_ms", "decode_ms"], ["prefill_ms", "decode_ms"])
    meta = StudyMetadata.read(study)
    for key in ("device", "budget_bytes", "context", "backend", "quant", "protocol", "quality", "sampler", "versions"):
        assert getattr(meta, key), key
    assert not meta.extra, f"metadata keys outside the schema: {sorted(meta.extra)}"
    for trial in study.trials:
        check_trial_attrs(trial.user_attrs)  # raises on a key or type the schema does not know
    records = {t.number: TrialRecord.read(t, metric_names(study)) for t in study.trials}
    best = study.best_trials
    assert best, "the Pareto set is empty"
    for trial in best:
        record = records[trial.number]
        assert record.status is TrialStatus.OK and record.measured
        assert record.constraint is not None and record.constraint <= 0
        ArchSpec.from_dict(record.spec)  # a real spec
        assert record.footprint_bytes <= meta.budget_bytes
    for trial in study.trials[:3]:
        spec = ArchSpec.from_dict(trial.user_attrs["spec"])
        assert records[trial.number].params == count_parameters(build_model(spec, device="meta"))
    infeasible = [r for r in records.values() if r.status is TrialStatus.INFEASIBLE]
    assert infeasible and not {r.number for r in infeasible} & {t.number for t in best}
