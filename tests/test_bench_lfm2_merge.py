"""bench.lfm2_vs_attention --merge: the full comparison done in parts folds into one table
without ever dividing two runs' numbers."""

from __future__ import annotations

import json
from types import SimpleNamespace

from bench.lfm2_vs_attention import merge_results, ratio_table, render
from bench.models import MODELS, WEIGHT_PRECISION, arithmetic

TRIO = ("LFM2-350M", "LFM2-350M-attn", "Qwen3-0.6B-shaped")


def part(date: str, backends: dict[str, dict[str, dict]], prefill, decode) -> dict:
    """A results file as one run writes it (JSON round trip: its points become strings)."""
    measured = {pair: {name: {"prefill": {t: by_model[name]["prefill"].get(t) for t in prefill}, "decode": {c: by_model[name]["decode"].get(c) for c in decode},
                              "footprint": 1 << 20, "error": None, "compile_wall_s": 1.0, "verification": None} for name in by_model}
                for pair, by_model in backends.items()}
    data = {"date": date, "argv": ["--backends", ",".join(backends)], "models": {n: MODELS[n].to_dict() for n in TRIO}, "pairs": {"LFM2-350M": list(TRIO[1:])},
            "backends": list(backends), "prefill": list(prefill), "decode": list(decode), "measured": measured, "raw": {"run": date}, "load_before": [0.1, 0.1, 0.1], "wall_s": 60.0}
    return json.loads(json.dumps(data))


def speeds(lfm2: float, attn: float, qwen: float, points) -> dict[str, dict]:
    return {"LFM2-350M": {k: {p: lfm2 for p in points} for k in ("prefill", "decode")},
            "LFM2-350M-attn": {k: {p: attn for p in points} for k in ("prefill", "decode")},
            "Qwen3-0.6B-shaped": {k: {p: qwen for p in points} for k in ("prefill", "decode")}}


def test_parts_fold_into_one_table_newest_run_winning():
    old = part("2026-11-29 04:59 UTC", {"executorch:8da4w": speeds(300, 200, 100, (512, 2048)), "onnx:int8": speeds(30, 20, 10, (512, 2048))}, (512, 2048), (512,))
    fp32 = part("2026-11-29 08:00 UTC", {"executorch:fp32": speeds(90, 60, 30, (512, 2048, 4096, 8192))}, (512, 2048, 4096, 8192), (512,))
    long = part("2026-11-29 09:00 UTC", {"onnx:int8": speeds(40, 10, 10, (512, 4096, 8192))}, (4096, 8192), (512,))
    merged = merge_results([old, fp32, long])
    assert merged["backends"] == ["executorch:8da4w", "onnx:int8", "executorch:fp32"]
    assert merged["prefill"] == (512, 2048, 4096, 8192) and merged["decode"] == (512,)
    int8 = merged["measured"]["onnx:int8"]
    assert int8["LFM2-350M"]["prefill"] == {512: 30, 2048: 30, 4096: 40, 8192: 40}
    assert int8["LFM2-350M"]["decode"] == {512: 40}  # measured again by the newest run: its number
    assert int8["LFM2-350M"]["source"]["prefill"] == {512: 0, 2048: 0, 4096: 2, 8192: 2}
    assert [r["date"] for r in merged["runs"]] == [old["date"], fp32["date"], long["date"]] and len(merged["raw_runs"]) == 3
    assert ratio_table(int8, "LFM2-350M", "LFM2-350M-attn", merged["prefill"], "prefill") == [1.5, 1.5, 4.0, 4.0]
    assert merged["measured"]["executorch:8da4w"]["LFM2-350M"]["prefill"].get(4096) is None  # not measured: no number


def test_a_merge_of_a_merge_keeps_each_point_with_its_run():
    a = part("d1", {"onnx:int8": speeds(30, 20, 10, (512,))}, (512,), (512,))
    b = part("d2", {"onnx:int8": speeds(40, 20, 10, (2048,))}, (2048,), (512,))
    first = json.loads(json.dumps({**merge_results([a, b]), "models": {n: MODELS[n].to_dict() for n in TRIO}}))
    c = part("d3", {"executorch:fp32": speeds(9, 6, 3, (512,))}, (512,), (512,))
    again = merge_results([first, c])
    assert [r["date"] for r in again["runs"]] == ["d1", "d2", "d3"]
    assert again["measured"]["onnx:int8"]["LFM2-350M"]["source"]["prefill"] == {512: 0, 2048: 1}
    assert again["measured"]["executorch:fp32"]["LFM2-350M"]["source"]["prefill"] == {512: 2}


def test_no_ratio_between_numbers_of_two_runs():
    a = part("d1", {"onnx:int8": speeds(30, 20, 10, (512,))}, (512,), (512,))
    b = part("d2", {"onnx:int8": speeds(40, 20, 10, (512,))}, (512,), (512,))
    b["measured"]["onnx:int8"] = {"LFM2-350M": b["measured"]["onnx:int8"]["LFM2-350M"]}  # a run that measured LFM2 alone
    merged = merge_results([a, b])
    int8 = merged["measured"]["onnx:int8"]
    assert int8["LFM2-350M"]["prefill"] == {512: 40}  # the table shows the newest number ...
    # ... but the ratio is the older run's, where both were measured (30 / 20), never 40 / 20
    assert ratio_table(int8, "LFM2-350M", "LFM2-350M-attn", (512,), "prefill") == [1.5]
    c = part("d3", {"onnx:int8": speeds(50, 20, 10, (2048,))}, (2048,), (512,))
    c["measured"]["onnx:int8"] = {"LFM2-350M": c["measured"]["onnx:int8"]["LFM2-350M"]}
    assert ratio_table(merge_results([a, c])["measured"]["onnx:int8"], "LFM2-350M", "LFM2-350M-attn", (2048,), "prefill") == [None]  # no run had both


def test_a_backend_measured_for_some_models_and_a_partly_failed_run_render(tmp_path):
    """fp32 measured for LFM2 and its twin only; a later int8 run lost one model's points to
    an OOM kill: the tables show what exists, say why points are missing, and no ratio crosses runs."""
    from bench.lfm2_vs_attention import main

    old = part("d1", {"onnx:int8": speeds(30, 20, 10, (512, 2048))}, (512, 2048), (512,))
    fp32 = part("d2", {"executorch:fp32": speeds(90, 60, 30, (512,))}, (512,), (512,))
    fp32["measured"]["executorch:fp32"].pop("Qwen3-0.6B-shaped")
    long = part("d3", {"onnx:int8": speeds(40, 20, 10, (4096,))}, (4096,), (512,))
    long["measured"]["onnx:int8"]["Qwen3-0.6B-shaped"].update(prefill={"4096": None}, decode={"512": None}, error="measure: oom: killed during prefill (length 4096)")
    paths = []
    for name, data in (("old.json", old), ("fp32.json", fp32), ("long.json", long)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n")
    assert main(["--merge-only", "--merge", ",".join(paths), "--results", str(tmp_path / "merged.json"), "--benchmarks", str(md)]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert "executorch:fp32 LFM2-350M vs Qwen3-0.6B-shaped" not in merged["ratios"]
    qwen = merged["ratios"]["onnx:int8 LFM2-350M vs Qwen3-0.6B-shaped"]
    assert qwen["prefill"]["measured"] == [3.0, 3.0, None] and qwen["decode"]["measured"] == [3.0]  # decode: from run 1, where both ran
    text = md.read_text()
    assert "Not measured ('-'): Qwen3-0.6B-shaped, run 3: measure: oom" in text
    assert "Qwen3-0.6B-shaped" not in text.split("### executorch:fp32")[1].split("Arithmetic")[0]


def test_the_merged_table_renders_with_missing_points_and_lists_its_runs():
    old = part("2026-11-29 04:59 UTC", {"onnx:int8": speeds(30, 20, 10, (512, 2048))}, (512, 2048), (512,))
    fp32 = part("2026-11-29 08:00 UTC", {"executorch:fp32": speeds(90, 60, 30, (512, 8192))}, (512, 8192), (512,))
    m = merge_results([old, fp32])
    arith = {pair: {n: arithmetic(s, m["prefill"], m["decode"], WEIGHT_PRECISION[tuple(pair.split(":"))]) for n, s in m["models"].items()} for pair in m["backends"]}
    ratios = {}
    for pair in m["backends"]:
        for other in m["pairs"]["LFM2-350M"]:
            entry = {}
            for kind, points in (("prefill", m["prefill"]), ("decode", m["decode"])):
                expected = [1.0 for _ in points]
                entry[kind] = {"points": list(points), "measured": ratio_table(m["measured"][pair], "LFM2-350M", other, points, kind), "expected_from_arithmetic": expected, "two_x": None}
            ratios[f"{pair} LFM2-350M vs {other}"] = entry
    args = SimpleNamespace(quick=False, threads=2, min_runs=2)
    text = render(args, m["models"], m["pairs"], m["backends"], m["prefill"], m["decode"], m["measured"], arith, ratios, m["runs"])
    assert "Merged from 2 runs" in text and "2026-11-29 08:00 UTC" in text
    int8_table = text.split("### onnx:int8")[1].split("###")[0]
    assert "| - |" in int8_table  # its 8192 was not measured


def test_runs_of_different_models_under_one_name_are_refused():
    import pytest

    a = part("d1", {"onnx:int8": speeds(30, 20, 10, (512,))}, (512,), (512,))
    b = part("d2", {"onnx:int8": speeds(40, 20, 10, (512,))}, (512,), (512,))
    b["models"]["LFM2-350M"]["d_model"] = 512
    with pytest.raises(SystemExit, match="LFM2-350M"):
        merge_results([a, b])


def test_a_missing_merge_file_is_named(tmp_path, capsys):
    import pytest

    from bench.lfm2_vs_attention import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--merge", str(tmp_path / "nope.json")])
    assert "nope.json" in capsys.readouterr().err


def test_merge_only_folds_files_into_one_results_file_and_block(tmp_path):
    from bench.lfm2_vs_attention import main
    from bench.report import load_json

    old = part("2026-11-29 04:59 UTC", {"onnx:int8": speeds(30, 20, 10, (512, 2048))}, (512, 2048), (512,))
    fp32 = part("2026-11-29 08:00 UTC", {"executorch:fp32": speeds(90, 60, 30, (512, 8192))}, (512, 8192), (512,))
    paths = []
    for name, data in (("old.json", old), ("fp32.json", fp32)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n")
    assert main(["--merge-only", "--merge", ",".join(paths), "--results", str(tmp_path / "merged.json"), "--benchmarks", str(md)]) == 0
    merged = load_json(tmp_path / "merged.json")
    assert merged["backends"] == ["onnx:int8", "executorch:fp32"] and [r["date"] for r in merged["runs"]] == [old["date"], fp32["date"]]
    assert merged["ratios"]["executorch:fp32 LFM2-350M vs Qwen3-0.6B-shaped"]["prefill"]["points"] == [512, 2048, 8192]
    assert merged["ratios"]["executorch:fp32 LFM2-350M vs Qwen3-0.6B-shaped"]["prefill"]["measured"] == [3.0, None, 3.0]  # 2048: fp32 not measured there
    assert "Merged from 2 runs" in md.read_text()


def test_merge_only_needs_files(capsys):
    import pytest

    from bench.lfm2_vs_attention import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--merge-only"])
    assert "--merge FILES" in capsys.readouterr().err
