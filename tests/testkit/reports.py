"""The study the report tests read, and a writer of trials in the study schema.

`study_under_test(tmp_path)` gives the storage URL and name of the study to test against.
Until the lead commits a study written by a real `lfm2-nas search` at
`tests/data/search_small.db` (study `small`), it is a hand-made one written here through
Optuna's public API exactly as `docs/study-schema.md` says (real `ArchSpec`s and preset
specs from `lfm2`, real `Protocol`/`Stats`/`Measurement` dicts from `devices.protocol`,
plausible figures). Switching to the real study is the one line `REAL_SEARCH_STUDY`.

`add_measured_trial` stays in use after the switch: the dashboard test adds a trial to a
running study, which is legitimately done with Optuna's API.

`launch_chromium(playwright)`: Debian's `chromium` (installed by `.ci/run`), headless, driven
by the `playwright` package through `executable_path`; no browser is downloaded.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution

from devices.protocol import Measurement, Protocol, Stats
from devices.sampling import summarize
from lfm2 import ArchSpec, presets
from nas.study_schema import MEMORY_CONSTRAINT, StudyMetadata, TrialStatus, check_trial_attrs
from search_space.costs.counts import parameters
from testkit import DATA

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]

#: The committed study a real search wrote, as (file, study name); None: use the hand-made one.
REAL_SEARCH_STUDY: tuple[Path, str] | None = (DATA / "search_small.db", "small")
if os.environ.get("LFM2_NAS_TEST_STUDY"):  # FILE.db:NAME: run the report tests on any study
    _file, _, _name = os.environ["LFM2_NAS_TEST_STUDY"].rpartition(":")
    REAL_SEARCH_STUDY = (Path(_file), _name)

HANDMADE_NAME = "handmade"
BUDGET_BYTES = 600 * 2**20
CONTEXT = 512
PROTOCOL = Protocol(prompt_lengths=(128, CONTEXT), decode_depths=(CONTEXT,), decode_tokens=8, min_runs=5, max_runs=10)


def launch_chromium(playwright):
    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium: apt-get install -y chromium"
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def study_under_test(tmp_path: Path) -> tuple[str, str]:
    """(storage URL, study name) of a private copy of the study the tests read."""
    if REAL_SEARCH_STUDY is not None:
        source, name = REAL_SEARCH_STUDY
        copy = tmp_path / source.name
        shutil.copyfile(source, copy)  # tests never touch the committed file
        return f"sqlite:///{copy}", name
    url = f"sqlite:///{tmp_path / 'handmade.db'}"
    write_handmade_study(url, HANDMADE_NAME)
    return url, HANDMADE_NAME


def parameter_count(spec: ArchSpec) -> int:
    """The parameter count (search_space's analytic count, which equals the built model's)."""
    return parameters(spec)


def _stats(rng: np.random.Generator, median_ms: float, cv: float, tokens: int, runs: int = 8) -> Stats:
    """Stats of synthetic samples, summarised as a measurement does (interval included)."""
    samples = sorted(float(x) for x in rng.normal(median_ms, cv * median_ms, size=runs).clip(min=median_ms * 0.5))
    return summarize(samples, tokens, PROTOCOL.trim_fraction)


def _variant(base: str, **changes) -> ArchSpec:
    return presets[base].replace(**changes)


def _layers(n: int, attention_at: tuple[int, ...], swa_at: tuple[int, ...] = ()) -> tuple[str, ...]:
    return tuple("attn" if i in attention_at else "swa" if i in swa_at else "conv" for i in range(n))


def handmade_candidates() -> list[tuple[ArchSpec, str | None, str]]:
    """(spec, preset name or None, status) of the hand-made study's trials, in order."""
    candidates = [
        (presets["LFM2-350M"], "LFM2-350M", "ok"),
        (presets["LFM2-700M"], "LFM2-700M", "infeasible"),
        (presets["LFM2-1.2B"], "LFM2-1.2B", "prefiltered"),
    ]
    shapes = [
        (768, 12, (3, 7, 10), ()),
        (768, 10, (4, 8), ()),
        (512, 12, (2, 5, 8, 10), ()),
        (512, 8, (5,), ()),
        (1024, 10, (3, 7), ()),
        (1024, 14, (2, 6, 10), (4, 12)),
        (768, 16, (2, 5, 8, 10, 12, 14), ()),
        (512, 16, tuple(range(16)), ()),
        (640, 12, (5,), (2, 8, 10)),
        (896, 12, (3, 6, 9), ()),
    ]
    for d_model, n_layers, attention_at, swa_at in shapes:
        heads = d_model // 64
        kv = 8 if heads % 8 == 0 else 2
        spec = _variant(
            "LFM2-350M",
            d_model=d_model,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=64,
            ffn_dim=int(d_model * 4.5) // 64 * 64,
            layers=_layers(n_layers, attention_at, swa_at),
            swa_window=256 if swa_at else 0,
        )
        candidates.append((spec, None, "ok"))
    candidates.append((_variant("LFM2-700M", layers=_layers(16, (1, 4, 7, 10, 13))), None, "oom"))
    candidates.append((_variant("LFM2-350M", d_model=1280, n_heads=20, n_kv_heads=4, head_dim=64), None, "compile_error"))
    return candidates


def study_metadata(quality: str = "mad") -> dict:
    return {
        "version": "0.1.0",
        "device": {
            "name": "local-2core",
            "profile": "host",
            "emulated": False,
            "cpu_model": "AMD EPYC 7B13 (hand-made study)",
            "cores": 2,
            "memory_bytes": 23 * 2**30,
            "os": "Linux 6.1 (Debian 12)",
            "runtimes": {"executorch": "1.5.1", "onnxruntime": "1.32.0"},
        },
        "budget_bytes": BUDGET_BYTES,
        "context": CONTEXT,
        "backend": "executorch",
        "quant": "q8",
        "protocol": PROTOCOL.to_dict(),
        "space": {"name": "hybrid-small", "text": "[space]\nd_model = [512, 640, 768, 896, 1024]\nlayers = [8, 16]\n"},
        "quality": quality,
        "sampler": "nsga2",
        "seed": 0,
        "versions": {"torch": "2.13.0", "executorch": "1.5.1", "optuna": optuna.__version__},
    }


def create_schema_study(url: str, name: str, quality: str = "mad") -> optuna.Study:
    with_quality = quality != "none"
    study = optuna.create_study(
        study_name=name,
        storage=url,
        directions=["maximize", "minimize", "minimize"] if with_quality else ["minimize", "minimize"],
    )
    with warnings.catch_warnings():  # set_metric_names is "experimental" in Optuna 5; the schema uses it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["quality", "prefill_ms", "decode_ms"] if with_quality else ["prefill_ms", "decode_ms"])
    StudyMetadata.from_attrs(study_metadata(quality)).write(study)  # through the schema, as the search writes
    return study


def add_measured_trial(
    study: optuna.Study,
    spec: ArchSpec,
    *,
    status: str = "ok",
    preset: str | None = None,
    seed: int = 0,
    prefill_ms: float | None = None,
    decode_ms: float | None = None,
    footprint_bytes: int | None = None,
    with_params: bool = True,
) -> optuna.trial.FrozenTrial:
    """Add one trial in the schema's form, with figures derived from the spec's size unless
    given (the dashboard test adds a trial that must land on the front). The budget is the
    study's own (`lfm2_nas.budget_bytes`), so this also writes into a real search's study;
    pass `with_params=False` there (its parameters have their own distributions)."""
    rng = np.random.default_rng(seed)
    budget = int(StudyMetadata.read(study).budget_bytes or BUDGET_BYTES)
    params = parameter_count(spec)
    with_quality = "quality" in (study.metric_names or [])
    kv_bytes = spec.kv_cache_bytes_per_token(1) * CONTEXT
    estimate = int(params * 1.02 + kv_bytes + 24 * 2**20)
    n_attention = len(spec.attention_layers)
    attrs: dict = {"spec": spec.to_dict(), "spec_key": spec.key, "layout": spec.layout, "params": params, "memory_estimate_bytes": estimate}
    if preset:
        attrs["preset"] = preset
    distributions = {"d_model": CategoricalDistribution([512, 640, 768, 896, 1024, 1280, 1536, 2048]), "n_layers": IntDistribution(8, 16)} if with_params else {}
    trial_params = {"d_model": spec.d_model, "n_layers": spec.n_layers} if with_params else {}
    if status == "prefiltered":
        attrs |= {"status": status, "reason": f"needs at least {estimate / 2**20:.0f} MiB (analytic lower bound) > budget {budget / 2**20:.0f} MiB: not compiled"}
        trial = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params=trial_params, distributions=distributions, user_attrs=check_trial_attrs(attrs), constraints={MEMORY_CONSTRAINT: float(estimate - budget)})
        study.add_trial(trial)
        return study.trials[-1]
    if status in ("oom", "compile_error"):
        reason = {"oom": "the measuring child ran out of memory under the device's memory cap while loading the program", "compile_error": "XNNPACK lowering failed: unsupported head layout (hand-made example)"}[status]
        attrs |= {"status": status, "reason": reason}
        trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params=trial_params, distributions=distributions, user_attrs=check_trial_attrs(attrs))
        study.add_trial(trial)
        return study.trials[-1]

    # A 2-core machine: prefill is compute-bound (~80 GFLOP/s at q8), decode bandwidth-bound (~15 GB/s).
    flops = 2 * params * CONTEXT + 4 * n_attention * CONTEXT**2 * spec.d_model
    prefill_ms = prefill_ms if prefill_ms is not None else flops / 80e9 * 1e3
    decode_ms = decode_ms if decode_ms is not None else (params * 1.0 + kv_bytes) / 15e9 * 1e3
    prefill = {length: _stats(rng, prefill_ms * length / CONTEXT, rng.uniform(0.02, 0.08), length) for length in PROTOCOL.prompt_lengths}
    decode = {depth: _stats(rng, decode_ms, rng.uniform(0.02, 0.10), PROTOCOL.decode_tokens) for depth in PROTOCOL.decode_depths}
    footprint = footprint_bytes if footprint_bytes is not None else int(estimate * rng.uniform(0.95, 1.08))
    peak = footprint + 355 * 2**20
    measurement = Measurement(
        status="ok",
        artifact_sha256=f"{seed:064x}",
        backend="executorch",
        quant="q8",
        spec_key=spec.key,
        protocol=PROTOCOL.to_dict(),
        load_time_s=float(rng.uniform(0.3, 1.5)),
        prefill=prefill,
        decode=decode,
        memory={"footprint_bytes": footprint, "peak_rss_bytes": peak, "baseline_rss_bytes": 355 * 2**20},
        artifact_bytes=int(params * 1.01),
        stack={"runtime": "executorch 1.5.1", "delegate": "XnnpackBackend", "threads": 2},
        device={"name": "local-2core", "emulated": False},
    ).to_dict()
    quality_score = float(np.clip(0.25 + 0.06 * np.log2(params / 5e7) + 0.025 * min(n_attention, 6) + rng.normal(0, 0.01), 0, 1))
    over = float(footprint - budget)
    status = TrialStatus.INFEASIBLE if over > 0 else TrialStatus.OK
    prefill_stats, decode_stats = prefill[CONTEXT], decode[CONTEXT]
    attrs |= {
        "status": status,
        "prefill_ms": prefill_stats.median_ms,
        "decode_ms": decode_stats.median_ms,
        "prefill_stats": prefill_stats.to_dict(),
        "decode_stats": decode_stats.to_dict(),
        "footprint_bytes": footprint,
        "peak_rss_bytes": peak,
        "measurement": measurement,
        "artifact": {"key": f"{spec.key}-executorch-q8", "path": f"artifacts/{spec.key}", "bytes": int(params * 1.01), "stages_s": {"export": 4.0, "lower": 41.0}, "backend": "executorch", "quant": "q8"},
        "stage_s": {"compile": 45.0, "measure": 20.0, "quality": 12.0},
        "cached": False,
    }
    if status == "infeasible":
        attrs["reason"] = f"footprint {footprint / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB"
    values = [prefill_stats.median_ms, decode_stats.median_ms]
    if with_quality:
        attrs |= {"quality": quality_score, "quality_detail": {"selective_copy": quality_score * 0.9, "recall": min(1.0, quality_score * 1.1)}}
        values = [quality_score, *values]
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, values=values, params=trial_params, distributions=distributions, user_attrs=check_trial_attrs(attrs), constraints={MEMORY_CONSTRAINT: over})
    study.add_trial(trial)
    return study.trials[-1]


def write_handmade_study(url: str, name: str = HANDMADE_NAME, quality: str = "mad") -> optuna.Study:
    study = create_schema_study(url, name, quality)
    for seed, (spec, preset, status) in enumerate(handmade_candidates()):
        add_measured_trial(study, spec, status=status, preset=preset, seed=seed)
    return study
