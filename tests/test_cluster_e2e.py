"""A search on a real two-node Ray cluster whose nodes share no folder.

Both nodes run on this machine (`ray start --head`, then `ray start --address`), each with
its own temp dir and its own LFM2_NAS_CACHE. Where the machine allows it (root and
`unshare`), the worker node runs in a private mount namespace with a tmpfs over its work
folder: its files are then truly invisible to the head and the driver, as on two machines.
Compiles are forced onto the worker node with a custom resource (`--compile-resource`).
"""

from __future__ import annotations

import contextlib
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
DEVICES = ["--device", "local", "--budget", "400MB"]
# this machine and an emulated Pixel 8: two agents, every candidate measured on both
TWO_DEVICES = ["--device", "local,pixel8", "--emulate", "--budget", "local=400MB,pixel8=300MB"]
SEARCH = ["--space", "small", "--context", "64", "--backend", "onnx", "--quant", "fp32", "--quality", "none", "--sampler", "random"]


def _exe(name: str) -> str:
    return shutil.which(name) or f"{sys.prefix}/bin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_mounts_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False).returncode == 0


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
        status = subprocess.run([_exe("ray"), "status", "--address", address], capture_output=True, text=True, env=env, timeout=120, check=False)
        if status.returncode == 0 and what in status.stdout:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster did not show {what!r} in time: {status.stdout[-2000:] if status else ''}{status.stderr[-2000:] if status else ''}")


@contextlib.contextmanager
def two_nodes(head_resources: str = "{}"):
    """A head and a worker node; only the worker offers "compile" unless `head_resources` does too."""
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
                    "--resources", head_resources, "--include-dashboard", "false", "--dashboard-agent-listen-port", "0", "--block"]
        started.append(subprocess.Popen(head_cmd, env=env | {"LFM2_NAS_CACHE": str(head / "cache")}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for(address, env, "1 node_")
        # The worker node: its own loopback address and (where possible) its own private disk, as a second machine.
        worker_cmd = [_exe("ray"), "start", "--address", address, "--node-ip-address", "127.0.0.2", "--temp-dir", str(worker / "ray"), "--num-cpus", "1",
                      "--resources", '{"compile": 1}', "--dashboard-agent-listen-port", "0", "--block"]
        if private:
            worker_cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs -o size=2g lfm2-worker "$0" && exec "$@"', str(worker), *worker_cmd]
        started.append(subprocess.Popen(worker_cmd, env=env | {"LFM2_NAS_CACHE": str(worker / "cache")}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for(address, env, "/1.0 compile" if head_resources == "{}" else "/2.0 compile")
        yield {"address": address, "env": env, "head": head, "worker": worker, "driver": driver, "private": private, "worker_process": started[-1]}
    finally:
        for process in reversed(started):
            _stop(process)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cluster():
    with two_nodes() as nodes:
        yield nodes


def _search(cluster, *args, study, devices=DEVICES):
    driver = cluster["driver"]
    env = cluster["env"] | {"LFM2_NAS_CACHE": str(driver / "cache"), "LFM2_NAS_CONFIG": str(driver / "devices.toml")}
    command = [_exe("lfm2-nas"), "search", *devices, *SEARCH, *args, "--study", study, "--ray-address", cluster["address"], "--compile-resource", "compile"]
    return subprocess.Popen(command, cwd=driver, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _load(cluster, study):
    return optuna.load_study(study_name=study, storage=open_storage(f"sqlite:///{cluster['driver']}/lfm2-nas.db"))


def test_search_on_two_nodes_moves_artifacts_through_ray_and_measures_on_two_devices(cluster):
    driver = cluster["driver"]
    search = _search(cluster, "--trials", "2", "--in-flight", "2", study="two-nodes", devices=TWO_DEVICES)
    out, err = search.communicate(timeout=900)
    assert search.returncode == 0, out[-3000:] + err[-3000:]
    study = _load(cluster, "two-nodes")
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
        # ... measured on both devices from the copy the device actors (on the head node)
        # received by sha256, which went once both had measured it
        measured_from = Path(artifact["measured_from"])
        assert measured_from == received / artifact["bundle_sha256"], artifact
        records = trial.user_attrs["devices"]
        for device in ("local", "pixel8"):
            assert Path(records[device]["measured_from"]) == measured_from
            assert records[device]["measurement"]["status"] == "ok" and records[device]["measurement"]["device"]["name"] == device
        assert len(trial.values) == 4 and all(v > 0 for v in trial.values)
    assert not [p for p in received.iterdir() if (p / "manifest.json").exists()], "received copies were left behind after both devices measured them"
    # nothing was compiled on the head node or by the driver
    assert not list((cluster["head"] / "cache").glob("artifacts*/**/manifest.json"))
    assert not list((driver / "cache").glob("**/artifacts*/**/manifest.json"))


def _compiling_on(process: subprocess.Popen) -> bool:
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for proc in family:
        with _gone():
            if "compile_candidate" in " ".join(proc.cmdline()):
                return True
    return False


def _kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node and everything it runs at once: a machine that lost power."""
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for proc in family:
        with _gone():
            proc.kill()
    psutil.wait_procs(family, timeout=30)


def test_a_worker_node_killed_mid_compile_loses_nothing():
    with two_nodes(head_resources='{"compile": 1}') as cluster:
        search = _search(cluster, "--trials", "3", "--in-flight", "2", study="node-lost")
        deadline = time.time() + 600
        while not _compiling_on(cluster["worker_process"]):
            assert search.poll() is None and time.time() < deadline, "no compile ever ran on the worker node"
            time.sleep(0.5)
        time.sleep(2)
        _kill_node(cluster["worker_process"])
        out, err = search.communicate(timeout=900)
        assert search.returncode == 0, out[-3000:] + err[-3000:]
        trials = _load(cluster, "node-lost").trials
        # The compile that died with the node ran again on the head: every trial finished, none lost.
        assert len(trials) == 3, [(t.number, t.state) for t in trials]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [(t.number, t.state, t.user_attrs.get("reason")) for t in trials]
        assert all(t.user_attrs["measurement"]["status"] == "ok" for t in trials)
