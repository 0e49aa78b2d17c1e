"""A training run's checkpoints: everything that makes a resumed run continue exactly as the
uninterrupted one (model, optimizer, scheduler, RNG states, the data position), and what a
checkpoint must share with the run that resumes it (`compatibility`).

`out/train/checkpoints/step-XXXXXXXX.pt`, written atomically (a file exists only once it is
complete), the newest `keep` kept."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from lfm2.errors import UserError

CHECKPOINT_PREFIX = "step-"


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files in `folder`, oldest first."""
    return sorted(folder.glob(f"{CHECKPOINT_PREFIX}*.pt"))


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{CHECKPOINT_PREFIX}{step:08d}.pt"
    partial = path.with_suffix(".pt.partial")
    torch.save(payload, partial)
    os.replace(partial, path)  # a checkpoint file exists only once it is complete
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load_latest(folder: Path, compatibility: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` and its payload (None when there is none); a
    `UserError` naming what differs when it was made with other settings."""
    existing = checkpoints(folder)
    if not existing:
        return None
    # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
    checkpoint = torch.load(existing[-1], map_location="cpu", weights_only=True)
    if checkpoint["compatibility"] != compatibility:
        changed = {k: (checkpoint["compatibility"].get(k), v) for k, v in compatibility.items() if checkpoint["compatibility"].get(k) != v}
        raise UserError(
            f"{existing[-1]} was made with different settings {changed} (checkpoint, now); "
            "resume with the same ones, or start over with --no-resume (or another --out)"
        )
    return existing[-1], checkpoint


__all__ = ["CHECKPOINT_PREFIX", "checkpoints", "load_latest", "rng_state", "save_checkpoint", "set_rng_state"]
