"""A search on a real two-node Ray cluster whose nodes share no folder.

Both nodes run on this machine (`ray start --head`, then `ray start --address`), each with
its own temp dir and its own LFM2_NAS_CACHE. Where the machine allows it (root and
`unshare`), the worker node runs in a private mount namespace with a tmpfs over its work
folder: its files are then truly invisible to the head and the driver, as on two machines.
Compiles are forced onto the worker node with a custom resource (`--compile-resource`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psutil
import pytest

from nas.storage import open_storage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEARCH = ["--device", "local", "--budget", "400MB", "--space", "small", "--context", "64", "--backend", "onnx", "--quant", "fp32", "--quality", "none", "--sampler", "random"]


def _exe(name: str) -> str:
    return shutil.which(name) or f"{sys.prefix}/bin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_mounts_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


def _stop(process: subprocess.Popen) -> None:
    """Stop one `ray start --block` and every process it started, by pid (never `ray stop`,
    which kills every Ray process of the machine by name). Ray's workers sit in their own
    process groups, so they are collected as descendants before anything is signalled."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for proc in family:
        with _gone():
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for proc in alive:
        with _gone():
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    process.wait(timeout=10)


class _gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, psutil.NoSuchProcess)


def _wait_for(address: str, env: dict, what: str, deadline_s: float = 180) -> None:
    deadline = time.time() + deadline_s
    status = None
    while time.time() < deadline:
        status = subprocess.run([_exe("ray"), "status", "--address", address], capture_output=True, text=True, env=env, timeout=120)
        if status.returncode == 0 and what in status.stdout:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster did not show {what!r} in time: {status.stdout[-2000:] if status else ''}{status.stderr[-2000:] if status else ''}")


@pytest.fixture
def cluster():
    # Short paths: Ray's unix sockets live under the temp dirs (108-byte limit).
    base = Path(tempfile.mkdtemp(prefix="lfm2c-", dir="/tmp"))
    head, worker, driver = base / "head", base / "worker", base / "driver"
    for folder in (head, worker, driver):
        folder.mkdir()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    address = f"127.0.0.1:{_free_port()}"
    private = _private_mounts_work()
    started: list[subprocess.Popen] = []
    try:
        head_cmd = [_exe("ray"), "start", "--head", "--port", address.split(":")[1], "--temp-dir", str(head / "ray"), "--num-cpus", "1",
                    "--include-dashboard", "false", "--dashboard-agent-listen-port", "0", "--block"]
        started.append(subprocess.Popen(head_cmd, env=env | {"LFM2_NAS_CACHE": str(head / "cache")}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for(address, env, "1 node_")
        # The worker node: the only one offering "compile"; its own loopback address, as a second machine.
        worker_cmd = [_exe("ray"), "start", "--address", address, "--node-ip-address", "127.0.0.2", "--temp-dir", str(worker / "ray"), "--num-cpus", "1",
                      "--resources", '{"compile": 1}', "--dashboard-agent-listen-port", "0", "--block"]
        if private:
            worker_cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs -o size=2g lfm2-worker "$0" && exec "$@"', str(worker), *worker_cmd]
        started.append(subprocess.Popen(worker_cmd, env=env | {"LFM2_NAS_CACHE": str(worker / "cache")}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for(address, env, "/1.0 compile")
        yield {"address": address, "env": env, "head": head, "worker": worker, "driver": driver, "private": private}
    finally:
        for process in reversed(started):
            _stop(process)
        shutil.rmtree(base, ignore_errors=True)


def test_search_on_two_nodes_moves_artifacts_through_ray(cluster):
    driver = cluster["driver"]
    env = cluster["env"] | {"LFM2_NAS_CACHE": str(driver / "cache"), "LFM2_NAS_CONFIG": str(driver / "devices.toml")}
    result = subprocess.run(
        [_exe("lfm2-nas"), "search", *SEARCH, "--trials", "2", "--in-flight", "2", "--study", "two-nodes",
         "--ray-address", cluster["address"], "--compile-resource", "compile"],
        cwd=driver, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = optuna.load_study(study_name="two-nodes", storage=open_storage(f"sqlite:///{driver}/lfm2-nas.db"))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, [(t.number, t.state, t.user_attrs.get("reason")) for t in study.trials]
    received = cluster["head"] / "cache" / "received"
    for trial in complete:
        artifact = trial.user_attrs["artifact"]
        compiled_at = Path(artifact["path"])
        # compiled on the worker node, in the worker's cache ...
        assert compiled_at.is_relative_to(cluster["worker"] / "cache"), artifact
        if cluster["private"]:
            assert not compiled_at.exists(), f"{compiled_at} is visible to the driver: the worker node's folder is shared"
        # ... and measured from the copy the device actor (on the head node) received by sha256
        measured_from = Path(artifact["measured_from"])
        assert measured_from == received / artifact["bundle_sha256"], artifact
        assert (measured_from / "manifest.json").is_file()
        assert trial.user_attrs["measurement"]["status"] == "ok" and all(v > 0 for v in trial.values)
    # nothing was compiled on the head node or by the driver
    assert not list((cluster["head"] / "cache").glob("artifacts*/**/manifest.json"))
    assert not list((driver / "cache").glob("**/artifacts*/**/manifest.json"))
