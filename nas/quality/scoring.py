"""`score(spec, kind)`: train a candidate's proxy and return its quality score.

Kinds:

* `"mad"` -- mean accuracy over the synthetic tasks (0..1, higher is better).
* `"lm"` -- minus the bits per byte on held-out stdlib text (-8..0, higher is better;
  `detail["bpb"]` holds the positive number).
* `"layout"` -- no training: minus the reference bits per byte predicted from the layout
  and the parameter count by a fit shipped as data (`nas.quality.layout`; the search's
  default, because no trained proxy ranked layouts better, BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lfm2.errors import UserError
from lfm2.model import LFM2, build_model, count_parameters
from lfm2.spec import ArchSpec
from nas.quality.proxy import proxy_spec
from nas.quality.settings import QualitySettings
from nas.quality.training import Task, train_sweep

KINDS = ("layout", "mad", "lm")
#: Bumped whenever a change to this package changes what a score means (invalidates caches).
QUALITY_VERSION = 1
#: Kinds that train nothing: scored in the caller's process, on no device.
FREE_KINDS = ("layout",)


@dataclass(frozen=True)
class QualityResult:
    """`score`: higher is better. `detail`: how it was obtained (see `score`)."""

    score: float
    kind: str
    key: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "kind": self.kind, "key": self.key, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityResult:
        return cls(score=float(data["score"]), kind=data["kind"], key=data["key"], detail=dict(data.get("detail", {})))


def cache_key(spec: ArchSpec, kind: str = "mad", settings: QualitySettings | None = None, seed: int = 0) -> str:
    """Names a score: equal keys mean the same proxy, training and data (16 hex digits).

    The device is not part of it: CPU (fp32) and CUDA (bf16 autocast) runs of the same
    settings differ only by rounding, and the search treats them as one score. For `lm`,
    the Python minor version is, because each ships its own stdlib (the corpus)."""
    _check_kind(kind)
    if kind in FREE_KINDS:  # no settings, no seed: the fit's version names it
        facts = {"version": QUALITY_VERSION, "spec": spec.key, "kind": kind, "signal": signal_version(kind)}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    settings = settings or QualitySettings.default()
    facts = {"version": QUALITY_VERSION, "spec": spec.key, "kind": kind, "settings": settings.key, "seed": int(seed)}
    if kind == "lm":
        facts["python"] = ".".join(platform.python_version_tuple()[:2])
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def signal_version(kind: str, settings: QualitySettings | None = None) -> str:
    """Names what a score of `kind` means, for the search to record with every trial:
    `layout-v<N>-<hash>` for the fitted layout signal, `<kind>-v<QUALITY_VERSION>-<settings
    key>` for a trained proxy (its recipe)."""
    _check_kind(kind)
    if kind == "layout":
        from nas.quality import layout

        return layout.version()
    return f"{kind}-v{QUALITY_VERSION}-{(settings or QualitySettings.default()).key}"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown quality kind {kind!r}; use one of {', '.join(KINDS)}")


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use device='cpu'")
    return dev


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def _maybe_compiled(model: LFM2, compile: bool) -> LFM2:
    # Blocks, not the whole model: the final norm keeps its forward hook (the MAD
    # compression decoder reads the hidden state through it) outside the compiled graphs,
    # and blocks of one kind and shape share one compiled graph.
    if compile:
        for layer in model.layers:
            layer.compile()
    return model


def score(
    spec: ArchSpec,
    kind: str = "mad",
    *,
    device: str = "cpu",
    settings: QualitySettings | None = None,
    seed: int = 0,
    report: Callable[[int, float], Any] | None = None,
    compile: bool = False,
) -> QualityResult:
    """Build the proxy of `spec`, train it under `settings`, return its score.

    `report(step, value)` receives intermediate scores (same scale as the final one): once
    after the learning-rate sweep, then every `settings.eval_every` steps. If it returns
    something truthy, training stops there and the result is that last value, with
    `detail["stopped_early"] = True`.

    `compile=True` runs each block of the proxy through `torch.compile` (fused kernels: a
    proxy step on a GPU is bound by launching thousands of small kernels, not by the GPU).
    On an H200 the MAD proxy's steps ran 2.0x and the LM task's 1.4x faster once compiled
    (~30 s of compiling per process). It is not in the key: like the device, it changes the
    rounding, not the recipe -- but under bf16 a rounding change moves a short MAD run's
    score about as much as another seed would (0.136 eager vs 0.185 compiled, 400 steps).

    `detail`: `proxy_spec` (dict), `proxy_parameters`, `lr` (chosen), `sweep` (value of
    each rate when the sweep ended), `steps` (of the chosen rate), `steps_trained` (all
    rates), `tokens` (seen by the chosen rate), `tokens_trained`, `curve` ([step, value]),
    `curve_details` (the task's detail at each point of `curve`: per-task accuracies, or
    validation and train bpb),
    `wall_s`, `device`, `settings` (name), `settings_key`, `seed`, `stopped_early`,
    `diverged`; for `mad` also `task_accuracy` and `chance` (per task); for `lm` also `bpb`,
    `train_bpb` (the same measure on fixed windows of the train split) and `corpus` (name,
    fingerprint, Python version, sizes).
    """
    _check_kind(kind)
    settings = settings or QualitySettings.default()
    if not isinstance(spec, ArchSpec):
        raise UserError(f"score() takes an ArchSpec, got {type(spec).__name__}; use ArchSpec.from_dict(...) first")
    if kind == "layout":  # nothing to train: device, settings, seed and compile do not apply
        from nas.quality import layout

        free = layout.score_layout(spec)
        return QualityResult(score=free["score"], kind=kind, key=cache_key(spec, kind), detail=free["detail"])
    dev = _device(device)
    started = time.perf_counter()
    task: Task

    if kind == "mad":
        from nas.quality.mad import CompressionDecoder, MadTask

        config = settings.task_config
        proxy = proxy_spec(spec, width_factor=settings.width_factor, vocab_size=config.vocab_size, seq_len=config.seq_len,
                           width_multiple=settings.width_multiple, min_d_model=settings.min_d_model, min_head_dim=settings.min_head_dim)
        task = MadTask(config, settings.tasks, batch_size=settings.mad_batch_size, train_examples=settings.mad_train_examples,
                       eval_examples=settings.mad_eval_examples, seed=seed, device=dev)
        steps, worst = settings.mad_steps, 0.0

        def build(lr: float) -> nn.ModuleDict:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                decoder = CompressionDecoder(proxy.d_model, proxy.vocab_size, config.compress_tokens)
            return nn.ModuleDict({"model": _maybe_compiled(build_model(proxy, device=dev, seed=seed), compile), "decoder": decoder.to(dev)})

    else:
        from lfm2.corpus import BYTE_VOCAB_SIZE, corpus_by_name
        from nas.quality.lm import UNIFORM_BPB, LmTask

        corpus = corpus_by_name(settings.lm_corpus, settings.lm_corpus_max_bytes)
        proxy = proxy_spec(spec, width_factor=settings.width_factor, vocab_size=BYTE_VOCAB_SIZE, seq_len=settings.lm_seq_len,
                           width_multiple=settings.width_multiple, min_d_model=settings.min_d_model, min_head_dim=settings.min_head_dim)
        task = LmTask(corpus, batch_size=settings.lm_batch_size, seq_len=settings.lm_seq_len, eval_windows=settings.lm_eval_windows, seed=seed, device=dev)
        steps, worst = settings.lm_steps, -UNIFORM_BPB

        def build(lr: float) -> nn.ModuleDict:
            return nn.ModuleDict({"model": _maybe_compiled(build_model(proxy, device=dev, seed=seed), compile)})

    sweep = train_sweep(
        build, task, steps=steps, learning_rates=settings.learning_rates, sweep_fraction=settings.sweep_fraction,
        warmup_fraction=settings.warmup_fraction, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
        eval_every=settings.eval_every, device=dev, bf16=settings.bf16_on_cuda, report=report, worst_value=worst,
    )
    best = sweep.best
    value = best.value if math.isfinite(best.value) else worst
    detail: dict[str, Any] = {
        "kind": kind,
        "spec_key": spec.key,
        "proxy_spec": proxy.to_dict(),
        "proxy_parameters": count_parameters(build_model(proxy, device="meta")),
        "lr": best.lr,
        "sweep": {str(lr): v for lr, v in sweep.sweep_values.items()},
        "steps": best.step,
        "steps_trained": sweep.steps_trained,
        "tokens": best.step * task.tokens_per_step(),
        "tokens_trained": sweep.steps_trained * task.tokens_per_step(),
        "curve": [[s, v] for s, v in sweep.curve],
        "curve_details": sweep.curve_details,
        "stopped_early": sweep.stopped_early,
        "diverged": best.diverged,
        "device": _device_name(dev),
        "compiled": compile,
        "settings": settings.name,
        "settings_key": settings.key,
        "seed": seed,
    }
    if kind == "mad":
        detail["task_accuracy"] = best.detail.get("task_accuracy", {t: 0.0 for t in settings.tasks})
        detail["chance"] = {t: settings.task_config.chance(t) for t in settings.tasks}
    else:
        detail["bpb"] = best.detail.get("bpb", UNIFORM_BPB)
        detail["train_bpb"] = best.detail.get("train_bpb", UNIFORM_BPB)
        detail["corpus"] = corpus.describe()
    detail["wall_s"] = time.perf_counter() - started
    return QualityResult(score=float(value), kind=kind, key=cache_key(spec, kind, settings, seed), detail=detail)


__all__ = ["score", "cache_key", "signal_version", "QualityResult", "KINDS", "FREE_KINDS", "QUALITY_VERSION"]
