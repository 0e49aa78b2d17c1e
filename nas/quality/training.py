"""The training loop both proxies share: AdamW, warm-up + cosine, a learning-rate sweep by
successive halving (all rates train the first part of the budget, the best one goes on),
intermediate values reported to the caller, who may ask to stop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lfm2.optim import adamw, lr_factor

#: `report(step, value)`; a truthy return asks the training to stop early.
Reporter = Callable[[int, float], Any]


class Task(Protocol):
    """What the sweep needs of a proxy: a loss on the batch of a step, and an evaluation."""

    def loss(self, modules: nn.ModuleDict, step: int) -> torch.Tensor: ...

    def evaluate(self, modules: nn.ModuleDict) -> tuple[float, dict[str, Any]]: ...


@dataclass
class Run:
    """One learning rate's training state."""

    lr: float
    modules: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    step: int = 0
    value: float = -math.inf
    detail: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False


def make_optimizer(modules: nn.ModuleDict, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # one rule for weight decay with `lfm2-nas train` (lfm2.optim says which and why)
    return adamw(modules.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Warm-up over `warmup_fraction` of the steps, then cosine to a tenth (lfm2.optim)."""
    return peak * lr_factor(step, max(1, int(total * warmup_fraction)), total, 0.1)


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sweep_length(steps: int, n_rates: int, sweep_fraction: float) -> int:
    """Steps every learning rate trains before the best one goes on alone."""
    return steps if n_rates == 1 else max(1, round(steps * sweep_fraction))


def steps_over_all_rates(steps: int, n_rates: int, sweep_fraction: float) -> int:
    """What a full `train_sweep` trains, summed over its learning rates (no early stop)."""
    sweep = sweep_length(steps, n_rates, sweep_fraction)
    return n_rates * sweep + (steps - sweep)


@dataclass
class SweepResult:
    best: Run
    sweep_values: dict[float, float]
    curve: list[tuple[int, float]]
    steps_trained: int  # over all rates
    stopped_early: bool
    wall_s: float
    curve_details: list[dict[str, Any]] = field(default_factory=list)  # the task's detail at each point of `curve`


def train_sweep(
    build: Callable[[float], nn.ModuleDict],
    task: Task,
    *,
    steps: int,
    learning_rates: tuple[float, ...],
    sweep_fraction: float,
    warmup_fraction: float,
    weight_decay: float,
    grad_clip: float,
    eval_every: int,
    device: torch.device,
    bf16: bool,
    report: Reporter | None = None,
    worst_value: float = 0.0,
) -> SweepResult:
    """Train one model per learning rate to `sweep_fraction * steps`, keep the best by
    `task.evaluate`, train it to `steps`. `report(step, value)` gets the best value after the
    sweep and then every `eval_every` steps; when it returns something truthy, training stops
    and the result is the last evaluation."""
    started = time.perf_counter()
    sweep_steps = sweep_length(steps, len(learning_rates), sweep_fraction)
    runs = []
    for lr in learning_rates:
        modules = build(lr)
        runs.append(Run(lr, modules, make_optimizer(modules, lr, weight_decay)))
    steps_trained = 0
    curve: list[tuple[int, float]] = []
    curve_details: list[dict[str, Any]] = []
    stopped = False

    def record(run: Run) -> None:
        curve.append((run.step, run.value))
        curve_details.append(dict(run.detail or {}))

    def advance(run: Run, until: int, live_report: bool) -> bool:
        """Train `run` to step `until`; True when the caller asked to stop."""
        nonlocal steps_trained
        run.modules.train()
        while run.step < until:
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(run.step, steps, run.lr, warmup_fraction)
            with _autocast(device, bf16):
                loss = task.loss(run.modules, run.step)
            if not torch.isfinite(loss):
                run.diverged, run.value = True, worst_value
                run.detail = {"diverged_at_step": run.step}
                return False
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run.modules.parameters(), grad_clip)
            run.optimizer.step()
            run.step += 1
            steps_trained += 1
            if live_report and (run.step % eval_every == 0 or run.step == until):
                evaluate(run)
                record(run)
                if report is not None and run.step < steps and report(run.step, run.value):
                    return True
        return False

    def evaluate(run: Run) -> None:
        run.modules.eval()
        with torch.no_grad(), _autocast(device, bf16):
            run.value, run.detail = task.evaluate(run.modules)
        run.modules.train()
        if not math.isfinite(run.value):
            run.diverged, run.value = True, worst_value

    single = len(runs) == 1
    for run in runs:
        if advance(run, sweep_steps, live_report=single):
            stopped = True
            break
        if not single and not run.diverged:
            evaluate(run)
    sweep_values = {run.lr: run.value for run in runs}
    best = max(runs, key=lambda r: (not r.diverged, r.value))
    for run in runs:  # free the losers' memory before the long phase
        if run is not best:
            run.modules, run.optimizer = None, None  # type: ignore[assignment]
    if not single and not stopped and not best.diverged:
        record(best)
        if report is not None and best.step < steps and report(best.step, best.value):
            stopped = True
        elif advance(best, steps, live_report=True):
            stopped = True
    if best.modules is not None and not best.diverged and (not curve or curve[-1][0] != best.step):
        evaluate(best)
        record(best)
    return SweepResult(best, sweep_values, curve, steps_trained, stopped, time.perf_counter() - started, curve_details)


__all__ = ["train_sweep", "SweepResult", "Reporter", "lr_at", "make_optimizer", "sweep_length", "steps_over_all_rates"]
