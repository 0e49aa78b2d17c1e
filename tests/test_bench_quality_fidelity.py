"""bench/experiments/quality_fidelity.py: the reference is sized from the proxies' real token counts, and
a run cut short continues with --resume instead of starting over."""

from __future__ import annotations

import json

import pytest

from bench.experiments import quality_fidelity as fidelity
from nas.quality import QualitySettings


def test_proxy_tokens_count_every_learning_rate_of_the_sweep():
    s = QualitySettings.default()
    sweep = round(s.mad_steps * s.sweep_fraction)
    mad_steps = len(s.learning_rates) * sweep + (s.mad_steps - sweep)
    lm_sweep = round(s.lm_steps * s.sweep_fraction)
    lm_steps = len(s.learning_rates) * lm_sweep + (s.lm_steps - lm_sweep)
    assert fidelity.proxy_tokens(s) == {"mad": mad_steps * s.mad_batch_size * s.task_config.seq_len, "lm": lm_steps * s.lm_batch_size * s.lm_seq_len}
    one_rate = s.replace(learning_rates=(1e-3,))
    assert fidelity.proxy_tokens(one_rate)["mad"] == s.mad_steps * s.mad_batch_size * s.task_config.seq_len


def test_the_reference_sees_at_least_the_factor_times_the_costlier_proxy():
    s = QualitySettings.default()
    for factor, batch in ((20, 256), (20, 100), (2.5, 64)):
        ref = fidelity.reference_settings(s, factor, batch)
        tokens = ref.lm_steps * ref.lm_batch_size * ref.lm_seq_len
        assert factor * max(fidelity.proxy_tokens(s).values()) <= tokens < factor * max(fidelity.proxy_tokens(s).values()) + batch * s.lm_seq_len
        assert ref.learning_rates == (fidelity.LONG_RUN_LR,) and ref.lm_batch_size == batch


def test_a_run_resumes_from_its_log(tmp_path):
    argv = ["--device", "cpu", "--settings", "cpu_small", "--archs", "3", "--stages", "long,lm", "--reference-factor", "2",
            "--reference-batch", "8", "--steps-scale", "0.1", "--workers", "1", "--threads", "1", "--out", str(tmp_path)]
    assert fidelity.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["ok"] for row in rows)
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["reference_tokens"] >= 2 * max(facts["proxy_tokens"].values())
    for row in rows:
        if row["stage"] == "long":  # the reference's validation and train-window bpb along the way
            assert len(row["curve"]) >= 2 and row["curve"][-1][0] == row["steps"] and row["curve"][-1][1] == row["bpb"]
            assert all(0 < bpb <= 8 and 0 < train <= 8 for _, bpb, train in row["curve"]) and row["epochs"] > 0
    # drop one finished job, as if the run had been cut short: --resume runs only that one
    (tmp_path / "fidelity.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:-1]))
    assert fidelity.main([*argv, "--resume"]) == 0
    again = [json.loads(line) for line in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert len(again) == 6 and again[:5] == rows[:5]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_lm_bpb"] == 3 and len(summary["pairs"]) == 3
    facts_after = json.loads((tmp_path / "facts.json").read_text())  # the first invocation's machine and workers are kept
    assert facts_after["earlier"] == [{k: facts[k] for k in fidelity.INVOCATION_FACTS}]
    # the reports can be rebuilt from the files alone, running nothing, with the run's own facts
    report = (tmp_path / "fidelity.md").read_text()
    (tmp_path / "fidelity.md").unlink()
    (tmp_path / "summary.json").unlink()
    assert fidelity.main(["--summarise-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "fidelity.md").read_text() == report and json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "earlier invocation" in report


def test_summarise_only_names_what_the_folder_lacks(tmp_path):
    with pytest.raises(SystemExit) as refused:
        fidelity.main(["--summarise-only", "--out", str(tmp_path)])
    assert "no facts.json or fidelity.jsonl" in str(refused.value) and "--out of an earlier run" in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_ranking_by_the_mean_over_seeds():
    """One seed of y scores it low (a proxy run that missed); the mean over its three seeds
    puts it back in order, which seed 0 alone cannot."""
    def row(arch, stage, seed, value):
        base = {"arch": arch, "stage": stage, "seed": seed, "layout": "CA", "ok": True, "proxy_parameters": 10}
        return {**base, "score": -value, "bpb": value} if stage == "long" else {**base, "score": value}

    rows = [row(a, "long", 0, b) for a, b in (("x", 2.0), ("y", 1.5), ("z", 1.2), ("w", 1.0))]
    rows += [row("x", "mad", s, v) for s, v in ((0, 0.2), (1, 0.2), (2, 0.2))]
    rows += [row("y", "mad", s, v) for s, v in ((0, 0.1), (1, 0.5), (2, 0.6))]  # seed 0 missed
    rows += [row("z", "mad", s, v) for s, v in ((0, 0.6), (1, 0.7))]
    rows += [row("w", "mad", 0, 0.9)]
    summary = fidelity.summarise(rows)
    assert summary["spearman_mad"] == pytest.approx(0.8)  # seed 0 alone: y and x swapped
    assert summary["spearman_seed_mean_mad"] == pytest.approx(1.0) and summary["seeds_mad"] == [1, 3] and summary["n_seed_mean_mad"] == 4
    assert "spearman_seed_mean_lm_bpb" not in summary  # no LM proxy rows
    one_seed = fidelity.summarise([r for r in rows if r["seed"] == 0])
    assert "spearman_seed_mean_mad" not in one_seed  # nothing to average


def test_resume_refuses_a_run_of_other_settings(tmp_path):
    argv = ["--device", "cpu", "--settings", "cpu_small", "--archs", "3", "--stages", "lm", "--reference-factor", "2",
            "--reference-batch", "8", "--steps-scale", "0.1", "--workers", "1", "--threads", "1", "--out", str(tmp_path)]
    assert fidelity.main(argv) == 0
    before = (tmp_path / "fidelity.jsonl").read_text()
    try:
        fidelity.main([*argv[:9], "3", *argv[10:], "--resume"])  # another reference factor
    except SystemExit as exc:
        assert "reference_tokens" in str(exc) and "another --out" in str(exc)
    else:
        raise AssertionError("--resume must refuse rows of another recipe")
    assert (tmp_path / "fidelity.jsonl").read_text() == before  # nothing lost


def test_pooled_run_keeps_references_apart_and_measures_seed_noise(tmp_path):
    """Two process pools (references / proxies) and seed repeats: every job lands once in the
    log, the ranking uses seed 0, and the repeats give each proxy's spread over seeds."""
    argv = ["--device", "cpu", "--settings", "cpu_small", "--archs", "3", "--stages", "long,lm", "--reference-factor", "2",
            "--reference-batch", "8", "--steps-scale", "0.05", "--workers", "3", "--long-workers", "1", "--threads", "1",
            "--seed-repeats", "2", "--repeat-archs", "2", "--out", str(tmp_path)]
    assert fidelity.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    keys = sorted((row["arch"], row["stage"], row["seed"]) for row in rows)
    expected = sorted([(arch, stage, 0) for arch in ("LFM2-350M", "all-conv-16", "all-attn-16") for stage in ("long", "lm")]
                      + [(arch, "lm", seed) for arch in ("LFM2-350M", "all-conv-16") for seed in (1, 2)])
    assert keys == expected and all(row["ok"] for row in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    seed0 = {row["arch"]: row["bpb"] for row in rows if row["stage"] == "lm" and row["seed"] == 0}
    assert {p["arch"]: p["lm_bpb"] for p in summary["pairs"]} == seed0
    noise = summary["seed_noise"]["lm"]
    assert set(noise["per_arch"]) == {"LFM2-350M", "all-conv-16"} and noise["n_archs"] == 3
    for arch, entry in noise["per_arch"].items():
        scores = sorted(row["bpb"] for row in rows if row["arch"] == arch and row["stage"] == "lm")
        assert sorted(entry["scores"]) == scores and abs(entry["range"] - (scores[-1] - scores[0])) < 1e-12
    assert "Seed noise" in (tmp_path / "fidelity.md").read_text()


def test_no_job_starts_after_the_deadline(tmp_path):
    argv = ["--device", "cpu", "--settings", "cpu_small", "--archs", "3", "--stages", "lm", "--steps-scale", "0.05",
            "--workers", "1", "--threads", "1", "--deadline-s", "0", "--out", str(tmp_path)]
    assert fidelity.main(argv) == 0
    assert (tmp_path / "fidelity.jsonl").read_text() == ""


def test_long_workers_must_leave_room_for_the_proxies(tmp_path):
    with pytest.raises(SystemExit) as refused:  # --long-workers equal to --workers
        fidelity.main(["--workers", "2", "--long-workers", "2", "--out", str(tmp_path)])
    assert refused.value.code == 2


def test_the_reference_deadline_stops_references_only(tmp_path):
    argv = ["--device", "cpu", "--settings", "cpu_small", "--archs", "3", "--stages", "long,lm", "--steps-scale", "0.05",
            "--reference-factor", "2", "--reference-batch", "8", "--workers", "1", "--threads", "1", "--long-deadline-s", "0", "--out", str(tmp_path)]
    assert fidelity.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert sorted(row["stage"] for row in rows) == ["lm"] * 3


def test_architectures_without_a_reference_are_listed_but_not_ranked():
    def row(arch, stage, value):
        base = {"arch": arch, "stage": stage, "seed": 0, "layout": "CA", "ok": True, "proxy_parameters": 10}
        return {**base, "score": value, "bpb": -value} if stage != "mad" else {**base, "score": value}

    rows = [row(a, "mad", m) for a, m in (("x", 0.1), ("y", 0.2), ("z", 0.3), ("w", 0.9))]
    rows += [row(a, "long", -b) for a, b in (("x", 2.0), ("y", 1.5), ("z", 1.2))]
    summary = fidelity.summarise(rows)
    assert summary["n_mad"] == 3 and summary["spearman_mad"] == 1.0
    assert "spearman_min_mad" not in summary  # these references have no curve to take a lowest point of
    assert summary["baselines"]["has any attention layer"] != summary["baselines"]["has any attention layer"]  # one layout for all: no ranking (nan)
    layouts = {"x": "CCCC", "y": "CACC", "z": "CASA"}  # more attention, lower reference bpb
    baselines = fidelity.summarise([{**r, "layout": layouts.get(r["arch"], "CC")} for r in rows])["baselines"]
    assert baselines["number of attention layers"] == 1.0 and baselines["has any attention layer"] > 0
    assert set(summary["baselines_p"]) == set(fidelity.BASELINES)  # each baseline with its permutation p-value
    assert {p["arch"]: p["long_bpb"] for p in summary["pairs"]} == {"x": 2.0, "y": 1.5, "z": 1.2, "w": None}
    text = fidelity.markdown(summary, {"date": "d", "machine": "m", "torch": "t", "python": "p", "settings": "s", "reference_factor": 20, "reference_tokens": 1e6,
                                       "reference_steps": 10, "reference_batch": 8, "lm_seq_len": 32, "proxy_tokens": {}, "workers": 1}, None)
    assert text.index("| z |") < text.index("| x |") < text.index("| w |")


def test_spearman_p_value_separates_a_perfect_ranking_from_a_shuffled_one():
    x = list(range(12))
    assert fidelity.spearman(x, x) == 1.0 and fidelity.spearman_p_value(x, x, permutations=2000) < 0.001
    shuffled = [5, 11, 0, 7, 2, 9, 4, 1, 10, 3, 8, 6]
    assert fidelity.spearman_p_value(x, shuffled, permutations=2000) > 0.2


def test_the_reference_can_be_sized_from_the_lm_proxy(tmp_path):
    """--reference-of lm: factor x the LM proxy's tokens (a 20x-the-costlier run over-fits the
    stdlib corpus); --only picks architectures; the facts name the recipe and --resume checks it."""
    s = QualitySettings.default()
    ref = fidelity.reference_settings(s, 20, 256, 1e-3, of="lm")
    tokens = ref.lm_steps * ref.lm_batch_size * ref.lm_seq_len
    assert 20 * fidelity.proxy_tokens(s)["lm"] <= tokens < 20 * fidelity.proxy_tokens(s)["lm"] + 256 * s.lm_seq_len and ref.learning_rates == (1e-3,)
    argv = ["--device", "cpu", "--settings", "cpu_small", "--archs", "3", "--only", "all-conv-16", "--stages", "long", "--reference-of", "lm",
            "--reference-lr", "1e-3", "--reference-corpus", "python-sources", "--reference-factor", "2", "--reference-batch", "8", "--steps-scale", "0.05", "--workers", "1", "--threads", "1",
            "--out", str(tmp_path)]
    assert fidelity.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "fidelity.jsonl").read_text().splitlines()]
    assert [(row["arch"], row["stage"], row["lr"]) for row in rows] == [("all-conv-16", "long", 1e-3)]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["reference_of"] == "lm" and facts["reference_lr"] == 1e-3 and facts["reference_corpus"] == "python-sources"
    assert "of the python-sources corpus" in (tmp_path / "fidelity.md").read_text()
    assert "the LM proxy's tokens" in (tmp_path / "fidelity.md").read_text() and "lr 0.001" in (tmp_path / "fidelity.md").read_text()
    try:
        fidelity.main([*argv[:-1], str(tmp_path), "--reference-lr", "2e-3", "--resume"])
    except SystemExit as exc:
        assert "reference_lr" in str(exc)
    else:
        raise AssertionError("--resume must refuse a run at another reference rate")


def test_only_names_architectures_of_the_list(tmp_path):
    (tmp_path / "facts.json").write_text("{}")  # an earlier run's: a refused command leaves it alone
    with pytest.raises(SystemExit) as refused:  # a name outside the --archs list
        fidelity.main(["--archs", "3", "--only", "random-07", "--out", str(tmp_path)])
    assert refused.value.code == 2 and (tmp_path / "facts.json").read_text() == "{}"


def test_candidate_stages_keep_the_reference_at_its_factor():
    """mad_wide: twice the width (head_dim 16 under default()); lm_long: as many tokens as the
    MAD proxy (never more, so a 20x reference stays 20x of every proxy), on the reference's corpus."""
    from lfm2.presets import presets
    from nas.quality import proxy_spec

    s = QualitySettings.default()
    wide = fidelity.stage_settings("mad_wide", s)
    assert wide.width_factor == 1 / 4 and wide.key != s.key and fidelity.proxy_tokens(wide)["mad"] == fidelity.proxy_tokens(s)["mad"]
    assert proxy_spec(presets["LFM2-350M"], width_factor=wide.width_factor, vocab_size=64, seq_len=128).head_dim == 16
    long_lm = fidelity.stage_settings("lm_long", s, "python-sources")
    mad_tokens, one_step = fidelity.proxy_tokens(s)["mad"], s.lm_batch_size * s.lm_seq_len
    assert mad_tokens - 2 * one_step < fidelity.proxy_tokens(long_lm)["lm"] <= mad_tokens and long_lm.lm_corpus == "python-sources"
    reference = fidelity.reference_settings(s, 20, 256, corpus="python-sources")
    assert reference.lm_steps * 256 * s.lm_seq_len >= 20 * max(fidelity.proxy_tokens(x)[k] for x in (s, wide, long_lm) for k in ("mad", "lm"))
    assert fidelity.stage_settings("mad", s) is s
    with pytest.raises(ValueError):
        fidelity.stage_settings("nope", s)


@pytest.mark.slow  # two small runs of 12 jobs: ~1 min of CPU (5 min on the shared 2-core machine)
def test_a_run_imports_an_earlier_runs_references_and_judges_the_candidate_signals(tmp_path):
    """What the 20-architecture run did: an earlier run's references are imported (refused when
    their recipe differs), the candidate stages run beside them, and the summary judges every
    signal with bootstrap intervals."""
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    common = ["--device", "cpu", "--settings", "cpu_small", "--archs", "3", "--reference-factor", "1", "--reference-batch", "4",
              "--steps-scale", "0.05", "--workers", "1", "--threads", "1"]
    assert fidelity.main([*common, "--stages", "long,lm", "--out", str(earlier)]) == 0
    with pytest.raises(SystemExit) as refused:  # a reference of another length
        fidelity.main([*common[:7], "2", *common[8:], "--stages", "long,mad_wide", "--import-from", str(earlier), "--out", str(later)])
    assert "reference_tokens" in str(refused.value)
    assert fidelity.main([*common, "--stages", "long,lm,mad_wide,lm_long", "--import-from", str(earlier), "--import-stages", "long,lm", "--out", str(later)]) == 0
    rows = [json.loads(line) for line in (later / "fidelity.jsonl").read_text().splitlines()]
    assert sorted((r["stage"], bool(r.get("imported_from"))) for r in rows) == sorted([("long", True), ("lm", True), ("mad_wide", False), ("lm_long", False)] * 3)
    for row in rows:
        if row["stage"] == "mad_wide":  # accuracies along the way: the learning speed
            assert len(row["curve"]) >= 2 and set(row["curve"][-1][2]) == set(row["task_accuracy"]) and row["curve"][-1][1] == row["score"]
    facts = json.loads((later / "facts.json").read_text())
    assert set(facts["stage_settings_keys"]) == {"mad_wide", "lm_long"} and facts["stage_tokens"]["lm_long"] <= facts["proxy_tokens"]["mad"]
    summary = json.loads((later / "summary.json").read_text())
    judged = summary["signals"]["signals"]
    assert {"mad_wide (seed 0)", "lm_long (seed 0)", "mad_wide recall AUC (seed 0)", "number of attention layers"} <= set(judged)
    assert all(judged[name]["n"] == 3 for name in ("mad_wide (seed 0)", "lm_long (seed 0)"))
    assert set(summary["stage_cost"]) == {"mad_wide", "lm_long"}  # imported rows cost nothing in this run
    assert "Candidate signals" in (later / "fidelity.md").read_text() and "wide MAD score" in (later / "fidelity.md").read_text()
