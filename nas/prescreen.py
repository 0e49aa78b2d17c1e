"""Pre-screening: skip a candidate the predictor says is not worth a device measurement.

Once a study has measured enough architectures on its device (`MIN_MEASUREMENTS`), the
predictor (`nas.predictor`, refitted on every new measurement) predicts each new
candidate's prefill, decode and footprint with an interval (the 5-95% range of its own
leave-one-out errors). A candidate is skipped, without compiling or measuring it, when

* it is confidently over budget: even the low end of its footprint interval is over the
  memory budget; or
* it is confidently dominated: even the optimistic end of its latency intervals is
  dominated by an architecture already measured within budget. That needs every objective
  known or predicted before measuring: a study without a quality objective
  (`quality="none"`), or one whose quality is a free signal computed from the spec
  (`quality="free"`, e.g. the number of attention layers, passed to `judge`). With a trained
  quality proxy (`quality="trained"`) the quality is unknown until scored, and a slower
  candidate may still be better, so only the budget rule applies.

What a skip is in the study: the trial is told PRUNED (never COMPLETE with predicted values:
a sampler must not learn from numbers nobody measured), with `status` "skipped", the
reason, and the prediction in its user attrs. An over-budget skip also sets the memory
constraint to the low end of the predicted footprint minus the budget (> 0), as the
analytic pre-filter does with its lower bound, so that TPE ranks it with the infeasible
trials; NSGA-II and the GP sampler read COMPLETE trials only and do not see skips at all.

    screen = Prescreen(features, budget_bytes=500 * 2**20, quality="none")
    screen.add(spec, prefill_ms=..., decode_ms=..., footprint_bytes=..., quality=None)
    verdict = screen.judge(spec)        # verdict.skip, verdict.reason, verdict.prediction
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lfm2.errors import UserError
from lfm2.spec import ArchSpec
from nas.predictor import FeatureSet, Observation, Prediction, Predictor

#: Measured architectures before the pre-screen judges anyone: fewer give a predictor whose
#: leave-one-out intervals (what "confidently" rests on) are too rough to trust.
MIN_MEASUREMENTS = 10
QUALITY_MODES = ("none", "free", "trained")


@dataclass(frozen=True)
class Verdict:
    skip: bool
    reason: str  # "" when measured
    rule: str | None = None  # "over_budget" | "dominated" | None
    prediction: Prediction | None = None

    def attrs(self) -> dict[str, Any]:
        """What a skipped trial stores (JSON-serialisable)."""
        return {"rule": self.rule, "reason": self.reason, "prediction": self.prediction.to_dict() if self.prediction else None}


@dataclass
class Prescreen:
    features: FeatureSet
    budget_bytes: int
    quality: str = "none"  # "none": no quality objective; "free": known before measuring (given to judge); "trained": unknown until scored
    min_measurements: int = MIN_MEASUREMENTS
    observations: list[Observation] = field(default_factory=list)
    qualities: list[float | None] = field(default_factory=list)
    _predictor: Predictor | None = None
    _fitted_on: int = -1

    def add(self, spec: ArchSpec, *, prefill_ms: float | None, decode_ms: float | None, footprint_bytes: float | None, quality: float | None = None) -> None:
        """One device measurement (any outcome that measured something: over budget too)."""
        if prefill_ms is None and decode_ms is None and footprint_bytes is None:
            return
        self.observations.append(Observation(spec, prefill_ms, decode_ms, footprint_bytes))
        self.qualities.append(quality)

    @property
    def active(self) -> bool:
        return len(self.observations) >= self.min_measurements

    def predictor(self) -> Predictor | None:
        if not self.active:
            return None
        if self._fitted_on != len(self.observations):
            f = self.features
            try:
                self._predictor = Predictor.fit(self.observations, prompt_tokens=f.prompt_tokens, decode_depth=f.decode_depth, backend=f.backend, quant=f.quant, context=f.context)
            except UserError:
                self._predictor = None
            self._fitted_on = len(self.observations)
        return self._predictor

    def _front(self) -> list[tuple[float, float, float | None]]:
        """(prefill, decode, quality) of the measured architectures within budget."""
        out = []
        for o, q in zip(self.observations, self.qualities, strict=True):
            if o.prefill_ms is None or o.decode_ms is None:
                continue
            if o.footprint_bytes is not None and o.footprint_bytes > self.budget_bytes:
                continue
            out.append((o.prefill_ms, o.decode_ms, q))
        return out

    def __post_init__(self) -> None:
        if self.quality not in QUALITY_MODES:
            raise ValueError(f"quality must be one of {QUALITY_MODES}, got {self.quality!r}")

    def judge(self, spec: ArchSpec, quality: float | None = None) -> Verdict:
        """Measure or skip `spec`; `quality`: its quality objective (higher is better) for a
        free quality signal (`quality="free"`), else None."""
        predictor = self.predictor()
        if predictor is None:
            return Verdict(False, "")
        prediction = predictor.predict(spec)
        intervals = prediction.intervals
        if "footprint_bytes" in intervals and intervals["footprint_bytes"][0] > self.budget_bytes:
            low = intervals["footprint_bytes"][0]
            return Verdict(True, f"predicted footprint at least {low / 2**20:.0f} MiB (5% end of its interval) > budget {self.budget_bytes / 2**20:.0f} MiB: not compiled",
                           "over_budget", prediction)
        if "prefill_ms" not in intervals or "decode_ms" not in intervals or self.quality == "trained" or (self.quality == "free" and quality is None):
            return Verdict(False, "", prediction=prediction)
        prefill_low, decode_low = intervals["prefill_ms"][0], intervals["decode_ms"][0]
        use_quality = self.quality == "free"
        for prefill, decode, q in self._front():
            quality_ok = (not use_quality) or (q is not None and quality is not None and q >= quality)
            if quality_ok and prefill <= prefill_low and decode <= decode_low:
                return Verdict(True, f"predicted prefill >= {prefill_low:.4g} ms and decode >= {decode_low:.4g} ms (optimistic ends) are dominated by a measured "
                                     f"architecture ({prefill:.4g} ms, {decode:.4g} ms{f', quality {q:g}' if use_quality else ''}): not compiled", "dominated", prediction)
        return Verdict(False, "", prediction=prediction)

    def accuracy(self) -> dict[str, Any] | None:
        predictor = self.predictor()
        return None if predictor is None else predictor.accuracy


def for_search(study, *, context: int, decode_tokens: int, backend: str, quant: str, budget_bytes: int, quality: str) -> Prescreen:
    """The pre-screen of a live search, holding the study's measurements so far (a resumed
    study's too). `quality` is the search's quality kind: "none" keeps the dominance rule;
    "layout", a free signal known before measuring, keeps it with the quality compared too
    (`free_quality`); a trained proxy ("mad", "lm") leaves only the budget rule."""
    from nas.predictor import observations_from_study

    mode = {"none": "none", "layout": "free"}.get(quality, "trained")
    screen = Prescreen(FeatureSet(context, context, backend, quant, context + decode_tokens), budget_bytes, quality=mode)
    observations, _ = observations_from_study(study)
    for o in observations:
        screen.add(o.spec, prefill_ms=o.prefill_ms, decode_ms=o.decode_ms, footprint_bytes=o.footprint_bytes, quality=free_quality(o.spec, quality))
    return screen


def free_quality(spec: ArchSpec, quality: str) -> float | None:
    """The search's quality objective of `spec` when it is known before measuring (the free
    `layout` signal), else None."""
    if quality != "layout":
        return None
    from nas.quality.layout import score_layout

    return float(score_layout(spec)["score"])


def record_skip(trial, verdict: Verdict, budget_bytes: int) -> None:
    """What a skipped trial stores before it is told PRUNED: status, reason, the prediction;
    for an over-budget skip the memory constraint at the low end of the predicted footprint
    (like the analytic pre-filter's lower bound), so that TPE ranks it with the infeasible."""
    from nas.objectives import MEMORY_CONSTRAINT
    from nas.study_schema import TrialStatus, write_trial_attrs

    write_trial_attrs(trial, status=TrialStatus.SKIPPED, reason=verdict.reason, prescreen=verdict.attrs())
    if verdict.rule == "over_budget" and verdict.prediction is not None:
        trial.set_constraint(MEMORY_CONSTRAINT, float(verdict.prediction.intervals["footprint_bytes"][0] - budget_bytes))


__all__ = ["Prescreen", "Verdict", "MIN_MEASUREMENTS", "QUALITY_MODES", "for_search", "free_quality", "record_skip"]
