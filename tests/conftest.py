"""Shared pytest plumbing.

`figures`: a scenario records what it did (jobs, faults injected, inputs tried, losses)
with `figures("network cut", jobs=3, faults=2, losses=0)`; the terminal summary prints
the records under "reliability figures", so a CI log shows the numbers behind a pass.
Records of one scenario (e.g. from a parametrized test) are added up field by field.

`lfm2_nas`: runs the installed `lfm2-nas` script in a subprocess, the way a user does:
`lfm2_nas("study", "list", cwd=tmp_path, env={"LFM2_NAS_CONFIG": ...}, timeout=300)`
(arguments go through `str`; `env` adds to this process's environment).

`small_disk_agent`: an agent process whose workdir is a 5 MiB tmpfs (test_reliability_disk.py,
test_reliability_security.py); skip where `testkit.reliability.can_mount_tmpfs()` is false.

Plain helpers that several test modules share are in the `testkit` package (tests/testkit/);
test modules import it, never each other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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


@pytest.fixture
def small_disk_agent(tmp_path):
    """An agent whose workdir is a 5 MiB tmpfs in a private user+mount namespace; yields
    (url, token, workdir, run-a-command-in-its-namespace)."""
    from testkit.reliability import isolated_env  # here, not at the top: conftest.py imports no product code for every test

    store = tmp_path / "store"
    store.mkdir()
    token = "disk-full-reliability-token"
    (tmp_path / "token").write_text(token)
    (tmp_path / "token").chmod(0o600)
    serve = [sys.executable, "-m", "devices.agent", "serve", "--name", "small-disk", "--port", "0", "--workdir", str(store), "--exit-with-parent"]
    serve += ["--token-file", str(tmp_path / "token"), "--ready-file", str(tmp_path / "ready.json"), "--max-upload", "64MiB", "--threads", "1"]
    script = f"mount -t tmpfs -o size=5m tmpfs {store} && exec " + " ".join(serve)
    with open(tmp_path / "agent.log", "wb") as log:
        process = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=isolated_env(tmp_path))

    def inside(*command: str) -> subprocess.CompletedProcess:  # the tmpfs is visible in the agent's namespace only
        return subprocess.run(["nsenter", "-t", str(process.pid), "-U", "-m", "--preserve-credentials", *command], capture_output=True, text=True, timeout=60)

    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.1)
        yield json.loads((tmp_path / "ready.json").read_text())["url"], token, store, inside
    finally:
        process.terminate()
        process.wait(30)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for scenario, numbers in _FIGURES.items():
        terminalreporter.write_line(f"{scenario}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in numbers.items()))
