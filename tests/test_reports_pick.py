"""`pick`: the best architecture within latency and memory limits, or which limit fails."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

import typer
from typer.testing import CliRunner

from lfm2 import presets
from lfm2.errors import UserError
from reports import Limits, load_study_data, pick
from reports.cli import EXIT_NOTHING_MEETS_LIMITS, register
from testkit import REPO
from testkit.reports import add_measured_trial, create_schema_study, handmade_candidates, study_under_test

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def study_source(tmp_path_factory) -> tuple[str, str]:
    return study_under_test(tmp_path_factory.mktemp("reports-pick"))


def expected_pick(study: optuna.Study, max_decode_ms=None, max_prefill_ms=None, max_memory_bytes=None) -> int | None:
    """The rule, written out over Optuna's raw trials (independent of `reports`)."""
    chosen = []
    for trial in study.trials:
        if trial.state != TrialState.COMPLETE or any(c > 0 for c in trial.constraints.values()):
            continue
        values = dict(zip(study.metric_names, trial.values))
        memory = trial.user_attrs["footprint_bytes"]
        if (max_decode_ms is not None and values["decode_ms"] > max_decode_ms) or (max_prefill_ms is not None and values["prefill_ms"] > max_prefill_ms) or (max_memory_bytes is not None and memory > max_memory_bytes):
            continue
        latency = (values["decode_ms"], values["prefill_ms"], memory, trial.number)
        chosen.append(((-values["quality"],) + latency if "quality" in values else latency, trial.number))
    return min(chosen)[1] if chosen else None


def _feasible(study):
    return [t for t in study.trials if t.state == TrialState.COMPLETE and all(c <= 0 for c in t.constraints.values())]


def test_pick_matches_the_rule_over_many_limits(study_source):
    url, name = study_source
    study = optuna.load_study(study_name=name, storage=url)
    data = load_study_data(name, url)
    feasible = _feasible(study)
    decodes = sorted(t.user_attrs["decode_ms"] for t in feasible)
    prefills = sorted(t.user_attrs["prefill_ms"] for t in feasible)
    memories = sorted(t.user_attrs["footprint_bytes"] for t in feasible)
    picked_some = 0
    for decode in (None, decodes[0], statistics.median(decodes), decodes[-1]):
        for prefill in (None, statistics.median(prefills)):
            for memory in (None, memories[len(memories) // 3], memories[-1]):
                result = pick(data, Limits(decode, prefill, memory))
                expected = expected_pick(study, decode, prefill, memory)
                assert (result.trial.number if result.ok else None) == expected, (decode, prefill, memory)
                if result.ok:
                    picked_some += 1
                    assert result.trial.on_pareto_set, "the best within limits is always in the Pareto set"
    assert picked_some >= 4
    # No limits at all: the best-quality feasible architecture.
    assert pick(data, Limits()).trial.number == expected_pick(study)


def test_nothing_meets_a_limit_names_it_and_the_best_there_is(study_source):
    url, name = study_source
    study = optuna.load_study(study_name=name, storage=url)
    data = load_study_data(name, url)
    fastest = min(_feasible(study), key=lambda t: t.user_attrs["decode_ms"])
    limit = fastest.user_attrs["decode_ms"] * 0.5
    result = pick(data, Limits(max_decode_ms=limit, max_memory_bytes=10**15))
    assert not result.ok and result.unmet == ["max-decode-ms"]
    assert f"nothing meets --max-decode-ms {limit:g} ms: the lowest is {fastest.user_attrs['decode_ms']:.2f} ms (trial {fastest.number})" in result.message
    smallest = min(t.user_attrs["footprint_bytes"] for t in _feasible(study))
    result = pick(data, Limits(max_memory_bytes=smallest // 2, max_prefill_ms=1e-3))
    assert not result.ok and result.unmet == ["max-prefill-ms", "budget"]
    assert "nothing meets --max-prefill-ms 0.001 ms" in result.message and "nothing meets --budget" in result.message


def test_limits_met_apart_but_not_together(tmp_path):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    study = create_schema_study(url, "two")
    spec_a, spec_b = presets["LFM2-350M"], handmade_candidates()[6][0]
    add_measured_trial(study, spec_a, decode_ms=5.0, prefill_ms=900.0, footprint_bytes=500 * 2**20)  # fast, big
    add_measured_trial(study, spec_b, decode_ms=9.0, prefill_ms=700.0, footprint_bytes=100 * 2**20, seed=1)  # slow, small
    data = load_study_data("two", url)
    result = pick(data, Limits(max_decode_ms=6, max_memory_bytes=200 * 2**20))
    assert not result.ok and result.unmet == ["all-together"]
    assert "each limit is met by some architecture, but none meets --max-decode-ms 6 ms and --budget 200.0 MiB together" in result.message
    assert f"the closest is trial 1 (decode {study.trials[1].user_attrs['decode_ms']:.2f} ms > 6 ms)" in result.message
    assert pick(data, Limits(max_decode_ms=6)).trial.number == 0
    assert pick(data, Limits(max_memory_bytes=200 * 2**20)).trial.number == 1


def test_a_measured_zero_is_a_figure_when_naming_the_closest(tmp_path):
    """A figure of 0 is met, not unknown: trial 0 misses only the budget, by 25%, trial 1 the
    decode limit by 50%, so trial 0 is the closest (a 0 once counted as infinitely far off)."""
    url = f"sqlite:///{tmp_path / 'zero.db'}"
    study = create_schema_study(url, "zero")
    spec_a, spec_b = presets["LFM2-350M"], handmade_candidates()[6][0]
    add_measured_trial(study, spec_a, decode_ms=0.0, prefill_ms=900.0, footprint_bytes=250 * 2**20)
    add_measured_trial(study, spec_b, decode_ms=9.0, prefill_ms=700.0, footprint_bytes=100 * 2**20, seed=1)
    result = pick(load_study_data("zero", url), Limits(max_decode_ms=6, max_memory_bytes=200 * 2**20))
    assert not result.ok and result.unmet == ["all-together"]
    assert "the closest is trial 0 (memory" in result.message, result.message


def test_quality_none_picks_the_lowest_decode_latency(tmp_path):
    url = f"sqlite:///{tmp_path / 'noq.db'}"
    study = create_schema_study(url, "noq", quality="none")
    for seed, (spec, preset, status) in enumerate(handmade_candidates()[:8]):
        add_measured_trial(study, spec, status=status, preset=preset, seed=seed)
    data = load_study_data("noq", url)
    result = pick(data, Limits())
    assert result.ranked_by == "decode latency (lowest)"
    assert result.trial.number == expected_pick(study) == min(_feasible(study), key=lambda t: t.values[1]).number
    limit = sorted(t.values[0] for t in _feasible(study))[-2]  # a prefill limit excluding the slowest
    assert pick(data, Limits(max_prefill_ms=limit)).trial.number == expected_pick(study, max_prefill_ms=limit)


def test_no_feasible_trial_says_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    study = create_schema_study(url, "none")
    spec, preset, _ = handmade_candidates()[1]  # over the budget
    add_measured_trial(study, spec, preset=preset)
    result = pick(load_study_data("none", url), Limits(max_decode_ms=100))
    assert not result.ok and result.unmet == ["feasible"] and "has no feasible measured architecture yet" in result.message


@pytest.mark.parametrize("field", ["max_decode_ms", "max_prefill_ms", "max_memory_bytes"])
def test_limits_must_be_positive(field):
    with pytest.raises(UserError, match="must be a positive number"):
        Limits(**{field: 0})


def test_pick_command(study_source):
    """In process: the choice as JSON (with the ArchSpec) and exit 1 when nothing meets the
    limits. Through `lfm2-nas` itself: bad input is exit status 2 with the accepted forms."""
    url, name = study_source
    study = optuna.load_study(study_name=name, storage=url)
    bad = subprocess.Popen([sys.executable, "-m", "nas.cli", "pick", "--study", name, "--storage", url, "--max-memory", "lots"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    memories = sorted(t.user_attrs["footprint_bytes"] for t in _feasible(study))
    memory_mib = memories[len(memories) // 2] / 2**20
    result = runner.invoke(app, ["pick", "--study", name, "--storage", url, "--budget", f"{memory_mib:.3f}MiB", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    limit = round(memory_mib * 2**20)
    assert answer["ok"] and answer["trial"] == expected_pick(study, max_memory_bytes=limit)
    chosen = study.trials[answer["trial"]]
    assert answer["spec"] == chosen.user_attrs["spec"] and answer["spec_key"] == chosen.user_attrs["spec_key"]
    assert answer["decode_ms"] == chosen.user_attrs["decode_ms"] and answer["footprint_bytes"] <= limit

    fastest = min(t.user_attrs["decode_ms"] for t in _feasible(study))
    result = runner.invoke(app, ["pick", "--study", name, "--storage", url, "--max-decode-ms", f"{fastest / 2}"])
    assert result.exit_code == EXIT_NOTHING_MEETS_LIMITS == 1
    assert "nothing meets the limits" in result.stderr and "--max-decode-ms" in result.stderr and "relax the limit" in result.stderr
    result = runner.invoke(app, ["pick", "--study", name, "--storage", url, "--max-decode-ms", f"{fastest / 2}", "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["unmet"] == ["max-decode-ms"]

    out, err = bad.communicate(timeout=300)
    assert bad.returncode == 2, (out, err)
    assert "--budget 'lots' is not a size" in err and "800M, 1.5GiB" in err
