"""Synthetic sequence tasks that probe what an operator mix can do (after MAD and Zoology).

Six seeded generators, each written here from the task descriptions of MAD (Poli et al.
2024, "Mechanistic Design and Scaling of Hybrid Architectures") and Zoology's multi-query
associative recall (Arora et al. 2023):

* `recall` -- in-context recall, multi-query (MQAR): key-value pairs, then some keys again;
  after each such key the model must give its value. Needs content-based lookup over the
  context: attention does it, a short convolution alone cannot reach far enough.
* `noisy_recall` -- the same with noise tokens scattered between the pairs and the queries.
* `fuzzy_recall` -- keys and values are motifs of 1..`fuzzy_max_motif` tokens (a prefix-free
  key set, so every answer is determined); the whole value motif is predicted.
* `selective_copy` -- data tokens scattered among blanks, then a separator; the model must
  write out the data tokens in order.
* `compression` -- a random sequence then a compression token; a small decoder must rebuild
  the whole sequence from the model's final hidden state at that one token (as in MAD).
* `memorisation` -- a fixed key->value table (the same for every sequence, so it lives in
  the weights): keys interleaved with insert tokens, the value is predicted at each key.

Format: `inputs` int64 [N, T]; `targets` int64 [N, T], the label for the *output at each
position* (-100 where nothing is scored; not necessarily the next input token, e.g. in
memorisation); `recon_at` int64 [N], the position whose final hidden state the compression
decoder reads (-1: none), `recon_targets` int64 [N, R] (-100 padded).

Vocabulary (shared by all tasks so that one model can train on a mixture):
`PAD`=0 (also the blank of selective copying), `SEP`=1, `COMPRESS`=2, `INSERT`=3, then
`n_noise` noise tokens, `n_keys` keys, `n_values` values, `memorise_keys` memorisation keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lfm2.errors import UserError

IGNORE = -100
PAD, SEP, COMPRESS, INSERT = 0, 1, 2, 3
N_SPECIAL = 4

TASKS = ("recall", "noisy_recall", "fuzzy_recall", "selective_copy", "compression", "memorisation")


class TaskError(UserError):
    """A task name or difficulty setting is not usable."""


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the suite; every task reads the ones it needs.

    `seq_len` is the length of every sequence. Harder: more pairs or motif length (recall
    capacity), a larger noise fraction, more tokens to copy or compress (state size), more
    memorisation keys (weight capacity), larger vocabularies.
    """

    seq_len: int = 128
    n_keys: int = 64
    n_values: int = 64
    n_noise: int = 16
    recall_pairs: int = 16
    noise_fraction: float = 0.4
    fuzzy_pairs: int = 8
    fuzzy_max_motif: int = 3
    copy_tokens: int = 16
    compress_tokens: int = 12
    # 4,096 facts: at 256 every proxy memorised the table within a fifth of the default budget
    # (accuracy 1.00 everywhere in the first fidelity run), so the task ranked nothing
    memorise_keys: int = 4096
    memorise_seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_keys", "n_values", "recall_pairs", "fuzzy_pairs", "fuzzy_max_motif", "copy_tokens", "compress_tokens", "memorise_keys"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TaskError(f"TaskConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.noise_fraction < 1.0:
            raise TaskError(f"TaskConfig.noise_fraction must be in [0, 1), got {self.noise_fraction}")
        if self.noise_fraction > 0 and self.n_noise < 1:
            raise TaskError("TaskConfig.n_noise must be >= 1 when noise_fraction > 0")
        if self.recall_pairs > self.n_keys:
            raise TaskError(f"TaskConfig.recall_pairs={self.recall_pairs} needs as many distinct keys; raise n_keys (now {self.n_keys})")
        if self.noisy_kv_len + 2 > self.seq_len:
            raise TaskError(f"seq_len={self.seq_len} leaves no room for a query after {self.recall_pairs} pairs with noise {self.noise_fraction}; raise seq_len or lower recall_pairs")
        if 2 * self.fuzzy_max_motif * (self.fuzzy_pairs + 1) > self.seq_len:  # the pairs, then room for one query
            raise TaskError(f"seq_len={self.seq_len} is too short for {self.fuzzy_pairs} fuzzy pairs of motifs up to {self.fuzzy_max_motif}; raise seq_len or lower fuzzy_pairs")
        if self.copy_tokens + 2 > self.seq_len or self.compress_tokens + 1 > self.seq_len:
            raise TaskError(f"seq_len={self.seq_len} is too short for copy_tokens={self.copy_tokens} / compress_tokens={self.compress_tokens}")
        if self.fuzzy_pairs > self.n_keys ** self.fuzzy_max_motif // 2:
            raise TaskError("TaskConfig.fuzzy_pairs is too many for the key vocabulary; raise n_keys or fuzzy_max_motif")

    # -- vocabulary ranges -------------------------------------------------------------------

    @property
    def noise_start(self) -> int:
        return N_SPECIAL

    @property
    def key_start(self) -> int:
        return N_SPECIAL + self.n_noise

    @property
    def value_start(self) -> int:
        return self.key_start + self.n_keys

    @property
    def memorise_key_start(self) -> int:
        return self.value_start + self.n_values

    @property
    def vocab_size(self) -> int:
        return self.memorise_key_start + self.memorise_keys

    @property
    def noisy_kv_len(self) -> int:
        return int(np.ceil(2 * self.recall_pairs / (1.0 - self.noise_fraction)))

    def memorise_table(self) -> np.ndarray:
        """The fixed key -> value table of the memorisation task (values as token ids)."""
        rng = np.random.default_rng(self.memorise_seed)
        return self.value_start + rng.integers(0, self.n_values, size=self.memorise_keys)

    def chance(self, task: str) -> float:
        """Accuracy of guessing uniformly among the tokens a task's answers come from."""
        if task in ("recall", "noisy_recall", "fuzzy_recall", "memorisation"):
            return 1.0 / self.n_values
        if task in ("selective_copy", "compression"):
            return 1.0 / (self.n_keys + self.n_values)
        raise TaskError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskBatch:
    inputs: np.ndarray
    targets: np.ndarray
    recon_at: np.ndarray
    recon_targets: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)


# -- helpers ---------------------------------------------------------------------------------


def _scatter(rng: np.random.Generator, length: int, sizes: list[int]) -> np.ndarray:
    """Random start offsets for blocks of `sizes`, kept in order and not overlapping, inside
    `length` slots; the slots no block covers are filler. A uniformly random arrangement:
    choose which of the (filler + blocks) units are blocks."""
    filler = length - sum(sizes)
    if filler < 0:
        raise TaskError(f"blocks of total size {sum(sizes)} do not fit in {length} positions")
    units = filler + len(sizes)
    chosen = np.sort(rng.choice(units, size=len(sizes), replace=False))
    before = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return chosen - np.arange(len(sizes)) + before


def _filler(rng: np.random.Generator, config: TaskConfig, length: int, noisy: bool) -> np.ndarray:
    if noisy:
        return config.noise_start + rng.integers(0, config.n_noise, size=length)
    return np.full(length, PAD, dtype=np.int64)


def _empty(n: int, config: TaskConfig, recon_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((n, config.seq_len), dtype=np.int64),
        np.full((n, config.seq_len), IGNORE, dtype=np.int64),
        np.full(n, -1, dtype=np.int64),
        np.full((n, recon_len), IGNORE, dtype=np.int64),
    )


# -- the tasks -------------------------------------------------------------------------------


def _recall(config: TaskConfig, n: int, rng: np.random.Generator, noisy: bool) -> TaskBatch:
    T, P = config.seq_len, config.recall_pairs
    kv_len = config.noisy_kv_len if noisy else 2 * P
    query_len = T - kv_len
    n_queries = min(P, query_len // 2)
    inputs, targets, recon_at, recon_targets = _empty(n, config, config.compress_tokens)
    for row in range(n):
        keys = config.key_start + rng.choice(config.n_keys, size=P, replace=False)
        values = config.value_start + rng.integers(0, config.n_values, size=P)
        x = np.concatenate((_filler(rng, config, kv_len, noisy), _filler(rng, config, query_len, noisy)))
        starts = _scatter(rng, kv_len, [2] * P)
        x[starts], x[starts + 1] = keys, values
        asked = rng.permutation(P)[:n_queries]
        query_starts = kv_len + _scatter(rng, query_len, [2] * n_queries)
        x[query_starts], x[query_starts + 1] = keys[asked], values[asked]
        inputs[row] = x
        targets[row, query_starts] = values[asked]
    return TaskBatch(inputs, targets, recon_at, recon_targets)


def _prefix_free_motifs(rng: np.random.Generator, count: int, vocab: int, max_len: int) -> list[tuple[int, ...]]:
    motifs: list[tuple[int, ...]] = []
    for _ in range(1000 * count):
        if len(motifs) == count:
            return motifs
        motif = tuple(int(t) for t in rng.integers(0, vocab, size=int(rng.integers(1, max_len + 1))))
        if any(m[: len(motif)] == motif or motif[: len(m)] == m for m in motifs):
            continue
        motifs.append(motif)
    raise TaskError(f"could not draw {count} prefix-free key motifs from {vocab} keys; lower fuzzy_pairs or raise n_keys")


def _fuzzy_recall(config: TaskConfig, n: int, rng: np.random.Generator) -> TaskBatch:
    T, P, M = config.seq_len, config.fuzzy_pairs, config.fuzzy_max_motif
    inputs, targets, recon_at, recon_targets = _empty(n, config, config.compress_tokens)
    for row in range(n):
        keys = [tuple(config.key_start + t for t in m) for m in _prefix_free_motifs(rng, P, config.n_keys, M)]
        values = [tuple(config.value_start + rng.integers(0, config.n_values, size=int(rng.integers(1, M + 1)))) for _ in range(P)]
        pairs = [k + v for k, v in zip(keys, values)]
        kv = np.array([t for pair in pairs for t in pair], dtype=np.int64)
        query_len = T - len(kv)
        asked: list[int] = []
        used = 0
        for index in rng.permutation(P):  # as many queries as fit, at least one (config checks)
            if used + len(pairs[index]) <= query_len:
                asked.append(int(index))
                used += len(pairs[index])
        x = np.concatenate((kv, np.full(query_len, PAD, dtype=np.int64)))
        starts = len(kv) + _scatter(rng, query_len, [len(pairs[i]) for i in asked])
        for start, index in zip(starts, asked):
            key, value = keys[index], values[index]
            x[start : start + len(key) + len(value)] = key + value
            answer_from = start + len(key) - 1  # the last key token predicts the first value token
            targets[row, answer_from : answer_from + len(value)] = value
        inputs[row] = x
    return TaskBatch(inputs, targets, recon_at, recon_targets)


def _selective_copy(config: TaskConfig, n: int, rng: np.random.Generator) -> TaskBatch:
    T, K = config.seq_len, config.copy_tokens
    context = T - 1 - K
    inputs, targets, recon_at, recon_targets = _empty(n, config, config.compress_tokens)
    for row in range(n):
        data = config.key_start + rng.integers(0, config.n_keys + config.n_values, size=K)
        x = np.full(T, PAD, dtype=np.int64)
        x[_scatter(rng, context, [1] * K)] = data
        x[context] = SEP
        x[context + 1 :] = data
        inputs[row] = x
        targets[row, context : context + K] = data
    return TaskBatch(inputs, targets, recon_at, recon_targets)


def _compression(config: TaskConfig, n: int, rng: np.random.Generator) -> TaskBatch:
    L = config.compress_tokens
    inputs, targets, recon_at, recon_targets = _empty(n, config, L)
    data = config.key_start + rng.integers(0, config.n_keys + config.n_values, size=(n, L))
    inputs[:, :L] = data
    inputs[:, L] = COMPRESS
    recon_at[:] = L
    recon_targets[:] = data
    return TaskBatch(inputs, targets, recon_at, recon_targets)


def _memorisation(config: TaskConfig, n: int, rng: np.random.Generator) -> TaskBatch:
    T = config.seq_len
    m = T // 2
    table = config.memorise_table()
    inputs, targets, recon_at, recon_targets = _empty(n, config, config.compress_tokens)
    keys = rng.integers(0, config.memorise_keys, size=(n, m))
    inputs[:, 0 : 2 * m : 2] = config.memorise_key_start + keys
    inputs[:, 1 : 2 * m : 2] = INSERT
    targets[:, 0 : 2 * m : 2] = table[keys]
    return TaskBatch(inputs, targets, recon_at, recon_targets)


def generate(task: str, config: TaskConfig, n: int, seed: int | np.random.Generator) -> TaskBatch:
    """`n` sequences of `task`; the same (task, config, n, seed) gives the same batch."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if task == "recall":
        return _recall(config, n, rng, noisy=False)
    if task == "noisy_recall":
        return _recall(config, n, rng, noisy=True)
    if task == "fuzzy_recall":
        return _fuzzy_recall(config, n, rng)
    if task == "selective_copy":
        return _selective_copy(config, n, rng)
    if task == "compression":
        return _compression(config, n, rng)
    if task == "memorisation":
        return _memorisation(config, n, rng)
    raise TaskError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def concatenate(batches: list[TaskBatch]) -> TaskBatch:
    return TaskBatch(*(np.concatenate([getattr(b, f) for b in batches]) for f in ("inputs", "targets", "recon_at", "recon_targets")))


__all__ = ["TASKS", "TaskConfig", "TaskBatch", "TaskError", "generate", "concatenate", "IGNORE", "PAD", "SEP", "COMPRESS", "INSERT"]
