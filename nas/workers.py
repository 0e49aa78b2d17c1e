"""The work the search hands to Ray: compile tasks, quality tasks, one actor per device.

Workers return plain data (dicts of JSON types); only the driver talks to the study.
Each task pins itself to the worker cores it is given, so that on a machine that is also
the device being measured, compiles and training never share the measured cores.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import ray


def _pin(cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))
        try:
            import torch

            torch.set_num_threads(len(cpus))
        except ImportError:
            pass


def _failure(stage: str, exc: BaseException) -> dict[str, Any]:
    tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-12:]
    return {"ok": False, "stage": stage, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": "\n".join(tail)}


@ray.remote(max_retries=0)
def compile_candidate(spec: dict, backend: str, quant: str, max_context: int, prompt_lengths: list[int], cpus: list[int] | None) -> dict[str, Any]:
    """Compile (or fetch from the artifact cache) one candidate; never raises."""
    _pin(cpus)
    started = time.perf_counter()
    try:
        from devices.compile import compile as compile_artifact
        from lfm2.spec import ArchSpec

        artifact = compile_artifact(ArchSpec.from_dict(spec), backend, quant, max_context, tuple(prompt_lengths))
        return {
            "ok": True,
            "path": str(artifact.path),
            "key": artifact.key,
            "bytes": artifact.size_bytes,
            "stages_s": artifact.manifest.get("stages_s", {}),
            "wall_s": time.perf_counter() - started,
        }
    except Exception as exc:
        result = _failure("compile", exc)
        result["wall_s"] = time.perf_counter() - started
        return result


@ray.remote(max_retries=0)
def score_quality(spec: dict, kind: str, device: str, settings: str, seed: int, cpus: list[int] | None) -> dict[str, Any]:
    """Train and score the candidate's quality proxy; never raises."""
    if device == "cpu":
        _pin(cpus)
    started = time.perf_counter()
    try:
        from lfm2.spec import ArchSpec
        from nas.quality import QualitySettings, score

        preset = getattr(QualitySettings, settings)()
        result = score(ArchSpec.from_dict(spec), kind, device=device, settings=preset, seed=seed)
        return {"ok": True, "score": result.score, "detail": result.to_dict(), "wall_s": time.perf_counter() - started}
    except Exception as exc:
        result = _failure("quality", exc)
        result["wall_s"] = time.perf_counter() - started
        return result


@ray.remote(num_cpus=0, max_concurrency=1, max_restarts=0)
class DeviceActor:
    """Owns one agent connection and runs one measurement at a time (max_concurrency=1):
    Ray queues the calls, so the device takes the next artifact the moment it is free."""

    def __init__(self, url: str, token: str, name: str | None = None):
        from devices.agent.client import AgentClient

        self.client = AgentClient(url, token, name=name)
        self.busy_s = 0.0

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def measure(self, artifact_path: str, protocol: dict, job_id: str, timeout_s: float) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            from devices.artifact import Artifact
            from devices.protocol import Protocol

            measurement = self.client.measure(Artifact.load(artifact_path), Protocol.from_dict(protocol), job_id=job_id, timeout=timeout_s)
            return {"ok": True, "measurement": measurement.to_dict(), "wall_s": time.perf_counter() - started}
        except Exception as exc:
            result = _failure("measure", exc)
            result["wall_s"] = time.perf_counter() - started
            return result
        finally:
            self.busy_s += time.perf_counter() - started

    def busy_seconds(self) -> float:
        return self.busy_s


__all__ = ["compile_candidate", "score_quality", "DeviceActor"]
