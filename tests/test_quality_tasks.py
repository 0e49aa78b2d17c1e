"""The synthetic task generators: seeded, well-formed, and every answer recoverable from the inputs."""

from __future__ import annotations

import numpy as np
import pytest

from nas.quality.tasks import COMPRESS, IGNORE, INSERT, PAD, SEP, TASKS, TaskConfig, TaskError, concatenate, generate

CONFIG = TaskConfig(seq_len=64, n_keys=16, n_values=16, n_noise=4, recall_pairs=8, noise_fraction=0.4,
                    fuzzy_pairs=4, fuzzy_max_motif=3, copy_tokens=8, compress_tokens=8, memorise_keys=32)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_batch_other_seed_other_batch(task):
    a, b, c = generate(task, CONFIG, 16, 7), generate(task, CONFIG, 16, 7), generate(task, CONFIG, 16, 8)
    for field in ("inputs", "targets", "recon_at", "recon_targets"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize("task", TASKS)
def test_shapes_dtypes_and_token_ranges(task):
    batch = generate(task, CONFIG, 12, 0)
    assert batch.inputs.shape == batch.targets.shape == (12, CONFIG.seq_len)
    assert batch.recon_at.shape == (12,) and batch.recon_targets.shape == (12, CONFIG.compress_tokens)
    assert batch.inputs.dtype == batch.targets.dtype == np.int64
    assert batch.inputs.min() >= 0 and batch.inputs.max() < CONFIG.vocab_size
    scored = batch.targets[batch.targets != IGNORE]
    recon = batch.recon_targets[batch.recon_targets != IGNORE]
    assert len(scored) + len(recon) > 0, "every task scores something"
    answers = np.concatenate((scored, recon))
    assert answers.min() >= CONFIG.key_start and answers.max() < CONFIG.memorise_key_start, "answers are data tokens"


def _is_key(t):
    return CONFIG.key_start <= t < CONFIG.value_start


def _is_value(t):
    return CONFIG.value_start <= t < CONFIG.memorise_key_start


@pytest.mark.parametrize("task", ["recall", "noisy_recall"])
def test_recall_answers_are_the_value_after_the_first_occurrence_of_the_key(task):
    batch = generate(task, CONFIG, 32, 1)
    for x, y in zip(batch.inputs, batch.targets):
        scored = np.flatnonzero(y != IGNORE)
        assert len(scored) == CONFIG.recall_pairs  # every pair asked once (room allows it here)
        for t in scored:
            first = int(np.flatnonzero(x == x[t])[0])
            assert first < t and _is_key(x[t])
            assert y[t] == x[first + 1] and _is_value(y[t])
        if task == "noisy_recall":
            noise = (x >= CONFIG.noise_start) & (x < CONFIG.key_start)
            assert noise.sum() > 0 and (x == PAD).sum() == 0


def test_fuzzy_recall_answers_follow_from_the_key_motifs_in_the_context():
    batch = generate("fuzzy_recall", CONFIG, 32, 2)
    for x, y in zip(batch.inputs, batch.targets):
        # parse the context: alternating runs of key tokens and value tokens, until the first PAD
        table, i = {}, 0
        while i < len(x) and x[i] != PAD:
            j = i
            while j < len(x) and _is_key(x[j]):
                j += 1
            k = j
            while k < len(x) and _is_value(x[k]):
                k += 1
            if j == i or k == j:
                break
            table[tuple(x[i:j])] = tuple(x[j:k])
            i = k
        assert len(table) == CONFIG.fuzzy_pairs
        keys = list(table)
        assert not any(a != b and a == b[: len(a)] for a in keys for b in keys), "key motifs are prefix-free"
        scored = np.flatnonzero(y != IGNORE)
        assert len(scored) > 0
        for t in scored:
            # walk back over the value tokens already shown, then over the key motif
            v = t
            while _is_value(x[v]):
                v -= 1
            start = v
            while start > 0 and _is_key(x[start - 1]):
                start -= 1
            key, shown = tuple(x[start : v + 1]), t - v
            assert y[t] == table[key][shown]


def test_selective_copy_answers_are_the_scattered_tokens_in_order():
    batch = generate("selective_copy", CONFIG, 32, 3)
    for x, y in zip(batch.inputs, batch.targets):
        sep = int(np.flatnonzero(x == SEP)[0])
        data = x[:sep][x[:sep] != PAD]
        assert len(data) == CONFIG.copy_tokens
        assert np.array_equal(y[y != IGNORE], data)
        assert np.array_equal(np.flatnonzero(y != IGNORE), np.arange(sep, sep + CONFIG.copy_tokens))


def test_compression_rebuilds_the_sequence_before_the_compression_token():
    batch = generate("compression", CONFIG, 16, 4)
    assert (batch.targets == IGNORE).all()
    for x, at, r in zip(batch.inputs, batch.recon_at, batch.recon_targets):
        assert x[at] == COMPRESS
        assert np.array_equal(r, x[:at])


def test_memorisation_uses_one_fixed_table_for_every_sequence():
    table = CONFIG.memorise_table()
    seen = {}
    for seed in (5, 6):
        batch = generate("memorisation", CONFIG, 16, seed)
        assert (batch.inputs[:, 1::2] == INSERT).all()
        for x, y in zip(batch.inputs, batch.targets):
            for t in np.flatnonzero(y != IGNORE):
                key = x[t]
                assert y[t] == table[key - CONFIG.memorise_key_start]
                assert seen.setdefault(int(key), int(y[t])) == y[t]
    assert len(seen) > CONFIG.memorise_keys // 2


def test_chance_levels_and_mixed_batches():
    assert CONFIG.chance("recall") == 1 / 16 and CONFIG.chance("compression") == 1 / 32
    mixed = concatenate([generate(t, CONFIG, 3, 0) for t in TASKS])
    assert mixed.inputs.shape == (3 * len(TASKS), CONFIG.seq_len)


def test_bad_difficulty_settings_say_what_to_change():
    with pytest.raises(TaskError, match="recall_pairs"):
        TaskConfig(seq_len=16, recall_pairs=8, noise_fraction=0.5)
    with pytest.raises(TaskError, match="n_keys"):
        TaskConfig(n_keys=4, recall_pairs=8)
    with pytest.raises(TaskError, match="unknown task"):
        generate("sorting", CONFIG, 1, 0)
