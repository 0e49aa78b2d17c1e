"""The MAD-style synthetic suite as one training task: a mixture of all tasks per batch.

One proxy model trains on every task at once (each step holds the same number of rows of
each task, and each task's loss counts equally), and is scored by per-task accuracy on a
held-out set: the score is the mean over tasks. One run per learning rate instead of one
per task and rate keeps a candidate's cost at a few GPU-seconds per thousand steps; sharing
the model also charges a layout for interference between skills, which the downstream
model has to live with too.

Compression needs an output that sees only one position: a two-layer MLP decoder reads the
proxy's final (normed) hidden state at the compression token -- taken with a forward hook,
so the model runs through its own `model(tokens)` -- plus a learned position embedding per
token to rebuild, as in MAD.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.quality.tasks import IGNORE, TaskConfig, concatenate, generate

#: Seed streams: training data, evaluation data and decoder weights never share draws.
_TRAIN_STREAM, _EVAL_STREAM, _ORDER_STREAM = 11, 23, 37


class CompressionDecoder(nn.Module):
    def __init__(self, d_model: int, vocab_size: int, length: int):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.up = nn.Linear(d_model, 2 * d_model)
        self.down = nn.Linear(2 * d_model, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [B, D] -> logits [B, length, vocab]."""
        return self.down(F.gelu(self.up(hidden[:, None, :] + self.positions[None])))


class HiddenCapture:
    """Keeps the output of the model's final norm (its last hidden state) from each forward."""

    def __init__(self, model: nn.Module):
        self.value: Tensor | None = None
        model.get_submodule("embedding_norm").register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output

    def last(self) -> Tensor:
        """The hidden state of the latest forward (an error before the first)."""
        if self.value is None:
            raise RuntimeError("no hidden state captured: run the model forward before reading its final norm's output")
        return self.value


def _tensors(batch, device: torch.device) -> dict[str, Tensor]:
    return {f: torch.as_tensor(getattr(batch, f), device=device) for f in ("inputs", "targets", "recon_at", "recon_targets")}


class MadTask:
    """Data and loss/evaluation of the suite for `train_sweep`."""

    def __init__(self, config: TaskConfig, tasks: tuple[str, ...], *, batch_size: int, train_examples: int, eval_examples: int, seed: int, device: torch.device):
        self.config, self.tasks, self.device = config, tasks, device
        self.rows_per_task = batch_size // len(tasks)
        self.train = []
        self.eval = []
        for index, name in enumerate(tasks):
            self.train.append(_tensors(generate(name, config, train_examples, np.random.default_rng([seed, _TRAIN_STREAM, index])), device))
            self.eval.append(_tensors(generate(name, config, eval_examples, np.random.default_rng([seed, _EVAL_STREAM, index])), device))
        self.train_examples = train_examples
        self.seed = seed

    def tokens_per_step(self) -> int:
        return self.rows_per_task * len(self.tasks) * self.config.seq_len

    @staticmethod
    def _capture(model: nn.Module) -> HiddenCapture:
        capture = model.__dict__.get("_quality_capture")  # kept on the model: one hook per model
        if capture is None:
            capture = model.__dict__["_quality_capture"] = HiddenCapture(model)
        return capture

    def _batch(self, step: int) -> list[dict[str, Tensor]]:
        # The same rows at the same step for every learning rate: a fair sweep.
        rng = np.random.default_rng([self.seed, _ORDER_STREAM, step])
        rows = []
        for data in self.train:
            index = torch.as_tensor(rng.integers(0, self.train_examples, size=self.rows_per_task), device=self.device)
            rows.append({k: v[index] for k, v in data.items()})
        return rows

    def _task_losses(self, modules: nn.ModuleDict, parts: list[dict[str, Tensor]]) -> list[Tensor]:
        model, decoder = modules["model"], modules["decoder"]
        capture = self._capture(model)
        inputs = torch.cat([p["inputs"] for p in parts])
        logits = model(inputs).float()
        hidden = capture.last()
        losses, start = [], 0
        for name, part in zip(self.tasks, parts):
            n = len(part["inputs"])
            if name == "compression":
                recon = decoder(hidden[start : start + n].gather(1, part["recon_at"][:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]).float()
                losses.append(F.cross_entropy(recon.reshape(-1, recon.shape[-1]), part["recon_targets"].reshape(-1), ignore_index=IGNORE))
            else:
                chunk = logits[start : start + n]
                losses.append(F.cross_entropy(chunk.reshape(-1, chunk.shape[-1]), part["targets"].reshape(-1), ignore_index=IGNORE))
            start += n
        return losses

    def loss(self, modules: nn.ModuleDict, step: int) -> Tensor:
        return torch.stack(self._task_losses(modules, self._batch(step))).mean()

    def evaluate(self, modules: nn.ModuleDict, eval_batch: int = 256) -> tuple[float, dict[str, Any]]:
        model, decoder = modules["model"], modules["decoder"]
        capture = self._capture(model)
        accuracies: dict[str, float] = {}
        for name, data in zip(self.tasks, self.eval):
            correct = total = 0
            for start in range(0, len(data["inputs"]), eval_batch):
                part = {k: v[start : start + eval_batch] for k, v in data.items()}
                logits = model(part["inputs"])
                if name == "compression":
                    hidden = capture.last()
                    at = part["recon_at"][:, None, None].expand(-1, 1, hidden.shape[-1])
                    predicted = decoder(hidden.gather(1, at)[:, 0]).argmax(-1)
                    targets = part["recon_targets"]
                else:
                    predicted, targets = logits.argmax(-1), part["targets"]
                scored = targets != IGNORE
                correct += int((predicted == targets)[scored].sum())
                total += int(scored.sum())
            accuracies[name] = correct / max(1, total)
        return float(np.mean(list(accuracies.values()))), {"task_accuracy": accuracies}


def example_batch(config: TaskConfig, tasks: tuple[str, ...], rows_per_task: int, seed: int):
    """A mixed batch like the ones the proxy trains on (for inspection and tests)."""
    return concatenate([generate(name, config, rows_per_task, np.random.default_rng([seed, _TRAIN_STREAM, i])) for i, name in enumerate(tasks)])


__all__ = ["MadTask", "CompressionDecoder", "example_batch"]
