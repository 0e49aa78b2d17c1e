"""The known physics of the proxy: short convolutions cannot do associative recall, attention can.

A pure gated short-conv stack sees a few tokens back (kernel 3: 2 tokens per layer), so it
cannot find a key's value further back and stays near chance on MQAR; the same stack with
attention layers in it learns the lookup (an induction circuit: the conv writes the previous
token into each position, attention matches the query key against it) and solves the task.
"""

from __future__ import annotations

import pytest

from lfm2 import ArchSpec
from nas.quality import QualitySettings, TaskConfig, score

MQAR_ONLY = QualitySettings(
    name="physics",
    width_factor=1.0,  # the specs below are already proxy-sized
    learning_rates=(1e-3,),
    warmup_fraction=0.02,
    eval_every=100,
    tasks=("recall",),
    task_config=TaskConfig(seq_len=32, n_keys=16, n_values=16, n_noise=4, recall_pairs=4, fuzzy_pairs=2, fuzzy_max_motif=2,
                           copy_tokens=4, compress_tokens=4, memorise_keys=16),
    mad_steps=300,
    mad_batch_size=64,
    mad_train_examples=4000,
    mad_eval_examples=256,
)


def _stack(layers: tuple[str, ...]) -> ArchSpec:
    return ArchSpec(vocab_size=64, d_model=64, layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=192)


@pytest.mark.slow
def test_short_conv_stack_stays_near_chance_on_mqar_while_the_hybrid_solves_it():
    chance = MQAR_ONLY.task_config.chance("recall")
    conv = score(_stack(("conv",) * 4), "mad", settings=MQAR_ONLY, seed=0)
    hybrid = score(_stack(("conv", "attn", "conv", "attn")), "mad", settings=MQAR_ONLY, seed=0)
    assert conv.detail["task_accuracy"]["recall"] < 3 * chance, conv.detail["curve"]
    assert hybrid.detail["task_accuracy"]["recall"] > 0.9, hybrid.detail["curve"]
