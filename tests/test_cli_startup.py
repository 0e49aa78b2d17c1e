"""The CLI starts without the heavy libraries: `lfm2-nas --help` (of the tool and of every
command) and `presets` import neither torch, Optuna, Ray nor the other libraries a command
loads only when it runs (they cost 3-5 s of start-up before). Checked on `sys.modules` in a
fresh interpreter, never on a time."""

from __future__ import annotations

import json
import subprocess
import sys

#: What a command imports only when it runs (each costs from ~0.1 s to seconds at import).
HEAVY = ("torch", "optuna", "ray", "fastapi", "uvicorn", "numpy", "pandas", "httpx", "plotly", "psutil", "onnxruntime", "executorch", "transformers", "scipy")

# Runs `lfm2-nas ARGS` through its entry point (`nas.cli:main`, what the installed script
# calls) in this fresh interpreter, then prints the heavy modules it left in `sys.modules`.
_PROBE = """
import contextlib, io, json, sys
from nas.cli import main
runs = json.loads(sys.argv[1])
loaded = {}
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code in (0, None), (argv, exc.code)
    loaded[" ".join(argv)] = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
print(json.dumps(loaded))
"""


def _heavy_modules_after(runs: list[list[str]]) -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(runs), json.dumps(HEAVY)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _commands() -> list[list[str]]:
    """Every command path of the app (`search`, `study list`, ...), read from typer's tree."""
    import typer

    from nas.cli import _register_commands, app

    _register_commands()
    paths: list[list[str]] = []

    def walk(command, prefix: list[str]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, [*prefix, name])
        else:
            paths.append(prefix)

    walk(typer.main.get_command(app), [])
    return paths


def test_help_imports_no_heavy_module(lfm2_nas):
    result = lfm2_nas("--help")
    assert result.returncode == 0 and "search" in result.stdout and "presets" in result.stdout
    assert _heavy_modules_after([["--help"]]) == {"--help": []}


def test_every_commands_help_imports_no_heavy_module():
    commands = _commands()
    assert ["search"] in commands and ["study", "list"] in commands and len(commands) > 15
    loaded = _heavy_modules_after([[*command, "--help"] for command in commands])
    assert {run: modules for run, modules in loaded.items() if modules} == {}


def test_presets_counts_parameters_without_torch(lfm2_nas):
    """`presets` shows each preset's parameter count from the spec (`lfm2.flops.parameters`),
    the count the model itself has."""
    assert _heavy_modules_after([["presets"], ["presets", "--json"]]) == {"presets": [], "presets --json": []}
    result = lfm2_nas("presets", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    from lfm2 import build_model, count_parameters, presets

    assert {row["name"] for row in rows} == set(presets)
    for row in rows:
        assert row["parameters"] == count_parameters(build_model(presets[row["name"]], device="meta")), row["name"]


def test_the_lazy_package_names_still_resolve():
    import devices
    import devices.agent
    import nas.quality
    import reports
    import search_space

    assert callable(devices.compile) and callable(devices.measure)  # functions, not the submodules
    assert devices.Protocol().max_context > 0 and callable(devices.open_runner)
    assert nas.quality.QualitySettings.default() is not None and "mad" in nas.quality.KINDS
    for package in (devices, devices.agent, reports, search_space):
        assert set(package.__all__) <= set(dir(package)) | set(package._LAZY) | {"costs"}, package.__name__
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    assert search_space.SearchSpace.load("small").contains is not None and callable(search_space.costs.parameters)


def test_an_export_named_as_its_submodule_stays_the_export_whatever_is_imported_first():
    # `import reports.pick` binds the module to `reports.pick`; a random test order made
    # `from reports import pick` the module in one run and the function in another
    code = (
        "import devices.compile, devices.measure, reports.pick\n"
        "import devices, reports\n"
        "from reports import pick\n"
        "assert callable(pick) and pick is reports.pick and pick.__module__ == 'reports.pick', pick\n"
        "assert callable(devices.compile) and callable(devices.measure), (devices.compile, devices.measure)\n"
        "from reports.pick import Limits\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
