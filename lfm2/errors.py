"""The errors every part of lfm2-nas raises on purpose, in two kinds that a user must tell
apart, and the one rule that turns them into an exit status.

* `UserError` (a `ValueError`): bad input (a flag, a file, a spec). Exit status 2
  (`EXIT_BAD_INPUT`); the message names the problem and says how to fix the input.
* `EnvironmentFailure` (a `RuntimeError`): the input was fine but something around it
  failed (an agent that cannot be reached, a database that cannot be written, a toolchain
  that crashed). Exit status 4 (`EXIT_ENVIRONMENT`); running the same command again once
  the environment is fixed can succeed, so scripts may retry on 4 and must not on 2.

Both derive from `LfmNasError`, so a caller that wants "anything lfm2-nas raised on
purpose" catches that. Exit statuses 1 and 3 keep their command-specific meanings
(`pick`: nothing meets the limits; `bench`: the measurement failed; `train`: not finished).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 4


class LfmNasError(Exception):
    """An error lfm2-nas raised on purpose; `exit_code` is the CLI's exit status for it."""

    exit_code = 1
    label = "error"


class UserError(LfmNasError, ValueError):
    """Bad input from a user (a flag, a file, a spec): say what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT
    label = "error"


class EnvironmentFailure(LfmNasError, RuntimeError):
    """The request was valid but the environment failed it (network, disk, a service, a
    toolchain): say what failed and what to check; the same command may succeed later."""

    exit_code = EXIT_ENVIRONMENT
    label = "failed"


def exit_with(exc: LfmNasError, write: Callable[[str], None] | None = None) -> None:
    """Print `exc` as the CLI shows it and exit with its status (the one rule every entry
    point follows: `nas.cli.main`, `python -m devices.agent`)."""
    hint = "" if isinstance(exc, UserError) else " (not a problem with your input: fix the environment and run the command again)"
    message = f"{exc.label}: {exc}{hint}"
    if write is None:
        print(message, file=sys.stderr)
    else:
        write(message)
    sys.exit(exc.exit_code)


__all__ = ["LfmNasError", "UserError", "EnvironmentFailure", "EXIT_BAD_INPUT", "EXIT_ENVIRONMENT", "exit_with"]
