"""What the search's workers hand back to the driver, typed: a compile, a measurement on one
device, a quality score. Each crosses Ray as a plain dict (`to_dict`; a worker of another
version, or a result from the cache, reads back with `from_dict`, which ignores keys it does
not know), and the driver works on the dataclass.

A failed stage is an outcome with `ok=False` and an `error` sentence, never an exception:
a compile that failed is a `CompileOutcome`, not a measurement with a made-up status (the
trial's status `compile_error` is decided where the trial is recorded, `nas.search`).
"""

from __future__ import annotations

import traceback as _traceback
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Self

#: The longest error sentence kept (a traceback's tail is in `traceback`).
MAX_ERROR_CHARS = 2000


@dataclass
class _Outcome:
    ok: bool = False
    error: str | None = None
    traceback: str | None = None
    wall_s: float = 0.0

    stage: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})

    @classmethod
    def failed(cls, error: str, wall_s: float = 0.0, tb: str | None = None) -> Self:
        """The outcome of a stage that did not produce its result (`error` says why)."""
        return cls(ok=False, error=error[:MAX_ERROR_CHARS], traceback=tb, wall_s=wall_s)

    @classmethod
    def from_exception(cls, exc: BaseException, wall_s: float) -> Self:
        tail = "".join(_traceback.format_exception(exc)).strip().splitlines()[-12:]
        return cls.failed(f"{type(exc).__name__}: {exc}", wall_s, "\n".join(tail))


@dataclass
class CompileOutcome(_Outcome):
    """`nas.workers.compile_candidate`: where the artifact is and what it is."""

    path: str | None = None  # on the compile node: readable there only
    node: str | None = None  # the Ray node that compiled it
    bundle_sha256: str | None = None  # only when the bundle travels to another node
    key: str | None = None
    bytes: int | None = None
    stages_s: dict[str, float] = field(default_factory=dict)
    measured_from: str | None = None  # the copy the (first) device actor read; set by the driver

    stage: ClassVar[str] = "compile"

    #: what a trial's `artifact` attr keeps of it (with the backend and quant)
    ARTIFACT_FIELDS: ClassVar[tuple[str, ...]] = ("key", "path", "node", "bundle_sha256", "measured_from", "bytes", "stages_s")

    def artifact_attr(self, backend: str, quant: str) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.ARTIFACT_FIELDS} | {"backend": backend, "quant": quant}


@dataclass
class MeasureOutcome(_Outcome):
    """`nas.workers.DeviceActor.measure`: the device's `Measurement` (as a dict: its own
    status says whether the device ran it: ok, oom, timeout, error), or `ok=False` when the
    measurement never came back (the agent or the actor was lost)."""

    measurement: dict[str, Any] | None = None
    local_path: str | None = None  # the artifact copy the actor read
    received_s: float = 0.0

    stage: ClassVar[str] = "measure"


@dataclass
class QualityOutcome(_Outcome):
    """`nas.workers.score_quality` (or the free signal scored in the driver)."""

    score: float | None = None
    detail: dict[str, Any] | None = None

    stage: ClassVar[str] = "quality"


__all__ = ["CompileOutcome", "MeasureOutcome", "QualityOutcome", "MAX_ERROR_CHARS"]
