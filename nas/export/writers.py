"""Writing what an export selected: a trainable model folder (`--to hf|lfm2`) or a verified
copy of the measured artifact (`--to executorch|onnx|llamacpp`), each with `lfm2_nas.json`
and `ARCH.md`; a family's `family.json` and `FAMILY.md`; and the two entry points,
`export_from_study` and `export_preset`."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lfm2.errors import UserError
from lfm2.hf import NotRepresentableError, to_hf_config
from lfm2.hf_io import save_hf_folder, save_model_folder
from lfm2.model import build_model, count_parameters
from nas.export.markdown import architecture_section, arch_markdown, family_markdown, hf_use_section
from nas.export.provenance import MODEL_TARGETS, provenance, redact_storage, study_metadata
from nas.export.selection import TIER_METRICS, Member, pareto_members, pick_family, select_trial
from nas.study_schema import DEFAULT_STORAGE, TrialStatus
from nas.study_schema import load_study as load_existing_study

TARGETS = ("hf", "lfm2", "executorch", "onnx", "llamacpp")
#: Targets that copy the compiled artifact a trial was measured with.
ARTIFACT_TARGETS = ("executorch", "onnx", "llamacpp")


@dataclass
class ExportResult:
    target: str
    folders: list[Path] = field(default_factory=list)
    family_index: Path | None = None
    skipped: list[str] = field(default_factory=list)  # "trial N: why"


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise UserError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")


def _check_hf_representable(members: list[Member]) -> list[tuple[Member, str]]:
    problems = []
    for member in members:
        try:
            to_hf_config(member.spec)
        except NotRepresentableError as exc:
            problems.append((member, str(exc)))
    return problems


def _prepare_destination(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise UserError(f"{path} already exists; remove it, choose another OUT, or pass --overwrite")
        shutil.rmtree(path)


def _resolve_artifact_path(raw: str, storage_url: str) -> Path:
    path = Path(raw).expanduser()
    if path.is_absolute() or path.exists():
        return path
    if storage_url.startswith("sqlite:///"):
        beside_db = Path(storage_url.removeprefix("sqlite:///")).expanduser().parent / path
        if beside_db.exists():
            return beside_db
    return path


def _check_artifact_info(member: Member, target: str) -> dict[str, Any]:
    number = member.trial.number
    info = member.record.artifact
    if not info or not info.get("path"):
        raise UserError(f"trial {number} records no measured artifact (status {member.record.written_status!r}); export it with --to hf or --to lfm2, or pick a measured trial")
    if info.get("backend") and info["backend"] != target:
        raise UserError(
            f"trial {number} was measured with backend {info['backend']} ({info.get('quant')}), not {target}: "
            + (f"export it with --to {info['backend']} (the measured files) or --to hf / --to lfm2 (a trainable folder)" if info["backend"] in ARTIFACT_TARGETS else "only --to hf or --to lfm2 can export it")
        )
    return info


def _export_artifact(member: Member, target: str, destination: Path, storage_url: str) -> None:
    from devices.artifact import Artifact

    number = member.trial.number
    info = _check_artifact_info(member, target)
    source = _resolve_artifact_path(info["path"], storage_url)
    if not source.is_dir():
        raise UserError(f"the artifact trial {number} was measured with is gone from {source}; export --to hf instead, or resume the search to compile it again")
    artifact = Artifact.load(source)  # verifies every file's sha256
    if artifact.backend != target:
        raise UserError(f"the artifact at {source} (trial {number}) is a {artifact.backend} artifact, not {target}: export it with --to {artifact.backend}")
    if info.get("key") and artifact.key != info["key"]:
        raise UserError(f"the artifact at {source} has key {artifact.key}, but trial {number} was measured with {info['key']}: it was replaced since; export --to hf instead")
    if artifact.spec.key != member.spec.key:
        raise UserError(f"the artifact at {source} holds architecture {artifact.spec.key}, but trial {number} is {member.spec.key}; the cache was overwritten: export --to hf instead")
    shutil.copytree(source, destination)
    Artifact.load(destination)  # the copy is complete and intact


def export_members(
    study: optuna.Study,
    members: list[Member],
    target: str,
    out: Path,
    *,
    storage_url: str,
    seed: int | None = 0,
    family_name: str | None = None,
    tier_by: str | None = None,
    overwrite: bool = False,
    skip_unsupported: bool = False,
    log=print,
) -> ExportResult:
    _check_target(target)
    if family_name and tier_by is None:
        raise ValueError(f"family {family_name!r}: say what its tiers are by (tier_by: one of {', '.join(TIER_METRICS)})")
    family_tier_by = tier_by or ""  # read only for a family, whose tier_by was checked above
    result = ExportResult(target=target)
    if target == "hf":
        problems = _check_hf_representable(members)
        if problems and not skip_unsupported:
            lines = "; ".join(f"trial {m.trial.number} ({m.spec.layout}): {why}" for m, why in problems)
            raise UserError(
                f"cannot export to Hugging Face Lfm2: {lines}. To train them, export with --to lfm2 instead "
                "(the same folder with the full spec in lfm2_nas.json; `lfm2-nas train` trains it, transformers "
                "cannot load it); --to executorch or --to onnx copies the artifacts that were measured; "
                "--skip-unsupported exports only the others to hf"
            )
        for member, why in problems:
            result.skipped.append(f"trial {member.trial.number}: {why}")
            log(f"skipped trial {member.trial.number}: {why}")
        members = [m for m in members if all(m is not p for p, _ in problems)]
        if not members:
            raise UserError("no member of the selection can be exported to Hugging Face Lfm2; use --to lfm2 (trainable by lfm2-nas), --to executorch or --to onnx")
    elif target in ARTIFACT_TARGETS:
        for member in members:  # refuse before anything is written
            _check_artifact_info(member, target)
    out.mkdir(parents=True, exist_ok=True)
    family_rows = []
    for member in members:
        name = f"{family_name}-t{member.tier}" if family_name else member.default_name
        destination = out / name
        _prepare_destination(destination, overwrite)
        family = None
        if family_name:
            family = {"name": family_name, "tier": member.tier, "size": len(members), "tier_by": family_tier_by, "tier_metric": TIER_METRICS[family_tier_by], "tier_value": member.tier_value}
        record = provenance(study, member, storage_url, target, seed, family)
        if target in MODEL_TARGETS:
            model = build_model(member.spec, seed=seed)
            parameters = count_parameters(model)
            (save_hf_folder if target == "hf" else save_model_folder)(model, destination, provenance=record)
            del model
        else:
            _export_artifact(member, target, destination, storage_url)
            parameters = count_parameters(build_model(member.spec, device="meta"))
            (destination / "lfm2_nas.json").write_text(json.dumps({"spec": member.spec.to_dict(), "spec_key": member.spec.key, **record}, indent=2, default=str) + "\n")
        (destination / "ARCH.md").write_text(arch_markdown(member.spec, record, parameters))
        result.folders.append(destination)
        log(f"exported trial {member.trial.number} ({member.spec.layout}) to {destination}")
        family_rows.append(
            {
                "tier": member.tier,
                "folder": name,
                "trial": member.trial.number,
                "layout": member.spec.layout,
                "spec_key": member.spec.key,
                "parameters": parameters,
                "tier_value": member.tier_value,
                **{k: getattr(member.record, k) for k in ("footprint_bytes", "prefill_ms", "decode_ms", "quality")},
            }
        )
    if family_name:
        result.family_index = _write_family_index(study, out, family_name, family_tier_by, family_rows, target, storage_url)
    return result


def _write_family_index(study: optuna.Study, out: Path, name: str, tier_by: str, rows: list[dict[str, Any]], target: str, storage_url: str) -> Path:
    meta = study_metadata(study)
    index = {
        "family": name,
        "study": study.study_name,
        "storage": redact_storage(storage_url),
        "target": target,
        "tier_by": tier_by,
        "tier_metric": TIER_METRICS[tier_by],
        "budget_bytes": meta.get("budget_bytes"),
        "context": meta.get("context"),
        "members": rows,
    }
    path = out / "family.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    (out / "FAMILY.md").write_text(family_markdown(study.study_name, name, tier_by, rows, meta))
    return path


def export_from_study(
    study_name: str,
    out: str | Path,
    *,
    target: str = "hf",
    storage: str | None = None,
    trial: int | None = None,
    pareto: bool = False,
    family: int | None = None,
    family_name: str | None = None,
    tier_by: str = "memory",
    seed: int | None = 0,
    overwrite: bool = False,
    skip_unsupported: bool = False,
    log=print,
) -> ExportResult:
    """`lfm2-nas export`: one trial, the whole Pareto set, or a family of K from it."""
    _check_target(target)
    if family is not None:
        pareto = True
    if (trial is None) == (not pareto):
        raise UserError("choose what to export: --trial N, or --pareto (optionally with --family K)")
    storage_url = storage or DEFAULT_STORAGE
    study = load_existing_study(study_name, storage_url)
    if trial is not None:
        members = [select_trial(study, trial)]
        state = members[0].trial.state
        status = members[0].record.written_status
        if state != TrialState.COMPLETE or status not in (None, TrialStatus.OK):
            log(f"note: trial {trial} is {state.name} with status {status!r}; exporting its architecture anyway")
    else:
        members = pareto_members(study)
        if family is not None:
            if len(members) < family:
                log(f"note: the Pareto set has only {len(members)} architecture(s); the family gets {len(members)}, not {family}")
            members = pick_family(members, family, tier_by)
            family_name = family_name or study_name
    return export_members(
        study,
        members,
        target,
        Path(out),
        storage_url=storage_url,
        seed=seed,
        family_name=family_name if family is not None else None,
        tier_by=tier_by if family is not None else None,
        overwrite=overwrite,
        skip_unsupported=skip_unsupported,
        log=log,
    )


def export_preset(name: str, out: str | Path, *, seed: int | None = 0, overwrite: bool = False, log=print) -> ExportResult:
    """`lfm2-nas export --preset NAME --to hf`: an LFM2 preset (or all-attention twin) as a
    Hugging Face folder with our initialisation, e.g. the reference to train beside a winner.
    Nothing was measured, so ARCH.md has the architecture and the weights only."""
    from lfm2.presets import presets

    if name not in presets:
        raise UserError(f"unknown preset {name!r}; `lfm2-nas presets` lists them: {', '.join(presets)}")
    spec = presets[name]
    destination = Path(out) / f"{name}-{spec.key}"
    _prepare_destination(destination, overwrite)
    model = build_model(spec, seed=seed)
    parameters = count_parameters(model)
    record = {
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "export_target": "hf",
        "preset": name,
        "init": {"function": "lfm2.model.init_weights", "seed": seed},
    }
    save_hf_folder(model, destination, provenance=record)
    del model
    lines = [f"# {name}: {spec.layout} (`{spec.key}`)", "", f"The {name} preset (`lfm2.presets`), exported {record['exported_at']}; not measured by a search.", "", *architecture_section(spec, parameters), *hf_use_section(seed)]
    (destination / "ARCH.md").write_text("\n".join(lines))
    log(f"exported preset {name} to {destination}")
    return ExportResult(target="hf", folders=[destination])




__all__ = ["ARTIFACT_TARGETS", "TARGETS", "ExportResult", "export_from_study", "export_members", "export_preset"]
