"""The seam between the search's workers and its driver: typed outcomes (`nas.results`) that
cross Ray as dicts, how the driver records each in the study (through `nas.study_schema`),
and the snapshot the progress display reads. The driver runs here on a real SQLite study;
no Ray, no agent: the outcomes are what the workers would have returned."""

from __future__ import annotations

import io

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from devices.protocol import MEASUREMENT_STATUSES
from lfm2.presets import presets
from nas.progress import Progress
from nas.results import CompileOutcome, MeasureOutcome, QualityOutcome
from nas.search import Candidate, DeviceRun, Search, SearchConfig
from nas.study_schema import TrialRecord, TrialStatus, metric_names


def test_outcomes_cross_ray_as_dicts_and_ignore_unknown_keys():
    compiled = CompileOutcome(ok=True, path="/x", node="n1", key="k", bytes=5, stages_s={"export": 1.0}, wall_s=2.0)
    assert CompileOutcome.from_dict(compiled.to_dict() | {"added_by_a_newer_worker": 1}) == compiled
    try:
        raise RuntimeError("lowering raised")
    except RuntimeError as exc:
        failed = QualityOutcome.from_exception(exc, wall_s=0.5)
    assert not failed.ok and failed.error == "RuntimeError: lowering raised" and "lowering raised" in failed.traceback
    assert MeasureOutcome.failed("x" * 5000).error == "x" * 2000
    # what an older driver cached for a quality score reads back as an outcome
    assert QualityOutcome.from_dict({"ok": True, "score": 0.5, "detail": {}, "wall_s": 1.0}).score == 0.5


@pytest.fixture
def search(tmp_path, monkeypatch):
    """A driver on a real study with one device, started no further than its study."""
    monkeypatch.chdir(tmp_path)
    config = SearchConfig(device="local", budget_bytes=400 * 2**20, trials=4, storage=f"sqlite:///{tmp_path}/s.db", quality="none", study="seam")
    driver = Search(config)
    driver.devices = {"local": DeviceRun(name="local", budget_bytes=config.budget_bytes, session=None)}
    driver.study = optuna.create_study(study_name="seam", storage=driver.storage, directions=["minimize", "minimize"])
    driver.study.set_metric_names(["prefill_ms", "decode_ms"])
    return driver


def _candidate(driver: Search) -> Candidate:
    spec = presets["LFM2-350M"]
    return Candidate(trial=driver.study.ask(), spec=spec, estimate={"total_bytes": 300 * 2**20}, targets=["local"])


def _record(driver: Search, number: int) -> TrialRecord:
    study = optuna.load_study(study_name="seam", storage=driver.storage)
    return TrialRecord.read(study.trials[number], metric_names(study))


def test_a_failed_compile_is_a_compile_error_not_a_measurement(search):
    candidate = _candidate(search)
    search._on_compile(candidate, CompileOutcome.failed("ValueError: lowering raised"))
    assert candidate.done and not candidate.measurements  # nothing was sent to the device
    search._finish(candidate)
    record = _record(search, 0)
    assert record.state == "FAIL" and record.status is TrialStatus.COMPILE_ERROR
    assert record.reason == "compile failed: ValueError: lowering raised"
    assert record.measurement is None and record.artifact is None
    assert "compile_error" not in MEASUREMENT_STATUSES  # a device never reports it


def test_a_measurement_that_never_came_back_is_lost(search):
    candidate = _candidate(search)
    candidate.compiled = CompileOutcome(ok=True, path="/a", key="k")
    search._on_measure(candidate, MeasureOutcome.failed("ActorDiedError: the actor died"), "local")
    search._finish(candidate)
    record = _record(search, 0)
    assert record.state == "FAIL" and record.status is TrialStatus.LOST and "ActorDiedError" in record.reason
    assert record.artifact["path"] == "/a" and record.artifact["key"] == "k"


def test_progress_reads_a_snapshot_and_prints_a_line_per_trial_off_a_terminal(search):
    out = io.StringIO()
    progress = Progress(search.snapshot, enabled=True, console=Console(file=out, force_terminal=False, width=300))
    with progress:
        progress.update()
        candidate = _candidate(search)
        search.pending[candidate.trial.number] = candidate
        candidate.compile_ref = object()  # in flight
        snapshot = search.snapshot()
        assert (snapshot.compiling, snapshot.measuring, snapshot.trials_done, snapshot.trials_target) == (1, 0, 0, 4)
        search.pending.clear()
        search._on_compile(candidate, CompileOutcome.failed("boom"))
        search._finish(candidate)
        progress.update()
        progress.update()  # nothing new: no new line
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "seam on local: 0/4 trials" in lines[0] and "1/4 trials" in lines[1] and "compile_error 1" in lines[1]
    assert search.study.trials[0].state == TrialState.FAIL


def test_a_device_that_failed_fails_a_multi_device_trial_with_every_record_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SearchConfig(device="local,pixel8", emulate=True, budget_bytes=400 * 2**20, trials=2, storage=f"sqlite:///{tmp_path}/m.db", quality="none", study="two")
    driver = Search(config)
    driver.devices = {name: DeviceRun(name=name, budget_bytes=config.budget_bytes, session=None) for name in ("local", "pixel8")}
    driver.study = optuna.create_study(study_name="two", storage=driver.storage, directions=["minimize"] * 4)
    candidate = Candidate(trial=driver.study.ask(), spec=presets["LFM2-350M"], estimate={"total_bytes": 300 * 2**20}, targets=["local", "pixel8"])
    candidate.compiled = CompileOutcome(ok=True, path="/a", key="k")
    driver._on_measure(candidate, MeasureOutcome(ok=True, measurement={"status": "oom", "error": "over the 400 MiB cap"}), "local")
    driver._on_measure(candidate, MeasureOutcome.failed("AgentUnreachable: pixel8 went away"), "pixel8")
    assert candidate.done
    driver._finish(candidate)
    record = TrialRecord.read(optuna.load_study(study_name="two", storage=driver.storage).trials[0], [])
    assert record.state == "FAIL" and record.status is TrialStatus.OOM
    assert record.reason == "local: over the 400 MiB cap; pixel8: AgentUnreachable: pixel8 went away"
    assert {name: r.status for name, r in record.devices.items()} == {"local": TrialStatus.OOM, "pixel8": TrialStatus.LOST}
    assert record.devices["local"].budget_bytes == 400 * 2**20 and record.prefill_ms is None  # no headline: not every device measured it


def test_a_search_in_several_processes_measures_with_them_and_a_shorter_time_in_each(tmp_path):
    one = SearchConfig(device="local", budget_bytes=400 * 2**20, storage=f"sqlite:///{tmp_path}/p.db", quality="none")
    three = SearchConfig(device="local", budget_bytes=400 * 2**20, storage=f"sqlite:///{tmp_path}/p.db", quality="none", processes=3)
    assert one.protocol.processes == 1 and "processes" not in one.protocol.to_dict()  # the measurement keys of before
    assert three.protocol.processes == 3 and three.protocol.max_seconds_per_point < one.protocol.max_seconds_per_point


def test_a_search_decides_loads_and_huge_pages_by_its_devices_and_a_resumed_study_keeps_its_own(tmp_path):
    from lfm2.errors import UserError
    from nas.search import DEFAULT_LOADS
    from nas.study_schema import StudyMetadata

    def decided(facts: dict, storage: str, **asked) -> SearchConfig:
        config = SearchConfig(device="local", budget_bytes=400 * 2**20, storage=storage, quality="none", study="decide", **asked)
        driver = Search(config)
        driver.devices = {"local": DeviceRun(name="local", budget_bytes=config.budget_bytes, session=None, facts=facts)}
        driver._decide_measurement()
        return config

    local, adb = {"info": {"transport": {"transport": "local"}}}, {"info": {"transport": {"transport": "adb"}}}
    fresh = decided(local, f"sqlite:///{tmp_path}/fresh.db")
    assert (fresh.loads, fresh.huge_pages) == (DEFAULT_LOADS, True)
    assert fresh.protocol.loads == DEFAULT_LOADS and fresh.protocol.huge_pages and fresh.protocol.max_seconds_per_point == 1.5
    phone = decided(adb, f"sqlite:///{tmp_path}/phone.db")
    assert (phone.loads, phone.huge_pages) == (1, False)  # the phone's runner cannot: as before, not an error
    assert "loads" not in phone.protocol.to_dict() and "huge_pages" not in phone.protocol.to_dict()
    for refused in ({"loads": 3}, {"huge_pages": True}, {"processes": 2}):  # asked for on a phone: refused before anything runs, with the flags to use
        with pytest.raises(UserError, match="--processes 1 --loads 1 --no-huge-pages"):
            decided(adb, f"sqlite:///{tmp_path}/phone.db", **refused)
    asked = decided(local, f"sqlite:///{tmp_path}/asked.db", loads=2, huge_pages=False)
    assert (asked.loads, asked.huge_pages) == (2, False)
    # a study measured before loads existed resumes with its own protocol: its measurement keys stay
    storage = f"sqlite:///{tmp_path}/old.db"
    old = optuna.create_study(study_name="decide", storage=storage, directions=["minimize"])
    StudyMetadata(protocol={"prompt_lengths": [512], "decode_depths": [512]}).write(old)
    resumed = decided(local, storage, resume=True)
    assert (resumed.loads, resumed.huge_pages) == (1, False)
