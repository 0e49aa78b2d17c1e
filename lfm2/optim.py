"""The optimiser and learning-rate schedule every training loop of lfm2-nas uses: `lfm2-nas
train` (`lfm2.train`) and the quality proxies (`nas.quality.training`).

Weight decay, one rule (`decays`): decay every weight with two or more dimensions (the
projections, the SwiGLU, the embedding and so the tied head) except the depthwise conv
kernels (`[channels, 1, kernel]`); never norms' gains. A depthwise kernel is a per-channel
filter of `kernel` taps, closer to a gain than to a matrix: decaying it shrinks the short
convolution towards zero, which nothing downstream rescales. The proxies were measured with
this rule (BENCHMARKS.md, quality fidelity); `lfm2-nas train` used to decay those kernels too
and now follows it.

Schedule (`lr_factor`): linear warm-up to the peak, then cosine decay to `min_ratio` of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def decays(parameter: torch.Tensor) -> bool:
    """Whether `parameter` gets weight decay (the rule in the module docstring)."""
    depthwise_kernel = parameter.ndim == 3 and parameter.shape[1] == 1
    return parameter.ndim >= 2 and not depthwise_kernel


def adamw(parameters: Iterable[torch.Tensor], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `parameters` with weight decay where `decays` says; fused on CUDA."""
    parameters = [p for p in parameters if p.requires_grad]
    decay = [p for p in parameters if decays(p)]
    ids = {id(p) for p in decay}
    other = [p for p in parameters if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = bool(parameters) and parameters[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine to `min_ratio` at `total_steps`
    (`step` counts optimizer steps already taken, as `LambdaLR` does)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


__all__ = ["adamw", "decays", "lr_factor"]
