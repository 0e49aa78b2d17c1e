"""Exit statuses: bad input exits 2, a failed environment exits 4 with its own message.

The two entry points that decide exit statuses (`lfm2-nas` = `nas.cli.main`, and
`python -m devices.agent`) both go through `lfm2.errors.exit_with`; these tests run them as
a user does and check status and message, plus the class -> status table in one place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.agent.client import AgentAuthError, AgentRejected, AgentUnreachable, JobLost, JobTimeout
from devices.agent.jobs import StoreUnavailable
from devices.agent.local import AgentStartError
from devices.agent.service import WorkdirLocked
from devices.compile import CachedCompileError, CompileError, CompileInputError, VerificationError
from lfm2.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EnvironmentFailure, LfmNasError, UserError
from lfm2.spec import SpecError

ENVIRONMENT_MARK = "not a problem with your input"


@pytest.mark.parametrize(
    "error, status",
    [
        (SpecError("d_model must be ..."), EXIT_BAD_INPUT),
        (CompileInputError("inputs", "prompt length 128 does not fit"), EXIT_BAD_INPUT),
        (AgentAuthError("the agent refused the token"), EXIT_BAD_INPUT),
        (AgentUnreachable("agent x is unreachable"), EXIT_ENVIRONMENT),
        (JobTimeout("no result in 60 s"), EXIT_ENVIRONMENT),
        (JobLost("the agent no longer knows job 1"), EXIT_ENVIRONMENT),
        (AgentRejected("the agent answered 503", 503), EXIT_ENVIRONMENT),
        (StoreUnavailable("the job database is read-only"), EXIT_ENVIRONMENT),
        (AgentStartError("the agent did not start"), EXIT_ENVIRONMENT),
        (WorkdirLocked("another agent serves it"), EXIT_ENVIRONMENT),
        (CompileError("lower", "the toolchain raised an error"), EXIT_ENVIRONMENT),
        (CachedCompileError("lower", "failed before"), EXIT_ENVIRONMENT),
        (VerificationError("logits disagree", {}), EXIT_ENVIRONMENT),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_each_error_has_one_exit_status(error, status):
    assert isinstance(error, LfmNasError) and error.exit_code == status
    # Bad input is a ValueError (as it always was); a failed environment is not bad input.
    assert isinstance(error, UserError) == (status == EXIT_BAD_INPUT)
    assert isinstance(error, EnvironmentFailure) == (status == EXIT_ENVIRONMENT) or isinstance(error, (AgentAuthError, CompileInputError))


def test_bad_input_exits_2_with_error(lfm2_nas, tmp_path):
    result = lfm2_nas("bench", "no-such-preset", cwd=tmp_path, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert result.stderr.startswith("error:") and "neither a preset" in result.stderr
    assert ENVIRONMENT_MARK not in result.stderr


@pytest.fixture
def registry(tmp_path, lfm2_nas):
    """A device registry with `gone`: an agent address nothing listens on (port 9, discard)."""
    env = {"LFM2_NAS_CONFIG": str(tmp_path / "devices.toml"), "LFM2_NAS_CACHE": str(tmp_path / "cache")}
    token = tmp_path / "gone.token"
    token.write_text("a-token-nobody-checks\n")
    token.chmod(0o600)
    added = lfm2_nas("devices", "add", "gone", "--url", "http://127.0.0.1:9", "--token-file", token, cwd=tmp_path, env=env, timeout=120)
    assert added.returncode == 0, added.stderr
    return env, token


def test_unreachable_device_exits_4_not_2(lfm2_nas, tmp_path, registry):
    env, _ = registry
    result = lfm2_nas("search", "--device", "gone", "--budget", "1GB", "--trials", "1", "--study", "s", cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == EXIT_ENVIRONMENT, result.stderr
    assert result.stderr.startswith("failed:") and "unreachable" in result.stderr and ENVIRONMENT_MARK in result.stderr
    assert not (tmp_path / "lfm2-nas.db").exists()  # refused before anything was created


def test_missing_token_of_a_device_is_bad_input(lfm2_nas, tmp_path, registry):
    env, token = registry
    token.unlink()
    result = lfm2_nas("search", "--device", "gone", "--budget", "1GB", "--trials", "1", "--study", "s", cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "token" in result.stderr and ENVIRONMENT_MARK not in result.stderr


def test_agent_entry_point_exits_4_when_its_workdir_is_taken(tmp_path):
    """`python -m devices.agent` (what `start_local_agent` runs) follows the same rule."""
    workdir, ready = tmp_path / "work", tmp_path / "ready.json"
    command = [sys.executable, "-m", "devices.agent", "serve", "--port", "0", "--workdir", str(workdir)]
    first = subprocess.Popen([*command, "--name", "first", "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), "the first agent did not start"
        second = subprocess.run([*command, "--name", "second"], capture_output=True, text=True, timeout=120)
        assert second.returncode == EXIT_ENVIRONMENT, second.stderr
        assert "failed:" in second.stderr and "another agent" in second.stderr and ENVIRONMENT_MARK in second.stderr
    finally:
        first.terminate()
        first.wait(timeout=60)


def test_agent_entry_point_exits_2_on_bad_input_before_serving(tmp_path):
    """A unit-less size is bad input there too (500 would be 500 bytes): refused, nothing served."""
    for flag in ("--memory-limit", "--max-upload"):
        result = subprocess.run([sys.executable, "-m", "devices.agent", "serve", "--name", "x", "--port", "0", "--workdir", str(tmp_path / "w"), flag, "500"], capture_output=True, text=True, timeout=120)
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        assert result.stderr.startswith("error:") and flag in result.stderr and "no unit" in result.stderr


def test_local_agents_pass_byte_counts_with_a_unit(tmp_path):
    from devices.agent.local import agent_command

    command = agent_command("a", tmp_path, tmp_path / "t", tmp_path / "r", memory_limit=3 << 30, max_upload="64MiB")
    assert command[command.index("--memory-limit") + 1] == f"{3 << 30}B" and command[command.index("--max-upload") + 1] == "64MiB"


def test_exit_codes_are_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "exit status 4" in readme.lower() and "exit status 2" in readme.lower()
