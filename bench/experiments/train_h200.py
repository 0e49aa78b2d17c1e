"""Train two ~350M-class architectures side by side for the same short budget on a GPU and
report tokens/s, MFU and the loss curves (issue 9's "train the winners" run).

    python -m bench.experiments.train_h200 --out runs --steps 150 --time-limit 200
    python -m bench.experiments.train_h200 --archs LFM2-350M,exports/lfm2-350m-class/trial-0007 ...

Each architecture is a preset name -- built with our seeded initialisation and saved as a
Hugging Face folder -- or a folder that `lfm2-nas export --to hf` wrote (a search's winner,
trained as exported); each is trained by `lfm2.train.train` (AdamW, warm-up + cosine, bf16 autocast, byte-level
stdlib corpus); the summaries and loss logs land in OUT/<name>-trained/train/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from lfm2 import build_model, presets
from lfm2.hf_io import read_provenance, read_spec, save_hf_folder
from lfm2.train import TrainConfig, train


def initial_folder(folder: Path, spec, seed: int, provenance: dict) -> Path:
    """A fresh Hugging Face folder holding `spec` with our seeded initialisation."""
    if folder.exists():
        shutil.rmtree(folder)
    return save_hf_folder(build_model(spec, seed=seed), folder, provenance=provenance)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.train_h200", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs")
    parser.add_argument("--archs", default="LFM2-350M,LFM2-350M-attn", help="preset names or exported HF folders, comma-separated")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=131072)
    parser.add_argument("--micro-batch-tokens", type=int, default=32768)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--time-limit", type=float, default=200.0, help="seconds per architecture")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--results", default=None, help="copy summaries and logs here (e.g. $OUT)")
    args = parser.parse_args()
    out = Path(args.out)
    results = []
    for arch in args.archs.split(","):
        if arch in presets:
            name, spec = arch, presets[arch]
            folder = initial_folder(out / name, spec, 0, {"preset": name})
        elif (Path(arch) / "config.json").is_file():
            folder = Path(arch)
            name, spec = folder.name, read_spec(folder)
            if not (folder / "model.safetensors").is_file():
                # shipped without its weights (a 350M model is 1.4 GB: too big to carry): rebuild
                # the export's seeded initialisation, which is what `export --to hf` wrote
                provenance = read_provenance(folder)
                seed = (provenance.get("init") or {}).get("seed", 0)
                folder = initial_folder(out / name, spec, seed, {**provenance, "weights": f"rebuilt by bench/experiments/train_h200.py with seed {seed}"})
        else:
            raise SystemExit(f"--archs: {arch!r} is neither a preset ({', '.join(sorted(presets))}) nor a folder with a config.json")
        config = TrainConfig(
            steps=args.steps, corpus="stdlib", tokenizer="bytes", seq_len=args.seq_len, batch_tokens=args.batch_tokens,
            micro_batch_tokens=args.micro_batch_tokens, lr=args.lr, device=args.device, time_limit_s=args.time_limit,
            eval_every=max(1, args.steps // 6), checkpoint_every=10**9,
        )
        started = time.perf_counter()
        result = train(folder, out / f"{name}-trained", config, resume=False)
        row = {"name": name, "layout": spec.layout, "completed": result.completed, "steps": result.step, "wall_s": time.perf_counter() - started,
               "initial_val_loss": result.initial_val_loss, "final_val_loss": result.final_val_loss, "final_train_loss": result.final_train_loss,
               "tokens_per_s": result.tokens_per_s, "mfu": result.mfu, "summary": result.summary}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "summary"}), flush=True)
        if args.results:
            target = Path(args.results)
            target.mkdir(parents=True, exist_ok=True)
            train_dir = out / f"{name}-trained" / "train"
            for file in ("log.jsonl", "loss.html", "summary.json"):
                if (train_dir / file).is_file():
                    shutil.copy(train_dir / file, target / f"{name}-{file}")
    if args.results:
        (Path(args.results) / "train_h200.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
