"""The CLI starts without the heavy libraries: `lfm2-nas --help` (and every command's
registration) must not import torch, ExecuTorch, ONNX Runtime, Ray or transformers; they load
when the command that needs them runs. Checked by what is imported, not by a timing."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "executorch", "onnxruntime", "torchao", "ray", "transformers")


def test_help_imports_none_of_the_heavy_libraries():
    code = (
        "import sys\n"
        "from nas import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        f"loaded = [name for name in {HEAVY!r} if name in sys.modules]\n"
        "assert not loaded, f'--help imported {loaded}'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "search" in done.stdout and "bench" in done.stdout  # every command is still listed


def test_the_lazy_package_names_still_resolve():
    import devices
    import nas.quality

    assert callable(devices.compile) and callable(devices.measure)  # functions, not the submodules
    assert devices.Protocol().max_context > 0 and callable(devices.open_runner)
    assert nas.quality.QualitySettings.default() is not None and "mad" in nas.quality.KINDS
    assert set(devices.__all__) <= set(dir(devices)) | set(devices._LAZY)
