"""Shared pytest plumbing.

`figures`: a scenario records what it did (jobs, faults injected, inputs tried, losses)
with `figures("network cut", jobs=3, faults=2, losses=0)`; the terminal summary prints
the records under "reliability figures", so a CI log shows the numbers behind a pass.
Records of one scenario (e.g. from a parametrized test) are added up field by field.

`lfm2_nas`: runs the installed `lfm2-nas` script in a subprocess, the way a user does:
`lfm2_nas("study", "list", cwd=tmp_path, env={"LFM2_NAS_CONFIG": ...}, timeout=300)`
(arguments go through `str`; `env` adds to this process's environment).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_FIGURES: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="session")
def figures():
    def record(scenario: str, **numbers: object) -> None:
        totals = _FIGURES.setdefault(scenario, {})
        for key, value in numbers.items():
            summable = isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(totals.get(key), (int, float))
            totals[key] = totals[key] + value if summable else value

    return record


@pytest.fixture
def private_core_locks(tmp_path_factory, monkeypatch):
    """Measurements lock their cores host-wide; tests that assert no timing take locks of
    their own instead of queueing behind other suites' measurements (use it with
    `pytestmark = pytest.mark.usefixtures("private_core_locks")`)."""
    monkeypatch.setenv("LFM2_NAS_LOCKS", str(tmp_path_factory.getbasetemp() / "core-locks"))


def run_lfm2_nas(*args: object, cwd: str | Path | None = None, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`lfm2-nas ARGS...` as a user runs it (the script of this venv), output captured."""
    exe = shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"
    environment = {**os.environ, **env} if env is not None else None
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lfm2_nas():
    """The `lfm2-nas` script in a subprocess: see `run_lfm2_nas`."""
    return run_lfm2_nas


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for scenario, numbers in _FIGURES.items():
        terminalreporter.write_line(f"{scenario}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in numbers.items()))
