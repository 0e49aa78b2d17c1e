"""A latency and memory predictor learned from measurements of one device and stack.

The analytic cost model (`search_space.costs`) counts what an architecture does: FLOPs of a
prefill, bytes a decode step reads, the footprint a runtime should need. How fast a given
device turns those into milliseconds is what measurements teach. For each objective the
predictor fits a small non-negative linear model on features that have a physical meaning
(as nn-Meter's kernel predictors and roofline models do), weighted for relative error:

* prefill of T tokens: the linear layers' FLOPs, the attention FLOPs the runtime EXECUTES
  (quadratic in T), the number of layers (per-layer overhead), a constant;
* decode at depth C: the weight bytes a step reads, the K/V bytes the runtime's attention
  reads at depth C, the number of layers, a constant;

"Executes" and "reads", as kernel-level predictors count them (nn-Meter): the keys each
query is scored against in the backend's own attention, not the algorithmic causal count.
The eager model attends over its whole static K/V buffer (max context) at every step; ONNX
prefills in chunks of `ONNX_PREFILL_CHUNK` over a growing cache (a chunk scores all keys so
far); a sliding-window layer of eager, ONNX and ExecuTorch scores its whole ring plus the
new keys whether or not the ring is full. On the quiet ONNX fp32 measurements
(bench/results/repeatability.json, 10 architectures) this took the held-out prefill error
from median 5.1% to 2.2% and decode from 80% to 90% within +-10% (BENCHMARKS, issue 22).
* footprint: the cost model's estimate for the backend and precision, and a constant (an
  affine correction of the estimate).

Non-negative coefficients keep the fit physical (no architecture gets faster by having more
FLOPs). The uncertainty of a prediction is the spread of the leave-one-out relative errors
on the measurements the predictor was fitted on: an interval that says how far this
device's own measurements were from the fitted model when each was held out.

    predictor = Predictor.fit(observations, prompt_tokens=2048, decode_depth=2048, backend="executorch", quant="8da4w", context=2064)
    p = predictor.predict(spec)       # p.prefill_ms, p.prefill_interval, ...
    predictor.accuracy                # leave-one-out: share within +-10%, median |error|
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from lfm2.errors import UserError
from lfm2.spec import ArchSpec
from search_space import costs

#: What each objective is learned from (see the module docstring).
TARGETS = ("prefill_ms", "decode_ms", "footprint_bytes")
#: The fewest measured architectures a fit needs: more than the 4 coefficients, with some to spare.
MIN_OBSERVATIONS = 6
#: The interval given with a prediction: these quantiles of the leave-one-out relative errors.
INTERVAL_QUANTILES = (0.05, 0.95)


@dataclass(frozen=True)
class Observation:
    """One measured architecture (None where that figure was not measured)."""

    spec: ArchSpec
    prefill_ms: float | None = None
    decode_ms: float | None = None
    footprint_bytes: float | None = None


#: devices.backends.onnx_runner.PREFILL_CHUNK (not imported: that module loads ONNX Runtime;
#: tests/test_predictor.py checks the two agree).
ONNX_PREFILL_CHUNK = 128
#: Backends whose sliding-window layers score the whole ring plus the new keys (see the module doc).
_RING_WHOLE = ("eager", "onnx", "executorch")


def _chunks(tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(keys already cached, tokens) of each step of a prefill run in steps of `chunk`."""
    return [(start, min(chunk, tokens - start)) for start in range(0, tokens, chunk)]


def _executed_keys(spec: ArchSpec, tokens: int, backend: str, context: int) -> tuple[float, float]:
    """(full-attention, sliding-window) query-key pairs scored per layer by a prefill of
    `tokens` from the empty state, as the backend's attention executes it."""
    chunk = ONNX_PREFILL_CHUNK if backend == "onnx" else tokens
    if backend == "eager":
        full = float(tokens * context)  # the static buffer, masked
    elif backend == "onnx":
        full = float(sum(t * (cached + t) for cached, t in _chunks(tokens, chunk)))
    else:
        full = tokens * (tokens + 1) / 2.0
    if backend in _RING_WHOLE:
        window = float(sum(t * (spec.swa_window + t) for _, t in _chunks(tokens, chunk)))
    else:
        window = float(sum(min(t + 1, spec.swa_window) for t in range(tokens)))
    return full, window


def _linear_and_attention_flops(spec: ArchSpec, tokens: int, backend: str = "", context: int = 0) -> tuple[float, float]:
    """The linear layers' FLOPs (with the head for the last token) and the attention's
    (q.k and p.v) as the backend executes them (`_executed_keys`)."""
    linear = 2.0 * tokens * costs.linear_macs_per_token(spec) + 2.0 * spec.d_model * spec.vocab_size
    full, window = _executed_keys(spec, tokens, backend, max(context, tokens))
    per_pair = 2.0 * 2.0 * spec.n_heads * spec.head_dim  # q.k and p.v, 2 FLOPs a MAC
    attention = per_pair * (full * spec.layers.count("attn") + window * spec.layers.count("swa"))
    return linear, attention


def _kv_bytes_read(spec: ArchSpec, depth: int, backend: str, context: int) -> float:
    """K/V bytes one decode step at `depth` reads, as the backend's attention reads them."""
    per_key = 2.0 * spec.n_kv_heads * spec.head_dim * 4  # K and V, fp32
    full = max(context, depth + 1) if backend == "eager" else depth + 1
    window = spec.swa_window + 1 if backend in _RING_WHOLE else min(depth + 1, spec.swa_window)
    return per_key * (full * spec.layers.count("attn") + window * spec.layers.count("swa"))


@dataclass(frozen=True)
class FeatureSet:
    """The features of each objective, for one protocol point and stack."""

    prompt_tokens: int
    decode_depth: int
    backend: str
    quant: str
    context: int  # the artifact's max context (the protocol's `max_context`): sizes the state in the footprint

    def names(self, target: str) -> tuple[str, ...]:
        return {
            "prefill_ms": ("linear GFLOP", "attention GFLOP executed", "layers", "constant"),
            "decode_ms": ("weight MB read", "KV MB read", "layers", "constant"),
            "footprint_bytes": ("cost-model estimate (x)", "constant MiB"),
        }[target]

    def row(self, spec: ArchSpec, target: str) -> np.ndarray:
        # Cached: a search refits on every measurement and the memory estimate behind the
        # footprint row costs ~1 ms; the same (features, spec) always gives the same row.
        return np.array(_cached_row(self, spec, target))

    def _row(self, spec: ArchSpec, target: str) -> np.ndarray:
        if target == "prefill_ms":
            linear, attention = _linear_and_attention_flops(spec, self.prompt_tokens, self.backend, self.context)
            return np.array([linear / 1e9, attention / 1e9, len(spec.layers), 1.0])
        if target == "decode_ms":
            precision = {"8da4w": "8da4w", "int8": "int8"}.get(self.quant, "fp32")
            weights = costs.weight_bytes(spec, precision)
            kv = _kv_bytes_read(spec, self.decode_depth, self.backend, self.context)
            return np.array([weights / 1e6, kv / 1e6, len(spec.layers), 1.0])
        if target == "footprint_bytes":
            estimate = costs.estimate_peak_memory(spec, self.context, self.backend, self.quant, prefill_tokens=self.prompt_tokens)
            return np.array([float(estimate.total_bytes), 2.0**20])  # a coefficient of 1 is the estimate as it is; the constant in MiB
        raise ValueError(f"unknown target {target!r}; one of {TARGETS}")


@lru_cache(maxsize=8192)
def _cached_row(features: FeatureSet, spec: ArchSpec, target: str) -> tuple[float, ...]:
    return tuple(float(v) for v in features._row(spec, target))


def nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min |x b - y| subject to b >= 0, by dropping the most negative coefficient and
    solving again (an active-set method; exact for the handful of features used here)."""
    active = list(range(x.shape[1]))
    coefficients = np.zeros(x.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (solution >= 0).all():
            coefficients[:] = 0
            coefficients[active] = solution
            return coefficients
        active.pop(int(np.argmin(solution)))
    return coefficients


def _fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients minimising the squared RELATIVE error (rows weighted by 1/y): a 10 ms
    miss on a 20 ms decode matters as much as 500 ms on a 1 s prefill."""
    weights = 1.0 / y
    return nonnegative_least_squares(x * weights[:, None], y * weights)


@dataclass
class TargetModel:
    target: str
    features: tuple[str, ...]
    coefficients: np.ndarray
    loo_relative_errors: np.ndarray  # (predicted - measured) / measured, each held out

    @property
    def interval_factors(self) -> tuple[float, float]:
        """(low, high) multipliers of a prediction that bound the measurement, from the
        leave-one-out errors: measured = predicted / (1 + error)."""
        low_q, high_q = np.quantile(self.loo_relative_errors, INTERVAL_QUANTILES)
        return 1.0 / (1.0 + high_q), 1.0 / (1.0 + low_q)

    def accuracy(self) -> dict[str, Any]:
        errors = np.abs(self.loo_relative_errors)
        return {
            "n": int(len(errors)),
            "within_10pct": float((errors <= 0.10).mean()),
            "within_25pct": float((errors <= 0.25).mean()),
            "median_abs_error": float(np.median(errors)),
            "max_abs_error": float(errors.max()),
        }


@dataclass(frozen=True)
class Prediction:
    """Predicted objectives with their intervals (None where the predictor has no model)."""

    values: dict[str, float]
    intervals: dict[str, tuple[float, float]]

    def to_dict(self) -> dict[str, Any]:
        return {target: {"predicted": value, "interval": list(self.intervals[target])} for target, value in self.values.items()}


@dataclass
class Predictor:
    features: FeatureSet
    models: dict[str, TargetModel] = field(default_factory=dict)

    @classmethod
    def fit(cls, observations: list[Observation], *, prompt_tokens: int, decode_depth: int, backend: str, quant: str, context: int | None = None) -> Predictor:
        """Fit one model per objective that at least MIN_OBSERVATIONS architectures measured.
        `context`: the artifacts' max context (default: the larger of the two points)."""
        features = FeatureSet(prompt_tokens, decode_depth, backend, quant, context or max(prompt_tokens, decode_depth))
        predictor = cls(features)
        for target in TARGETS:
            rows = [(o.spec, float(getattr(o, target))) for o in observations if getattr(o, target) is not None and getattr(o, target) > 0]
            if len(rows) < MIN_OBSERVATIONS:
                continue
            x = np.stack([features.row(spec, target) for spec, _ in rows])
            y = np.array([value for _, value in rows])
            errors = np.empty(len(rows))
            for held_out in range(len(rows)):
                keep = np.arange(len(rows)) != held_out
                coefficients = _fit(x[keep], y[keep])
                errors[held_out] = (x[held_out] @ coefficients - y[held_out]) / y[held_out]
            predictor.models[target] = TargetModel(target, features.names(target), _fit(x, y), errors)
        if not predictor.models:
            raise UserError(
                f"too few measured architectures to fit a predictor: each objective needs at least {MIN_OBSERVATIONS} "
                f"(got {len(observations)} observations); run more trials on this device first"
            )
        return predictor

    def predict(self, spec: ArchSpec) -> Prediction:
        values: dict[str, float] = {}
        intervals: dict[str, tuple[float, float]] = {}
        for target, model in self.models.items():
            value = float(self.features.row(spec, target) @ model.coefficients)
            low, high = model.interval_factors
            values[target] = value
            intervals[target] = (value * low, value * high)
        return Prediction(values, intervals)

    def surely_over(self, spec: ArchSpec, budget_bytes: int) -> bool:
        """Is even the low end of the footprint's interval over the budget?"""
        if "footprint_bytes" not in self.models:
            return False
        return self.predict(spec).intervals["footprint_bytes"][0] > budget_bytes

    @property
    def accuracy(self) -> dict[str, dict[str, Any]]:
        return {target: model.accuracy() for target, model in self.models.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "features": {"prompt_tokens": self.features.prompt_tokens, "decode_depth": self.features.decode_depth, "context": self.features.context,
                         "backend": self.features.backend, "quant": self.features.quant},
            "models": {
                target: {"coefficients": dict(zip(model.features, (float(c) for c in model.coefficients), strict=True)), "leave_one_out": model.accuracy()}
                for target, model in self.models.items()
            },
        }


def observations_from_study(study) -> tuple[list[Observation], dict[str, Any]]:
    """The measured trials of a study (any status with a measurement: an over-budget trial
    is a measurement too) and the study's protocol facts (context, backend, quant)."""
    from optuna.trial import TrialState

    from nas.study_schema import StudyMetadata, read_trials

    observations = []
    for record in read_trials(study):
        if record.state != TrialState.COMPLETE.name or not record.spec or record.prefill_ms is None or record.devices:  # one device's figures only
            continue
        observations.append(Observation(ArchSpec.from_dict(record.spec), record.prefill_ms, record.decode_ms, record.footprint_bytes))
    return observations, StudyMetadata.read(study).to_attrs()


__all__ = ["Observation", "Predictor", "Prediction", "FeatureSet", "TARGETS", "observations_from_study", "nonnegative_least_squares"]
