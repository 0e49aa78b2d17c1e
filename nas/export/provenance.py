"""The machine-readable story of an exported folder (`lfm2_nas.json`): which study, trial,
device, runtime and protocol its figures come from, read through the study schema
(`StudyMetadata`, `TrialRecord`)."""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

import optuna

from nas.export.selection import Member
from nas.study_schema import StudyMetadata

#: Targets that write a trainable model folder with our seeded initial weights.
MODEL_TARGETS = ("hf", "lfm2")
#: The measured figures a folder's provenance repeats (TrialRecord fields of those names).
MEASURED_KEYS = ("prefill_ms", "decode_ms", "footprint_bytes", "peak_rss_bytes", "quality", "memory_estimate_bytes", "params", "prefill_stats", "decode_stats", "quality_detail", "quality_signal", "cached")


def redact_storage(url: str) -> str:
    """The storage URL without a password (it goes into files people share)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def study_metadata(study: optuna.Study) -> dict[str, Any]:
    metadata = StudyMetadata.read(study)
    return metadata.to_attrs() if metadata.written else {}


def provenance(study: optuna.Study, member: Member, storage_url: str, target: str, seed: int | None, family: dict[str, Any] | None) -> dict[str, Any]:
    """The machine-readable story of an exported folder (`lfm2_nas.json`), read through the
    study schema: which study, trial, device, runtime and protocol the figures come from."""
    trial, meta, record = member.trial, StudyMetadata.read(study), member.record
    measurement = record.measurement or {}
    return {
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "export_target": target,
        "init": {"function": "lfm2.model.init_weights", "seed": seed} if target in MODEL_TARGETS else None,
        "study": {
            "name": study.study_name,
            "storage": redact_storage(storage_url),
            "metric_names": study.metric_names,
            "directions": [d.name.lower() for d in study.directions],
            **{k: getattr(meta, k) for k in ("budget_bytes", "context", "backend", "quant", "quality", "quality_signal", "sampler", "seed", "version")},
            "space": meta.space_name,
        },
        "trial": {
            "number": record.number,
            "state": record.state,
            "status": record.written_status,  # as stored (None for a trial the search did not write)
            "reason": record.reason,
            "values": trial.values,
            "preset": record.preset,
            "datetime_complete": record.datetime_complete,
        },
        "measured": _measured(record),
        # a multi-device search's figures per device (each whole measurement stays in the study)
        **({"measured_on_devices": {name: {k: v for k, v in r.to_attrs().items() if k != "measurement"} for name, r in record.devices.items()}} if record.devices else {}),
        "device": measurement.get("device") or meta.device or None,
        "runtime": {"backend": measurement.get("backend") or meta.backend, "quant": measurement.get("quant") or meta.quant, "stack": measurement.get("stack"), "load_time_s": measurement.get("load_time_s")},
        "protocol": measurement.get("protocol") or meta.protocol,
        "artifact": record.artifact,
        "versions": meta.versions or None,
        "family": family,
    }




def _measured(record) -> dict[str, Any]:
    """The figures the trial has (a multi-device trial's are the worst device's)."""
    values = {k: getattr(record, k) for k in MEASURED_KEYS}
    values["cached"] = record.cached
    return {k: v for k, v in values.items() if v is not None}


__all__ = ["MEASURED_KEYS", "MODEL_TARGETS", "provenance", "redact_storage", "study_metadata"]
