"""Scenario 8 of issue 11: bad input to the CLI exits 2 with a message that names the
problem and the fix, and writes nothing half-way.

test_search_cli.py covers `search` (device, budget, backend, quant, sampler, a missing
space file, storage URLs) and `study show`; the other engineers' tests cover some of
`pick` and `export`. This file adds what they leave: broken space files and out-of-range
search flags, `report`, `pick`, `dashboard`, `export`, `agent serve`, `devices add|remove|list`,
and the files each leaves behind. Run in-process through `nas.cli.main` (what the
`lfm2-nas` script calls) to keep it fast.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from testkit.reliability import isolated_env

SPACE_OK = """name = "tiny"
vocab_size = 256
max_seq_len = 64
head_dim = 32
d_model = [64]
n_layers = [1]
ffn_multiplier = [2.0]
n_kv_heads = [1]
operators = ["conv", "attn"]
"""


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run `lfm2-nas ARGS` in-process in an empty folder with private config and cache;
    returns (exit status, stderr)."""
    work = tmp_path / "work"
    work.mkdir()
    for key, value in isolated_env(tmp_path).items():
        if key.startswith(("LFM2_NAS_", "XDG_")):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(work)

    def run(*args: str) -> tuple[int, str]:
        from nas import cli as nas_cli

        # main() registers the commands once per process (it is idempotent), so the app is
        # left as it is: restoring an earlier, empty command list broke every later call
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            nas_cli.main([str(a) for a in args])
        return exit_.value.code, capsys.readouterr().err

    run.work = work
    return run


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check_refused(code: int, err: str, expected: list[str]) -> None:
    assert code == 2, (code, err)
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "space_text, flags, expected",
    [
        ('name = "x"\nvocab_size = [\n', [], ["bad.toml", "not valid TOML", "fix the syntax"]),
        (SPACE_OK.replace('"attn"]', '"lstm"]'), [], ["bad.toml", "'operators'", "'lstm'", "conv, attn, swa"]),
        (SPACE_OK.replace("d_model = [64]", "d_model = [60]"), [], ["bad.toml", "d_model"]),
        (SPACE_OK + "n_experts = [4]\n", [], ["bad.toml", "n_experts"]),
        (SPACE_OK, ["--trials", "0"], ["--trials must be >= 1"]),
        (SPACE_OK, ["--context", "0"], ["--context must be >= 1"]),
        (SPACE_OK, ["--in-flight", "0"], ["--in-flight must be >= 1"]),
        (SPACE_OK, ["--quality", "vibes"], ["--quality 'vibes'", "mad"]),
        (SPACE_OK, ["--storage", "study.db"], ["not a URL", "sqlite:///"]),
        (SPACE_OK, ["--storage", "/no/such/folder/study.log"], ["/no/such/folder", "does not exist"]),
        (SPACE_OK, ["--budget", "-5MB"], ["--budget"]),
    ],
    ids=["invalid-toml", "unknown-operator", "width-not-multiple-of-head", "unknown-key", "trials-0", "context-0", "in-flight-0", "quality", "storage-not-url", "journal-folder", "negative-budget"],
)
def test_bad_search_input_exits_2_and_writes_nothing(cli, space_text, flags, expected, figures):
    space = cli.work / "bad.toml"
    space.write_text(space_text)
    code, err = cli("search", "--device", "local", "--budget", "500MB", "--space", "bad.toml", "--backend", "eager", "--quant", "fp32", *flags)
    _check_refused(code, err, expected)
    assert _files(cli.work) == {"bad.toml"}  # no study database, no journal, no cache
    figures("CLI bad input: search", inputs_tried=1, exit_2=1, files_written=0)


def _study(tmp_path: Path) -> str:
    from testkit.export_study import build_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    build_study(url, name="s")
    return url


@pytest.fixture(scope="module")
def study_url(tmp_path_factory):
    return _study(tmp_path_factory.mktemp("study"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["report", "--study", "s", "--storage", "sqlite:///missing.db"], ["no database file", "missing.db", "run the search first"]),
        (["report", "--study", "nope", "--storage", "STUDY"], ["no study named 'nope'", "studies there: s", "--study"]),
        (["report", "--study", "s", "--storage", "ftp://x/y"], ["ftp://x/y", "sqlite:///"]),
        (["pick", "--study", "s", "--storage", "STUDY", "--max-prefill-ms", "0"], ["--max-prefill-ms must be a positive number"]),
        (["pick", "--study", "s", "--storage", "STUDY", "--max-decode-ms", "-3"], ["--max-decode-ms must be a positive number"]),
        (["pick", "--study", "nope", "--storage", "sqlite:///missing.db"], ["no database file", "missing.db"]),
        (["dashboard", "--study", "s", "--storage", "STUDY", "--refresh", "-1"], ["--refresh must be a positive number"]),
        (["dashboard", "--study", "s", "--storage", "sqlite:///missing.db"], ["no database file", "missing.db"]),
        (["export", "out", "--study", "s", "--storage", "STUDY", "--to", "tflite"], ["--to must be one of hf, lfm2, executorch, onnx"]),
        (["export", "out", "--study", "s", "--storage", "STUDY", "--to", "hf"], ["--trial N", "--pareto"]),
        (["export", "out", "--study", "s", "--storage", "STUDY", "--trial", "999", "--to", "hf"], ["no trial 999", "0..9"]),
        (["export", "out", "--study", "s", "--storage", "STUDY", "--pareto", "--family", "0", "--to", "hf"], ["--family must be >= 1"]),
        (["export", "out", "--study", "s", "--storage", "STUDY", "--pareto", "--family", "2", "--tier-by", "size", "--to", "hf"], ["--tier-by must be one of memory, latency"]),
        (["export", "out", "--study", "nope", "--storage", "STUDY", "--trial", "0", "--to", "hf"], ["no study named 'nope'", "--study"]),
    ],
    ids=[
        "report-missing-db", "report-unknown-study", "report-bad-url", "pick-zero", "pick-negative", "pick-missing-db", "dashboard-refresh",
        "dashboard-missing-db", "export-to", "export-what", "export-no-trial", "export-family-0", "export-tier-by", "export-unknown-study",
    ],
)
def test_bad_report_pick_dashboard_export_input_exits_2_and_writes_nothing(cli, study_url, args, expected, figures):
    args = [study_url if a == "STUDY" else a for a in args]
    code, err = cli(*args)
    _check_refused(code, err, expected)
    assert _files(cli.work) == set(), "a refused command left files behind"
    figures(f"CLI bad input: {args[0]}", inputs_tried=1, exit_2=1, files_written=0)


@pytest.mark.parametrize(
    "args",
    [
        ["study", "show", "--study", "nope", "--storage", "sqlite:///typo.db"],
        ["study", "pareto", "--study", "nope", "--storage", "sqlite:///typo.db"],
        ["export", "out", "--study", "nope", "--storage", "sqlite:///typo.db", "--trial", "0", "--to", "hf"],
    ],
    ids=["study-show", "study-pareto", "export"],
)
def test_a_mistyped_storage_file_is_not_created(cli, args, figures):
    code, err = cli(*args)
    _check_refused(code, err, ["no study named 'nope'"])
    assert _files(cli.work) == set(), f"left behind: {_files(cli.work)}"
    figures(f"CLI bad input: {args[0]}", inputs_tried=1, exit_2=1, files_written=0)


def test_dashboard_port_out_of_range(cli, study_url):
    code, err = cli("dashboard", "--study", "s", "--storage", study_url, "--port", "70000")
    _check_refused(code, err, ["--port", "65535"])


# -- agent serve --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--name", "bad name"], ["agent name 'bad name'", "e.g. pixel8-lab"]),
        (["--cpus", "99"], ["--cpus", "[99]", "usable here"]),
        (["--memory-limit", "lots"], ["--memory-limit 'lots' is not a size", "800M"]),
        (["--emulate"], ["--emulate needs a --profile", "pixel8"]),
        (["--profile", "iphone-99"], ["unknown device profile 'iphone-99'", "known:", "pixel8"]),
        (["--tls-cert", "cert.pem"], ["--tls-cert and --tls-key"]),
        (["--port", "70000"], ["--port 70000", "1-65535"]),
        (["--port", "-1"], ["--port -1", "1-65535"]),
    ],
    ids=["name", "cpus", "memory-limit", "emulate-local", "profile", "tls-half", "port-high", "port-negative"],
)
def test_bad_agent_serve_input_exits_2_and_sets_up_nothing(cli, flags, expected, figures):
    args = ["agent", "serve", "--name", "lab", "--port", "0", "--workdir", "agent-dir"]
    code, err = cli(*args, *flags)
    _check_refused(code, err, expected)
    workdir = cli.work / "agent-dir"
    assert not {"jobs.sqlite", "agent.lock", "artifacts"} & set(os.listdir(workdir) if workdir.exists() else []), "a refused agent set up its workdir"
    figures("CLI bad input: agent serve", inputs_tried=1, exit_2=1, half_set_up_workdirs=0)


def test_a_token_file_others_can_read_is_refused(cli):
    token = cli.work / "shared.token"
    token.write_text("s3cret-token-value\n")
    token.chmod(0o644)
    code, err = cli("agent", "serve", "--name", "lab", "--port", "0", "--workdir", "agent-dir", "--token-file", token)
    _check_refused(code, err, ["readable by others", f"chmod 600 {token}"])
    assert "s3cret" not in err and not (cli.work / "agent-dir").exists()


def test_a_port_in_use_exits_2_and_leaves_the_workdir_untouched(cli):
    """Another process holds the port: the agent says which port and what to do, and sets
    up no job store or lock in its workdir (it binds the port before touching the workdir)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = cli("agent", "serve", "--name", "lab", "--port", port, "--workdir", "w")
    _check_refused(code, err, [f"127.0.0.1:{port}", "choose another --port", "0 picks a free one"])
    assert sorted(os.listdir(cli.work / "w")) == ["token"]  # the token file (complete) is all there is


# -- devices add | remove | list ------------------------------------------------------------


def _token(folder: Path, mode: int = 0o600) -> Path:
    path = folder / "agent.token"
    path.write_text("a-token\n")
    path.chmod(mode)
    return path


def test_bad_devices_input_exits_2_and_keeps_the_registry_as_it_was(cli, figures):
    code, err = cli("devices", "add", "lab", "--url", "http://127.0.0.1:9", "--token-file", _token(cli.work))
    assert code == 0, err
    registry = Path(os.environ["LFM2_NAS_CONFIG"])
    before = registry.read_bytes()
    (cli.work / "shared").mkdir()
    token, open_token = cli.work / "agent.token", _token(cli.work / "shared", 0o644)
    cases = [
        (["add", "other", "--url", "ftp://x", "--token-file", token], ["device URL 'ftp://x'", "http://HOST:PORT"]),
        (["add", "other", "--url", "http://127.0.0.1:9", "--token-file", cli.work / "nope.token"], ["does not exist", "copy it from the agent's host"]),
        (["add", "other", "--url", "http://127.0.0.1:9", "--token-file", open_token], ["readable by others", "chmod 600", "add the device again"]),
        (["add", "pixel 8", "--url", "http://127.0.0.1:9", "--token-file", token], ["device name 'pixel 8'", "e.g. pixel8"]),
        (["add", "lab", "--url", "http://127.0.0.1:10", "--token-file", token], ["registered already", "devices remove lab", "--replace"]),
        (["remove", "ghost"], ["no device named 'ghost'", "registered: lab"]),
    ]
    for args, expected in cases:
        code, err = cli("devices", *args)
        _check_refused(code, err, expected)
        assert registry.read_bytes() == before, args
    assert [p.name for p in registry.parent.iterdir() if p.name.startswith(".devices-")] == []  # no temporary file left
    figures("CLI bad input: devices", inputs_tried=len(cases), exit_2=len(cases), registry_changed=0)


def test_a_broken_registry_is_named_with_the_fix(cli):
    registry = Path(os.environ["LFM2_NAS_CONFIG"])
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text("[devices\n")
    for args in (["devices", "list"], ["devices", "add", "lab", "--url", "http://127.0.0.1:9", "--token-file", _token(cli.work)]):
        code, err = cli(*args)
        _check_refused(code, err, [str(registry), "not valid TOML", "fix it or remove it"])
    assert registry.read_text() == "[devices\n"
