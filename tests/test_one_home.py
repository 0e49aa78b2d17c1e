"""Concepts that used to be written twice now have one home each; these check that the
callers really go through it (same answers from every caller), and the rules themselves."""

from __future__ import annotations

import math

import pytest
import torch

from lfm2 import build_model, presets
from lfm2.optim import adamw, decays, lr_factor
from lfm2.sizes import format_size

TINY = presets["LFM2-350M"].replace(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=160)


def test_format_size_is_the_one_byte_formatter():
    from devices.bench_cli import _mib as bench_mib
    from devices.measure import _fmt_bytes
    from nas.export.markdown import _mib as export_mib
    from reports.sizes import format_bytes

    assert format_size(1536 << 20) == "1.50 GiB" and format_size(100) == "100 B" and format_size(None) == "-"
    assert format_size(1234.5 * 2**20, unit="MiB", digits=1) == "1,234.5 MiB"
    assert format_size(True) == "-" and format_size("12") == "-"  # not a number: the placeholder
    assert format_bytes(1536 << 20) == "1.5 GiB" and format_bytes(None) == "–"
    assert export_mib(3 * 2**20) == "3.0 MiB" and export_mib(None) == "n/a"
    assert bench_mib(3 * 2**20) == "3.0 MiB" and bench_mib(None) == "-"
    assert _fmt_bytes(3 * 2**20) == "3 MiB" and _fmt_bytes(None) == "?"


def test_one_weight_decay_rule_for_training_and_the_proxies():
    from lfm2.train import TrainConfig, _optimizer
    from nas.quality.training import make_optimizer

    model = build_model(TINY, seed=0)
    decayed = {name for name, p in model.named_parameters() if decays(p)}
    assert not any(name.endswith("conv.weight") for name in decayed)  # depthwise kernels [d, 1, k]
    assert not any("norm" in name for name in decayed)
    assert {"embed_tokens.weight"} <= decayed and any(name.endswith("w1.weight") for name in decayed)

    def groups(optimizer) -> list[tuple[float, set[int]]]:
        return [(g["weight_decay"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]

    trainer = _optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    proxy = make_optimizer(torch.nn.ModuleDict({"model": model}), lr=1e-3, weight_decay=0.1)
    assert groups(trainer) == groups(proxy) == groups(adamw(model.parameters(), lr=1e-3, weight_decay=0.1))
    assert trainer.defaults["betas"] == proxy.defaults["betas"] == (0.9, 0.95)


def test_one_schedule():
    from nas.quality.training import lr_at

    assert [lr_factor(s, 10, 100, 0.1) for s in (0, 9)] == [0.1, 1.0]
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1) and lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    for step in (0, 3, 10, 57, 99, 150):
        assert lr_at(step, 100, 3e-3, 0.05) == pytest.approx(3e-3 * lr_factor(step, 5, 100, 0.1))
    assert math.isclose(lr_at(0, 10, 1.0, 0.0), 1.0)  # at least one warm-up step


def test_one_list_of_out_of_memory_messages():
    from devices.measure_child import is_out_of_memory, mentions_out_of_memory

    assert is_out_of_memory(MemoryError()) and is_out_of_memory(RuntimeError("std::bad_alloc"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: not enough memory"))
    assert mentions_out_of_memory("Traceback ...\nMemoryError: Unable to allocate 4.00 GiB")
    assert not mentions_out_of_memory("RuntimeError: shape mismatch") and not is_out_of_memory(ValueError("bad input"))


def test_the_search_keys_its_cache_by_the_agents_fingerprint(tmp_path):
    """`nas.search` uses the fingerprint the agent computes (`devices.stack.device_fingerprint`),
    and recomputes the same from its facts when an agent does not send one."""
    from devices.agent.config import build_config
    from devices.stack import device_fingerprint
    from nas.search import _fingerprint

    config = build_config(name="fp", workdir=tmp_path / "agent", profile="local")
    info = {"fingerprint": config.fingerprint, "machine": config.machine(), "profile": config.profile.to_dict(), "emulated": config.emulate, "limits": config.limits.to_dict()}
    assert _fingerprint(info, None) == config.fingerprint
    older = {k: v for k, v in info.items() if k != "fingerprint"}
    assert _fingerprint(older, None) == config.fingerprint == device_fingerprint({**config.machine(), "profile": "local", "emulated": False, "limits": {k: v for k, v in config.limits.to_dict().items() if k != "timeout_s"}})
    other_profile = {**older, "profile": {"name": "pixel8"}}
    assert _fingerprint(other_profile, None) != _fingerprint(older, None)
