"""A training run's data: the corpus tokenised once (cached beside the run), and the batches
drawn from it in an order that a resumed run repeats exactly.

Batches are fixed windows of `seq_len + 1` tokens (stride `seq_len`) visited in a seeded
random permutation per epoch; the position in it (epoch, index) is all the sampler's state,
which the checkpoint saves (`lfm2.checkpoints`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lfm2.corpus import Corpus
from lfm2.errors import UserError
from lfm2.tokenizer import byte_tokenizer, encode_documents, train_bpe_tokenizer


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def prepare_tokens(corpus: Corpus, kind: str, vocab_size: int, workdir: Path, log: Callable[[str], None] = print):
    """The tokenizer and the train/validation token streams, cached in `workdir`."""
    cache = workdir / "tokens.npz"
    tokenizer_path = workdir / "tokenizer.json"
    if cache.is_file() and tokenizer_path.is_file():
        with np.load(cache) as data:
            meta = json.loads(str(data["meta"]))
            if meta == {"fingerprint": corpus.fingerprint, "kind": kind, "vocab_size": vocab_size}:
                from tokenizers import Tokenizer

                return Tokenizer.from_file(str(tokenizer_path)), data["train"], data["validation"]
    train_documents, validation_documents = corpus.documents("train"), corpus.documents("validation")
    if kind == "bytes":
        tokenizer = byte_tokenizer(vocab_size)
    else:
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size:,}) on {corpus.train_bytes:,} bytes")
        tokenizer = train_bpe_tokenizer((doc.decode("utf-8", errors="replace") for doc in train_documents), vocab_size)
        log(f"BPE vocabulary: {tokenizer.get_vocab_size():,} tokens")
    dtype = _token_dtype(vocab_size)
    train_tokens = encode_documents(tokenizer, train_documents, kind, dtype)
    validation_tokens = encode_documents(tokenizer, validation_documents, kind, dtype)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tokenizer_path))
    meta = json.dumps({"fingerprint": corpus.fingerprint, "kind": kind, "vocab_size": vocab_size})
    np.savez(cache, train=train_tokens, validation=validation_tokens, meta=np.array(meta))
    return tokenizer, train_tokens, validation_tokens


class WindowSampler:
    """Fixed windows of `seq_len + 1` tokens (stride `seq_len`), visited in a seeded random
    order per epoch. The position (epoch, index) is all the state there is."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len} + 1; use a larger corpus or a smaller --seq-len")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_windows, generator=generator)

    def next_batch(self, n_sequences: int) -> torch.Tensor:
        rows = []
        for _ in range(n_sequences):
            if self.index >= self.n_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            start = int(self._order[self.index]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
            self.index += 1
        return torch.stack(rows)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def validation_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    n = min(max(1, max_tokens // seq_len), (len(tokens) - 1) // seq_len)
    if n < 1:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len} + 1; use a larger corpus or a smaller --seq-len")
    data = torch.from_numpy(tokens[: n * seq_len + 1].astype(np.int64))
    return torch.stack([data[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


__all__ = ["WindowSampler", "prepare_tokens", "validation_windows"]
