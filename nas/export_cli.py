"""`lfm2-nas export` (a study's winners -> model folders or measured artifacts) and
`lfm2-nas train` (an exported model folder -> a trained model folder of the same kind)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def export(
    out: Path = typer.Argument(..., help="Folder to write into (created); one sub-folder per architecture."),
    study: Optional[str] = typer.Option(None, "--study", help="The study's name."),
    storage: Optional[str] = typer.Option(None, "--storage", help="sqlite:///FILE.db (default sqlite:///lfm2-nas.db), an RDB URL, or a journal file PATH.log."),
    trial: Optional[int] = typer.Option(None, "--trial", help="Export this trial's architecture."),
    pareto: bool = typer.Option(False, "--pareto", help="Export every architecture of the feasible Pareto set."),
    family: Optional[int] = typer.Option(None, "--family", help="With --pareto: K members spread over the budget, exported as a named family (family.json)."),
    family_name: Optional[str] = typer.Option(None, "--family-name", help="The family's name (default: the study's)."),
    tier_by: str = typer.Option("memory", "--tier-by", help="Spread the family by 'memory' (measured footprint) or 'latency' (decode ms)."),
    to: str = typer.Option(
        ..., "--to",
        help="hf: a Hugging Face Lfm2 folder (transformers loads it; refuses sliding-window layers and other specs Lfm2 cannot express). "
        "lfm2: the same folder for ANY architecture, sliding-window layers included (lfm2-nas trains and loads it; transformers "
        "only where it can express the spec). executorch, onnx or llamacpp: the artifact that was measured.",
    ),
    preset: Optional[str] = typer.Option(None, "--preset", help="Instead of --study: an LFM2 preset (see `lfm2-nas presets`), --to hf only."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights (--to hf, --to lfm2)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing member folders."),
    skip_unsupported: bool = typer.Option(False, "--skip-unsupported", help="--to hf: skip architectures Hugging Face Lfm2 cannot express instead of failing (--to lfm2 exports them all)."),
) -> None:
    """Export a search's winners: trainable model folders (hf, lfm2) or the measured artifacts (executorch, onnx, llamacpp).

    Winners with sliding-window layers (the small and default spaces search them) export with --to lfm2, which `lfm2-nas train` trains like a Hugging Face folder.
    """
    from lfm2.errors import UserError
    from nas.export import export_from_study, export_preset

    if preset is not None:
        if study is not None or trial is not None or pareto or family is not None:
            raise UserError("--preset exports a preset on its own; drop --study/--trial/--pareto/--family")
        if to not in ("hf", "lfm2"):
            raise UserError(f"a preset was never compiled or measured: only --to hf exports it, not --to {to}")
        export_preset(preset, out, seed=seed, overwrite=overwrite, log=typer.echo)
        return
    if study is None:
        raise UserError("say what to export: --study NAME with --trial N or --pareto, or --preset NAME")
    result = export_from_study(
        study, out, target=to, storage=storage, trial=trial, pareto=pareto, family=family, family_name=family_name,
        tier_by=tier_by, seed=seed, overwrite=overwrite, skip_unsupported=skip_unsupported, log=typer.echo,
    )
    if result.family_index:
        typer.echo(f"family index: {result.family_index}")
    if to in ("hf", "lfm2") and result.folders:
        typer.echo(f"train one: lfm2-nas train {result.folders[0]} --corpus stdlib --steps 1000")


def train(
    folder: Path = typer.Argument(..., help="An exported model folder: lfm2-nas export --to lfm2 (any architecture, sliding-window layers included) or --to hf."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where the run and the trained model go (default: FOLDER-trained)."),
    corpus: str = typer.Option("stdlib", "--corpus", help="'stdlib' (the Python standard library corpus), 'python-sources' (it and the installed packages' sources, ~10x larger; NAME:MAX_BYTES caps either) or a text file / folder of text files."),
    tokenizer: str = typer.Option("bytes", "--tokenizer", help="bytes (id = byte, <|endoftext|> = 256) or bpe (byte-level BPE trained here, vocab = the model's)."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    batch_tokens: int = typer.Option(65536, "--batch-tokens", help="Tokens per optimizer step (whole sequences)."),
    micro_batch_tokens: Optional[int] = typer.Option(None, "--micro-batch-tokens", help="Tokens per forward pass; gradients accumulate up to --batch-tokens (default: all at once)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Training sequence length."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="The cosine ends at lr * this."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (default 5% of --steps)."),
    weight_decay: float = typer.Option(0.1, "--weight-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the global gradient norm to this."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation every N steps (default steps/10)."),
    eval_tokens: int = typer.Option(65536, "--eval-tokens", help="Validation tokens per evaluation."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps (default steps/10)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint in OUT (default), or start over."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for training (default: torch's; 1 is fastest for tiny models on a busy machine)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Checkpoint and stop after this many seconds; run again to resume."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Checkpoint and stop after this many steps of this run; run again to resume."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="The device's bf16 peak, for MFU on a GPU not in the built-in table."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON at the end."),
) -> None:
    """Train an exported architecture on a text corpus.

    FOLDER is what `lfm2-nas export --to lfm2` (any searched architecture) or `--to hf` wrote. The result, in --out, is a folder of the same kind: a Hugging Face folder that transformers loads or, for specs Lfm2 cannot express (sliding-window layers), an lfm2-nas folder that lfm2.hf_io.load_model_folder loads.

    A CPU smoke run: --device cpu --steps 10 --seq-len 64 --batch-tokens 512 --eval-every 10 --eval-tokens 1024 --corpus stdlib:2000000
    """
    from lfm2.train import TrainConfig
    from lfm2.train import train as run_training

    config = TrainConfig(
        steps=steps, corpus=corpus, tokenizer=tokenizer, seq_len=seq_len, batch_tokens=batch_tokens, micro_batch_tokens=micro_batch_tokens,
        lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
        eval_tokens=eval_tokens, checkpoint_every=checkpoint_every, seed=seed, device=device, compile=compile_model, threads=threads,
        time_limit_s=time_limit, stop_after=stop_after, peak_tflops=peak_tflops,
    )
    result = run_training(folder, out, config, resume=resume, log=typer.echo)
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), "completed": result.completed, **result.summary}, default=str))
    if not result.completed:
        typer.echo(f"not finished (step {result.step} of {steps}); run the same command again to resume")
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("train")(train)


__all__ = ["register", "export", "train"]
