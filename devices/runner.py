"""`Runner`: one loaded artifact, ready to prefill and decode. Each backend provides one.

The measurement protocol and the check against eager talk to every runtime through this
interface only, so that numbers from ExecuTorch, ONNX Runtime and eager are comparable.
The decode state lives inside the runner: `prefill` starts from an empty state at
position 0, `decode` continues from whatever state the runner holds. Decode latency
does not depend on the state's values, so a decode at depth C may follow a `reset()`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from devices.artifact import Artifact

if TYPE_CHECKING:
    import numpy as np


class Runner(abc.ABC):
    def __init__(self, artifact: Artifact, threads: int | None = None):
        self.artifact = artifact
        self.threads = threads

    @abc.abstractmethod
    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        """tokens int64 [1, T] with T one of `artifact.prompt_lengths`; from an empty state
        at position 0. Returns the last position's logits [1, vocab]; keeps the new state."""

    @abc.abstractmethod
    def decode(self, token: np.ndarray, pos: int) -> np.ndarray:
        """token int64 [1, 1] at absolute position `pos` (< artifact.max_context). Returns
        logits [1, vocab]; the runner's state becomes the state after this token."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Drop the state: the next decode sees an empty (zero) state."""

    def stack(self) -> dict:
        """Facts about the runtime this runner uses (versions, delegate, threads)."""
        return {"backend": self.artifact.backend, "threads": self.threads}

    def close(self) -> None:  # noqa: B027 - optional: a runner with nothing to release keeps this
        """Release what the runtime holds (sessions, mapped files); nothing by default."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Runner"]
