"""One default backend and one default precision per backend across the commands (issue #24:
`bench` used to default to onnx/fp32 while `search` defaulted to executorch/8da4w, and `search
--backend onnx` without --quant was refused for onnx's lack of 8da4w)."""

from __future__ import annotations

import json

import pytest
import typer

from lfm2.backends import BACKENDS, DEFAULT_BACKEND, DEFAULT_QUANT, QUANTS, default_quant


def _command(*path: str):
    from nas.cli import _register_commands, app

    _register_commands()  # what main() does first
    command = typer.main.get_command(app)  # typer's own click: groups have `commands`
    for name in path:
        command = command.commands[name]
    return command


def _option(command, flag: str):
    return next(p for p in command.params if flag in getattr(p, "opts", ()))


@pytest.mark.parametrize("path", [("bench",), ("search",), ("space", "sample")])
def test_every_command_takes_the_same_default_backend_and_leaves_the_precision_to_it(path):
    command = _command(*path)
    assert _option(command, "--backend").default == DEFAULT_BACKEND
    assert _option(command, "--quant").default is None  # resolved per backend: default_quant


def test_each_backend_defaults_to_a_precision_it_compiles():
    assert set(DEFAULT_QUANT) == set(BACKENDS)
    for backend in BACKENDS:
        assert default_quant(backend) in QUANTS[backend]
    assert default_quant("executorch") == "8da4w" and default_quant("llamacpp") == "q4_0"


def test_an_unknown_backend_names_the_choices():
    from lfm2.errors import UserError

    with pytest.raises(UserError, match="choose one of executorch"):
        default_quant("tflite")


def test_search_with_another_backend_and_no_quant_takes_that_backends_precision(lfm2_nas, tmp_path):
    # A bad --sampler stops the search at its first check of the flags (exit 2, nothing started):
    # reaching that check means --backend onnx without --quant passed the precision check.
    result = lfm2_nas("search", "--device", "local", "--budget", "500MB", "--backend", "onnx", "--sampler", "bogus", "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--sampler 'bogus'" in result.stderr and "8da4w" not in result.stderr
    assert not (tmp_path / "s.db").exists()


def test_space_sample_estimates_memory_at_the_backends_shipped_precision(lfm2_nas):
    from search_space import costs
    from lfm2.spec import ArchSpec

    result = lfm2_nas("space", "sample", "--n", "1", "--space", "small", "--context", "256", "--backend", "onnx")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[0])
    assert row["costs"] == costs.describe(ArchSpec.from_dict(row["spec"]), 256, "onnx", "int8")
