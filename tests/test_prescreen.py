"""nas.prescreen: skips only what the predictor is sure of, records a skip without values,
and the tabular replay runs the search's samplers and pre-screen against a table."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest

from nas.objectives import MEMORY_CONSTRAINT
from nas.predictor import FeatureSet
from nas.prescreen import MIN_MEASUREMENTS, Prescreen, record_skip
from nas.study_schema import check_trial_attrs
from search_space import SearchSpace

FEATURES = FeatureSet(prompt_tokens=256, decode_depth=256, backend="eager", quant="fp32", context=264)
# a synthetic device that follows the predictor's features (2% noise)
PREFILL = np.array([8.0, 40.0, 0.2, 1.0])
DECODE = np.array([0.05, 0.6, 0.15, 0.3])


def _specs(n: int, seed: int = 0):
    space = SearchSpace.load("small")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def _device(spec, rng):
    return {
        "prefill_ms": float(FEATURES.row(spec, "prefill_ms") @ PREFILL) * rng.normal(1, 0.02),
        "decode_ms": float(FEATURES.row(spec, "decode_ms") @ DECODE) * rng.normal(1, 0.02),
        "footprint_bytes": float(FEATURES.row(spec, "footprint_bytes") @ np.array([1.1, 10.0])) * rng.normal(1, 0.01),
    }


def test_nothing_is_skipped_before_enough_measurements():
    rng = np.random.default_rng(0)
    screen = Prescreen(FEATURES, budget_bytes=1, quality="none")  # everything would be over this budget
    for spec in _specs(MIN_MEASUREMENTS - 1):
        assert not screen.judge(spec).skip
        screen.add(spec, **_device(spec, rng))
    assert not screen.active


def test_confidently_over_budget_and_dominated_candidates_are_skipped_and_good_ones_are_not():
    rng = np.random.default_rng(1)
    specs = _specs(60)
    footprints = sorted(_device(s, np.random.default_rng(0))["footprint_bytes"] for s in specs)
    budget = int(footprints[len(footprints) // 2])
    screen = Prescreen(FEATURES, budget_bytes=budget, quality="none")
    for spec in specs[:20]:
        screen.add(spec, **_device(spec, rng))
    assert screen.active
    measured_front = [(o.prefill_ms, o.decode_ms) for o in screen.observations if o.footprint_bytes <= budget]
    verdicts = [(spec, screen.judge(spec), _device(spec, np.random.default_rng(2))) for spec in specs[20:]]
    over = [(s, v, truth) for s, v, truth in verdicts if v.rule == "over_budget"]
    dominated = [(s, v, truth) for s, v, truth in verdicts if v.rule == "dominated"]
    assert over and dominated, "a synthetic device this regular must give skips of both kinds"
    for _, verdict, truth in over:
        assert truth["footprint_bytes"] > budget  # confidently over budget: truly over
        assert verdict.prediction is not None and "predicted footprint" in verdict.reason
    for _, _verdict, truth in dominated:
        assert any(p <= truth["prefill_ms"] and d <= truth["decode_ms"] for p, d in measured_front)  # truly dominated
    # what passes includes the candidates that would improve the front
    improving = [v for _, v, truth in verdicts if truth["footprint_bytes"] <= budget * 0.9 and not any(p <= truth["prefill_ms"] * 1.2 and d <= truth["decode_ms"] * 1.2 for p, d in measured_front)]
    assert improving and not any(v.skip for v in improving)


def test_a_trained_quality_objective_leaves_only_the_budget_rule_and_a_free_one_is_used():
    rng = np.random.default_rng(3)
    specs = _specs(40)
    trained = Prescreen(FEATURES, budget_bytes=10**12, quality="trained")
    free = Prescreen(FEATURES, budget_bytes=10**12, quality="free")
    for spec in specs[:20]:
        values = _device(spec, rng)
        trained.add(spec, **values)
        free.add(spec, **values, quality=0.0)  # every measured one has the worst quality
    assert not any(trained.judge(s).skip for s in specs[20:])
    # better quality than anything measured: never dominated, however slow
    assert not any(free.judge(s, quality=1.0).skip for s in specs[20:])
    with pytest.raises(ValueError, match="quality must be one of"):
        Prescreen(FEATURES, budget_bytes=1, quality="mad")


def test_the_search_default_quality_layout_is_judged_as_a_free_signal():
    """`--quality layout` (the default) is known before measuring, so the pre-screen keeps its
    dominance rule with the layout score compared; a trained proxy is not known."""
    from nas.prescreen import for_search, free_quality
    from nas.quality.layout import score_layout

    spec = _specs(1)[0]
    assert free_quality(spec, "layout") == pytest.approx(score_layout(spec)["score"])
    assert free_quality(spec, "mad") is None and free_quality(spec, "none") is None
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    kinds = {q: for_search(study, context=256, decode_tokens=8, backend="eager", quant="fp32", budget_bytes=2**30, quality=q).quality for q in ("layout", "mad", "none")}
    assert kinds == {"layout": "free", "mad": "trained", "none": "none"}


def test_a_skip_is_recorded_as_pruned_with_the_prediction_and_no_values(tmp_path):
    rng = np.random.default_rng(4)
    specs = _specs(40)
    screen = Prescreen(FEATURES, budget_bytes=1, quality="none")
    for spec in specs[:12]:
        screen.add(spec, **_device(spec, rng))
    verdict = screen.judge(specs[20])
    assert verdict.skip and verdict.rule == "over_budget"
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["minimize", "minimize"])
    trial = study.ask()
    record_skip(trial, verdict, budget_bytes=1)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    stored = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 's.db'}").trials[0]
    assert stored.state == optuna.trial.TrialState.PRUNED and stored.values is None
    assert stored.user_attrs["status"] == "skipped"
    prediction = stored.user_attrs["prescreen"]["prediction"]
    assert set(prediction) == {"prefill_ms", "decode_ms", "footprint_bytes"} and json.dumps(prediction)
    assert stored.constraints[MEMORY_CONSTRAINT] > 0


@pytest.mark.slow
def test_a_live_search_skips_what_its_study_says_is_over_budget_and_the_flag_turns_it_off(tmp_path):
    """The CLI on a real study file that holds 15 measured architectures of a device whose
    footprint is 20x the cost model's estimate: resumed, the search skips every new candidate
    as over budget (recorded, not compiled, never told values); with --no-prescreen it
    compiles and measures again."""
    import os
    import shutil
    import subprocess
    import sys

    from nas.storage import open_storage
    from nas.study import create_or_resume
    from search_space import costs

    env = dict(os.environ, LFM2_NAS_CACHE=str(tmp_path / "cache"), LFM2_NAS_CONFIG=str(tmp_path / "devices.toml"))
    exe = shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"
    url = f"sqlite:///{tmp_path}/s.db"
    base = [exe, "search", "--device", "local", "--budget", "400MB", "--space", "small", "--context", "64", "--backend", "eager", "--quant", "fp32",
            "--quality", "none", "--sampler", "random", "--study", "pre", "--storage", url, "--resume"]

    def search(*args):
        result = subprocess.run([*base, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    storage = open_storage(url, create=True)  # this test writes the study a search would have
    study, _ = create_or_resume("pre", storage, url, "none", "random", 0, 18, False, {"budget_bytes": 400_000_000, "context": 64, "backend": "eager", "quant": "fp32", "quality": "none"})
    space = SearchSpace.load("small")
    rng = np.random.default_rng(5)
    for spec in _specs(15, seed=11):
        features = FeatureSet(64, 64, "eager", "fp32", 72)
        footprint = 20 * costs.estimate_peak_memory(spec, 72, "eager", "fp32", prefill_tokens=64).total_bytes * rng.normal(1, 0.01)
        prefill, decode = float(features.row(spec, "prefill_ms") @ PREFILL), float(features.row(spec, "decode_ms") @ DECODE)
        study.add_trial(optuna.trial.create_trial(
            params=space.params_for(spec), distributions=space.distributions(), values=[prefill, decode],
            user_attrs=check_trial_attrs({"spec": spec.to_dict(), "spec_key": spec.key, "status": "infeasible", "prefill_ms": prefill, "decode_ms": decode, "footprint_bytes": int(footprint)}),
            constraints={MEMORY_CONSTRAINT: footprint - 400e6}))
    search("--trials", "18")
    new = [t for t in optuna.load_study(study_name="pre", storage=storage).trials if t.number >= 15]
    assert len(new) == 3
    for trial in new:
        assert trial.state == optuna.trial.TrialState.PRUNED and trial.values is None, (trial.state, trial.user_attrs.get("reason"))
        assert trial.user_attrs["status"] == "skipped" and trial.user_attrs["prescreen"]["rule"] == "over_budget"
        assert trial.user_attrs["prescreen"]["prediction"]["footprint_bytes"]["interval"][0] > 400e6
        assert trial.constraints[MEMORY_CONSTRAINT] > 0 and "artifact" not in trial.user_attrs  # never compiled
    search("--trials", "19", "--no-prescreen")
    last = optuna.load_study(study_name="pre", storage=storage).trials[-1]
    assert last.user_attrs["status"] in ("ok", "infeasible") and last.user_attrs["footprint_bytes"] > 0  # measured
