"""Bad input to `lfm2-nas search` and `study`: exit status 2, a message that names the
problem and the fix, and nothing written half-way."""

import shutil

import pytest


@pytest.fixture
def lfm2_nas(lfm2_nas):
    """The shared `lfm2_nas` fixture (conftest.py), with a device registry and cache of the test's own."""

    def run(*args, cwd):
        return lfm2_nas(*args, cwd=cwd, env={"LFM2_NAS_CONFIG": str(cwd / "devices.toml"), "LFM2_NAS_CACHE": str(cwd / "cache")}, timeout=300)

    return run


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--device", "local", "--budget", "lots"], ["--budget", "800M"]),
        (["--device", "local", "--budget", "500XB"], ["unknown unit"]),
        (["--device", "local", "--budget", "500"], ["--budget", "no unit", "500MB"]),
        (["--device", "pixel8", "--budget", "500MB"], ["no device agent named 'pixel8'", "lfm2-nas agent serve", "lfm2-nas devices add", "--emulate"]),
        (["--device", "nosuchboard", "--budget", "500MB", "--emulate"], ["profile", "pixel8"]),
        (["--device", "local", "--budget", "500MB", "--backend", "tflite"], ["unknown backend", "executorch"]),
        (["--device", "local", "--budget", "500MB", "--backend", "onnx", "--quant", "8da4w"], ["onnx", "int8"]),
        (["--device", "local", "--budget", "500MB", "--sampler", "cmaes"], ["nsga2"]),
        (["--device", "local", "--budget", "500MB", "--space", "missing.toml"], ["missing.toml"]),
        (["--device", "local", "--budget", "500MB", "--storage", "sqlite:////no/such/folder/x.db"], ["/no/such/folder", "sqlite:///"]),
        (["--device", "local", "--budget", "500MB", "--storage", "postgresql://u@127.0.0.1:9/db"], ["postgresql", "sqlite:///"]),
        # several devices in one search
        (["--device", "local,local", "--budget", "500MB"], ["names local more than once"]),
        (["--device", "local,", "--budget", "500MB"], ["--device", "pixel8,rpi5,local"]),
        (["--device", "local,pixel8", "--emulate", "--budget", "local=500MB"], ["no budget to pixel8", "pixel8=SIZE"]),
        (["--device", "local", "--budget", "pixel8=500MB"], ["'pixel8'", "not in --device"]),
        (["--device", "local,pixel8", "--emulate", "--budget", "local=500MB,pixel8=500"], ["--budget for pixel8", "no unit"]),
        (["--device", "local,pixel8", "--emulate", "--budget", "500MB,1GB"], ["two budgets"]),
        (["--device", "local,nosuchboard", "--budget", "500MB", "--emulate"], ["profile", "nosuchboard"]),
        # found before any agent, Ray or storage starts (it used to fail the first trial)
        (["--device", "local", "--budget", "500MB", "--quality", "mad", "--quality-settings", "gpu_big"], ["--quality-settings 'gpu_big'", "default, cpu_small"]),
        (["--device", "local", "--budget", "500MB", "--processes", "0"], ["--processes must be a whole number from 1 to 16"]),
    ],
)
def test_bad_search_input_exits_2_with_the_fix(lfm2_nas, tmp_path, args, expected):
    result = lfm2_nas("search", *args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    for text in expected:
        assert text in result.stderr, (text, result.stderr)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lfm2-nas.db").exists()  # nothing written half-way


def test_missing_study_names_what_exists(lfm2_nas, tmp_path):
    result = lfm2_nas("study", "show", "--study", "nope", "--storage", f"sqlite:///{tmp_path}/s.db", cwd=tmp_path)
    assert result.returncode == 2 and "no study named 'nope'" in result.stderr and "--study" in result.stderr


def test_resume_of_a_study_that_does_not_exist(lfm2_nas, tmp_path):
    result = lfm2_nas("search", "--device", "local", "--budget", "500MB", "--space", "small", "--study", "ghost", "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "no study 'ghost'" in result.stderr


def test_study_list_of_a_missing_file_refuses_and_creates_nothing(lfm2_nas, tmp_path):
    # the same rule as `study show`: a command that reads never creates an empty database
    result = lfm2_nas("study", "list", "--storage", f"sqlite:///{tmp_path}/typo.db", cwd=tmp_path)
    assert result.returncode == 2 and "typo.db does not exist" in result.stderr and "--storage" in result.stderr
    assert not (tmp_path / "typo.db").exists()


def test_study_show_labels_each_objective(lfm2_nas, tmp_path):
    from pathlib import Path

    db = tmp_path / "small.db"
    shutil.copyfile(Path(__file__).parent / "data" / "search_small.db", db)
    result = lfm2_nas("study", "show", "--study", "small", "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header = " ".join(result.stdout.split())
    for name in ("quality", "prefill_ms", "decode_ms", "footprint MiB"):
        assert name in header, (name, result.stdout)


def test_report_into_a_missing_folder_exits_2_before_reading_the_study(lfm2_nas, tmp_path):
    """`report --out` creates no folder: a typo in it is refused (exit 2) with the fix,
    before the study is read (here the study does not even exist)."""
    result = lfm2_nas("report", "--study", "s", "--storage", "sqlite:///missing.db", "--out", tmp_path / "no-such-folder" / "r.html", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "no-such-folder does not exist" in result.stderr and "mkdir -p" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "no-such-folder").exists()
