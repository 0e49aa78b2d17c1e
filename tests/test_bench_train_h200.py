"""bench/experiments/train_h200.py takes a search's exported folder shipped without its weights (a 350M
model's 1.2 GB cannot travel to the GPU machine) and rebuilds the export's seeded weights."""

from __future__ import annotations

import json
import sys

import torch

from bench.experiments import train_h200
from lfm2 import build_model
from lfm2.hf_io import load_hf_folder, save_hf_folder
from lfm2.spec import ArchSpec

TINY = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "conv"), n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)


def test_a_folder_without_weights_is_rebuilt_from_its_seed_and_trained(tmp_path, monkeypatch):
    shipped = tmp_path / "trial-3-CAC"
    save_hf_folder(build_model(TINY, seed=7), shipped, provenance={"study": "s", "trial": 3, "init": {"function": "lfm2.model.init_weights", "seed": 7}})
    (shipped / "model.safetensors").unlink()
    out, results = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["train_h200.py", "--archs", str(shipped), "--out", str(out), "--steps", "2", "--seq-len", "64",
                                      "--batch-tokens", "128", "--micro-batch-tokens", "128", "--device", "cpu", "--results", str(results)])
    train_h200.main()
    rebuilt = load_hf_folder(out / "trial-3-CAC")  # the initial weights, as the export wrote them
    expected = build_model(TINY, seed=7).state_dict()
    assert all(torch.equal(rebuilt.state_dict()[name], tensor) for name, tensor in expected.items())
    assert json.loads((out / "trial-3-CAC" / "lfm2_nas.json").read_text())["trial"] == 3
    rows = json.loads((results / "train_h200.json").read_text())
    assert rows[0]["name"] == "trial-3-CAC" and rows[0]["completed"] and rows[0]["steps"] == 2


def test_an_unknown_arch_is_refused_with_the_choices(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_h200.py", "--archs", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    try:
        train_h200.main()
    except SystemExit as exc:
        assert "neither a preset" in str(exc) and "LFM2-350M" in str(exc)
    else:
        raise AssertionError("an unknown --archs entry must be refused")
