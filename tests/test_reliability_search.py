"""Scenarios 1, 2 and 4 of issue 11 at the level of a whole search, as a user runs it:
`lfm2-nas search --device NAME` against an agent registered in a private devices.toml
(an agent process started here, so that the test can kill it and bring it back at the
same address), real eager compiles and measurements, a SQLite study.

1+4. The agent has a memory cap; one candidate of the space is far over it. The agent is
     SIGKILLed in the middle of a measurement and started again at the same address with
     the same workdir: the search waits it out, the job is re-run there, the big candidate
     is `oom` with the agent alive and the next job run, and every measurement reaches the
     study exactly once.
2.   The driver is SIGKILLed while the (registered, long-lived) agent measures; `--resume`
     leaves no trial RUNNING and collects the finished job from the agent under the same
     job id instead of measuring it again.

Everything is slow (minutes on a busy 2-core machine): `-m slow`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from testkit.agent import http
from testkit.reliability import free_port, isolated_env

from devices.agent import AgentClient, start_local_agent
from devices.agent.service import measurement_children
from devices.protocol import Measurement, Protocol
from devices.registry import add_device

pytestmark = pytest.mark.slow

#: Tiny candidates (d_model 64) and a big one (d_model 2048: ~120M parameters, ~0.5 GB of
#: fp32 weights over ~0.25 GB of torch) against a 500 MiB cap: tiny ones fit, big ones are oom.
SPACE = """name = "reliability"
vocab_size = 256
max_seq_len = 64
head_dim = 32
ffn_multiple_of = 64
d_model = [{widths}]
n_layers = [2]
ffn_multiplier = [4.0]
n_kv_heads = [1]
operators = ["conv", "attn"]
"""
MEMORY_CAP = "500MiB"
BIG_WIDTH = 2048
CONTEXT = 16


def _lfm2_nas() -> str:
    return shutil.which("lfm2-nas") or f"{sys.prefix}/bin/lfm2-nas"


def _planned_specs(space_file: Path, seed: int, trials: int) -> list:
    """The specs a `--sampler random --seed SEED` search asks for first, in trial order
    (nothing else is asked before them: the space holds no LFM2 preset)."""
    from nas.objectives import directions, make_sampler
    from search_space import SearchSpace

    space = SearchSpace.load(str(space_file))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions("none"), sampler=make_sampler("random", seed, trials))
    return [space.sample(study.ask()) for _ in range(trials)]


def _seed_where(space_file: Path, trials: int, wanted) -> int:
    for seed in range(200):
        specs = _planned_specs(space_file, seed, trials)
        if len({spec.key for spec in specs}) == trials and wanted(specs):
            return seed
    raise AssertionError("no seed gives the planned candidates; change the space")


class Fleet:
    """A registered agent this test can kill and bring back, and the search CLI."""

    def __init__(self, tmp_path: Path, monkeypatch, memory_limit: str | None):
        self.tmp = tmp_path
        self.env = isolated_env(tmp_path)
        for key in ("LFM2_NAS_CONFIG", "LFM2_NAS_CACHE", "LFM2_NAS_LOCKS"):
            monkeypatch.setenv(key, self.env[key])  # the agent started below inherits them
        self.workdir, self.port, self.memory_limit = tmp_path / "agent", free_port(), memory_limit
        self.agent = start_local_agent(name="bench-a", workdir=self.workdir, port=self.port, threads=1, memory_limit=memory_limit, job_timeout_s=600)
        self.token = self.agent.token
        self.restarted: list = []
        add_device("bench-a", self.agent.url, self.workdir / "token")
        self.storage = f"sqlite:///{tmp_path / 'study.db'}"

    def restart(self):
        handle = start_local_agent(name="bench-a", workdir=self.workdir, port=self.port, token=self.token, threads=1, memory_limit=self.memory_limit, job_timeout_s=600)
        self.restarted.append(handle)
        return handle

    def client(self) -> AgentClient:
        return AgentClient(self.agent.url, self.token, retry_for_s=5)

    def search_command(self, space_file: Path, seed: int, trials: int, *extra: str) -> list[str]:
        return [
            _lfm2_nas(), "search", "--device", "bench-a", "--budget", "4GB", "--space", str(space_file), "--backend", "eager", "--quant", "fp32",
            "--context", str(CONTEXT), "--quality", "none", "--sampler", "random", "--seed", str(seed), "--trials", str(trials),
            "--in-flight", "2", "--study", "fleet", "--storage", self.storage, *extra,
        ]  # fmt: skip

    def start_search(self, command: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"search-{len(list(self.tmp.glob('search-*.log')))}.log", "w")
        return subprocess.Popen(command, cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def logs(self) -> str:
        return "\n".join(path.read_text()[-3000:] for path in sorted(self.tmp.glob("search-*.log")))

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="fleet", storage=self.storage)

    def stop(self) -> None:
        for handle in [self.agent, *self.restarted]:
            handle.stop()


@pytest.fixture
def fleet_factory(tmp_path, monkeypatch):
    fleets = []

    def make(memory_limit: str | None = None) -> Fleet:
        fleets.append(Fleet(tmp_path, monkeypatch, memory_limit))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.stop()


def _wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None, logs=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert process is None or process.poll() is None, f"the search exited ({process.returncode}) before {what}:\n{logs()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{logs()}"
        time.sleep(0.2)


def _agent_jobs(client: AgentClient) -> list[dict]:
    return list(reversed(client.jobs(limit=1000)))


def _measured_trials(study: optuna.Study) -> list:
    """Trials whose measurement came from the agent in this study (not from the cache)."""
    return [t for t in study.trials if "measurement" in t.user_attrs and not t.user_attrs.get("measurement_cached_from")]


def test_agent_killed_mid_measurement_and_an_oom_candidate_lose_nothing(fleet_factory, tmp_path, figures):
    space_file = tmp_path / "space.toml"
    space_file.write_text(SPACE.format(widths=f"64, {BIG_WIDTH}"))
    trials = 3
    seed = _seed_where(space_file, trials, lambda specs: specs[0].d_model == BIG_WIDTH and all(s.d_model == 64 for s in specs[1:]))
    planned = _planned_specs(space_file, seed, trials)
    tiny_keys = {spec.key for spec in planned if spec.d_model == 64}
    fleet = fleet_factory(memory_limit=MEMORY_CAP)
    search = fleet.start_search(fleet.search_command(space_file, seed, trials))
    with fleet.client() as client, http(fleet.agent.url, fleet.token) as raw:

        def tiny_job_measuring():
            for job in client.jobs(state="running"):
                artifact = raw.get(f"/v1/artifacts/{job['artifact_sha256']}").json()
                if artifact["spec_key"] in tiny_keys and measurement_children(fleet.workdir):
                    return job["job_id"]
            return None

        killed_job = _wait_for(tiny_job_measuring, 900, "a tiny candidate's measurement to start", search, fleet.logs)
        orphans = measurement_children(fleet.workdir)
        os.kill(fleet.agent.pid, signal.SIGKILL)
        fleet.agent.process.wait()
        time.sleep(3)  # the agent is away; the search keeps waiting for the job
        assert search.poll() is None, fleet.logs()
        restarted = fleet.restart()
        assert not any(p.is_running() and p.status() != "zombie" for p in orphans), "the restarted agent left the killed agent's measurement running"
        assert search.wait(1200) == 0, fleet.logs()
        jobs = _agent_jobs(client)
        assert restarted.running()

    study = fleet.study()
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert not [t.number for t in study.trials if t.user_attrs.get("status") == "lost"], "a trial was lost to the agent's restart"
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == trials and [t.user_attrs["spec_key"] for t in finished] == [s.key for s in planned]
    for trial, spec in zip(finished, planned):
        if spec.d_model == BIG_WIDTH:
            assert trial.state == TrialState.FAIL and trial.user_attrs["status"] == "oom", (trial.number, trial.user_attrs.get("reason"))
            assert "cap" in trial.user_attrs["reason"] or "memory" in trial.user_attrs["reason"]
        else:
            assert trial.state == TrialState.COMPLETE and trial.user_attrs["status"] == "ok", (trial.number, trial.user_attrs.get("reason"))

    # the agent: every job done once; the killed one re-queued and run again; one job per candidate
    by_id = {job["job_id"]: job for job in jobs}
    assert len(jobs) == trials
    for job in jobs:
        assert job["state"] == "done" and [e["event"] for e in job["events"]].count("done") == 1
        assert job["attempts"] == (2 if job["job_id"] == killed_job else 1), job
    assert "requeued" in [e["event"] for e in by_id[killed_job]["events"]]
    oom_jobs = [job for job in jobs if job["status"] == "oom"]
    assert len(oom_jobs) == 1
    after_oom = [job for job in jobs if job["started_at"] >= oom_jobs[0]["finished_at"]]
    if not after_oom:  # the big candidate happened to be measured last: the next job comes from here
        tiny_artifact = next(t.user_attrs["artifact"]["path"] for t in finished if t.user_attrs["status"] == "ok")
        with restarted.client() as client:
            after_oom = [{"status": client.measure(tiny_artifact, Protocol.from_dict(oom_jobs[0]["protocol"]), timeout=600).status}]
    assert after_oom and all(job["status"] == "ok" for job in after_oom), after_oom
    # the study: each candidate measured once, with the result the agent stored
    measured = _measured_trials(study)
    assert sorted(t.user_attrs["spec_key"] for t in measured) == sorted(s.key for s in planned)
    stored = {job["artifact_sha256"]: Measurement.from_dict(job["measurement"]).to_dict() for job in jobs}
    for trial in measured:
        assert Measurement.from_dict(trial.user_attrs["measurement"]).to_dict() == stored[trial.user_attrs["measurement"]["artifact_sha256"]]
    figures("search, agent SIGKILLed mid-measurement", trials=trials, jobs=len(jobs), faults_injected=1, orphans_killed=len(orphans), requeued=1, lost_trials=0, measured_twice_into_study=0)
    figures("search, oom candidate", trials=trials, oom=len(oom_jobs), agent_alive=1, jobs_after_oom=len(after_oom), losses=0)


def test_driver_killed_while_the_agent_measures_resumes_without_measuring_again(fleet_factory, tmp_path, figures):
    space_file = tmp_path / "space.toml"
    space_file.write_text(SPACE.format(widths="64"))
    trials = 2
    seed = _seed_where(space_file, trials, lambda specs: True)
    planned = _planned_specs(space_file, seed, trials)
    fleet = fleet_factory()
    command = fleet.search_command(space_file, seed, trials)
    search = fleet.start_search(command)
    with fleet.client() as client:
        in_flight = _wait_for(
            lambda: next((job["job_id"] for job in client.jobs(state="running") if measurement_children(fleet.workdir)), None), 900, "a measurement to start", search, fleet.logs
        )
        os.killpg(search.pid, signal.SIGKILL)  # the driver and everything it started; the registered agent is not among them
        search.wait()
        running = [t.number for t in fleet.study().trials if t.state == TrialState.RUNNING]
        assert running, "the kill left no trial RUNNING: it came too late to test --resume"
        finished_on_agent = client.wait(in_flight, timeout=900)  # the agent finishes the job on its own
        assert finished_on_agent.status == "ok", finished_on_agent.error

        resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=fleet.env, capture_output=True, text=True, timeout=1200)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        jobs = _agent_jobs(client)

    study = fleet.study()
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    requeued = [t for t in study.trials if t.user_attrs.get("requeued")]
    assert sorted(t.number for t in requeued) == sorted(running) and all(t.user_attrs["status"] == "lost" for t in requeued)
    for lost in requeued:  # each was evaluated again after the resume, to the end
        again = [t for t in study.trials if t.user_attrs.get("requeued_from") == lost.number]
        assert len(again) == 1 and again[0].state.is_finished(), lost.number
    counted = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("requeued")]
    assert len(counted) == trials and all(t.state == TrialState.COMPLETE for t in counted)
    # the agent measured each candidate once: the resumed search got the in-flight job's
    # result back under the same job id rather than a second measurement
    assert len(jobs) == len({s.key for s in planned}) == trials
    for job in jobs:
        assert job["attempts"] == 1 and [e["event"] for e in job["events"]].count("started") == 1, job
    measured = _measured_trials(study)
    keys = [t.user_attrs["spec_key"] for t in measured if t.state == TrialState.COMPLETE]
    assert sorted(keys) == sorted(s.key for s in planned), "a candidate was measured into the study twice, or not at all"
    collected = next(t for t in measured if t.user_attrs["measurement"]["artifact_sha256"] == finished_on_agent.artifact_sha256)
    assert Measurement.from_dict(collected.user_attrs["measurement"]).to_dict() == finished_on_agent.to_dict()
    figures("search, driver SIGKILLed mid-measurement, --resume", trials=trials, jobs=len(jobs), faults_injected=1, trials_left_running=0, measured_twice=0, losses=0)


def test_a_registered_device_that_is_offline_exits_4_naming_it_and_writes_nothing(tmp_path):
    """An unreachable agent is a failed environment, not bad input: exit 4 (lfm2.errors)."""
    env = isolated_env(tmp_path)
    token = tmp_path / "off.token"
    token.write_text("a-token\n")
    token.chmod(0o600)
    add_device("offline-board", f"http://127.0.0.1:{free_port()}", token, path=env["LFM2_NAS_CONFIG"])
    before = set(os.listdir(tmp_path))
    command = [_lfm2_nas(), "search", "--device", "offline-board", "--budget", "500MB", "--space", "small", "--backend", "onnx", "--quant", "fp32", "--quality", "none"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 4, result.stderr[-2000:]
    assert "offline-board" in result.stderr and "unreachable" in result.stderr and "devices list" in result.stderr
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr
    assert set(os.listdir(tmp_path)) - before <= {"cache", "locks", "xdg-data"} and not (tmp_path / "lfm2-nas.db").exists()
