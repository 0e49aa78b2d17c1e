"""The work the search hands to Ray: compile tasks, quality tasks, one actor per device.

Workers return typed outcomes (`nas.results`), as plain dicts over Ray (`to_dict`); only
the driver talks to the study.
A task that runs on the driver's node (the "home" node, where the device actors live)
pins itself to the worker cores it is given, so that on a machine that is also the device
being measured, compiles and training never share the measured cores; on any other node
those core numbers mean nothing and it runs unpinned.

Artifacts travel through Ray, not a shared disk: a compile that ran on another node also
returns its artifact's bundle (devices.agent.bundle) as bytes in Ray's object store, and
the device actor materialises it in its own node's cache under the bundle's sha256,
verified file by file against the manifest, before it uploads it to the agent. Once every
device has measured it, the driver has the copy discarded (`discard_received`): the agent
keeps its own copy by sha256, and the compile node keeps the original.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from nas.results import CompileOutcome, MeasureOutcome, QualityOutcome

#: Where a device actor keeps the artifacts it received from other nodes, by bundle sha256.
RECEIVED_DIR = "received"


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _pin(cpus: list[int] | None, home_node: str | None = None) -> None:
    # Core numbers are the home node's: elsewhere they would pin to unrelated (or absent) cores.
    if cpus and (home_node is None or home_node == _node_id()):
        os.sched_setaffinity(0, set(cpus))
        try:
            import torch

            torch.set_num_threads(len(cpus))
        except ImportError:
            pass


# num_returns=2: the small summary the driver reads, and the bundle bytes it never reads
# (it only hands their reference to the device actor). max_retries: the task never raises,
# so Ray retries it only when its worker or node died; that also lets Ray rebuild a lost
# bundle by running the compile again (lineage reconstruction).
@ray.remote(num_returns=2, max_retries=3)
def compile_candidate(
    spec: dict, backend: str, quant: str, max_context: int, prompt_lengths: list[int], cpus: list[int] | None, home_node: str | None = None
) -> tuple[dict[str, Any], bytes | None]:
    """Compile (or fetch from the artifact cache) one candidate; never raises.

    Returns (a `CompileOutcome` as a dict, bundle): on the home node the bundle is None (the
    device actor reads the folder at its `path`); on any other node it is the artifact's
    bundle bytes."""
    _pin(cpus, home_node)
    started = time.perf_counter()
    try:
        from devices.agent.bundle import bundle_bytes
        from devices.compile import compile as compile_artifact
        from lfm2.spec import ArchSpec

        artifact = compile_artifact(ArchSpec.from_dict(spec), backend, quant, max_context, tuple(prompt_lengths))
        node = _node_id()
        sha = bundle = None  # on the home node the actor reads the folder (and hashes it to upload)
        if home_node is not None and node != home_node:
            sha, bundle = bundle_bytes(artifact)
        outcome = CompileOutcome(ok=True, path=str(artifact.path), node=node, bundle_sha256=sha, key=artifact.key, bytes=artifact.size_bytes,
                                 stages_s=artifact.manifest.get("stages_s", {}), wall_s=time.perf_counter() - started)
        return outcome.to_dict(), bundle
    except Exception as exc:
        return CompileOutcome.from_exception(exc, time.perf_counter() - started).to_dict(), None


def materialise(compiled: dict[str, Any], bundle: list, cache_dir: Path | None = None, timeout_s: float | None = None) -> Path:
    """The local folder of the artifact `compiled` describes.

    On the node that compiled it, that is its own folder. Elsewhere it is
    `<cache>/received/<bundle sha256>`: reused if present, else fetched from Ray's object
    store (`bundle` holds the reference, wrapped in a list so that Ray does not fetch it
    before we know we need it), checked against the sha256 the compile reported, and
    unpacked with `extract_bundle` (which verifies every file against the manifest).
    `timeout_s` bounds the wait for a bundle Ray is rebuilding (its node died), so that a
    rebuild that cannot run (no node offers the compile resource any more) fails this one
    measurement instead of stalling the device."""
    from devices.agent.bundle import extract_bundle
    from devices.artifact import Artifact, ArtifactError
    from devices.compile import default_cache_dir

    if compiled.get("node") == _node_id() or not bundle or bundle[0] is None:
        return Path(compiled["path"])
    sha = compiled["bundle_sha256"]
    received = Path(cache_dir or default_cache_dir()) / RECEIVED_DIR
    target = received / sha
    if (target / "manifest.json").is_file():
        try:
            Artifact.load(target, verify=True)
            return target
        except ArtifactError:
            shutil.rmtree(target, ignore_errors=True)  # damaged on this disk: fetch it again
    data = ray.get(bundle[0], timeout=timeout_s)
    if data is None:
        # The compile node died after the compile and Ray rebuilt the bundle by running the
        # compile again (lineage), this time on this node: the artifact is in our own cache.
        return _rebuilt_here(compiled)
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise ArtifactError(f"the bundle of artifact {compiled.get('key')} arrived with sha256 {got[:12]}..., the compile reported {sha[:12]}...: damaged in transit, or compiled again (its node died) into different bytes; run the search again")
    received.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=received))
    try:
        tar = staging / "bundle.tar"
        tar.write_bytes(data)
        del data
        extract_bundle(tar, staging / "artifact")
        try:
            os.rename(staging / "artifact", target)  # atomic: a folder under its sha is complete
        except OSError:
            if not (target / "manifest.json").is_file():  # not another actor winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def discard_received(path: str) -> bool:
    """Remove `path` if it is a copy under `<cache>/received/` (never a compile's own
    folder); True when it was one."""
    folder = Path(path)
    if folder.parent.name != RECEIVED_DIR or not (folder / "manifest.json").is_file():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


@ray.remote(max_retries=0)
def score_quality(spec: dict, kind: str, device: str, settings: str, seed: int, cpus: list[int] | None, home_node: str | None = None) -> dict[str, Any]:
    """Train and score the candidate's quality proxy; never raises. A `QualityOutcome` as a dict."""
    if device == "cpu":
        _pin(cpus, home_node)
    started = time.perf_counter()
    try:
        from lfm2.spec import ArchSpec
        from nas.quality import QualitySettings, score

        preset = QualitySettings.named(settings)
        result = score(ArchSpec.from_dict(spec), kind, device=device, settings=preset, seed=seed)
        return QualityOutcome(ok=True, score=result.score, detail=result.to_dict(), wall_s=time.perf_counter() - started).to_dict()
    except Exception as exc:
        return QualityOutcome.from_exception(exc, time.perf_counter() - started).to_dict()


def _rebuilt_here(compiled: dict[str, Any]) -> Path:
    from devices.artifact import Artifact, ArtifactError
    from devices.compile import default_cache_dir

    # Same key, same compile request; an export need not give the same bytes twice, so the
    # first bundle's sha256 is not required, only the manifest's own file hashes.
    path = default_cache_dir() / "artifacts" / compiled["key"]
    if not (path / "manifest.json").is_file():
        raise ArtifactError(f"artifact {compiled['key']} was to be compiled again on this node, but {path} does not hold it; run the search again")
    Artifact.load(path, verify=True)
    return path


class _DeviceActor:
    """Owns one agent connection and runs one measurement at a time (started with max_concurrency=1):
    Ray queues the calls, so the device takes the next artifact the moment it is free."""

    def __init__(self, url: str, token: str, name: str | None = None):
        from devices.agent.client import AgentClient

        self.client = AgentClient(url, token, name=name)
        self.busy_s = 0.0

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def measure(self, compiled: dict[str, Any], bundle: list, protocol: dict, job_id: str, timeout_s: float, anchor: tuple[dict[str, Any], list] | None = None) -> dict[str, Any]:
        """Measure the artifact `compiled` describes (a compile_candidate summary; `bundle`
        is [its bundle's ObjectRef or None]). The agent keeps artifacts by sha256, so the
        client sends the bundle only if the agent does not have it yet. `anchor`: the
        anchor's (compile summary, [bundle ref]), timed side by side with the candidate
        (sent once: the agent keeps it too). A `MeasureOutcome` as a dict."""
        started = time.perf_counter()
        try:
            from devices.artifact import Artifact
            from devices.protocol import Protocol

            path = materialise(compiled, bundle, timeout_s=timeout_s)
            anchor_path = None if anchor is None else materialise(anchor[0], anchor[1], timeout_s=timeout_s)
            received_s = time.perf_counter() - started
            measurement = self.client.measure(Artifact.load(path), Protocol.from_dict(protocol), job_id=job_id, timeout=timeout_s, anchor=anchor_path)
            return MeasureOutcome(ok=True, measurement=measurement.to_dict(), local_path=str(path), received_s=received_s, wall_s=time.perf_counter() - started).to_dict()
        except Exception as exc:
            return MeasureOutcome.from_exception(exc, time.perf_counter() - started).to_dict()
        finally:
            self.busy_s += time.perf_counter() - started

    def busy_seconds(self) -> float:
        return self.busy_s

    def discard(self, path: str) -> bool:
        """Remove a received artifact copy on this actor's node (see `discard_received`)."""
        return discard_received(path)

    def discard_bundle(self, sha256: str) -> bool:
        """Remove this node's received copy of the bundle `sha256`, if there is one (the
        anchor's, once the search is done: its path is this node's, not the driver's)."""
        from devices.compile import default_cache_dir

        return discard_received(str(default_cache_dir() / RECEIVED_DIR / sha256))


# `ray.remote` called, not applied as a class decorator, so that type checkers see the actor
# class it returns (mypy keeps a decorated class's own type). max_concurrency=1 is given where
# the actor starts (nas.search: `.options`): Ray's typed overloads of `ray.remote` leave that
# actor option out.
DeviceActor = ray.remote(num_cpus=0, max_restarts=0)(_DeviceActor)


__all__ = ["RECEIVED_DIR", "DeviceActor", "compile_candidate", "discard_received", "materialise", "score_quality"]
