"""The search end to end, as a user runs it: the installed CLI, a real local agent, Ray,
real compiles and measurements, a SQLite study file."""

import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest

from nas.storage import open_storage

pytestmark = pytest.mark.slow

BASE = ["--device", "local", "--budget", "400MB", "--space", "small", "--context", "64", "--backend", "onnx", "--quant", "fp32", "--quality", "none", "--sampler", "random", "--in-flight", "2"]


@pytest.fixture
def env(tmp_path):
    environment = dict(os.environ)
    environment["LFM2_NAS_CACHE"] = str(tmp_path / "cache")  # a fresh cache: nothing reused from other runs
    environment["LFM2_NAS_CONFIG"] = str(tmp_path / "devices.toml")
    return environment


def load(tmp_path, name):
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{tmp_path}/lfm2-nas.db"))


def test_search_over_the_small_space_on_the_local_device(lfm2_nas, tmp_path, env):
    result = lfm2_nas("search", *BASE, "--trials", "4", "--study", "e2e", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Pareto front" in result.stdout and "lfm2-nas report --study e2e" in result.stdout
    # piped, not a terminal: a plain progress line per finished trial, as it happens
    progress = [line for line in result.stdout.splitlines() if "e2e on local:" in line and "/4 trials" in line]
    assert len(progress) >= 4, result.stdout[-3000:]
    study = load(tmp_path, "e2e")
    assert study.metric_names == ["prefill_ms", "decode_ms"]
    meta = study.user_attrs["lfm2_nas"]
    assert meta["budget_bytes"] == 400 * 1000**2 and meta["device"]["name"] == "local" and meta["protocol"]["prompt_lengths"] == [64]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, [(t.number, t.state, t.user_attrs.get("reason")) for t in study.trials]
    for trial in complete:
        assert all(v > 0 for v in trial.values)
        assert trial.user_attrs["footprint_bytes"] > 0
        assert trial.user_attrs["measurement"]["status"] == "ok"
        assert trial.user_attrs["prefill_stats"]["samples_ms"]
        stats = trial.user_attrs["decode_stats"]
        assert stats["ci_low_ms"] <= stats["median_ms"] <= stats["ci_high_ms"]  # the interval is stored with every figure
    # anchored by default: every objective is the ratio to the space's anchor times the study's
    # reference (the anchor's ms in its first measurement), and says so in the study
    assert meta["anchor"]["layers"] == ["conv", "conv", "attn", "conv", "conv", "attn"]
    (reference,) = study.user_attrs["anchor_reference"].values()
    for trial in complete:
        for metric, value in zip(("prefill", "decode"), trial.values):
            anchor = trial.user_attrs[f"{metric}_stats"]["anchor"]
            assert anchor["ratio_ci_low"] <= anchor["ratio"] <= anchor["ratio_ci_high"]
            assert value == pytest.approx(anchor["ratio"] * reference[f"{metric}_ms"])
    assert study.best_trials
    assert len([t for t in study.trials if t.state.is_finished()]) == 4

    # The same search again in a new study: every candidate comes from the cache.
    again = lfm2_nas("search", *BASE, "--trials", "4", "--study", "e2e-again", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    repeated = [t for t in load(tmp_path, "e2e-again").trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert repeated and all(t.user_attrs["cached"] for t in repeated)


def test_resume_after_the_driver_is_killed_repeats_no_completed_trial(lfm2_nas, tmp_path, env):
    exe = shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"
    driver = subprocess.Popen([exe, "search", *BASE, "--trials", "3", "--study", "crash"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = f"sqlite:///{tmp_path}/lfm2-nas.db"
    deadline = time.time() + 600
    completed_before = []
    while time.time() < deadline:
        time.sleep(2)
        try:
            study = optuna.load_study(study_name="crash", storage=open_storage(storage))
        except Exception:
            continue
        completed_before = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(completed_before) >= 1 and any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials):
            break
    assert completed_before, "the search completed no trial in time"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
    driver.wait()
    before = {t.number: (t.values, t.user_attrs["spec_key"]) for t in completed_before}

    result = lfm2_nas("search", *BASE, "--trials", "3", "--study", "crash", "--resume", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = load(tmp_path, "crash")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for number, (values, key) in before.items():
        assert study.trials[number].values == values and study.trials[number].user_attrs["spec_key"] == key
    counted = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("requeued")]
    assert len(counted) == 3
    # a candidate measured before the kill is not measured again after it
    keys_after = [t.user_attrs.get("spec_key") for t in study.trials if t.number not in before and t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("cached")]
    assert not set(keys_after) & {key for _, key in before.values()}
    # one anchor reference for the whole study, across the kill
    assert len(study.user_attrs["anchor_reference"]) == 1
    # resuming the anchored study without its anchor would mix ratios and milliseconds: refused
    refused = lfm2_nas("search", *BASE, "--trials", "4", "--study", "crash", "--resume", "--no-anchor", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "measured with the anchor CCACCA" in refused.stderr and "drop --no-anchor" in refused.stderr, refused.stderr[-2000:]


def test_failures_are_recorded_with_their_reasons(lfm2_nas, tmp_path, env):
    # A budget so small that every candidate is certainly over it: prefiltered, never compiled.
    result = lfm2_nas("search", *BASE[:2], "--budget", "1MB", *BASE[4:], "--trials", "2", "--study", "tiny-budget", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(tmp_path, "tiny-budget").trials
    assert trials and all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["status"] == "prefiltered" for t in trials)
    assert all("budget" in t.user_attrs["reason"] for t in trials)


def test_the_default_quality_is_the_free_layout_signal_and_every_trial_records_its_version(lfm2_nas, tmp_path, env):
    from lfm2.spec import ArchSpec
    from nas.quality import layout, score

    default_quality = [arg for i, arg in enumerate(BASE) if arg != "--quality" and BASE[i - 1] != "--quality"]  # no --quality: the default
    result = lfm2_nas("search", *default_quality, "--trials", "3", "--study", "signal", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = load(tmp_path, "signal")
    assert study.metric_names == ["quality", "prefill_ms", "decode_ms"] and study.directions[0].name == "MAXIMIZE"
    meta = study.user_attrs["lfm2_nas"]
    assert meta["quality"] == "layout" and meta["quality_signal"] == layout.version()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, [(t.number, t.state, t.user_attrs.get("reason")) for t in study.trials]
    for trial in complete:
        assert trial.user_attrs["quality_signal"] == layout.version()
        spec = ArchSpec.from_dict(trial.user_attrs["spec"])
        detail = trial.user_attrs["quality_detail"]
        assert detail["kind"] == "layout" and detail["detail"]["signal_version"] == layout.version()
        assert trial.values[0] == trial.user_attrs["quality"] == pytest.approx(score(spec, "layout").score)
