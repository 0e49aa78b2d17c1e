"""`AdbTransport`: the one place that runs the `adb` program (`adb -s SERIAL push|pull|shell`).

Everything the adb agent does to a phone goes through the small `Transport` interface:
push a file, pull a file, run a shell command with a timeout, and start a long-running
shell command with pipes to it (the runner). What goes wrong with adb is turned into an
`AdbError` whose `kind` names it and whose message says what to do:

* `adb_missing`   the adb program is not on PATH
* `no_device`     no phone with that serial is attached (or it vanished)
* `unauthorized`  the phone has not accepted this computer's key
* `offline`       the phone is attached but adb cannot talk to it
* `disconnected`  the connection broke during a command (a cable pulled mid-run)
* `no_space`      the phone's storage is full
* `failed`        anything else adb or the command reported

The first four (and `disconnected`) mean "the phone is not reachable now": they are
`DeviceUnavailable`, which the agent's worker answers by putting the job back in the queue
(with a growing pause) and, if the phone stays away, finishing it with status `lost` and
the reason; a measurement is never dropped silently.
"""

from __future__ import annotations

import abc
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lfm2.errors import UserError

#: Seconds a plain adb command (getprop, ls, df) may take before it counts as a hang.
COMMAND_TIMEOUT_S = 30.0


class AdbError(UserError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class DeviceUnavailable(AdbError):
    """The phone is not reachable now (absent, unauthorised, offline, disconnected): worth
    trying the job again later; not the candidate's fault."""


_UNAVAILABLE = ("no_device", "unauthorized", "offline", "disconnected")


def classify(serial: str, stderr: str, what: str) -> AdbError | None:
    """The `AdbError` adb's own messages describe, or None when they name no adb trouble."""
    text = stderr.strip()
    low = text.lower()
    if "device unauthorized" in low:
        kind, message = "unauthorized", (
            f"phone {serial} has not authorised this computer ({what}): unlock it and accept the 'Allow USB debugging?' prompt "
            "(tick 'Always allow'); if no prompt shows, revoke USB debugging authorisations in Developer options and replug"
        )
    elif "device offline" in low:
        kind, message = "offline", f"phone {serial} is offline to adb ({what}): replug the cable, or run `adb kill-server` and `adb -s {serial} get-state`"
    elif re.search(r"device '[^']*' not found|device not found|no devices/emulators found", low):
        kind, message = "no_device", f"no phone with serial {serial} is attached ({what}): plug it in with USB debugging on; `adb devices` lists the serials"
    elif "no space left" in low:
        kind, message = "no_space", f"phone {serial} has no space left ({what}): free space on its /data partition (delete /data/local/tmp/lfm2-nas/artifacts to drop pushed models)"
    elif any(marker in low for marker in ("error: closed", "protocol fault", "connection reset", "broken pipe", "device still connecting")):
        kind, message = "disconnected", f"the connection to phone {serial} broke ({what}): check the cable; the job is tried again when it is back"
    else:
        return None
    error_class = DeviceUnavailable if kind in _UNAVAILABLE else AdbError
    return error_class(kind, f"{message}\nadb said: {text[-500:]}" if text else message)


@dataclass
class ShellResult:
    returncode: int
    stdout: str
    stderr: str


class Transport(abc.ABC):
    """How the adb agent reaches a phone (one implementation: `AdbTransport`)."""

    serial: str

    @abc.abstractmethod
    def state(self) -> str:
        """'device' when usable; raises `AdbError` (no_device, unauthorized, offline) otherwise."""

    @abc.abstractmethod
    def push(self, local: Path, remote: str, timeout_s: float | None = None) -> None: ...

    @abc.abstractmethod
    def pull(self, remote: str, local: Path, timeout_s: float | None = None) -> None: ...

    @abc.abstractmethod
    def shell(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S, check: bool = True) -> ShellResult:
        """Run `command` by the phone's shell; with `check`, a non-zero status raises `AdbError`."""

    @abc.abstractmethod
    def spawn(self, command: str) -> subprocess.Popen:
        """Start `command` on the phone with stdin/stdout/stderr pipes (text, line-buffered)."""

    def describe(self) -> dict[str, str]:
        return {"transport": "adb", "serial": self.serial}


class AdbTransport(Transport):
    """The real adb command line. `adb` is the program (default: `adb` on PATH, or $ADB)."""

    def __init__(self, serial: str, adb: str | None = None):
        if not serial or any(c.isspace() for c in serial):
            raise UserError(f"--adb needs the phone's serial as `adb devices` lists it, got {serial!r}")
        self.serial = serial
        program = adb or os.environ.get("ADB") or "adb"
        found = shutil.which(program)
        if found is None:
            raise AdbError("adb_missing", f"the adb program ({program}) is not on PATH: install Android's platform-tools (Debian/Ubuntu: apt-get install adb), or set ADB=/path/to/adb")
        self.adb = found

    def _run(self, args: list[str], what: str, timeout_s: float | None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.adb, "-s", self.serial, *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DeviceUnavailable("disconnected", f"adb did not answer within {timeout_s:g} s ({what}) for phone {self.serial}: replug it or run `adb kill-server`") from None

    def _raise_for(self, done: subprocess.CompletedProcess, what: str) -> None:
        error = classify(self.serial, f"{done.stderr}\n{done.stdout}" if done.returncode else done.stderr, what)
        if error is not None:
            raise error
        if done.returncode != 0:
            raise AdbError("failed", f"{what} on phone {self.serial} failed (status {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")

    def state(self) -> str:
        done = self._run(["get-state"], "get-state", COMMAND_TIMEOUT_S)
        self._raise_for(done, "get-state")
        state = done.stdout.strip()
        if state != "device":
            raise classify(self.serial, state, "get-state") or AdbError("failed", f"phone {self.serial} is in state {state!r}, not 'device'")
        return state

    def push(self, local: Path, remote: str, timeout_s: float | None = None) -> None:
        done = self._run(["push", str(local), remote], f"push {Path(local).name}", timeout_s)
        self._raise_for(done, f"push {Path(local).name} to {remote}")

    def pull(self, remote: str, local: Path, timeout_s: float | None = None) -> None:
        done = self._run(["pull", remote, str(local)], f"pull {remote}", timeout_s)
        self._raise_for(done, f"pull {remote}")

    def shell(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S, check: bool = True) -> ShellResult:
        done = self._run(["shell", command], f"shell {command.split()[0] if command.split() else ''}", timeout_s)
        if done.returncode != 0:
            # adb's own failures (no device, unauthorised, a broken connection) come first;
            # a command's failure is the caller's to judge, unless it asked us to check
            error = classify(self.serial, done.stderr, f"shell {command.split()[0] if command.split() else ''}")
            if error is not None and (isinstance(error, DeviceUnavailable) or check):
                raise error
            if check:
                raise AdbError("failed", f"`{command[:200]}` on phone {self.serial} exited with status {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
        return ShellResult(done.returncode, done.stdout, done.stderr)

    def spawn(self, command: str) -> subprocess.Popen:
        return subprocess.Popen(
            [self.adb, "-s", self.serial, "shell", command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
        )  # fmt: skip


__all__ = ["AdbTransport", "Transport", "AdbError", "DeviceUnavailable", "ShellResult", "classify", "COMMAND_TIMEOUT_S"]
