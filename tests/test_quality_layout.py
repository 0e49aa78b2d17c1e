"""The free `layout` quality signal (the search's default): what it computes, that the shipped
fit is the one its data gives, and what `lfm2-nas quality` says about it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.experiments import fidelity_signals
from lfm2 import presets
from nas.quality import FREE_KINDS, QualitySettings, cache_key, score, signal_version
from nas.quality import layout

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "results" / "fidelity_signals23"


def lfm2_nas(*args):
    exe = shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_layout_score_is_the_shipped_fit_of_the_benchmarks_free_features():
    spec = presets["LFM2-350M"]
    result = score(spec, "layout")
    d = result.detail
    assert result.kind == "layout" and "layout" in FREE_KINDS
    assert d["signal_version"] == signal_version("layout") == layout.version() and d["signal_version"].startswith("layout-v1-")
    # the features are the ones bench/experiments/fidelity_signals.py judged, computed from the spec alone
    assert d["features"]["attention layers"] == fidelity_signals.attention_layers(spec.layout) == 6
    assert d["features"]["layers"] == 16 and d["features"]["attention share"] == pytest.approx(6 / 16)
    rows = [json.loads(line) for line in (RUN / "fidelity.jsonl").read_text().splitlines()]
    reference = next(r for r in rows if r["arch"] == "LFM2-350M" and r["stage"] == "long")
    assert layout.proxy_parameters(spec) == reference["proxy_parameters"]  # the parameter count the fit saw
    assert d["predicted_reference_bpb"] == pytest.approx(-result.score) and 0.9 < -result.score < 1.2  # near the references' 0.98-1.48
    # no device, settings or seed: the signal's version alone names the score
    assert cache_key(spec, "layout") == result.key == cache_key(spec, "layout", QualitySettings.cpu_small(), seed=3)
    assert cache_key(spec, "layout") != cache_key(spec, "mad")
    assert signal_version("mad", QualitySettings.default()) == f"mad-v1-{QualitySettings.default().key}"


def test_layout_ranks_like_the_references_where_they_disagree_least():
    conv = presets["LFM2-350M"].replace(layers=("conv",) * 16)
    hybrid = presets["LFM2-350M"]
    assert score(hybrid, "layout").score > score(conv, "layout").score  # every reference put pure conv stacks last
    bigger = presets["LFM2-700M"]
    assert score(bigger, "layout").score > score(hybrid, "layout").score  # same layout, more parameters


@pytest.mark.slow
def test_the_shipped_fit_is_what_its_benchmark_run_gives():
    from bench.experiments.fit_layout_signal import fit

    shipped = layout.signal()
    refit = fit(RUN, shipped["version"])
    for key in ("mean", "scale", "weights"):
        assert refit[key] == pytest.approx(shipped[key])
    assert refit["signal_version"] == shipped["signal_version"] == layout.version()
    assert refit["fidelity_held_out"]["spearman"] == pytest.approx(shipped["fidelity_held_out"]["spearman"])


def test_quality_cli_defaults_to_the_layout_signal_and_its_help_prints_fidelity_and_cost():
    result = lfm2_nas("quality", "LFM2-350M")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("layout score ") and layout.version() in result.stdout and "no training" in result.stdout
    held = layout.signal()["fidelity_held_out"]
    help_text = lfm2_nas("quality", "--help").stdout
    assert f"{held['spearman']:+.2f}" in help_text and layout.version() in help_text
    for kind in ("layout (default)", "attention count", "mad", "lm"):
        assert kind in help_text
    assert "no GPU" in help_text and "s of an H200" in help_text
