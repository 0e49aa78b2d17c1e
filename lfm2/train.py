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
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from lfm2.checkpoints import CHECKPOINT_PREFIX, checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from lfm2.corpus import Corpus, load_corpus  # one Corpus: a named corpus or text files (lfm2.corpus)
from lfm2.errors import UserError
from lfm2.flops import training_flops_per_token  # one home for FLOPs (lfm2.flops)
from lfm2.hf_io import is_transformers_loadable, load_model_folder, read_provenance, read_spec, save_model_folder
from lfm2.model import LFM2
from lfm2.optim import adamw, lr_factor
from lfm2.spec import ArchSpec
from lfm2.tokenizer import TOKENIZER_KINDS, end_of_text_id, save_tokenizer
from lfm2.train_data import WindowSampler, prepare_tokens, validation_windows
from lfm2.train_log import append_record, plot_log, read_log, truncate_log

_T = TypeVar("_T")

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


def _evaluate(model: torch.nn.Module, windows: torch.Tensor, micro: int, device: torch.device, autocast) -> float:
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


@dataclass
class _Run:
    """What a checkpoint holds, live: the model and its optimiser, the schedule, the data
    position, and the step reached."""

    model: LFM2
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: WindowSampler
    compatibility: dict[str, Any]
    step: int = 0

    def payload(self, config: TrainConfig, device: torch.device) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(device),
            "data": self.sampler.state_dict(),
            "compatibility": self.compatibility,
            "config": dataclasses.asdict(config),
        }

    def restore(self, checkpoint: dict[str, Any], device: torch.device) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.sampler.load_state_dict(checkpoint["data"])
        set_rng_state(checkpoint["rng"], device)
        self.step = checkpoint["step"]


def _check_request(folder: Path, out: Path, spec: ArchSpec, config: TrainConfig) -> None:
    if out.resolve() == folder.resolve():
        raise UserError(f"--out must differ from the folder being trained ({folder}): the initial weights would be overwritten")
    if config.seq_len > spec.max_seq_len:
        raise UserError(f"--seq-len {config.seq_len} is longer than the model's max_seq_len {spec.max_seq_len}")


def _resume_or_start(run: _Run, checkpoint_dir: Path, log_path: Path, resume: bool, device: torch.device, log: Callable[[str], None]) -> None:
    """Continue from the newest checkpoint (its log cut back to it), or start afresh."""
    latest = load_latest(checkpoint_dir, run.compatibility) if resume else None
    if latest is not None:
        path, checkpoint = latest
        run.restore(checkpoint, device)
        truncate_log(log_path, run.step)
        log(f"resumed from {path} at step {run.step}")
        return
    existing = checkpoints(checkpoint_dir)
    if existing:
        log(f"--no-resume: discarding {len(existing)} checkpoint(s) and the log in {log_path.parent}")
        for path in existing:
            path.unlink()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")


def _optimizer_step(run: _Run, training_model, batch: torch.Tensor, config: TrainConfig, device: torch.device, autocast) -> tuple[float, float, float]:
    """One step over `batch` in micro-batches (gradients accumulated, clipped): (train loss,
    the learning rate it used, the gradient norm before clipping)."""
    n_seq, micro = len(batch), config.sequences_per_micro_batch
    tokens_per_step = n_seq * config.seq_len
    loss_sum = torch.zeros((), device=device)
    for start in range(0, n_seq, micro):
        chunk = batch[start : start + micro].to(device, non_blocking=True)
        with autocast():
            logits = training_model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum") / tokens_per_step
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return loss_sum.item(), lr, float(grad_norm)  # .item() synchronises: the step time is honest on CUDA


def _stop_reason(config: TrainConfig, step: int, steps_this_run: int, elapsed_s: float, signalled: bool) -> str | None:
    """Why the run stops before its last step (it resumes from there), or None."""
    if step >= config.steps:
        return None
    if config.stop_after is not None and steps_this_run >= config.stop_after:
        return f"--stop-after {config.stop_after}"
    if config.time_limit_s is not None and elapsed_s > config.time_limit_s:
        return f"time limit {config.time_limit_s:.0f} s"
    return "SIGTERM" if signalled else None


@contextlib.contextmanager
def _sigterm_flag():
    """A flag that SIGTERM sets (the loop then checkpoints and stops), for the run's duration."""
    stop = {"signal": False}
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    except ValueError:  # not the main thread: no graceful SIGTERM
        previous = None
    try:
        yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _resolved(value: _T | None, name: str) -> _T:
    """A field `TrainConfig.resolved` fills in (None there is a bug in `resolved`)."""
    if value is None:
        raise AssertionError(f"TrainConfig.{name} is None after resolved(); resolved() must fill it in")
    return value


def _compiled(model: LFM2) -> torch.nn.Module:
    """`torch.compile(model)`: a module wrapping `model` (typed as a plain callable by torch)."""
    compiled = torch.compile(model)
    if not isinstance(compiled, torch.nn.Module):
        raise TypeError(f"torch.compile returned {type(compiled).__name__}, not a module; train without --compile")
    return compiled


def _train(folder, out, config: TrainConfig | None, resume: bool, log: Callable[[str], None]) -> TrainResult:
    folder = Path(folder)
    spec = read_spec(folder)
    config = (config or TrainConfig()).resolved()
    # `resolved` filled these in; the names below are their non-None values
    warmup_steps, log_every = _resolved(config.warmup_steps, "warmup_steps"), _resolved(config.log_every, "log_every")
    eval_every, checkpoint_every = _resolved(config.eval_every, "eval_every"), _resolved(config.checkpoint_every, "checkpoint_every")
    out = Path(out) if out is not None else folder.with_name(folder.name + "-trained")
    _check_request(folder, out, spec, config)
    workdir = out / "train"
    checkpoint_dir = workdir / "checkpoints"
    log_path = workdir / "log.jsonl"
    device = torch.device(_resolved(config.device, "device"))

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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, config.steps, config.min_lr_ratio))
    run = _Run(model, optimizer, scheduler, sampler, _compatibility(config, spec, corpus))
    _resume_or_start(run, checkpoint_dir, log_path, resume, device, log)

    training_model = _compiled(model) if config.compile else model
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

    if run.step == 0:
        initial = _evaluate(training_model, val_windows, micro, device, autocast)
        append_record(log_path, {"kind": "val", "step": 0, "val_loss": initial, "tokens": 0})
        log(f"step 0: validation loss {initial:.4f}")

    started, steps_this_run = time.perf_counter(), 0
    timed_tokens, timed_seconds = 0, 0.0
    timing_skip = min(3, max(0, config.steps - run.step - 1))  # first steps pay compile/allocator warm-up
    reason = None
    with _sigterm_flag() as stop:
        while run.step < config.steps:
            step_start = time.perf_counter()
            train_loss, lr, grad_norm = _optimizer_step(run, training_model, sampler.next_batch(n_seq), config, device, autocast)
            seconds = time.perf_counter() - step_start
            run.step += 1
            step = run.step
            steps_this_run += 1
            if steps_this_run > timing_skip:
                timed_tokens += tokens_per_step
                timed_seconds += seconds
            tokens_per_s = tokens_per_step / seconds
            mfu = flops_per_token * tokens_per_s / peak if peak else None
            record = {"kind": "train", "step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s, "step_s": seconds}
            if mfu is not None:
                record["mfu"] = mfu
            append_record(log_path, record)
            if not math.isfinite(train_loss):
                raise UserError(f"the loss became {train_loss} at step {step}; lower --lr (now {config.lr}) or raise --warmup-steps")
            if step % log_every == 0 or step == config.steps:
                log(f"step {step}/{config.steps}: loss {train_loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s" + (f" MFU {mfu:.1%}" if mfu is not None else ""))
            if step % eval_every == 0 or step == config.steps:
                val_loss = _evaluate(training_model, val_windows, micro, device, autocast)
                append_record(log_path, {"kind": "val", "step": step, "val_loss": val_loss, "tokens": step * tokens_per_step})
                log(f"step {step}: validation loss {val_loss:.4f}")
            reason = _stop_reason(config, step, steps_this_run, time.perf_counter() - started, stop["signal"])
            if step % checkpoint_every == 0 or step == config.steps or reason:
                save_checkpoint(checkpoint_dir, step, run.payload(config, device), config.keep_checkpoints)
            if reason:
                log(f"stopped at step {step} ({reason}); run the same command again to resume")
                break

    records = read_log(log_path)
    plot_log(records, workdir / "loss.html", f"{spec.layout} ({spec.key})")
    mean_tokens_per_s = timed_tokens / timed_seconds if timed_seconds else None
    summary = _summary(records, run.step, config, tokens_per_step, device_name, mean_tokens_per_s, flops_per_token, peak, tokenizer, corpus)
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
        step=run.step,
        final_train_loss=summary["final_train_loss"],
        final_val_loss=summary["final_val_loss"],
        initial_val_loss=summary["initial_val_loss"],
        tokens_per_s=tokens_per_s,
        mfu=summary["mfu"],
        summary=summary,
    )


def _summary(records, step: int, config: TrainConfig, tokens_per_step: int, device_name: str, tokens_per_s: float | None, flops_per_token: float, peak: float | None, tokenizer, corpus: Corpus) -> dict[str, Any]:
    """What the run did (summary.json, the provenance of the trained folder, ARCH.md)."""
    train_records = [r for r in records if r["kind"] == "train"]
    val_records = [r for r in records if r["kind"] == "val"]
    return {
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


def _write_result(folder: Path, out: Path, model: LFM2, tokenizer, config: TrainConfig, spec: ArchSpec, summary: dict[str, Any]) -> None:
    eot = end_of_text_id(tokenizer)
    token_ids: dict[str, int | None] = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
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
    "CHECKPOINT_PREFIX",
    "save_checkpoint",
    "plot_log",
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
