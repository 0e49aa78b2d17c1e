"""The README's path from the quick start's search to a trained model, as a user runs it: the
console script in a subprocess at every step, on the study the quick start's search wrote.

`tests/data/search_small.db` (study `small`) was written by a real `lfm2-nas search --device
local --space small --context 128 --backend onnx --quant fp32 --quality mad`: both of its
Pareto winners have sliding-window layers, which Hugging Face Lfm2 cannot express. So the
path is search -> report -> `export --to hf` (refused, naming `--to lfm2`) -> `export --to
lfm2` -> `train` (a few CPU steps) -> the trained folder reloads to the model the run ended
with, logit for logit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch

from lfm2 import ArchSpec, build_model
from lfm2.hf_io import is_transformers_loadable, load_model_folder, read_provenance, read_spec

pytestmark = pytest.mark.slow  # five console-script runs, each importing torch: ~1 min on 2 busy cores

STUDY_DB = Path(__file__).parent / "data" / "search_small.db"
STUDY = "small"
CORPUS = str(Path(json.__file__).parent)  # a small folder of real text every Python has
TRAIN_FLAGS = ["--corpus", CORPUS, "--device", "cpu", "--threads", "1", "--seq-len", "32", "--batch-tokens", "256", "--eval-tokens", "512"]


def test_quick_start_study_reaches_a_trained_model(lfm2_nas, tmp_path):
    shutil.copyfile(STUDY_DB, tmp_path / "lfm2-nas.db")
    url = f"sqlite:///{tmp_path / 'lfm2-nas.db'}"
    study = optuna.load_study(study_name=STUDY, storage=url)
    winners = {t.user_attrs["spec_key"]: ArchSpec.from_dict(t.user_attrs["spec"]) for t in study.best_trials}
    assert winners and all("swa" in spec.layers for spec in winners.values()), "the study no longer shows the dead end this test is about"

    report = lfm2_nas("report", "--study", STUDY, "--storage", url, "--out", tmp_path / "report.html", cwd=tmp_path)
    assert report.returncode == 0 and (tmp_path / "report.html").stat().st_size > 10_000, report.stderr

    refused = lfm2_nas("export", "--study", STUDY, "--storage", url, "--pareto", "--to", "hf", tmp_path / "hf", cwd=tmp_path)
    assert refused.returncode == 2 and "sliding-window" in refused.stderr and "--to lfm2" in refused.stderr, refused.stderr
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())

    exported = lfm2_nas("export", "--study", STUDY, "--storage", url, "--pareto", "--to", "lfm2", tmp_path / "winners", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    folders = sorted((tmp_path / "winners").iterdir())
    assert {read_spec(f).key for f in folders} == set(winners)
    for folder in folders:
        assert not is_transformers_loadable(folder) and read_provenance(folder)["transformers"]["loadable"] is False
    # The export's own hint says what to run next; follow it, at a CPU-test size.
    hint = next(line for line in exported.stdout.splitlines() if line.startswith("train one: lfm2-nas train "))
    folder = Path(hint.split()[4])
    assert folder in folders
    spec = read_spec(folder)
    tokens = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model_folder(folder).eval()(tokens), build_model(spec, seed=0).eval()(tokens))  # the documented init

    steps = 3
    trained = lfm2_nas("train", folder, "--steps", steps, "--eval-every", steps, "--checkpoint-every", steps, *TRAIN_FLAGS, "--json", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr + trained.stdout[-2000:]
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["completed"] and summary["steps"] == steps and summary["final_val_loss"] < summary["initial_val_loss"]
    out = Path(summary["out"])
    assert out == Path(f"{folder}-trained") and "lfm2-nas folder" in trained.stdout
    assert read_spec(out) == spec and not is_transformers_loadable(out) and (out / "tokenizer.json").is_file()

    # The trained folder reloads to exactly the model the run ended with (its last checkpoint).
    checkpoint = torch.load(out / "train" / "checkpoints" / f"step-{steps:08d}.pt", map_location="cpu", weights_only=True)
    ended = build_model(spec, device="meta")
    ended.load_state_dict(checkpoint["model"], assign=True)
    ended.lm_head.weight = ended.embed_tokens.weight
    with torch.no_grad():
        reloaded = load_model_folder(out).eval()(tokens)
        assert torch.equal(reloaded, ended.eval()(tokens))
        assert not torch.allclose(reloaded, load_model_folder(folder).eval()(tokens))
