"""`lfm2-nas bench` through a real subprocess: a table or JSON on success, exit 2 with the
fix on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SPEC = {"vocab_size": 256, "d_model": 32, "layers": ["conv", "attn"], "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64}


def _bench(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LFM2_NAS_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "nas.cli", "bench", *args], capture_output=True, text=True, env=env, timeout=600)


# measurements here assert no timing: they lock cores of their own (conftest.py)
pytestmark = pytest.mark.usefixtures("private_core_locks")


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(SPEC))
    return path


def test_bench_prints_json_with_rows(spec_file, tmp_path):
    done = _bench(str(spec_file), "--backend", "eager", "--prompt", "8,12", "--depth", "4", "--tokens", "2", "--max-seconds", "0.1", "--threads", "1", "--processes", "2", "--json",
                  tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["measurement"]["protocol"]["processes"] == 2 and len(payload["measurement"]["stack"].get("processes") or [None]) <= 2
    assert [row["test"] for row in payload["rows"]] == ["pp8", "pp12", "tg@4"]
    assert all(row["tokens_per_s"] > 0 and row["llama_bench_tokens_per_s"] > 0 and row["llama_bench_tokens_per_s_std"] >= 0 for row in payload["rows"])
    assert all(row["ci_low_ms"] <= row["median_ms"] <= row["ci_high_ms"] for row in payload["rows"])
    assert payload["measurement"]["status"] == "ok" and payload["artifact"]["verification"]["passed"]
    assert "verified against fp32 eager: passed, max |logit diff| 0," in done.stderr, done.stderr  # said before measuring


def _main(*args: str, capsys) -> tuple[int, str, str]:
    """The CLI in this process (`nas.cli.main`, which maps UserError to exit 2)."""
    from nas.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", *args])
    out, err = capsys.readouterr()
    return exited.value.code, out, " ".join(err.split())


@pytest.mark.slow
def test_bench_prints_a_table(spec_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LFM2_NAS_CACHE", str(tmp_path / "cache"))
    from nas.cli import main

    with pytest.raises(SystemExit) as finished:  # a CLI exits, with status 0 on success
        main(["bench", str(spec_file), "--backend", "eager", "--prompt", "8", "--depth", "4", "--tokens", "2", "--max-seconds", "0.1"])
    assert finished.value.code in (0, None)
    out = capsys.readouterr().out
    assert "pp8" in out and "tg@4" in out and "footprint" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["NoSuchModel"], "neither a preset"),
        (["{spec}", "--prompt", "12,abc"], "not a positive integer"),
        (["{spec}", "--backend", "tflite"], "choose one of"),
        (["{spec}", "--backend", "onnx", "--quant", "8da4w"], "compiles fp32, int8"),
        (["{spec}", "--memory-cap", "lots"], "--memory-limit"),  # the old name still accepted, the message uses the one name
        (["{spec}", "--memory-limit", "500"], "no unit"),
        (["{spec}", "--threads", "0"], "--threads must be >= 1"),
        (["{spec}", "--processes", "0"], "--processes must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_the_fix(spec_file, capsys, args, message):
    code, _, err = _main(*[a.format(spec=spec_file) for a in args], capsys=capsys)
    assert code == 2, err
    assert message in err
