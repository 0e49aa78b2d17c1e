"""Train an exported LFM2 architecture (a model folder, see `lfm2.hf_io`) on a text corpus.

Any architecture the search produces trains: a Hugging Face folder (`lfm2-nas export --to hf`)
or an lfm2-nas folder (`--to lfm2`, e.g. with sliding-window layers), and the result has the
same flavour as the input (a spec `transformers` cannot express stays an lfm2-nas folder).

`train(folder, out, TrainConfig(...))` reads the folder's architecture and initial weights,
tokenises the corpus (byte-level, or a BPE trained here; see `lfm2.tokenizer`), and runs
AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast on CUDA and
gradient accumulation up to `batch_tokens` per step. Everything lands in `out`:

    out/model.safetensors, lfm2_nas.json, tokenizer.json,          the trained model folder
        tokenizer_config.json, ARCH.md (+ config.json,             (+ what transformers needs,
        generation_config.json)                                      where it can express it)
    out/train/log.jsonl        one record per step ("train") and per evaluation ("val")
    out/train/loss.html        the loss curves (plotly), written when the run ends or stops
    out/train/checkpoints/     step-XXXXXXXX.pt: model, optimizer, scheduler, RNG, data position
    out/train/tokens.npz       the tokenised corpus (reused on resume)

A run resumes from its latest checkpoint by default and then continues exactly as the
uninterrupted run would have (same batches, same learning rates, same losses): batches
are drawn from a seeded permutation of fixed windows, and the position in it is saved.
On CUDA each step records tokens/s and the model-FLOPs utilisation (MFU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lfm2.flops import training_flops_per_token  # one home for FLOPs (lfm2.flops)
from lfm2.optim import adamw, lr_factor
from lfm2.errors import UserError
from lfm2.hf_io import is_transformers_loadable, load_model_folder, read_provenance, read_spec, save_model_folder
from lfm2.model import LFM2
from lfm2.spec import ArchSpec
from lfm2.tokenizer import (
    TOKENIZER_KINDS,
    byte_tokenizer,
    encode_documents,
    end_of_text_id,
    save_tokenizer,
    train_bpe_tokenizer,
)

CHECKPOINT_PREFIX = "step-"

#: Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU. The H200 has
#: the H100 SXM's compute (989 TFLOP/s dense bf16); it differs in memory only.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12}


@dataclass
class TrainConfig:
    """How to train. `None` fields are derived from `steps` (see `resolved`)."""

    steps: int = 1000
    corpus: str = "stdlib"  # "stdlib" (lfm2.corpus) or a path to a text file or folder
    tokenizer: str = "bytes"  # "bytes" or "bpe"
    seq_len: int = 512
    batch_tokens: int = 65_536  # tokens per optimizer step (rounded down to whole sequences)
    micro_batch_tokens: int | None = None  # tokens per forward pass (gradient accumulation); default batch_tokens
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int | None = None  # default 5% of steps (at least 1)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int | None = None  # default steps // 10
    eval_tokens: int = 65_536  # validation tokens per evaluation (whole windows)
    checkpoint_every: int | None = None  # default steps // 10
    keep_checkpoints: int = 2
    val_fraction: float = 0.05  # for --corpus PATH (the stdlib corpus brings its own split)
    seed: int = 0
    device: str | None = None  # default cuda when available
    compile: bool = False
    threads: int | None = None  # CPU intra-op threads (default: torch's); 1 is fastest for tiny models on a busy machine
    peak_tflops: float | None = None  # for MFU on a device not in PEAK_BF16_FLOPS
    time_limit_s: float | None = None  # checkpoint and stop after this long (resume later)
    stop_after: int | None = None  # checkpoint and stop after this many steps of this run
    log_every: int | None = None  # console lines; the JSONL log has every step

    def resolved(self) -> TrainConfig:
        config = dataclasses.replace(self)
        if config.steps < 1:
            raise UserError(f"--steps must be >= 1, got {config.steps}")
        if config.tokenizer not in TOKENIZER_KINDS:
            raise UserError(f"--tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, got {config.tokenizer!r}")
        if config.seq_len < 2:
            raise UserError(f"--seq-len must be >= 2, got {config.seq_len}")
        if config.batch_tokens < config.seq_len:
            raise UserError(f"--batch-tokens ({config.batch_tokens}) must hold at least one sequence of --seq-len {config.seq_len}")
        if not 0 < config.val_fraction < 1:
            raise UserError(f"the validation fraction must be in (0, 1), got {config.val_fraction}")
        config.micro_batch_tokens = min(config.micro_batch_tokens or config.batch_tokens, config.batch_tokens)
        if config.micro_batch_tokens < config.seq_len:
            raise UserError(f"--micro-batch-tokens ({config.micro_batch_tokens}) must hold at least one sequence of --seq-len {config.seq_len}")
        if config.warmup_steps is None:
            config.warmup_steps = max(1, round(0.05 * config.steps))
        if config.eval_every is None:
            config.eval_every = max(1, config.steps // 10)
        if config.checkpoint_every is None:
            config.checkpoint_every = max(1, config.steps // 10)
        if config.log_every is None:
            config.log_every = max(1, config.steps // 50)
        if config.device is None:
            config.device = "cuda" if torch.cuda.is_available() else "cpu"
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        return config

    @property
    def sequences_per_step(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def sequences_per_micro_batch(self) -> int:
        return max(1, (self.micro_batch_tokens or self.batch_tokens) // self.seq_len)


# -- corpus --------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str
    train: list[bytes]  # documents
    validation: list[bytes]
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            digest = hashlib.sha256()
            for split in (self.train, self.validation):
                digest.update(len(split).to_bytes(8, "little"))
                for doc in split:
                    digest.update(len(doc).to_bytes(8, "little"))
                    digest.update(doc)
            self.fingerprint = digest.hexdigest()[:16]

    @property
    def train_bytes(self) -> int:
        return sum(map(len, self.train))

    @property
    def validation_bytes(self) -> int:
        return sum(map(len, self.validation))


def _read_text_files(path: Path) -> list[bytes]:
    """The UTF-8 text files under `path` (or `path` itself), in a stable order. Binary files
    (a NUL byte, or not UTF-8) and hidden or cache folders are skipped."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    documents = []
    for file in files:
        relative = file.relative_to(path).parts if file != path else ()
        if any(part.startswith(".") or part == "__pycache__" for part in relative):
            continue
        data = file.read_bytes()
        if not data or b"\x00" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        documents.append(data)
    return documents


def _split_documents(documents: list[bytes], val_fraction: float) -> tuple[list[bytes], list[bytes]]:
    """The last `val_fraction` of the bytes (in document order) become the validation split;
    the document on the boundary is cut at a newline near it."""
    total = sum(map(len, documents))
    boundary = total - max(1, int(total * val_fraction))
    train, validation, seen = [], [], 0
    for doc in documents:
        if seen + len(doc) <= boundary:
            train.append(doc)
        elif seen >= boundary:
            validation.append(doc)
        else:
            cut = boundary - seen
            newline = doc.find(b"\n", cut)
            cut = newline + 1 if 0 <= newline < len(doc) - 1 else cut
            train.append(doc[:cut])
            validation.append(doc[cut:])
        seen += len(doc)
    return [d for d in train if d], [d for d in validation if d]


def _named(source: str) -> Corpus:
    """`NAME` or `NAME:MAX_BYTES` for a corpus of `lfm2.corpus.CORPORA` (`stdlib`,
    `python-sources`), with its own split by file; its file separator is replaced by our
    end-of-text token between documents."""
    from lfm2.corpus import CORPORA, FILE_SEPARATOR, corpus_by_name

    name, _, cap = source.partition(":")
    max_bytes = None
    if cap:
        try:
            max_bytes = int(float(cap))
        except ValueError:
            raise UserError(f"--corpus {source}: write {name} or {name}:MAX_BYTES (e.g. {name}:2000000); corpora: {', '.join(CORPORA)}") from None
    corpus = corpus_by_name(name, max_bytes)
    return Corpus(
        name=corpus.name,
        train=[d for d in corpus.train.tobytes().split(FILE_SEPARATOR) if d],
        validation=[d for d in corpus.validation.tobytes().split(FILE_SEPARATOR) if d],
    )


def load_corpus(source: str, val_fraction: float = 0.05) -> Corpus:
    """A corpus of `lfm2.corpus` by name (`stdlib[:MAX_BYTES]`: the Python standard library;
    `python-sources[:MAX_BYTES]`: it and the installed packages' sources, ~10x larger) or a
    text file or folder of text files (split by `val_fraction` of the bytes)."""
    from lfm2.corpus import CORPORA

    if source.partition(":")[0] in CORPORA:
        return _named(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--corpus {source}: no such file or folder; give a text file, a folder of text files, or one of {', '.join(CORPORA)}")
    documents = _read_text_files(path)
    if not documents:
        raise UserError(f"--corpus {source}: found no UTF-8 text files there")
    train, validation = _split_documents(documents, val_fraction)
    return Corpus(name=str(path.resolve()), train=train, validation=validation)


# -- tokens and batches --------------------------------------------------------------------


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
    if kind == "bytes":
        tokenizer = byte_tokenizer(vocab_size)
    else:
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size:,}) on {corpus.train_bytes:,} bytes")
        tokenizer = train_bpe_tokenizer((doc.decode("utf-8", errors="replace") for doc in corpus.train), vocab_size)
        log(f"BPE vocabulary: {tokenizer.get_vocab_size():,} tokens")
    dtype = _token_dtype(vocab_size)
    train_tokens = encode_documents(tokenizer, corpus.train, kind, dtype)
    validation_tokens = encode_documents(tokenizer, corpus.validation, kind, dtype)
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


# -- schedule, FLOPs -----------------------------------------------------------------------


def peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return flops, name
    return None, name


# -- checkpoints ---------------------------------------------------------------------------


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{CHECKPOINT_PREFIX}*.pt"))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _compatibility(config: TrainConfig, spec: ArchSpec, corpus: Corpus) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    return {
        "spec_key": spec.key,
        "corpus": corpus.fingerprint,
        "tokenizer": config.tokenizer,
        "seq_len": config.seq_len,
        "sequences_per_step": config.sequences_per_step,
        "seed": config.seed,
    }


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{CHECKPOINT_PREFIX}{step:08d}.pt"
    partial = path.with_suffix(".pt.partial")
    torch.save(payload, partial)
    os.replace(partial, path)  # a checkpoint file exists only once it is complete
    for old in _checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


# -- the log -------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_log(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import plotly.graph_objects as go

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["loss"] for r in train], name="train loss", mode="lines"))
    figure.add_trace(go.Scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], name="validation loss", mode="lines+markers"))
    figure.update_layout(title=title, xaxis_title="step", yaxis_title="cross-entropy (nats/token)", template="plotly_white")
    figure.write_html(str(path), include_plotlyjs=True)


# -- training ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    completed: bool  # False when stopped early (time limit, --stop-after, SIGTERM): resume it
    step: int
    final_train_loss: float | None
    final_val_loss: float | None
    initial_val_loss: float | None
    tokens_per_s: float | None
    mfu: float | None
    summary: dict[str, Any]


def _evaluate(model: LFM2, windows: torch.Tensor, micro: int, device: torch.device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), micro):
            batch = windows[start : start + micro].to(device, non_blocking=True)
            with autocast():
                logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
    model.train()
    return total / count


def _optimizer(model: LFM2, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The one rule for weight decay and the optimiser's form: lfm2.optim (why, there).
    return adamw(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2))


def train(folder: str | Path, out: str | Path | None = None, config: TrainConfig | None = None, *, resume: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train the model folder `folder` (Hugging Face or lfm2-nas); write the run and the result to `out`
    (default: `<folder>-trained`). Resumes from `out`'s latest checkpoint unless `resume`
    is False (then the old checkpoints and log are discarded)."""
    threads = torch.get_num_threads()
    if config is not None and config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(folder, out, config, resume, log)
    finally:
        torch.set_num_threads(threads)


def _train(folder, out, config: TrainConfig | None, resume: bool, log: Callable[[str], None]) -> TrainResult:
    folder = Path(folder)
    spec = read_spec(folder)
    config = (config or TrainConfig()).resolved()
    out = Path(out) if out is not None else folder.with_name(folder.name + "-trained")
    if out.resolve() == folder.resolve():
        raise UserError(f"--out must differ from the folder being trained ({folder}): the initial weights would be overwritten")
    if config.seq_len > spec.max_seq_len:
        raise UserError(f"--seq-len {config.seq_len} is longer than the model's max_seq_len {spec.max_seq_len}")
    workdir = out / "train"
    checkpoint_dir = workdir / "checkpoints"
    log_path = workdir / "log.jsonl"
    device = torch.device(config.device)

    corpus = load_corpus(config.corpus, config.val_fraction)
    log(f"corpus {corpus.name}: {corpus.train_bytes:,} train bytes, {corpus.validation_bytes:,} validation bytes")
    tokenizer, train_tokens, val_tokens = prepare_tokens(corpus, config.tokenizer, spec.vocab_size, workdir, log)
    sampler = WindowSampler(train_tokens, config.seq_len, config.seed)
    val_windows = validation_windows(val_tokens, config.seq_len, config.eval_tokens)
    log(f"tokens: {len(train_tokens):,} train, {len(val_tokens):,} validation ({config.tokenizer}); {sampler.n_windows:,} windows of {config.seq_len}")

    torch.manual_seed(config.seed)
    model = load_model_folder(folder, device=device, dtype=torch.float32)
    model.train()
    optimizer = _optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    compatibility = _compatibility(config, spec, corpus)

    step = 0
    existing = _checkpoints(checkpoint_dir)
    if existing and resume:
        # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        checkpoint = torch.load(existing[-1], map_location="cpu", weights_only=True)
        if checkpoint["compatibility"] != compatibility:
            changed = {k: (checkpoint["compatibility"].get(k), v) for k, v in compatibility.items() if checkpoint["compatibility"].get(k) != v}
            raise UserError(
                f"{existing[-1]} was made with different settings {changed} (checkpoint, now); "
                "resume with the same ones, or start over with --no-resume (or another --out)"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        sampler.load_state_dict(checkpoint["data"])
        _set_rng_state(checkpoint["rng"], device)
        step = checkpoint["step"]
        records = [r for r in read_log(log_path) if r["step"] <= step]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        log(f"resumed from {existing[-1]} at step {step}")
    else:
        if existing:
            log(f"--no-resume: discarding {len(existing)} checkpoint(s) and the log in {workdir}")
            for path in existing:
                path.unlink()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")

    training_model = torch.compile(model) if config.compile else model
    # bf16 autocast on CUDA (weights and optimizer state stay fp32); plain fp32 on CPU.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    flops_per_token = training_flops_per_token(spec, config.seq_len)
    peak, device_name = peak_flops(device, config.peak_tflops)
    n_seq, micro = config.sequences_per_step, config.sequences_per_micro_batch
    tokens_per_step = n_seq * config.seq_len
    log(
        f"training {spec.layout} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device_name}: "
        f"{config.steps} steps x {tokens_per_step:,} tokens, micro-batch {micro} x {config.seq_len}"
    )

    stop = {"signal": False}
    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    except ValueError:  # not the main thread: no graceful SIGTERM
        pass

    def write(record: dict[str, Any]) -> None:
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def checkpoint_now() -> Path:
        payload = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(device),
            "data": sampler.state_dict(),
            "compatibility": compatibility,
            "config": dataclasses.asdict(config),
        }
        return save_checkpoint(checkpoint_dir, step, payload, config.keep_checkpoints)

    if step == 0:
        initial = _evaluate(training_model, val_windows, micro, device, autocast)
        write({"kind": "val", "step": 0, "val_loss": initial, "tokens": 0})
        log(f"step 0: validation loss {initial:.4f}")

    started, steps_this_run = time.perf_counter(), 0
    timed_tokens, timed_seconds = 0, 0.0
    timing_skip = min(3, max(0, config.steps - step - 1))  # first steps pay compile/allocator warm-up
    reason = None
    while step < config.steps:
        step_start = time.perf_counter()
        batch = sampler.next_batch(n_seq)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, n_seq, micro):
            chunk = batch[start : start + micro].to(device, non_blocking=True)
            with autocast():
                logits = training_model(chunk[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum") / tokens_per_step
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        train_loss = loss_sum.item()  # synchronises: the step time below is honest on CUDA
        seconds = time.perf_counter() - step_start
        step += 1
        steps_this_run += 1
        if steps_this_run > timing_skip:
            timed_tokens += tokens_per_step
            timed_seconds += seconds
        tokens_per_s = tokens_per_step / seconds
        mfu = flops_per_token * tokens_per_s / peak if peak else None
        record = {"kind": "train", "step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s, "step_s": seconds}
        if mfu is not None:
            record["mfu"] = mfu
        write(record)
        if not math.isfinite(train_loss):
            raise UserError(f"the loss became {train_loss} at step {step}; lower --lr (now {config.lr}) or raise --warmup-steps")
        if step % config.log_every == 0 or step == config.steps:
            log(f"step {step}/{config.steps}: loss {train_loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s" + (f" MFU {mfu:.1%}" if mfu is not None else ""))
        if step % config.eval_every == 0 or step == config.steps:
            val_loss = _evaluate(training_model, val_windows, micro, device, autocast)
            write({"kind": "val", "step": step, "val_loss": val_loss, "tokens": step * tokens_per_step})
            log(f"step {step}: validation loss {val_loss:.4f}")
        if config.stop_after is not None and steps_this_run >= config.stop_after and step < config.steps:
            reason = f"--stop-after {config.stop_after}"
        elif config.time_limit_s is not None and time.perf_counter() - started > config.time_limit_s and step < config.steps:
            reason = f"time limit {config.time_limit_s:.0f} s"
        elif stop["signal"]:
            reason = "SIGTERM"
        if step % config.checkpoint_every == 0 or step == config.steps or reason:
            checkpoint_now()
        if reason:
            log(f"stopped at step {step} ({reason}); run the same command again to resume")
            break
    if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)

    records = read_log(log_path)
    plot_log(records, workdir / "loss.html", f"{spec.layout} ({spec.key})")
    train_records = [r for r in records if r["kind"] == "train"]
    val_records = [r for r in records if r["kind"] == "val"]
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else None
    summary = {
        "steps": step,
        "target_steps": config.steps,
        "tokens": step * tokens_per_step,
        "device": device_name,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak if peak and tokens_per_s else None,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "initial_val_loss": val_records[0]["val_loss"] if val_records and val_records[0]["step"] == 0 else None,
        "final_val_loss": val_records[-1]["val_loss"] if val_records else None,
        "final_train_loss": train_records[-1]["loss"] if train_records else None,
        "tokenizer": config.tokenizer,
        "tokenizer_vocab": tokenizer.get_vocab_size(),
        "corpus": corpus.name,
        "corpus_fingerprint": corpus.fingerprint,
        "config": dataclasses.asdict(config),
    }
    if device.type == "cuda":
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    completed = reason is None
    if completed:
        _write_result(folder, out, model, tokenizer, config, spec, summary)
        if is_transformers_loadable(out):
            log(f"saved the trained model to {out} (a Hugging Face folder: transformers.AutoModelForCausalLM.from_pretrained loads it)")
        else:
            log(
                f"saved the trained model to {out} (an lfm2-nas folder: lfm2.hf_io.load_model_folder loads it; "
                f"transformers cannot: {read_provenance(out)['transformers']['reason']})"
            )
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return TrainResult(
        out=out,
        completed=completed,
        step=step,
        final_train_loss=summary["final_train_loss"],
        final_val_loss=summary["final_val_loss"],
        initial_val_loss=summary["initial_val_loss"],
        tokens_per_s=tokens_per_s,
        mfu=summary["mfu"],
        summary=summary,
    )


def _write_result(folder: Path, out: Path, model: LFM2, tokenizer, config: TrainConfig, spec: ArchSpec, summary: dict[str, Any]) -> None:
    eot = end_of_text_id(tokenizer)
    token_ids = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    provenance = read_provenance(folder)
    provenance.pop("spec", None)
    provenance.pop("spec_key", None)
    provenance["trained"] = {"from": str(folder.resolve()), **summary}
    save_model_folder(model, out, token_ids=token_ids, provenance=provenance)
    save_tokenizer(tokenizer, out, config.tokenizer, spec.max_seq_len)
    arch = (folder / "ARCH.md").read_text() if (folder / "ARCH.md").is_file() else f"# {spec.layout} ({spec.key})\n"
    (out / "ARCH.md").write_text(arch.rstrip() + "\n\n" + training_section(summary) + "\n")


def training_section(summary: dict[str, Any]) -> str:
    def fmt(value, pattern):
        return pattern.format(value) if value is not None else "n/a"

    config = summary["config"]
    lines = [
        "## Training",
        "",
        "Trained by `lfm2-nas train` from the exported initial weights; loss curves in `train/loss.html`, per-step log in `train/log.jsonl`.",
        "",
        "| | |",
        "|---|---|",
        f"| corpus | {summary['corpus']} (fingerprint {summary['corpus_fingerprint']}) |",
        f"| tokenizer | {summary['tokenizer']} ({summary['tokenizer_vocab']:,} tokens) |",
        f"| steps | {summary['steps']} x {config['batch_tokens'] // config['seq_len'] * config['seq_len']:,} tokens (seq_len {config['seq_len']}) = {summary['tokens']:,} tokens |",
        f"| optimiser | AdamW lr {config['lr']:g}, betas ({config['beta1']}, {config['beta2']}), weight decay {config['weight_decay']}, warm-up {config['warmup_steps']} steps, cosine to {config['min_lr_ratio']}x, clip {config['grad_clip']} |",
        f"| device | {summary['device']} |",
        f"| validation loss | {fmt(summary['initial_val_loss'], '{:.4f}')} -> {fmt(summary['final_val_loss'], '{:.4f}')} nats/token |",
        f"| final train loss | {fmt(summary['final_train_loss'], '{:.4f}')} |",
        f"| throughput | {fmt(summary['tokens_per_s'], '{:,.0f}')} tokens/s |",
        f"| MFU | {fmt(summary['mfu'], '{:.1%}')} (model FLOPs {summary['flops_per_token']:.3g}/token, peak {fmt(summary['peak_flops'], '{:.3g}')} FLOP/s) |",
    ]
    if summary.get("peak_memory_bytes") is not None:
        lines.append(f"| peak GPU memory | {summary['peak_memory_bytes'] / 2**30:.1f} GiB |")
    return "\n".join(lines)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "Corpus",
    "load_corpus",
    "prepare_tokens",
    "WindowSampler",
    "lr_factor",
    "training_flops_per_token",
    "peak_flops",
    "read_log",
    "train",
]
