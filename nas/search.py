"""The search driver: ask -> sample -> pre-filter -> compile | quality -> measure -> tell.

Only this process touches the study. Ray runs the work: compiles as CPU tasks, quality
proxies as tasks that ask for a GPU when the cluster has one, and one actor per device
that owns the agent connection and runs one measurement at a time. Up to `in_flight`
candidates are in the pipeline at once, so that the next artifact is ready when the
device frees up.

On a cluster (--ray-address) the device actors stay on the driver's node (the agent URLs
are the driver's: a local agent listens on its loopback), compiles go to any node with a
free CPU (or only to nodes offering `compile_resource`), and a compile made elsewhere comes
back through Ray's object store (nas/workers.py): no folder is shared between nodes.

Several devices (`--device pixel8,rpi5,local`): one actor per device; a candidate is
compiled once and measured on every device whose budget its memory estimate may fit (the
pre-filter runs per device), each device's results under its name in the trial
(`devices`), its objectives and memory constraint named after it (nas/objectives.py). A
device that fails or is lost fails its own measurements only: the trial records the
others and the search goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
import ray
from optuna.trial import TrialState

from devices.protocol import Measurement, Protocol, Stats
from lfm2.backends import DEFAULT_BACKEND, DEFAULT_QUANT
from lfm2.errors import EnvironmentFailure, UserError
from lfm2.spec import ArchSpec
from nas.cache import ResultCache, measurement_key
from nas.device_list import parse_devices
from nas.device_session import DeviceSession, describe, open_device
from nas.results import CompileOutcome, MeasureOutcome, QualityOutcome
from nas.objectives import MEMORY_CONSTRAINT, QUALITY_KINDS, SAMPLERS, memory_constraint, objective_names, objective_values
from nas.storage import DEFAULT_STORAGE, missing_sqlite_file, open_storage
from nas.study import create_or_resume, enqueue_presets, fail_stale_trials, finished_trials, spec_attrs
from nas.study_schema import ANCHOR_REFERENCE_ATTR, DeviceRecord, StudyMetadata, TrialStatus, write_estimate_error_summary, write_trial_attrs

if TYPE_CHECKING:
    from nas.prescreen import Prescreen

#: the outcome of one stage of a candidate (what its Ray ref returns)
_O = TypeVar("_O", CompileOutcome, MeasureOutcome, QualityOutcome)

#: loads of the model per measuring process where the search decides (3 loads of 1.5 s: decode
#: ratios repeat within ~3% on a shared host, BENCHMARKS.md "Load to load")
DEFAULT_LOADS = 3
RAY_TEMP_DIR = "/tmp/lfm2-nas-ray"  # short: Ray's unix sockets live under it (108-byte path limit)
log = logging.getLogger("lfm2_nas.search")


@dataclass
class SearchConfig:
    device: str  # one device name, or several separated by commas
    budget_bytes: int  # the budget of every device without one in `budgets` (0: each has one there)
    trials: int = 20
    study: str | None = None
    storage: str | None = None
    space: str = "default"
    backend: str = DEFAULT_BACKEND
    quant: str = DEFAULT_QUANT[DEFAULT_BACKEND]
    context: int = 2048
    quality: str = "layout"  # free, and as good as the trained proxies (nas/quality/layout.py)
    quality_settings: str = "default"  # a QualitySettings preset: default (GPU-sized) or cpu_small
    sampler: str = "tpe"  # the best sampler on the tabular benchmark (BENCHMARKS.md, issue 22)
    seed: int | None = 0
    in_flight: int = 2
    ray_address: str | None = None
    resume: bool = False
    emulate: bool = False
    decode_tokens: int = 8
    measure_timeout_s: float = 900.0
    compile_resource: str | None = None  # a custom Ray resource each compile asks for one unit of (ray start --resources)
    prescreen: bool = True  # skip candidates the predictor says are over budget or dominated (nas/prescreen.py); one device only
    # time the space's anchor architecture beside every candidate and rank by the ratio of their
    # lower quartiles (times the study's anchor reference): the host's drift cancels (issue 21).
    # None: on where every device can (not a phone over adb), or as the resumed study was
    anchor: bool | None = None
    # fresh processes a measured point may use (devices.processes): the points still unsure after
    # one are measured again in another, the figures combined; 1: one process per measurement
    processes: int = 1
    # loads of the model inside each measuring process, every point timed after each and the
    # figures combined (Protocol.loads); huge pages for the measuring processes (Protocol.huge_pages).
    # None: 3 loads in huge pages where every device can (not a phone over adb), or as the resumed
    # study was (`Search._decide_measurement`)
    loads: int | None = None
    huge_pages: bool | None = None
    budgets: dict[str, int] = field(default_factory=dict)  # per-device budgets (--budget pixel8=500MB,rpi5=1GB)

    def __post_init__(self) -> None:
        from devices.artifact import check_backend_quant

        check_backend_quant(self.backend, self.quant)
        if self.quality not in QUALITY_KINDS:
            raise UserError(f"--quality {self.quality!r}: choose one of {', '.join(QUALITY_KINDS)}")
        if self.quality != "none":
            _quality_settings(self.quality_settings)  # before anything starts: a typo is exit 2, not a failed trial
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.trials < 1:
            raise UserError(f"--trials must be >= 1, got {self.trials}")
        if self.context < 1:
            raise UserError(f"--context must be >= 1, got {self.context}")
        if self.in_flight < 1:
            raise UserError(f"--in-flight must be >= 1, got {self.in_flight}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or not 1 <= self.processes <= 16:
            raise UserError(f"--processes must be a whole number from 1 to 16, got {self.processes!r}")
        if self.loads is not None and (isinstance(self.loads, bool) or not isinstance(self.loads, int) or not 1 <= self.loads <= 16):
            raise UserError(f"--loads must be a whole number from 1 to 16, got {self.loads!r}")
        if not self.measure_timeout_s > 0:
            raise UserError(f"--measure-timeout must be a positive number of seconds, got {self.measure_timeout_s}")
        devices = parse_devices(self.device)
        unknown = sorted(set(self.budgets) - set(devices))
        if unknown:
            raise UserError(f"--budget names {', '.join(unknown)}, not in --device ({', '.join(devices)})")
        if any(self.budget_for(name) <= 0 for name in devices):
            raise UserError("--budget must be a positive size such as 500MB (or NAME=SIZE for each device)")
        self.study = self.study or f"{'+'.join(devices)}-{self.backend}-{self.quant}"

    @property
    def study_name(self) -> str:
        """`study`, which `__post_init__` names after the devices when it is not given."""
        if self.study is None:
            raise AssertionError("SearchConfig.study is None after __post_init__, which names it")
        return self.study

    @property
    def devices(self) -> list[str]:
        return parse_devices(self.device)

    @property
    def multi_device(self) -> bool:
        return len(self.devices) > 1

    def budget_for(self, device: str) -> int:
        return self.budgets.get(device, self.budget_bytes)

    @property
    def protocol(self) -> Protocol:
        # Prefill of `context` tokens, decode at depth `context`: the two headline figures,
        # each sampled until its median's interval is tight (Protocol's defaults), at most 5 s;
        # in several processes, at most 3 s in each (past ~2-3 s a process's own samples no
        # longer move a decode ratio's spread: BENCHMARKS.md, "A point in several processes");
        # after each of several loads, at most 1.5 s (BENCHMARKS.md, "Load to load").
        loads = self.loads or 1  # None until the search has decided (Search._decide_measurement)
        return Protocol(
            prompt_lengths=(self.context,),
            decode_depths=(self.context,),
            decode_tokens=self.decode_tokens,
            max_seconds_per_point=5.0 if self.processes == 1 and loads == 1 else 3.0 if loads == 1 else 1.5,
            processes=self.processes,
            loads=loads,
            huge_pages=bool(self.huge_pages),
        )


@dataclass
class DeviceRun:
    """One device of the search: its session, budget, actor and what it said it is."""

    name: str
    budget_bytes: int
    session: DeviceSession
    actor: Any = None
    facts: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


@dataclass
class Candidate:
    trial: optuna.Trial
    spec: ArchSpec
    estimate: dict[str, Any]
    targets: list[str] = field(default_factory=list)  # the devices the pre-filter admits
    prefiltered: dict[str, float] = field(default_factory=dict)  # device -> lower bound minus its budget (> 0)
    started: float = field(default_factory=time.perf_counter)
    compile_ref: Any = None
    bundle_ref: Any = None  # the compiled bundle in Ray's object store; held until measured everywhere
    measure_refs: dict[str, Any] = field(default_factory=dict)  # device -> its measurement in flight
    quality_ref: Any = None
    compiled: CompileOutcome | None = None  # a failed compile too (then nothing is measured)
    measurements: dict[str, MeasureOutcome] = field(default_factory=dict)  # device -> what came back
    measured_from: dict[str, str] = field(default_factory=dict)  # device -> the artifact copy its actor read
    quality: QualityOutcome | None = None
    measurement_cached: dict[str, Any] = field(default_factory=dict)  # device -> provenance of a cached measurement
    quality_cached: bool = False
    quality_key: str | None = None
    stage_s: dict[str, float] = field(default_factory=dict)

    @property
    def compile_failed(self) -> bool:
        return self.compiled is not None and not self.compiled.ok

    @property
    def done(self) -> bool:
        measured = self.compile_failed or all(d in self.measurements for d in self.targets)
        return measured and (self.quality is not None or self.quality_ref is None)


@dataclass
class SearchStats:
    asked: int = 0
    told: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    device_busy_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=lambda: {"compile": 0.0, "measure": 0.0, "quality": 0.0})

    def count(self, status: str) -> None:
        self.told[status] = self.told.get(status, 0) + 1

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started


def start_ray(address: str | None, worker_cpus: list[int] | None) -> None:
    if ray.is_initialized():
        return
    if address is None:
        # A private, loopback-only cluster for this run: Ray 2.60's token auth would write a
        # token under $HOME; nothing outside this machine can reach it, so it is off. Its
        # session files go to a folder we name rather than Ray's default.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # One Ray CPU per worker core: tasks pinned to the same cores would only time-share
        # them, and running them one after another gets the first artifact to the device sooner.
        num_cpus = len(worker_cpus or os.sched_getaffinity(0))
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=RAY_TEMP_DIR, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
        except Exception as exc:
            ray.shutdown()  # a failed start leaves its GCS and monitor processes behind otherwise
            raise EnvironmentFailure(f"could not start a local Ray cluster ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            "on a heavily loaded machine try again, or start one with `ray start --head` and pass --ray-address") from exc
    else:
        # Joining `ray start --head`: its auth mode and temp dir are that cluster's settings.
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


def _check_compile_resource(name: str | None) -> None:
    """Refuse a compile resource no node offers: the compiles would wait for it forever."""
    if name and ray.cluster_resources().get(name, 0) < 1:
        raise UserError(f"--compile-resource {name!r}: no node of the Ray cluster offers it; start the compile nodes with "
                        f"`ray start --address HEAD:6379 --resources '{{\"{name}\": N}}'` or drop the flag")


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


class Search:
    def __init__(self, config: SearchConfig, console=None):
        from search_space import SearchSpace

        self.config = config
        self.console = console
        self.space = SearchSpace.load(config.space)
        # checks the flags; starts nothing
        self.start_devices = {name: open_device(name, config.emulate) for name in config.devices}
        self.storage_url = config.storage or DEFAULT_STORAGE
        if config.resume:
            _require_existing_sqlite(self.storage_url, config.study_name)
        self.storage = open_storage(self.storage_url, create=True)  # the one command that may create it
        self.cache = ResultCache()
        self.stats = SearchStats()
        self.pending: dict[int, Candidate] = {}
        self.devices: dict[str, DeviceRun] = {}
        self.device: DeviceSession | None = None  # the first device's session
        self.worker_cpus: list[int] | None = None  # where compiles and training run on this machine
        self.discards: list[Any] = []  # received artifact copies being removed (DeviceActor.discard)
        self.prescreen: Prescreen | None = None  # once the study is open (config.prescreen)
        self.study: optuna.Study | None = None  # once run() opened it
        self.anchored = False  # decided once the devices are up (`_decide_anchor`)
        self.anchor_spec = self.space.anchor_spec()  # the space's anchor architecture, when anchored
        self.anchor: tuple[dict[str, Any], list] | None = None  # the anchor's (compile summary, [bundle ref]) when anchored
        self.anchor_reference: dict[str, dict[str, Any]] = {}  # device -> the anchor's ms the study scales ratios by

    # -- set-up ---------------------------------------------------------------------------

    def _quality_signal(self) -> str | None:
        """The version of the quality signal this search scores with (None: no quality)."""
        if not hasattr(self, "_signal"):
            self._signal = _signal_version(self.config.quality, self.config.quality_settings)
        return self._signal

    def _metadata(self) -> dict[str, Any]:
        from importlib.metadata import version

        from devices.artifact import toolchain_versions

        c = self.config
        if c.multi_device:
            budgets = {name: run.budget_bytes for name, run in self.devices.items()}
            # budget_bytes: the one budget when all devices share it, else None (budgets_bytes has each)
            where = {"devices": {name: run.facts for name, run in self.devices.items()}, "budgets_bytes": budgets,
                     "budget_bytes": next(iter(budgets.values())) if len(set(budgets.values())) == 1 else None}
        else:
            (run,) = self.devices.values()
            where = {"device": run.facts, "budget_bytes": run.budget_bytes}
        return {
            "version": version("lfm2-nas"),
            **where,
            "context": c.context,
            "backend": c.backend,
            "quant": c.quant,
            "protocol": c.protocol.to_dict(),
            "space": {"name": self.space.name, "text": self.space.source_text},
            "quality": c.quality,
            "quality_settings": c.quality_settings,
            "quality_signal": self._quality_signal(),
            "sampler": c.sampler,
            "seed": c.seed,
            "anchor": self.anchor_spec.to_dict() if self.anchored else None,
            "versions": toolchain_versions(),
        }

    def run(self) -> optuna.Study:
        c = self.config
        try:
            for name, start in self.start_devices.items():
                self.devices[name] = DeviceRun(name=name, budget_bytes=c.budget_for(name), session=start())
            sessions = [run.session for run in self.devices.values()]
            self.device = sessions[0]
            # Agents started on this machine all partition its cores alike (device_session):
            # compiles take the lower half; their measurements share the upper half, one at a
            # time (devices.measure locks each core host-wide while it measures).
            self.worker_cpus = next((s.worker_cpus for s in sessions if s.worker_cpus), None)
            start_ray(c.ray_address, self.worker_cpus)
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from nas.workers import DeviceActor

            self.home_node = ray.get_runtime_context().get_node_id()
            _check_compile_resource(c.compile_resource)
            on_home_node = NodeAffinitySchedulingStrategy(node_id=self.home_node, soft=False)
            for run in self.devices.values():
                run.actor = DeviceActor.options(scheduling_strategy=on_home_node, max_concurrency=1).remote(run.session.url, run.session.token, run.name)
            infos = ray.get([run.actor.info.remote() for run in self.devices.values()], timeout=60)
            for run, info in zip(self.devices.values(), infos):
                run.facts = describe(run.session, info)
                run.fingerprint = _fingerprint(info, run.session)
            self._decide_measurement()
            self.anchored = self._decide_anchor()
            study, resumed = create_or_resume(c.study_name, self.storage, self.storage_url, c.quality, c.sampler, c.seed, c.trials, c.resume, self._metadata(), devices=c.devices if c.multi_device else None)
            self.study = study
            _check_same_devices(study, c)
            if resumed:
                stale = fail_stale_trials(study)
                if stale and self.console:
                    self.console.print(f"resumed: trials {stale} were left running by a stopped driver; failed and re-enqueued")
            else:
                enqueue_presets(study, self.space)
            if self.anchored:
                self._prepare_anchor(study)
            self.quality_on_gpu = c.quality not in ("none", "layout") and cluster_has_gpu()
            if c.prescreen and not c.multi_device:  # the predictor learns one device's figures
                from nas.prescreen import for_search

                self.prescreen = for_search(study, context=c.context, decode_tokens=c.decode_tokens, backend=c.backend, quant=c.quant, budget_bytes=c.budget_bytes, quality=c.quality)
            with _stop_on_signals() as self.stop_flag:
                try:
                    self._loop()
                except SearchInterrupted:
                    # Leave nothing RUNNING: the in-flight candidates are failed as `lost`
                    # and enqueued again, so that --resume evaluates them.
                    fail_stale_trials(study, list(self.pending), reason="the search was interrupted while this trial ran; re-enqueued for --resume")
                    raise
            write_estimate_error_summary(study)
            anchor_sha = self.anchor[0].get("bundle_sha256") if self.anchor is not None else None
            if anchor_sha:  # the anchor travelled from another node: every actor's copy goes
                self.discards.extend(run.actor.discard_bundle.remote(anchor_sha) for run in self.devices.values())
            if self.discards:
                with contextlib.suppress(ray.exceptions.RayError):
                    # the actors end with this driver: let them finish removing the received copies
                    ray.wait(self.discards, num_returns=len(self.discards), timeout=60)
            return study
        finally:
            if ray.is_initialized() and c.ray_address is None:
                ray.shutdown()
            for run in self.devices.values():
                run.session.stop()
            self.cache.close()

    # -- the loop -------------------------------------------------------------------------

    def snapshot(self):
        """What the progress display shows now (`nas.progress.SearchSnapshot`)."""
        from nas.progress import SearchSnapshot

        study = self.study
        pending = list(self.pending.values())
        return SearchSnapshot(
            study_name=self.config.study,
            device=self.config.device,
            trials_done=finished_trials(study) if study is not None else 0,
            trials_target=self.config.trials,
            compiling=sum(c.compile_ref is not None for c in pending),
            measuring=sum(bool(c.measure_refs) for c in pending),
            scoring=sum(c.quality_ref is not None for c in pending),
            wall_s=self.stats.wall_s,
            told=dict(self.stats.told),
            device_busy_s=self.stats.device_busy_s,
            devices=len(self.devices),
            study=study,
        )

    def _open_study(self) -> optuna.Study:
        if self.study is None:
            raise AssertionError("the search's study is not open; run() opens it before the loop")
        return self.study

    def _loop(self) -> None:
        from nas.progress import Progress

        target = self.config.trials
        with Progress(self.snapshot, enabled=self.console is not None, console=self.console) as progress:
            while True:
                done = finished_trials(self._open_study())
                while len(self.pending) < self.config.in_flight and done + len(self.pending) < target:
                    self.stop_flag.check()
                    self._start_candidate()
                    done = finished_trials(self._open_study())
                if not self.pending:
                    break
                self._advance()
                self.stop_flag.check()
                progress.update()

    def _start_candidate(self) -> None:
        from search_space.costs import estimate_peak_memory
        from search_space.costs import parameters as count_parameters

        c = self.config
        trial = self._open_study().ask()
        self.stats.asked += 1
        try:
            spec = self.space.sample(trial)
        except UserError as exc:
            write_trial_attrs(trial, status=TrialStatus.ERROR, reason=f"the space produced an invalid spec: {exc}")
            self._tell(trial, TrialStatus.ERROR)
            return
        estimate = estimate_peak_memory(spec, c.context + c.decode_tokens, c.backend, c.quant, prefill_tokens=c.context)
        estimate_dict = asdict(estimate)
        spec_attrs(trial, spec, count_parameters(spec), estimate_dict)
        # Per device: a candidate certainly over one device's budget is not measured there.
        over = {name: float(estimate.lower_bound_bytes - run.budget_bytes) for name, run in self.devices.items() if estimate.lower_bound_bytes > run.budget_bytes}
        if len(over) == len(self.devices):
            for name, excess in over.items():
                trial.set_constraint(memory_constraint(name if c.multi_device else None), excess)
            budgets = " / ".join(f"{run.budget_bytes / 2**20:.0f}" for run in self.devices.values())
            write_trial_attrs(trial, status=TrialStatus.PREFILTERED,
                              reason=f"needs at least {estimate.lower_bound_bytes / 2**20:.0f} MiB (analytic lower bound) > budget {budgets} MiB: not compiled")
            self._tell(trial, TrialStatus.PREFILTERED)
            return
        if self.prescreen is not None and (verdict := self.prescreen.judge(spec, _free_quality(spec, c.quality))).skip:
            from nas.prescreen import record_skip

            record_skip(trial, verdict, c.budget_bytes)
            self._tell(trial, TrialStatus.SKIPPED)
            return
        targets = [name for name in self.devices if name not in over]
        candidate = Candidate(trial=trial, spec=spec, estimate=estimate_dict, targets=targets, prefiltered=over)
        self.pending[trial.number] = candidate
        self._start_measurement_path(candidate)
        self._start_quality(candidate)

    def _compile_options(self) -> dict[str, Any]:
        """Ray options of a compile task, a candidate's or the anchor's: one CPU, and the
        custom compile resource when the search names one (compiles run only where it is)."""
        options: dict[str, Any] = {"num_cpus": 1}
        if self.config.compile_resource:
            options["resources"] = {self.config.compile_resource: 1}
        return options

    def _decide_measurement(self) -> None:
        """Loads per process and huge pages, where not asked for: as the resumed study was
        measured, else 3 loads in huge pages wherever every device can (a phone over adb
        cannot yet: one load, no huge pages there). Settles `config.protocol`."""
        c = self.config
        over_adb = [name for name, run in self.devices.items() if (run.facts.get("info") or {}).get("transport", {}).get("transport", "local") != "local"]
        if c.loads is None or c.huge_pages is None:
            before = _previous_protocol(self.storage, c.study_name) if c.resume else None
            if before is not None:
                loads, huge_pages = int(before.get("loads", 1)), bool(before.get("huge_pages", False))
            else:
                loads, huge_pages = (1, False) if over_adb else (DEFAULT_LOADS, True)
            c.loads = loads if c.loads is None else c.loads
            c.huge_pages = huge_pages if c.huge_pages is None else c.huge_pages
        if over_adb and (c.processes > 1 or (c.loads or 1) > 1 or c.huge_pages):
            raise UserError(f"device(s) {', '.join(over_adb)} measure over adb, whose runner cannot measure a point in several processes, reload the model between "
                            f"timings or ask glibc for huge pages yet: search with --processes 1 --loads 1 --no-huge-pages (asked: processes {c.processes}, loads {c.loads}, "
                            f"huge pages {'on' if c.huge_pages else 'off'})")

    def _decide_anchor(self) -> bool:
        """Whether this search is anchored: as asked (--anchor/--no-anchor); by default, as the
        resumed study was, else wherever every device can (a phone over adb cannot yet)."""
        c = self.config
        over_adb = [name for name, run in self.devices.items() if (run.facts.get("info") or {}).get("transport", {}).get("transport", "local") != "local"]
        wanted = c.anchor
        if wanted is None and c.resume:
            wanted = _previous_anchor(self.storage, c.study_name) is not None
        if wanted is None:
            if over_adb and self.console:
                self.console.print(f"no anchor: {', '.join(over_adb)} measure(s) over adb, whose runner has no anchored measurement yet (latencies are the medians as measured)")
            return not over_adb
        if wanted and over_adb:
            raise UserError(f"device(s) {', '.join(over_adb)} measure over adb, whose runner has no anchored measurement yet: search with --no-anchor")
        return wanted

    def _prepare_anchor(self, study: optuna.Study) -> None:
        """Compile the space's anchor architecture once, as every candidate is compiled (it
        then travels to each device actor the same way), and read the study's anchor
        references of a resumed study."""
        from nas.workers import compile_candidate

        c = self.config
        spec = self.anchor_spec
        if self.console:
            self.console.print(f"anchor: {spec.layout} d={spec.d_model} compiled for {c.backend} {c.quant}, timed beside every candidate (--no-anchor: without)")
        ref, bundle = compile_candidate.options(**self._compile_options()).remote(spec.to_dict(), c.backend, c.quant, c.context + c.decode_tokens, [c.context], self.worker_cpus, self.home_node)
        outcome = CompileOutcome.from_dict(ray.get(ref))
        if not outcome.ok:
            raise UserError(f"the anchor architecture ({spec.layout}, d {spec.d_model}) did not compile for {c.backend} {c.quant}: {outcome.error}; search with --no-anchor")
        self.anchor = (outcome.to_dict(), [bundle])
        self.anchor_reference = dict(study.user_attrs.get(ANCHOR_REFERENCE_ATTR) or {})

    def _anchored_ms(self, device: str, trial_number: int, prefill: Stats, decode: Stats) -> tuple[float, float]:
        """The objectives of an anchored measurement: each ratio to the anchor times the
        study's reference for the anchor on this device (the anchor's milliseconds in the
        study's first anchored measurement there, stored in the study: every trial, resumed
        or not, is scaled by the same number, so its ranking is the ratios')."""
        if prefill.anchor is None or decode.anchor is None:
            raise AssertionError(f"trial {trial_number}: an anchored search got a measurement without its anchor ratios")
        reference = self.anchor_reference.get(device)
        if reference is None:
            reference = {"prefill_ms": prefill.anchor["anchor_quantile_ms"], "decode_ms": decode.anchor["anchor_quantile_ms"], "trial": trial_number}
            self.anchor_reference[device] = reference
            self._open_study().set_user_attr(ANCHOR_REFERENCE_ATTR, self.anchor_reference)
        return prefill.anchor["ratio"] * reference["prefill_ms"], decode.anchor["ratio"] * reference["decode_ms"]

    def _measurement_key(self, spec: ArchSpec, device: str) -> str:
        from devices.artifact import measurement_revision, toolchain_versions

        c = self.config
        protocol = c.protocol.key + (f"+anchor:{self.anchor_spec.key}" if self.anchored else "")
        return measurement_key(spec.key, c.backend, c.quant, protocol, self.devices[device].fingerprint, toolchain_versions(), measurement_revision(c.backend))

    def _start_measurement_path(self, candidate: Candidate) -> None:
        from nas.workers import compile_candidate

        for device in candidate.targets:
            cached = self.cache.get(self._measurement_key(candidate.spec, device))
            if cached is not None:
                value, provenance = cached
                if candidate.compiled is None and value.get("artifact"):
                    candidate.compiled = CompileOutcome.from_dict(value["artifact"])
                candidate.measurements[device] = MeasureOutcome(ok=True, measurement=value["measurement"])
                candidate.measurement_cached[device] = provenance
        if candidate.measurement_cached and not self.config.multi_device:
            write_trial_attrs(candidate.trial, measurement_cached_from=next(iter(candidate.measurement_cached.values())))
        if all(device in candidate.measurements for device in candidate.targets):
            return  # every device's measurement came from the cache: nothing to compile
        c = self.config
        candidate.compile_ref, candidate.bundle_ref = compile_candidate.options(**self._compile_options()).remote(
            candidate.spec.to_dict(), c.backend, c.quant, c.context + c.decode_tokens, [c.context], self.worker_cpus, self.home_node
        )

    def _start_quality(self, candidate: Candidate) -> None:
        from nas.workers import score_quality

        c = self.config
        if c.quality == "none":
            return
        from nas.quality import FREE_KINDS, score
        from nas.quality import cache_key as quality_cache_key

        # what the score means (the signal's version), with every trial: scores of two versions do not compare
        write_trial_attrs(candidate.trial, quality_signal=self._quality_signal())
        if c.quality in FREE_KINDS:  # no training: scored here, at once
            started = time.perf_counter()
            try:
                result = score(candidate.spec, c.quality)
                candidate.quality = QualityOutcome(ok=True, score=result.score, detail=result.to_dict(), wall_s=time.perf_counter() - started)
            except Exception as exc:  # a failed score fails its trial, as a proxy's failure does
                candidate.quality = QualityOutcome.from_exception(exc, time.perf_counter() - started)
            candidate.stage_s["quality"] = candidate.quality.wall_s
            return
        settings = _quality_settings(c.quality_settings)
        key = "quality-" + quality_cache_key(candidate.spec, c.quality, settings, c.seed or 0)
        cached = self.cache.get(key)
        if cached is not None:
            value, provenance = cached
            candidate.quality = QualityOutcome.from_dict(value)
            candidate.quality_cached = True
            write_trial_attrs(candidate.trial, quality_cached_from=provenance)
            return
        candidate.quality_key = key
        # A proxy step is bound by the host launching kernels, not by the GPU: four share one
        # GPU at little cost each (BENCHMARKS.md, quality proxies), so ask for a quarter.
        options = {"num_gpus": 0.25, "num_cpus": 1} if self.quality_on_gpu else {"num_cpus": 1}
        device = "cuda" if self.quality_on_gpu else "cpu"
        candidate.quality_ref = score_quality.options(**options).remote(
            candidate.spec.to_dict(), c.quality, device, c.quality_settings, c.seed or 0, self.worker_cpus, self.home_node
        )

    def _refs(self) -> dict[Any, tuple[Candidate, str, str | None]]:
        """Every result in flight: ref -> (candidate, stage, device or None)."""
        refs: dict[Any, tuple[Candidate, str, str | None]] = {}
        for candidate in self.pending.values():
            if candidate.compile_ref is not None:
                refs[candidate.compile_ref] = (candidate, CompileOutcome.stage, None)
            if candidate.quality_ref is not None:
                refs[candidate.quality_ref] = (candidate, QualityOutcome.stage, None)
            for device, ref in candidate.measure_refs.items():
                refs[ref] = (candidate, MeasureOutcome.stage, device)
        return refs

    def _advance(self) -> None:
        refs = self._refs()
        if refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
        else:
            ready = []
        for ref in ready:
            candidate, stage, device = refs[ref]
            if stage == CompileOutcome.stage:
                compiled = self._collect(ref, CompileOutcome, candidate)
                candidate.compile_ref = None
                self._on_compile(candidate, compiled)
            elif stage == QualityOutcome.stage:
                scored = self._collect(ref, QualityOutcome, candidate)
                candidate.quality_ref = None
                self._on_quality(candidate, scored)
            else:
                if device is None:
                    raise AssertionError(f"trial {candidate.trial.number}: a measurement in flight without its device")
                measured = self._collect(ref, MeasureOutcome, candidate)
                candidate.measure_refs.pop(device)
                self._on_measure(candidate, measured, device)
        for number in [n for n, cand in self.pending.items() if cand.done]:
            self._finish(self.pending.pop(number))

    def _collect(self, ref: Any, outcome_type: type[_O], candidate: Candidate) -> _O:
        """The outcome `ref` returned, its stage's time added to the candidate's and the search's."""
        try:
            outcome = outcome_type.from_dict(ray.get(ref))
        except ray.exceptions.RayError as exc:
            # The worker or actor died for good (a device actor is not restarted): this
            # stage failed, the others and the search go on.
            outcome = outcome_type.failed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        stage = outcome_type.stage
        candidate.stage_s[stage] = max(candidate.stage_s.get(stage, 0.0), outcome.wall_s)  # devices measure side by side
        self.stats.stage_s[stage] += outcome.wall_s
        return outcome

    def _on_compile(self, candidate: Candidate, outcome: CompileOutcome) -> None:
        candidate.compiled = outcome
        if not outcome.ok:
            candidate.bundle_ref = None  # nothing to measure: the trial is a compile error
            return
        c = self.config
        # The bundle's reference goes inside a list: Ray then hands the reference over
        # rather than fetching the bytes, and the actor fetches them only if it needs them.
        for device in [d for d in candidate.targets if d not in candidate.measurements]:
            candidate.measure_refs[device] = self.devices[device].actor.measure.remote(
                outcome.to_dict(), [candidate.bundle_ref], c.protocol.to_dict(), self._measurement_key(candidate.spec, device), c.measure_timeout_s, self.anchor
            )

    def _on_measure(self, candidate: Candidate, outcome: MeasureOutcome, device: str) -> None:
        self.stats.device_busy_s += outcome.wall_s
        if outcome.local_path:
            candidate.measured_from[device] = outcome.local_path
            if candidate.compiled is not None and candidate.compiled.measured_from is None:
                candidate.compiled.measured_from = outcome.local_path
        if not candidate.measure_refs:
            candidate.bundle_ref = None  # measured everywhere: Ray may free the bundle
            self._discard_received_copy(candidate, device)
        candidate.measurements[device] = outcome
        if outcome.ok and outcome.measurement is not None and outcome.measurement["status"] == "ok":
            if candidate.compiled is None:
                raise AssertionError(f"trial {candidate.trial.number} was measured on {device} without a compile result")
            self.cache.put(self._measurement_key(candidate.spec, device), {"measurement": outcome.measurement, "artifact": candidate.compiled.to_dict()}, self.config.study_name, candidate.trial.number)

    def _discard_received_copy(self, candidate: Candidate, device: str) -> None:
        """Every device has measured a bundle that travelled from another node: its copy
        under `<cache>/received/` has served (each agent keeps the artifact by sha256) and
        goes, unless another candidate in flight uses the same bundle."""
        sha = candidate.compiled.bundle_sha256 if candidate.compiled else None
        copies = set(candidate.measured_from.values())
        if not sha or not copies:
            return
        others = [p for p in self.pending.values() if p is not candidate and p.compiled is not None and p.compiled.bundle_sha256 == sha and (p.measure_refs or p.compile_ref is not None)]
        if not others:
            for path in copies:
                self.discards.append(self.devices[device].actor.discard.remote(path))  # on the actors' node; waited for at the end

    def _on_quality(self, candidate: Candidate, outcome: QualityOutcome) -> None:
        candidate.quality = outcome
        if outcome.ok:
            if candidate.quality_key is None:
                raise AssertionError(f"trial {candidate.trial.number} was scored without a quality cache key")
            self.cache.put(candidate.quality_key, outcome.to_dict(), self.config.study_name, candidate.trial.number)

    # -- telling the study ----------------------------------------------------------------

    def _finish(self, candidate: Candidate) -> None:
        c, trial = self.config, candidate.trial
        artifact = None
        if candidate.compiled is not None and candidate.compiled.ok:
            # path: where it was compiled, on the compile node; measured_from: the copy the
            # device actor read (the same folder unless the compile ran on another node)
            artifact = candidate.compiled.artifact_attr(c.backend, c.quant)
        write_trial_attrs(trial, cached=bool(candidate.measurement_cached) or candidate.quality_cached, stage_s=candidate.stage_s, artifact=artifact)
        if c.multi_device:
            self._finish_on_devices(candidate)
            return
        (device,) = candidate.targets  # one device: a candidate it prefilters is never started
        record = self._device_record(candidate, device)
        if not record.measured:
            write_trial_attrs(trial, status=record.status, **record.trial_attrs())
            self._tell(trial, record.status)
            return
        write_trial_attrs(trial, **(record.trial_attrs() | {"reason": None}))
        if self.prescreen is not None:
            self.prescreen.add(candidate.spec, prefill_ms=record.prefill_ms, decode_ms=record.decode_ms, footprint_bytes=record.footprint_bytes, quality=_free_quality(candidate.spec, c.quality))
        quality_score = self._quality_score(candidate)
        if quality_score is False:
            return
        if record.over_budget_bytes is None:
            raise AssertionError(f"trial {trial.number}: a measured device record without its excess over the budget")
        trial.set_constraint(MEMORY_CONSTRAINT, record.over_budget_bytes)
        write_trial_attrs(trial, status=record.status, reason=record.reason)
        self._tell(trial, record.status, values=objective_values(c.quality, quality_score, *record.latencies()))

    def _device_record(self, candidate: Candidate, device: str) -> DeviceRecord:
        """What `device` made of the candidate: its status (ok, infeasible over its budget,
        or how it failed), the headline figures and the whole measurement."""
        c = self.config
        budget = self.devices[device].budget_bytes
        record = DeviceRecord(status=TrialStatus.OK, budget_bytes=budget, cached_from=candidate.measurement_cached.get(device), measured_from=candidate.measured_from.get(device))
        outcome = candidate.measurements.get(device)
        if outcome is None:  # never sent to the device: its compile failed (a cached measurement needs none)
            record.status, record.reason = TrialStatus.COMPILE_ERROR, f"compile failed: {candidate.compiled.error if candidate.compiled else 'no compile result'}"
            return record
        if not outcome.ok:  # the measurement never came back: the agent or its actor was lost
            record.status, record.reason = TrialStatus.LOST, outcome.error or "lost"
            return record
        m = outcome.measurement
        if m is None:  # an ok outcome carries its measurement; without one, nothing came back
            record.status, record.reason = TrialStatus.LOST, "the device returned no measurement"
            return record
        if m["status"] != "ok":  # the device ran it and it failed there (oom, timeout, error)
            record.status, record.reason = TrialStatus(m["status"]), m.get("error") or m["status"]
            if "protocol" in m:
                record.measurement = m
            return record
        measurement = Measurement.from_dict(m)
        prefill, decode = measurement.prefill[c.context], measurement.decode[c.context]
        footprint = measurement.memory.get("footprint_bytes")
        record.measurement = m
        if self.anchored:
            record.prefill_ms, record.decode_ms = self._anchored_ms(device, candidate.trial.number, prefill, decode)
        else:
            record.prefill_ms, record.decode_ms = prefill.median_ms, decode.median_ms
        record.prefill_stats, record.decode_stats = prefill.to_dict(), decode.to_dict()
        record.footprint_bytes, record.peak_rss_bytes = footprint, measurement.memory.get("peak_rss_bytes")
        if footprint:
            record.memory_estimate_error = (candidate.estimate["total_bytes"] - footprint) / footprint
        record.over_budget_bytes = over = float((footprint or 0) - budget)
        if footprint is not None and over > 0:  # no footprint: `over` is minus the budget
            record.status = TrialStatus.INFEASIBLE
            record.reason = f"footprint {footprint / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB"
        return record

    def _quality_score(self, candidate: Candidate) -> float | None | bool:
        """The quality score (None without a proxy), or False after failing the trial for it."""
        c, trial = self.config, candidate.trial
        if c.quality == "none":
            return None
        q = candidate.quality or QualityOutcome.failed("no quality result")
        if not q.ok:
            write_trial_attrs(trial, status=TrialStatus.ERROR, reason=f"quality proxy failed: {q.error}")
            self._tell(trial, TrialStatus.ERROR)
            return False
        write_trial_attrs(trial, quality=q.score, quality_detail=q.detail)
        return q.score

    def _finish_on_devices(self, candidate: Candidate) -> None:
        """Tell a multi-device trial: every device's record under `devices`, one memory
        constraint per device; COMPLETE (ok, or infeasible when over any device's budget)
        only when every device measured it; PRUNED when the pre-filter kept it off some
        device (certainly infeasible there, measured on the rest); FAIL when any device
        failed, with the others' figures kept."""
        c, trial = self.config, candidate.trial
        records: dict[str, DeviceRecord] = {}
        for name, run in self.devices.items():
            if name in candidate.prefiltered:
                lower = candidate.prefiltered[name] + run.budget_bytes
                records[name] = DeviceRecord(status=TrialStatus.PREFILTERED, budget_bytes=run.budget_bytes,
                                             reason=f"needs at least {lower / 2**20:.0f} MiB (analytic lower bound) > budget {run.budget_bytes / 2**20:.0f} MiB: not measured here")
                trial.set_constraint(memory_constraint(name), candidate.prefiltered[name])
                continue
            records[name] = record = self._device_record(candidate, name)
            if record.over_budget_bytes is not None:
                trial.set_constraint(memory_constraint(name), record.over_budget_bytes)
        write_trial_attrs(trial, devices=records)
        failed = {name: r for name, r in records.items() if not r.measured and r.status is not TrialStatus.PREFILTERED}
        if failed:
            status = next(iter(failed.values())).status
            reasons = {r.reason or r.status.value for r in failed.values()}
            # a compile error is the same on every device: say it once
            reason = reasons.pop() if status == TrialStatus.COMPILE_ERROR and len(reasons) == 1 else "; ".join(f"{name}: {r.reason}" for name, r in failed.items())
            measured = [name for name, r in records.items() if r.measured]
            if measured:
                reason += f" (measured on {', '.join(measured)})"
            write_trial_attrs(trial, status=status, reason=reason)
            self._tell(trial, status)
            return
        quality_score = self._quality_score(candidate)
        if quality_score is False:
            return
        if candidate.prefiltered:
            reason = "; ".join(f"{name}: {records[name].reason}" for name in candidate.prefiltered) + f" (measured on {', '.join(candidate.targets)})"
            write_trial_attrs(trial, status=TrialStatus.PREFILTERED, reason=reason)
            self._tell(trial, TrialStatus.PREFILTERED)
            return
        over = [name for name, r in records.items() if r.status is TrialStatus.INFEASIBLE]
        status = TrialStatus.INFEASIBLE if over else TrialStatus.OK
        write_trial_attrs(trial, status=status, reason="; ".join(f"{name}: {records[name].reason}" for name in over) or None)
        latencies = [records[name].latencies() for name in self.devices]
        self._tell(trial, status, values=objective_values(c.quality, quality_score, *latencies[0], more=latencies[1:]))

    def _tell(self, trial: optuna.Trial, status: TrialStatus, values: list[float] | None = None) -> None:
        """Tell the study how `trial` ended, in the state its status maps to (`TrialStatus.state`)."""
        study = self._open_study()
        if status.state == TrialState.COMPLETE:
            study.tell(trial, values)
        else:
            study.tell(trial, state=status.state)
        self.stats.count(status.value)



class SearchInterrupted(Exception):
    """SIGINT or SIGTERM reached the driver; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between waits (at least once a second).
    The handler must not raise: the signal can land inside Ray's C++ `wait`, which then
    turns the exception into a SystemError."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise SearchInterrupted(self.signum)


@contextlib.contextmanager
def _stop_on_signals():
    flag = _StopFlag()

    def handler(signum, frame):
        flag.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _require_existing_sqlite(url: str, study: str) -> None:
    """--resume of a SQLite file that does not exist: say so rather than create an empty one."""
    missing = missing_sqlite_file(url)
    if missing is not None:
        raise UserError(f"--resume: there is no study {study!r} to resume: {missing} does not exist; drop --resume to start it, or check --storage")


def _signal_version(kind: str, settings_name: str) -> str | None:
    from nas.quality import signal_version

    return None if kind == "none" else signal_version(kind, _quality_settings(settings_name))


def _quality_settings(name: str):
    from nas.quality.settings import QualitySettings

    return QualitySettings.named(name)


def _fingerprint(info: dict[str, Any], session: DeviceSession) -> str:
    """The device's fingerprint, which the agent computes (`AgentConfig.fingerprint`); for an
    agent too old to send it, the same rule applied to its facts (`devices.stack.agent_fingerprint`)."""
    from devices.stack import agent_fingerprint

    if isinstance(info.get("fingerprint"), str) and info["fingerprint"]:
        return info["fingerprint"]
    profile = info.get("profile")
    return agent_fingerprint(info.get("machine") or {}, profile.get("name") if isinstance(profile, dict) else profile, info.get("emulated"), info.get("limits") or {})


def _check_same_devices(study: optuna.Study, config: SearchConfig) -> None:
    """A resumed study must be searched on the devices (and budgets) it was started with:
    its objectives are named after them."""
    expected = objective_names(config.quality, config.devices if config.multi_device else None)
    if study.metric_names and list(study.metric_names) != expected:
        raise UserError(f"study {study.study_name!r} has objectives {', '.join(study.metric_names)}, this search would have {', '.join(expected)}: "
                        "resume it with the --device list it was started with, or start a new --study")
    previous = StudyMetadata.read(study).budgets_bytes
    budgets = {name: config.budget_for(name) for name in config.devices}
    if config.multi_device and previous is not None and previous != budgets:
        raise UserError(f"study {study.study_name!r} was run with budgets {previous}, not {budgets}; resume it with the same --budget, or start a new --study")


def _stored_metadata(storage: optuna.storages.BaseStorage, name: str) -> StudyMetadata | None:
    try:
        return StudyMetadata.read(optuna.load_study(study_name=name, storage=storage))
    except KeyError:
        return None


def _previous_anchor(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any] | None:
    """The anchor a stored study was measured with (None: none, or no such study)."""
    stored = _stored_metadata(storage, name)
    return None if stored is None else stored.anchor


def _previous_protocol(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any] | None:
    """The measurement protocol a stored study was measured with (None: none, or no such study)."""
    stored = _stored_metadata(storage, name)
    return None if stored is None else stored.protocol


def run_search(config: SearchConfig, console=None) -> optuna.Study:
    return Search(config, console=console).run()



def _free_quality(spec: ArchSpec, quality: str) -> float | None:
    """The quality objective when it is free to compute before measuring (nas.prescreen)."""
    from nas.prescreen import free_quality

    return free_quality(spec, quality)


__all__ = ["SearchConfig", "DeviceRun", "Search", "SearchInterrupted", "run_search", "start_ray"]
