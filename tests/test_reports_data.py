"""Reading a study into rows, the Pareto set, the hypervolume, storage errors, sizes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from lfm2 import ArchSpec
from lfm2.errors import UserError
from reports import load_study_data, parse_size, read_study
from reports.html import report_payload
from reports.pareto import front_2d, reference_point
from testkit.reports import add_measured_trial, create_schema_study, handmade_candidates, study_under_test, write_handmade_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def study_source(tmp_path_factory) -> tuple[str, str]:
    return study_under_test(tmp_path_factory.mktemp("reports-data"))


@pytest.fixture(scope="module")
def study(study_source) -> optuna.Study:
    url, name = study_source
    return optuna.load_study(study_name=name, storage=url)


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and all(c <= 0 for c in trial.constraints.values())


def test_rows_follow_the_study(study):
    data = read_study(study)
    trials = study.trials
    assert [row.number for row in data.trials] == [t.number for t in trials]
    assert data.pareto_numbers == sorted(t.number for t in study.best_trials)
    assert data.pareto_numbers, "the test study must have a Pareto set"
    for row, trial in zip(data.trials, trials):
        assert row.state == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert list(row.values.values()) == trial.values
            assert row.outcome == ("feasible" if _feasible(trial) else "infeasible")
            assert row.arch == ArchSpec.from_dict(trial.user_attrs["spec"])
            assert row.layout == row.arch.layout
        else:
            assert row.values == {}
            assert row.outcome in ("prefiltered", "skipped", "oom", "failed", "running")
        assert row.on_pareto_set == (trial.number in data.pareto_numbers)
        assert row.preset == trial.user_attrs.get("preset")
    outcomes = {row.outcome for row in data.trials}
    assert "feasible" in outcomes and len(outcomes) >= 2, "the test study must hold feasible trials and others"
    assert data.facts["budget_bytes"] == data.budget_bytes > 0


def _exact_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by `points` (minimisation) inside the reference box, counted
    cell by cell over the grid their coordinates make: slow, simple, independent of Optuna."""
    axes = [np.unique(np.concatenate([points[:, d], [reference[d]]])) for d in range(points.shape[1])]
    volume = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        low = np.array([axes[d][i] for d, i in enumerate(cell)])
        high = np.array([axes[d][i + 1] for d, i in enumerate(cell)])
        if (points <= low).all(axis=1).any():
            volume += float(np.prod(high - low))
    return volume


def test_hypervolume_is_optunas_and_correct(study):
    data = read_study(study)
    history = data.hypervolume
    reference = np.array(history["reference_point"])
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in data.directions])
    feasible = [t for t in study.trials if _feasible(t)]
    # The reference point lies beyond every feasible trial on every objective.
    for trial in feasible:
        assert np.all(signs * np.array(trial.values) < signs * reference)
    front = np.array([signs * np.array(t.values) for t in study.best_trials])
    assert history["hypervolume"][-1] == pytest.approx(_exact_hypervolume(front, signs * reference), rel=1e-9)
    assert all(b >= a - 1e-9 for a, b in zip(history["hypervolume"], history["hypervolume"][1:])), "a front's hypervolume never shrinks"
    assert history["trial_numbers"] == [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert 0 < history["fraction"][-1] <= 1


def test_front_2d_is_the_non_dominated_staircase():
    points = [(1.0, 0.3, 0), (2.0, 0.5, 1), (2.5, 0.4, 2), (3.0, 0.7, 3), (1.5, 0.2, 4)]
    # x minimised, y maximised: 2 and 4 are beaten by 1 and 0.
    assert [p[2] for p in front_2d(points, (False, True))] == [0, 1, 3]
    assert [p[2] for p in front_2d(points, (False, False))] == [0, 4]


def test_reference_point_needs_a_feasible_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    study = create_schema_study(url, "empty")
    spec, preset, _status = handmade_candidates()[1]  # LFM2-700M: measured over the budget
    add_measured_trial(study, spec, preset=preset, seed=1)
    data = load_study_data("empty", url)
    assert [t.outcome for t in data.trials] == ["infeasible"]
    assert data.pareto_numbers == [] and data.hypervolume is None and reference_point(data) is None
    payload = report_payload(data)  # an all-infeasible study still renders
    assert "Pareto set is empty" in payload["sections"]["pareto"]


def test_quality_none_study_reads_two_objectives(tmp_path):
    url = f"sqlite:///{tmp_path / 'noq.db'}"
    study = create_schema_study(url, "noq", quality="none")
    for seed, (spec, preset, status) in enumerate(handmade_candidates()[:6]):
        add_measured_trial(study, spec, status=status, preset=preset, seed=seed)
    data = load_study_data("noq", url)
    assert data.metric_names == ["prefill_ms", "decode_ms"] and not data.has_quality
    assert all(t.quality is None for t in data.trials)
    payload = report_payload(data)
    assert set(payload["figures"]) == {"fig-decode-prefill", "fig-memory", "fig-hypervolume", "fig-outcomes"}
    assert data.hypervolume["hypervolume"][-1] > 0


def test_storage_errors_say_what_to_do(tmp_path, study_source):
    url, name = study_source
    missing = tmp_path / "missing.db"
    with pytest.raises(UserError, match=r"no database file: .*missing\.db does not exist; run the search first"):
        load_study_data(name, f"sqlite:///{missing}")
    assert not missing.exists(), "reading must not create an empty database"
    with pytest.raises(UserError, match=r"cannot open storage 'nosuchdb://x'.*--storage sqlite:///PATH\.db"):
        load_study_data(name, "nosuchdb://x")
    with pytest.raises(UserError, match=rf"no study named 'other' in .*\(studies there: {name}\); check --study and --storage"):
        load_study_data("other", url)
    with pytest.raises(UserError, match="not a URL or an existing file"):
        load_study_data(name, str(tmp_path / "nowhere"))
    # A bare path to an existing SQLite file is accepted.
    path = url.removeprefix("sqlite:///")
    assert load_study_data(name, path).name == name


@pytest.mark.parametrize(
    "text, expected",
    [("500MB", 500 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("800M", 800 * 2**20), ("800m", 800 * 2**20), ("1048576", 2**20), ("2 GB", 2 * 10**9), ("512k", 512 * 1024), (".5G", 2**29)],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-5MB", "1.2.3G", "five"])
def test_bad_sizes_name_the_spellings(text):
    with pytest.raises(UserError, match=r"--max-memory .*800M, 1\.5GiB"):
        parse_size(text, "--max-memory")


def test_journal_storage_is_read(tmp_path):
    path = tmp_path / "study.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = create_schema_study(storage, "journal")
    spec, preset, _ = handmade_candidates()[0]
    add_measured_trial(study, spec, preset=preset)
    data = load_study_data("journal", str(path))
    assert data.pareto_numbers == [0] and data.trials[0].preset == "LFM2-350M"
    assert math.isfinite(data.trials[0].decode_ms)


def test_a_study_just_started_renders(tmp_path):
    """The dashboard shows a study from its first second: no trial, then one running."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    study = create_schema_study(url, "new")
    data = load_study_data("new", url)
    assert data.trials == [] and data.hypervolume is None
    assert "<b>0</b> trials" in report_payload(data)["sections"]["summary"]
    study.ask()
    data = load_study_data("new", url)
    assert [t.outcome for t in data.trials] == ["running"]
    payload = report_payload(data)
    assert 'data-trial="0" class="running"' in payload["sections"]["trials"]


def test_presets_are_starred_and_every_outcome_told_apart(tmp_path):
    """On the hand-made study always (the small space of the real test search holds no
    preset): a measured preset is a named star on both fronts, and feasible, over-budget,
    prefiltered, OOM and failed trials each have their place."""
    url = f"sqlite:///{tmp_path / 'all.db'}"
    write_handmade_study(url, "all")
    data = load_study_data("all", url)
    assert {t.outcome for t in data.trials} == {"feasible", "infeasible", "prefiltered", "oom", "failed"}
    payload = report_payload(data)
    measured_presets = sorted(t.preset for t in data.trials if t.preset and t.measured)
    assert measured_presets == ["LFM2-350M", "LFM2-700M"]
    for key in ("fig-quality-prefill", "fig-quality-decode"):
        traces = {t["name"]: t for t in payload["figures"][key]["data"]}
        assert sorted(traces["LFM2 preset"]["text"]) == measured_presets
        over = [n for n in traces["over budget (infeasible)"]["customdata"]]
        assert over == [t.number for t in data.trials if t.outcome == "infeasible"]
        assert sorted(traces["Pareto set (all objectives)"]["customdata"]) == data.pareto_numbers
    outcome_bars = {t["name"]: t["x"][0] for t in payload["figures"]["fig-outcomes"]["data"]}
    assert sum(outcome_bars.values()) == len(data.trials) and len(outcome_bars) == 5
    prefiltered_preset = next(t for t in data.trials if t.outcome == "prefiltered" and t.preset)
    assert f'id="arch-{prefiltered_preset.number}"' in payload["sections"]["architectures"]  # shown for comparison


def test_latency_axes_carry_the_measured_intervals_as_error_bars(tmp_path, study):
    from reports.figures import front_figure

    # the committed real study predates intervals (no bars); a study written as the search now does has them
    assert all(t.error_x.array is None for t in front_figure(read_study(study), "prefill_ms", "decode_ms").data)
    study = write_handmade_study(f"sqlite:///{tmp_path / 'intervals.db'}")
    data = read_study(study)
    figure = front_figure(data, "prefill_ms", "decode_ms")
    checked = 0
    for trace in (t for t in figure.data if t.mode == "markers" and len(t.x)):
        for i, number in enumerate(trace.customdata):
            stats = study.trials[number].user_attrs["prefill_stats"]
            if stats.get("ci_low_ms") is None:  # a trial stored before intervals: no bar
                assert trace.error_x.array is None or trace.error_x.array[i] == trace.error_x.arrayminus[i] == 0
                continue
            x = trace.x[i]
            assert x - trace.error_x.arrayminus[i] == pytest.approx(stats["ci_low_ms"]) and x + trace.error_x.array[i] == pytest.approx(stats["ci_high_ms"])
            checked += 1
    assert checked > 0
    quality = front_figure(data, "prefill_ms", "quality")
    assert all(t.error_y.array is None for t in quality.data)  # no interval for the proxy score


def test_an_anchored_latency_gets_the_ratios_interval_scaled_to_the_objective_and_the_facts_say_so():
    """In an anchored study the objective is the ratio to the anchor times a reference: its
    error bar is the ratio's interval on that scale, not the raw milliseconds' interval."""
    from types import SimpleNamespace

    from reports.figures import _interval
    from reports.html import _latency_basis
    from search_space import SearchSpace

    stats = {"median_ms": 50.0, "ci_low_ms": 40.0, "ci_high_ms": 70.0, "anchor": {"ratio": 2.0, "ratio_ci_low": 1.9, "ratio_ci_high": 2.2}}
    trial = SimpleNamespace(prefill_stats=stats, decode_stats=None, values={"prefill_ms": 30.0})  # reference 15 ms
    below, above = _interval(trial, "prefill_ms", {})
    assert (30.0 - below, 30.0 + above) == (pytest.approx(28.5), pytest.approx(33.0))
    plain = SimpleNamespace(prefill_stats={k: v for k, v in stats.items() if k != "anchor"}, decode_stats=None, values={"prefill_ms": 50.0})
    assert _interval(plain, "prefill_ms", {}) == (pytest.approx(10.0), pytest.approx(20.0))
    assert "anchored" in _latency_basis({"anchor": SearchSpace.load("small").anchor_spec().to_dict()}) and "CCACCA" in _latency_basis({"anchor": SearchSpace.load("small").anchor_spec().to_dict()})
    assert _latency_basis({}) == "medians as measured"
