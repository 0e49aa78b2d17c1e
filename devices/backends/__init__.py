"""The backend registry: which module compiles and runs each backend.

Every backend module exposes

* `export(spec, quant, max_context, prompt_lengths, out_dir, seed) -> (files, facts)`:
  writes the model files into `out_dir` (an empty folder) and returns their names and the
  extra manifest facts (`stages_s`, `methods`, `not_delegated_ops`, ...). Time each stage
  with `devices.compile.Stages`, so a toolchain failure surfaces as a `CompileError`
  naming the stage.
* `RUNNER`: its `devices.runner.Runner` subclass, built as `RUNNER(artifact, threads)`.

and may expose

* `reference_model(spec, quant, seed)`: the eager model at the precision the artifact
  deploys (weights rounded or quantised as the artifact stores them), which the check
  against eager compares with instead of the fp32 model;
* `VERIFY_TOLERANCES`: `{quant: {"min_cosine", "top1_agreement", "max_abs_diff_rel"}}`,
  the check's bounds for that precision where they differ from `devices.compile`'s;
* `share_threads(threads)`: make the runtime run every model this process loads afterwards
  on one pool of `threads` compute threads, where by default each loaded model would get
  its own (ONNX Runtime: a pool per session). The measuring child calls it before it loads
  anything, so that the anchor timed beside a candidate does not leave its pool's threads
  competing with the candidate's.

Modules are imported only when their backend is used: `import executorch` alone costs
~355 MiB and ~7 s, which a process that only runs ONNX Runtime or eager must not pay.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from devices.artifact import Artifact, check_backend_quant
from devices.runner import Runner
from lfm2.errors import UserError

BACKEND_MODULES: dict[str, str] = {
    "eager": "devices.backends.eager",
    "executorch": "devices.backends.executorch",
    "onnx": "devices.backends.onnx",
    "llamacpp": "devices.backends.llamacpp",
}


def backend_module(backend: str) -> ModuleType:
    """Import (once) and return the module of `backend`."""
    if backend not in BACKEND_MODULES:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_MODULES)}")
    try:
        return importlib.import_module(BACKEND_MODULES[backend])
    except ModuleNotFoundError as exc:
        if exc.name == BACKEND_MODULES[backend]:
            raise UserError(f"backend {backend!r} is not available in this checkout ({exc.name} is missing)") from exc
        raise


def runner_class(backend: str) -> type[Runner]:
    module = backend_module(backend)
    cls = getattr(module, "RUNNER", None)
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise TypeError(f"{module.__name__} must define RUNNER, its Runner subclass")
    return cls


def open_runner(artifact: Artifact, threads: int | None = None) -> Runner:
    """Load `artifact` into its backend's runtime, with `threads` compute threads."""
    check_backend_quant(artifact.backend, artifact.quant)
    return runner_class(artifact.backend)(artifact, threads)


__all__ = ["BACKEND_MODULES", "backend_module", "open_runner", "runner_class"]
