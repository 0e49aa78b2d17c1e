"""The language-model proxy: bits per byte on held-out stdlib text after a short training run.

The proxy model is byte-level (vocabulary 256) and trains on random windows of the train
split of `lfm2.corpus.stdlib_corpus`; it is evaluated on fixed, evenly spread,
non-overlapping windows of the validation split. Bits per byte = mean next-byte
cross-entropy in nats / ln 2 over every predicted byte of those windows (a byte early in a
window sees less context: the same for every candidate).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm2.corpus import Corpus

_ORDER_STREAM = 41
#: Bits per byte of a model that knows nothing (uniform over 256 bytes): the worst score.
UNIFORM_BPB = 8.0
#: Train-split windows evaluated beside the validation ones (at most the validation count).
TRAIN_EVAL_WINDOWS = 256


class LmTask:
    """Data and loss/evaluation of the LM proxy for `train_sweep`."""

    def __init__(self, corpus: Corpus, *, batch_size: int, seq_len: int, eval_windows: int, seed: int, device: torch.device):
        self.corpus, self.batch_size, self.seq_len, self.seed, self.device = corpus, batch_size, seq_len, seed, device
        self.eval_data = torch.as_tensor(corpus.evaluation_windows(seq_len + 1, eval_windows), device=device)
        # the same measure on fixed windows the model trains on: its gap to the validation
        # bpb shows a run that memorises the (small) corpus instead of learning from it
        self.train_eval_data = torch.as_tensor(corpus.evaluation_windows(seq_len + 1, min(eval_windows, TRAIN_EVAL_WINDOWS), split="train"), device=device)
        self.train_data = torch.from_numpy(np.array(corpus.train)).to(device)  # a writable uint8 copy; windows are sliced on the device

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def _batch(self, step: int) -> Tensor:
        rng = np.random.default_rng([self.seed, _ORDER_STREAM, step])
        starts = torch.as_tensor(rng.integers(0, len(self.train_data) - self.seq_len - 1, size=self.batch_size), device=self.device)
        offsets = torch.arange(self.seq_len + 1, device=self.device)
        return self.train_data[starts[:, None] + offsets[None, :]].long()

    def loss(self, modules: nn.ModuleDict, step: int) -> Tensor:
        window = self._batch(step)
        logits = modules["model"](window[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))

    def evaluate(self, modules: nn.ModuleDict, eval_batch: int = 64) -> tuple[float, dict[str, Any]]:
        bpb, count = _bits_per_byte(modules["model"], self.eval_data, eval_batch)
        train_bpb, _ = _bits_per_byte(modules["model"], self.train_eval_data, eval_batch)
        return -bpb, {"bpb": bpb, "train_bpb": train_bpb, "eval_bytes": count}


def _bits_per_byte(model: nn.Module, windows: Tensor, eval_batch: int) -> tuple[float, int]:
    """Mean next-byte cross-entropy in bits over every predicted byte of `windows` (the
    uniform model's 8 bits when it is not finite), and the number of bytes predicted."""
    total_nats, count = 0.0, 0
    for start in range(0, len(windows), eval_batch):
        window = windows[start : start + eval_batch]
        logits = model(window[:, :-1]).float()
        total_nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"))
        count += window[:, 1:].numel()
    bpb = total_nats / count / math.log(2)
    return (bpb if math.isfinite(bpb) else UNIFORM_BPB), count


__all__ = ["LmTask", "UNIFORM_BPB"]
