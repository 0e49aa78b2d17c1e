"""`RunnerSession`: one `lfm2-runner` process on the phone, driven line by line over adb.

The host writes a command, the runner answers one JSON line (see lfm2_runner.cpp). Times in
the answers are the phone's own: the round trip over USB is not in them. Every answer is
awaited with a deadline; when the runner's output ends, the session tells a phone that went
away (`DeviceUnavailable`, kind `disconnected`) from a runner that died (`RunnerDied`, with
its exit status and stderr: 137 / SIGKILL on a phone is most often Android's low-memory
killer).
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from typing import Any

from devices.adb.transport import AdbError, DeviceUnavailable, Transport


class RunnerError(Exception):
    """The runner answered a command with an error (llama.cpp refused something)."""


class RunnerDied(Exception):
    def __init__(self, message: str, returncode: int | None, stderr: str):
        super().__init__(message)
        self.returncode, self.stderr = returncode, stderr

    @property
    def killed(self) -> bool:
        return self.returncode in (137, -9)


class RunnerTimeout(Exception):
    pass


class RunnerSession:
    def __init__(self, transport: Transport, command: str):
        self.transport = transport
        self.process: subprocess.Popen = transport.spawn(command)
        if self.process.stdin is None or self.process.stdout is None or self.process.stderr is None:
            raise TypeError(f"{type(transport).__name__}.spawn must start the runner with stdin, stdout and stderr pipes (subprocess.PIPE)")
        self._stdin, self._stdout, self._stderr_stream = self.process.stdin, self.process.stdout, self.process.stderr
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self.pid: int | None = None
        threading.Thread(target=self._pump, args=(self._stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._collect_stderr, daemon=True).start()

    @staticmethod
    def _pump(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    def _collect_stderr(self) -> None:
        for line in self._stderr_stream:
            self._stderr.append(line)
            del self._stderr[:-200]

    def stderr_tail(self, chars: int = 2000) -> str:
        return "".join(self._stderr)[-chars:]

    def _ended(self, what: str) -> Exception:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        returncode = self.process.poll()
        time.sleep(0.05)  # the stderr reader's last lines
        stderr = self.stderr_tail()
        try:
            self.transport.state()
        except DeviceUnavailable as gone:
            return DeviceUnavailable("disconnected", f"the phone went away while the runner was {what}: {gone}")
        except AdbError:
            pass
        return RunnerDied(f"the runner ended (status {returncode}) while {what}; its stderr ends with:\n{stderr}", returncode, stderr)

    def read(self, what: str, timeout_s: float) -> dict[str, Any]:
        """The next JSON answer within `timeout_s`; lines that are not JSON objects (a
        runtime's chatter on stdout) are skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunnerTimeout(f"the runner gave no answer within {timeout_s:g} s while {what}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)  # keep the end visible to later reads
                raise self._ended(what)
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(answer, dict):
                continue
            if "error" in answer:
                raise RunnerError(str(answer["error"])[:2000])
            return answer

    def request(self, command: str, timeout_s: float) -> dict[str, Any]:
        try:
            self._stdin.write(command + "\n")
            self._stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._ended(f"sent `{command}`") from None
        return self.read(f"running `{command}`", timeout_s)

    def close(self, kill_remote: bool = True) -> None:
        """Ask the runner to quit; make sure it is gone (on the phone too) and reap adb."""
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self._stdin.write("quit\n")
            self._stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            if kill_remote and self.pid:
                with contextlib.suppress(AdbError):
                    self.transport.shell(f"kill -9 {int(self.pid)} 2>/dev/null", timeout_s=10, check=False)
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)


__all__ = ["RunnerSession", "RunnerError", "RunnerDied", "RunnerTimeout"]
