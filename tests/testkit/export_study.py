"""The study the export tests read (its check against docs/study-schema.md is
tests/test_export_study.py).

Until the lead's `tests/data/search_small.db` (written by a real `lfm2-nas search`, study
`small`) exists, `small_study` builds one through Optuna's public API exactly as the
schema describes (real ArchSpecs, the memory constraint through `trial.set_constraint`,
`Measurement`/`Stats` dicts); the figures are made up but consistent. Switching to the real file is the one
line `REAL_STUDY_DB` below.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
from optuna.trial import TrialState

from devices.protocol import Measurement, Protocol, Stats
from lfm2 import ArchSpec
from nas.objectives import directions, objective_names
from nas.study_schema import MEMORY_CONSTRAINT, StudyMetadata, TrialStatus, write_trial_attrs
from testkit import DATA

#: The real study, once the lead provides it: set to DATA_DB (and nothing else changes).
DATA_DB = DATA / "search_small.db"
# The committed real study (tests/data/search_small.db) is not used here: its feasible winners
# all have sliding-window layers, which Hugging Face Lfm2 cannot express, so `--to hf` would
# refuse every one. The hand-made study below follows the same schema with exportable specs.
# tests/test_quickstart_path.py takes the real study through `--to lfm2` and `lfm2-nas train`.
REAL_STUDY_DB: Path | None = None
STUDY_NAME = "small"
BUDGET = 64 * 2**20
CONTEXT = 128


def tiny_spec(layers: str, d_model: int = 64, **changes) -> ArchSpec:
    ops = {"C": "conv", "A": "attn", "S": "swa"}
    fields = dict(vocab_size=512, d_model=d_model, layers=tuple(ops[c] for c in layers), n_heads=4, n_kv_heads=2, ffn_dim=2 * d_model + 32, max_seq_len=256)
    fields.update(changes)
    return ArchSpec(**fields)


def _stats(median: float, tokens: int) -> Stats:
    samples = [median * f for f in (0.97, 0.99, 1.0, 1.01, 1.04)]
    return Stats(median_ms=median, trimmed_mean_ms=median, p10_ms=samples[0], p90_ms=samples[-1], cv=0.025, samples_ms=samples, tokens=tokens)


DEVICE = {"name": "test-host", "profile": "local", "emulated": False, "cpu_model": "AMD EPYC (test)", "cores": 2, "memory_bytes": 23 * 2**30, "os": "Linux", "runtimes": ["executorch", "onnx"]}


def _metadata(protocol: Protocol, backend: str) -> dict:
    return {
        "version": "0.1.0",
        "device": DEVICE,
        "budget_bytes": BUDGET,
        "context": CONTEXT,
        "backend": backend,
        "quant": "fp32",
        "protocol": protocol.to_dict(),
        "space": {"name": "test", "text": "# made by tests/testkit/export_study.py\n"},
        "quality": "mad",
        "sampler": "tpe",
        "seed": 0,
        "versions": {"python": "3.11", "torch": "2.13.0"},
    }


#: (layout, d_model, quality, prefill_ms, decode_ms, footprint MiB): ok/infeasible trials.
MEASURED = [
    ("CCAC", 64, 0.30, 10.0, 1.00, 8),
    ("CACA", 64, 0.34, 11.0, 1.10, 9),
    ("CCACCA", 96, 0.42, 16.0, 1.60, 20),
    ("CACACA", 96, 0.45, 18.0, 1.80, 22),
    ("CCACCACC", 128, 0.52, 25.0, 2.50, 40),
    ("CACCACCA", 128, 0.55, 27.0, 2.70, 44),
    ("CCCC", 64, 0.20, 12.0, 1.20, 10),  # dominated by CCAC
    ("AAAAAAAA", 192, 0.70, 60.0, 6.00, 90),  # over the budget: infeasible
]


def build_study(storage_url: str, name: str = STUDY_NAME, measured=MEASURED, extra=(), artifact_for=None, backend: str = "executorch") -> optuna.Study:
    """A study laid out as the search writes it: metadata, spec attrs, measurements, the
    memory constraint, failed and pruned trials."""
    protocol = Protocol(prompt_lengths=(CONTEXT,), decode_depths=(CONTEXT,), decode_tokens=4, min_runs=3, max_runs=5)
    # Built in memory, then copied: SQLite commits every attr on its own, which is slow here.
    study = optuna.create_study(study_name=name, directions=directions("mad"), sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(objective_names("mad"))
    StudyMetadata.from_attrs(_metadata(protocol, backend)).write(study)  # through the schema, as the search writes
    rows = [(tiny_spec(layout, d), q, p, dms, mib) for layout, d, q, p, dms, mib in measured]
    rows += list(extra)  # (spec, quality, prefill_ms, decode_ms, footprint MiB)
    for index, (spec, quality, prefill, decode, mib) in enumerate(rows):
        trial = study.ask()
        _spec_attrs(trial, spec)
        footprint = mib * 2**20
        measurement = Measurement(
            status="ok", artifact_sha256="0" * 64, backend=backend, quant="fp32", spec_key=spec.key, protocol=protocol.to_dict(),
            load_time_s=0.2, prefill={CONTEXT: _stats(prefill, CONTEXT)}, decode={CONTEXT: _stats(decode, 4)},
            memory={"footprint_bytes": footprint, "peak_rss_bytes": footprint + 300 * 2**20}, stack={"runtime": "executorch 1.5.1", "threads": 2, "delegate": "xnnpack"},
            device=DEVICE, wall_time_s=3.0,
        ).to_dict()
        artifact = {"key": f"artifact{index:04d}", "path": f"/nonexistent/artifacts/artifact{index:04d}", "bytes": 1, "stages_s": {}, "backend": backend, "quant": "fp32"}
        if artifact_for is not None:  # a real compiled artifact (see test_export_artifacts.py)
            artifact = artifact_for(spec)
        over = float(footprint - BUDGET)
        trial.set_constraint(MEMORY_CONSTRAINT, over)
        write_trial_attrs(
            trial, measurement=measurement, artifact=artifact, prefill_ms=prefill, decode_ms=decode,
            prefill_stats=measurement["prefill"][str(CONTEXT)], decode_stats=measurement["decode"][str(CONTEXT)],
            footprint_bytes=footprint, peak_rss_bytes=footprint + 300 * 2**20, quality=quality, quality_detail={"recall": quality}, cached=False,
            status=TrialStatus.OK if over <= 0 else TrialStatus.INFEASIBLE,
            reason=f"footprint {mib} MiB > budget {BUDGET // 2**20} MiB" if over > 0 else None,
        )
        study.tell(trial, [quality, prefill, decode])
    failed = study.ask()
    _spec_attrs(failed, tiny_spec("CCAA"))
    write_trial_attrs(failed, status=TrialStatus.COMPILE_ERROR, reason="compile failed: lowering raised (test)")
    study.tell(failed, state=TrialState.FAIL)
    pruned = study.ask()
    _spec_attrs(pruned, tiny_spec("AAAAAAAAAAAA", 256))
    write_trial_attrs(pruned, status=TrialStatus.PREFILTERED, reason="estimate certainly over budget")
    pruned.set_constraint(MEMORY_CONSTRAINT, 1.0e9)
    study.tell(pruned, state=TrialState.PRUNED)
    optuna.copy_study(from_study_name=name, from_storage=study._storage, to_storage=storage_url)
    return optuna.load_study(study_name=name, storage=storage_url)


def parameter_count(spec: ArchSpec) -> int:
    """Unique parameters (tied head once), counted from the shapes; equal to
    `lfm2.count_parameters(build_model(spec))` (checked in tests/test_export_study.py) without building a model."""
    d, hd = spec.d_model, spec.head_dim
    total = spec.vocab_size * d + d + (0 if spec.tie_embeddings else spec.vocab_size * d)
    for op in spec.layers:
        total += 2 * d + 3 * d * spec.ffn_dim
        if op == "conv":
            total += 4 * d * d + d * spec.conv_kernel
        else:
            total += d * (spec.n_heads + 2 * spec.n_kv_heads) * hd + spec.n_heads * hd * d + 2 * hd
    return total


def _spec_attrs(trial, spec: ArchSpec) -> None:
    write_trial_attrs(trial, spec=spec.to_dict(), spec_key=spec.key, layout=spec.layout, params=parameter_count(spec), memory_estimate_bytes=2 * 2**20)


def small_study(folder: Path) -> tuple[str, str]:
    """(storage URL, study name) of a private copy of the study the export tests use."""
    db = folder / "search_small.db"
    if REAL_STUDY_DB is not None:
        shutil.copyfile(REAL_STUDY_DB, db)
        return f"sqlite:///{db}", STUDY_NAME
    build_study(f"sqlite:///{db}")
    return f"sqlite:///{db}", STUDY_NAME
