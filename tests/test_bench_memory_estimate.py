"""bench.memory_estimate's full-size mode as a user runs it: `lfm2-nas bench ... --json` into a
file, then `python -m bench.memory_estimate --bench-json FILE`. On a small ONNX model (so the
test stays a minute), the analytic lower bound the search prunes with must not be above the
measured footprint, and the footprint splits into what loading and running added."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SPEC = {"vocab_size": 4096, "d_model": 256, "layers": ["conv", "attn", "conv", "attn"], "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 768}

pytestmark = pytest.mark.usefixtures("private_core_locks")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_full_size_rows_from_bench_json_keep_the_lower_bound_below_the_measurement(quant, tmp_path):
    env = {**os.environ, "LFM2_NAS_CACHE": str(tmp_path / "cache")}
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps(SPEC))
    bench = subprocess.run(
        [sys.executable, "-m", "nas.cli", "bench", str(spec), "--backend", "onnx", "--quant", quant, "--prompt", "300", "--depth", "300", "--tokens", "2", "--max-seconds", "0.2", "--threads", "1", "--json"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    measured_json = tmp_path / "bench.json"
    measured_json.write_text(bench.stdout)
    results = tmp_path / "rows.json"
    report = subprocess.run([sys.executable, "-m", "bench.memory_estimate", "--bench-json", str(measured_json), "--no-write", "--results", str(results)], capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    (row,) = json.loads(results.read_text())["rows"]
    footprint = json.loads(bench.stdout)["measurement"]["memory"]["footprint_bytes"]
    assert row["measured_bytes"] == footprint and row["backend"] == "onnx" and row["quant"] == quant
    assert 0 < row["lower_bound_bytes"] <= footprint and not row["lower_bound_violated"]
    assert row["measured_load_bytes"] + row["measured_run_bytes"] == footprint
    assert row["estimate_load_bytes"] + row["estimate_run_bytes"] == row["estimate_bytes"]
    assert f"onnx {quant}" in report.stdout
