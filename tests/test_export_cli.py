"""`lfm2-nas export` and `lfm2-nas train` as a user runs them: the console script in a
subprocess, from a study to a trained Hugging Face model that `transformers` generates with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testkit.export_study import build_study, small_study, tiny_spec

from lfm2.train import TrainConfig, read_log, train

CORPUS = str(Path(json.__file__).parent)
TRAIN_FLAGS = ["--corpus", CORPUS, "--device", "cpu", "--threads", "1", "--seq-len", "32", "--batch-tokens", "256", "--eval-tokens", "1024", "--lr", "3e-3"]


def test_export_train_load_generate_end_to_end(lfm2_nas, tmp_path):
    transformers = pytest.importorskip("transformers")
    url, name = small_study(tmp_path)
    import optuna

    trial = min(optuna.load_study(study_name=name, storage=url).best_trials, key=lambda t: t.number)
    exported = lfm2_nas("export", "--study", name, "--storage", url, "--trial", trial.number, "--to", "hf", tmp_path / "out")
    assert exported.returncode == 0, exported.stderr
    (folder,) = list((tmp_path / "out").iterdir())
    assert folder.name.startswith(f"trial-{trial.number}-") and (folder / "model.safetensors").is_file()

    trained = lfm2_nas("train", folder, "--steps", 20, "--eval-every", 10, *TRAIN_FLAGS, "--json")
    assert trained.returncode == 0, trained.stderr + trained.stdout
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["completed"] and summary["steps"] == 20 and summary["final_val_loss"] < summary["initial_val_loss"]
    out = Path(summary["out"])
    assert out == Path(f"{folder}-trained")

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def main():\n", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 16 or tokenizer.eos_token_id in generated[0].tolist()
    assert tokenizer.decode(generated[0], skip_special_tokens=True).startswith("def main():\n")


def run_main(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (same code path as the console script, without paying
    another torch import): exit status and stderr."""
    from nas.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return exit_.value.code, capsys.readouterr().err


def test_cli_errors_name_the_problem_and_the_fix(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'swa.db'}"
    swa = tiny_spec("CSCA", swa_window=16)
    study = build_study(url, name="swa", measured=[("CCAC", 64, 0.3, 10.0, 1.0, 8)], extra=[(swa, 0.9, 12.0, 1.1, 9)])
    number = next(t.number for t in study.trials if t.user_attrs.get("spec_key") == swa.key)
    code, err = run_main(capsys, "export", "--study", "swa", "--storage", url, "--trial", number, "--to", "hf", tmp_path / "out")
    assert code == 2 and f"trial {number}" in err and "--to executorch" in err
    code, err = run_main(capsys, "export", "--study", "swa", "--storage", url, "--to", "hf", tmp_path / "out")
    assert code == 2 and "--pareto" in err
    code, err = run_main(capsys, "train", tmp_path / "nothing-here", "--corpus", CORPUS)
    assert code == 2 and "config.json" in err


@pytest.mark.slow
def test_train_killed_mid_run_resumes_onto_the_uninterrupted_curve(lfm2_nas, tmp_path):
    """SIGKILL the training process after its first checkpoint, run the same command again:
    the losses equal those of an uninterrupted run."""
    from lfm2 import build_model
    from lfm2.hf_io import save_hf_folder

    folder = save_hf_folder(build_model(tiny_spec("CCAC"), seed=0), tmp_path / "tiny")
    steps, every = 60, 10
    flags = ["--steps", steps, "--checkpoint-every", every, "--eval-every", every, *TRAIN_FLAGS]
    exe = shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"
    process = subprocess.Popen([exe, "train", str(folder), "--out", str(tmp_path / "killed"), *map(str, flags)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "train" / "checkpoints" / f"step-{every:08d}.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be interrupted"
    log = read_log(tmp_path / "killed" / "train" / "log.jsonl")
    assert max(r["step"] for r in log) < steps
    resumed = lfm2_nas("train", folder, "--out", tmp_path / "killed", *flags)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr

    config = TrainConfig(steps=steps, checkpoint_every=every, eval_every=every, corpus=CORPUS, device="cpu", seq_len=32, batch_tokens=256, eval_tokens=1024, lr=3e-3, threads=1)
    train(folder, tmp_path / "whole", config, log=lambda *_: None)
    a = read_log(tmp_path / "whole" / "train" / "log.jsonl")
    b = read_log(tmp_path / "killed" / "train" / "log.jsonl")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for x, y in zip(a, b):
        key = "loss" if x["kind"] == "train" else "val_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x, y)
