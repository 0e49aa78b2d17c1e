"""nas.predictor: a non-negative fit that recovers a known device, held-out accuracy that
means what it says, and `lfm2-nas predict` on a real study file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from lfm2.errors import UserError
from nas.predictor import MIN_OBSERVATIONS, FeatureSet, Observation, Predictor, nonnegative_least_squares
from search_space import SearchSpace

FEATURES = FeatureSet(prompt_tokens=512, decode_depth=512, backend="onnx", quant="fp32", context=528)


def _specs(n: int, seed: int = 0):
    space = SearchSpace.load("small")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def test_nonnegative_least_squares_recovers_a_nonnegative_model_and_never_goes_negative():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, size=(40, 3))
    truth = np.array([2.0, 0.0, 0.5])
    assert np.allclose(nonnegative_least_squares(x, x @ truth), truth, atol=1e-9)
    # data that an unconstrained fit would explain with a negative coefficient
    y = x @ np.array([1.0, 0.0, 0.0]) - 0.3 * x[:, 1] + 5
    assert (nonnegative_least_squares(x, y) >= 0).all()


def test_a_device_that_follows_the_features_is_learnt_and_held_out_errors_are_small():
    # a synthetic device: 8 ms per linear GFLOP, 40 ms per attention GFLOP, 0.2 ms per layer; 3% noise
    rng = np.random.default_rng(1)
    truth = {"prefill_ms": np.array([8.0, 40.0, 0.2, 1.0]), "decode_ms": np.array([0.05, 0.6, 0.15, 0.3])}
    observations = []
    for spec in _specs(24):
        values = {t: float(FEATURES.row(spec, t) @ c) * rng.normal(1, 0.03) for t, c in truth.items()}
        observations.append(Observation(spec, values["prefill_ms"], values["decode_ms"], None))
    predictor = Predictor.fit(observations, prompt_tokens=512, decode_depth=512, backend="onnx", quant="fp32", context=528)
    assert set(predictor.models) == {"prefill_ms", "decode_ms"}  # no footprint measured: no footprint model
    for target in truth:
        accuracy = predictor.accuracy[target]
        assert accuracy["n"] == 24 and accuracy["within_10pct"] >= 0.9, (target, accuracy)
    new = _specs(5, seed=7)
    for spec in new:
        prediction = predictor.predict(spec)
        for target, coefficients in truth.items():
            expected = float(FEATURES.row(spec, target) @ coefficients)
            low, high = prediction.intervals[target]
            assert low <= prediction.values[target] <= high
            assert abs(prediction.values[target] - expected) / expected < 0.1


def test_held_out_errors_are_honest_for_a_device_the_features_do_not_explain():
    rng = np.random.default_rng(2)
    observations = [Observation(spec, float(rng.uniform(10, 1000)), None, None) for spec in _specs(20)]
    predictor = Predictor.fit(observations, prompt_tokens=512, decode_depth=512, backend="onnx", quant="fp32")
    assert predictor.accuracy["prefill_ms"]["median_abs_error"] > 0.25  # random latencies: no skill claimed


def test_too_few_measurements_is_a_clear_error():
    observations = [Observation(spec, 10.0, 1.0, 1e8) for spec in _specs(MIN_OBSERVATIONS - 1)]
    with pytest.raises(UserError, match="too few measured architectures"):
        Predictor.fit(observations, prompt_tokens=128, decode_depth=128, backend="onnx", quant="fp32")


def test_predict_command_on_a_real_study(tmp_path):
    db = tmp_path / "small.db"
    shutil.copyfile(Path(__file__).parent / "data" / "search_small.db", db)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_specs(1)[0].to_dict()))
    done = subprocess.run([sys.executable, "-m", "nas.cli", "predict", str(spec), "--study", "small", "--storage", f"sqlite:///{db}", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    for target in ("prefill_ms", "decode_ms", "footprint_bytes"):
        low, high = payload["prediction"][target]["interval"]
        assert 0 < low <= payload["prediction"][target]["predicted"] <= high
        assert payload["predictor"]["models"][target]["leave_one_out"]["n"] == 6
    missing = subprocess.run([sys.executable, "-m", "nas.cli", "predict", str(spec), "--study", "nope", "--storage", f"sqlite:///{db}"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no study named 'nope'" in missing.stderr


def test_the_onnx_prefill_chunk_the_predictor_counts_is_the_runners():
    from devices.backends.onnx_runner import PREFILL_CHUNK
    from nas.predictor import ONNX_PREFILL_CHUNK

    assert ONNX_PREFILL_CHUNK == PREFILL_CHUNK


def test_executed_attention_follows_each_backends_kernel():
    # eager attends over its whole static buffer; ONNX chunked over a growing cache; the
    # others causally: for a full-attention-only model, eager >= ONNX >= causal
    spec = _specs(1)[0]
    from dataclasses import replace

    full_only = replace(spec, layers=("attn",) * len(spec.layers), swa_window=0)
    rows = {b: FeatureSet(512, 512, b, "fp32", 528).row(full_only, "prefill_ms")[1] for b in ("eager", "onnx", "executorch")}
    assert rows["eager"] > rows["onnx"] > rows["executorch"] > 0
    decode = {b: FeatureSet(512, 100, b, "fp32", 528).row(full_only, "decode_ms")[1] for b in ("eager", "onnx")}
    assert decode["eager"] > decode["onnx"]  # the static buffer (528 slots) against 101 keys


def test_an_anchored_repeatability_file_is_fitted_as_a_search_stores_it():
    """bench.predictor on an anchored run: each pass's ratio times the reference the search
    would take (the anchor's ms in the first measurement of pass 1), not the drifting ms."""
    from bench.predictor import anchor_reference, anchored_observations

    space = SearchSpace.load("small")
    specs = [space.anchor_spec()] * 2

    def measured(ratio: float, anchor_ms: float) -> dict:
        point = {"median_ms": ratio * anchor_ms, "anchor": {"ratio": ratio, "anchor_quantile_ms": anchor_ms}}
        return {"measurement": {"prefill": {"64": point}, "decode": {"32": point}}}

    # the host drifted 1.5x between the passes: the ms disagree, the ratios do not
    data = {
        "anchor": specs[0].to_dict(), "prefill_tokens": 64, "decode_depth": 32,
        "raw": [[measured(2.0, 10.0), measured(3.0, 10.0)], [measured(2.0, 15.0), measured(3.0, 15.0)]],
        "rows": [
            {"spec": spec.to_dict(), "prefill_ms": [20.0 * k, 30.0 * k], "decode_ms": [20.0 * k, 30.0 * k], "prefill_anchor_ratio": [r, r], "decode_anchor_ratio": [r, r], "footprint_bytes": [1 << 20, 1 << 20]}
            for spec, k, r in zip(specs, (1.0, 1.5), (2.0, 3.0))
        ],
    }
    reference = anchor_reference(data)
    assert reference == {"prefill": 10.0, "decode": 10.0}
    observations = anchored_observations(data, reference)
    assert [o.prefill_ms for o in observations] == [20.0, 30.0] and [o.decode_ms for o in observations] == [20.0, 30.0]
    assert anchor_reference({**data, "anchor": None}) is None  # a plain file is fitted on its ms
