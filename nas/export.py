"""Export a search's winners: trainable model folders, or the artifacts that were measured.

Reads the study only through Optuna's public API and the layout of docs/study-schema.md.

* `--to hf`: one folder per architecture with `config.json` (model_type `lfm2`,
  `Lfm2ForCausalLM`, loadable without remote code), `model.safetensors` (our seeded
  initialisation, `lfm2.model.init_weights`), `generation_config.json`, `lfm2_nas.json`
  (spec and provenance, machine-readable) and `ARCH.md` (the measured figures and where
  they come from). Specs Hugging Face's Lfm2 cannot express (sliding-window layers, ...)
  are refused, naming the trial, the reason and `--to lfm2`.
* `--to lfm2`: the same folder for any spec (`lfm2.hf_io.save_model_folder`): a `--to hf`
  folder (the same config.json and weights, byte for byte) where Lfm2 can express the spec;
  otherwise an lfm2-nas folder with the same weights file and `lfm2_nas.json` (the full
  spec, marked not loadable by `transformers`) and no `config.json`. `lfm2-nas train`
  trains either, and `lfm2.hf_io.load_model_folder` loads either. This is the target for
  the small and default spaces, whose winners often have sliding-window layers.
* `--to executorch|onnx`: a copy of the compiled artifact each trial was measured with
  (files + `manifest.json`, verified against its sha256s before and after the copy), with
  the same `ARCH.md` and `lfm2_nas.json` next to it.

`--family K` picks K members of the Pareto set spread over the range they cover: by memory
(the measured footprint, the figure the budget is compared with) or by latency (decode
ms per token at the study's context). The member nearest each of K evenly spaced targets
between the smallest and largest value is taken (ties go to the better quality, then the
faster decode); members are named `<family>-t1` (smallest/fastest) .. `<family>-tK`, and
`family.json` / `FAMILY.md` list them.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lfm2.errors import UserError
from lfm2.hf import NotRepresentableError, hf_representable, to_hf_config
from lfm2.hf_io import save_hf_folder, save_model_folder
from lfm2.model import build_model, count_parameters
from lfm2.sizes import format_size
from lfm2.spec import ArchSpec
from nas.study_schema import DEFAULT_STORAGE, StudyMetadata, TrialRecord, metric_names
from nas.study_schema import load_study as load_existing_study

TARGETS = ("hf", "lfm2", "executorch", "onnx", "llamacpp")
#: Targets that write a trainable model folder with our seeded initial weights.
MODEL_TARGETS = ("hf", "lfm2")
#: Targets that copy the compiled artifact a trial was measured with.
ARTIFACT_TARGETS = ("executorch", "onnx", "llamacpp")
TIER_METRICS = {"memory": "footprint_bytes", "latency": "decode_ms"}

INIT_DESCRIPTION = (
    "Weights are our seeded initialisation (`lfm2.model.init_weights`): normal(0, 0.02) for the "
    "embedding (tied to the output head) and every projection, with the residual outputs "
    "(`out_proj` of conv and attention, `w2` of the SwiGLU) scaled down to 0.02 / sqrt(2 * n_layers) "
    "as in GPT-2; RMSNorm gains one; depthwise conv kernels uniform(+-1/sqrt(kernel)), PyTorch's "
    "default for a conv. The model is untrained: train it with `lfm2-nas train`."
)


@dataclass
class Member:
    """One architecture to export: its trial, spec, and (in a family) its tier."""

    trial: FrozenTrial
    spec: ArchSpec
    tier: int | None = None
    tier_value: float | None = None

    @property
    def default_name(self) -> str:
        return f"trial-{self.trial.number}-{self.spec.layout}-{self.spec.key}"


@dataclass
class ExportResult:
    target: str
    folders: list[Path] = field(default_factory=list)
    family_index: Path | None = None
    skipped: list[str] = field(default_factory=list)  # "trial N: why"


# -- reading the study ---------------------------------------------------------------------


def redact_storage(url: str) -> str:
    """The storage URL without a password (it goes into files people share)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def study_metadata(study: optuna.Study) -> dict[str, Any]:
    metadata = StudyMetadata.read(study)
    return metadata.to_attrs() if metadata.written else {}


def trial_spec(trial: FrozenTrial) -> ArchSpec:
    if "spec" not in trial.user_attrs:
        raise UserError(f"trial {trial.number} has no 'spec' user attr (it failed before an architecture was sampled); pick another trial")
    return ArchSpec.from_dict(trial.user_attrs["spec"])


def select_trial(study: optuna.Study, number: int) -> Member:
    trials = study.get_trials(deepcopy=False)
    matching = [t for t in trials if t.number == number]
    if not matching:
        raise UserError(f"study {study.study_name!r} has no trial {number} (it has trials 0..{len(trials) - 1}); see `lfm2-nas study` or the dashboard")
    return Member(matching[0], trial_spec(matching[0]))


def pareto_members(study: optuna.Study) -> list[Member]:
    """The feasible Pareto set (`study.best_trials`), one member per architecture (the
    first trial of each spec key), ordered by trial number."""
    seen: dict[str, Member] = {}
    for trial in sorted(study.best_trials, key=lambda t: t.number):
        if trial.user_attrs.get("status", "ok") != "ok" or "spec" not in trial.user_attrs:
            continue
        spec = trial_spec(trial)
        seen.setdefault(spec.key, Member(trial, spec))
    if not seen:
        raise UserError(f"study {study.study_name!r} has no feasible completed trial yet, so no Pareto set; run (or resume) the search first, or export one --trial")
    return list(seen.values())


def _quality(trial: FrozenTrial) -> float:
    value = trial.user_attrs.get("quality")
    return float(value) if value is not None else float("-inf")


def _tier_value(member: Member, metric: str) -> float:
    attrs = member.trial.user_attrs
    if metric == "memory":
        value = attrs.get("footprint_bytes", attrs.get("memory_estimate_bytes"))
    else:
        value = attrs.get("decode_ms")
    if value is None:
        raise UserError(f"trial {member.trial.number} has no {TIER_METRICS[metric]} to place it in a {metric} tier; use --tier-by {'latency' if metric == 'memory' else 'memory'}")
    return float(value)


def pick_family(members: list[Member], k: int, tier_by: str = "memory") -> list[Member]:
    """K members spread evenly over the range of `tier_by` the Pareto set covers (see the
    module docstring); fewer when the set is smaller. Returned smallest/fastest first with
    `tier` 1..K."""
    if k < 1:
        raise UserError(f"--family must be >= 1, got {k}")
    if tier_by not in TIER_METRICS:
        raise UserError(f"--tier-by must be one of {', '.join(TIER_METRICS)}, got {tier_by!r}")
    values = {m.trial.number: _tier_value(m, tier_by) for m in members}
    low, high = min(values.values()), max(values.values())
    targets = [high] if k == 1 else [low + (high - low) * i / (k - 1) for i in range(k)]
    if k == 1:
        # One member: the best quality that fits, the fastest decode among equals.
        chosen = [max(members, key=lambda m: (_quality(m.trial), -float(m.trial.user_attrs.get("decode_ms", 0.0))))]
    else:
        chosen, free = [], list(members)
        for target in targets[: len(members)]:
            best = min(free, key=lambda m: (abs(values[m.trial.number] - target), -_quality(m.trial), float(m.trial.user_attrs.get("decode_ms", 0.0))))
            chosen.append(best)
            free.remove(best)
    chosen.sort(key=lambda m: (values[m.trial.number], m.trial.number))
    return [Member(m.trial, m.spec, tier=i + 1, tier_value=values[m.trial.number]) for i, m in enumerate(chosen)]


# -- what goes into every exported folder --------------------------------------------------


def provenance(study: optuna.Study, member: Member, storage_url: str, target: str, seed: int | None, family: dict[str, Any] | None) -> dict[str, Any]:
    """The machine-readable story of an exported folder (`lfm2_nas.json`), read through the
    study schema: which study, trial, device, runtime and protocol the figures come from."""
    trial, meta = member.trial, StudyMetadata.read(study)
    record = TrialRecord.read(trial, metric_names(study))
    attrs = trial.user_attrs
    measured_keys = ("prefill_ms", "decode_ms", "footprint_bytes", "peak_rss_bytes", "quality", "memory_estimate_bytes", "params", "prefill_stats", "decode_stats", "quality_detail", "quality_signal", "cached")
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
            "status": attrs.get("status"),  # as stored (None for a trial the search did not write)
            "reason": record.reason,
            "values": trial.values,
            "preset": record.preset,
            "datetime_complete": record.datetime_complete,
        },
        "measured": {k: attrs.get(k) for k in measured_keys if k in attrs},
        # a multi-device search's figures per device (each whole measurement stays in the study)
        **({"measured_on_devices": {name: {k: v for k, v in r.items() if k != "measurement"} for name, r in attrs["devices"].items()}} if isinstance(attrs.get("devices"), dict) else {}),
        "device": measurement.get("device") or meta.device or None,
        "runtime": {"backend": measurement.get("backend") or meta.backend, "quant": measurement.get("quant") or meta.quant, "stack": measurement.get("stack"), "load_time_s": measurement.get("load_time_s")},
        "protocol": measurement.get("protocol") or meta.protocol,
        "artifact": record.artifact,
        "versions": meta.versions or None,
        "family": family,
    }


def _mib(value: Any) -> str:
    return format_size(value, unit="MiB", digits=1, missing="n/a")


def _ms(value: Any) -> str:
    return f"{value:.3f} ms" if isinstance(value, (int, float)) else "n/a"


def _stats_cell(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "n/a"
    return f"p10 {stats.get('p10_ms', float('nan')):.3f}, p90 {stats.get('p90_ms', float('nan')):.3f}, cv {stats.get('cv', float('nan')):.3f}, {len(stats.get('samples_ms', []))} samples"


def architecture_section(spec: ArchSpec, parameters: int) -> list[str]:
    return [
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| layout (C conv, A attention, S sliding window) | `{spec.layout}` |",
        f"| layers / attention layers | {spec.n_layers} / {list(spec.attention_layers)} |",
        f"| d_model, SwiGLU width | {spec.d_model}, {spec.ffn_dim} |",
        f"| heads / kv heads / head_dim | {spec.n_heads} / {spec.n_kv_heads} / {spec.head_dim} |",
        f"| vocabulary, tied embeddings | {spec.vocab_size:,}, {spec.tie_embeddings} |",
        f"| conv kernel, RoPE theta, norm eps | {spec.conv_kernel}, {spec.rope_theta:g}, {spec.norm_eps:g} |",
        f"| max_seq_len | {spec.max_seq_len:,} |",
        f"| parameters | {parameters:,} |",
        f"| KV cache per token (bf16) | {spec.kv_cache_bytes_per_token(2):,} bytes |",
        "",
    ]


def _weights_and_use(seed: int | None) -> list[str]:
    return ["## Weights", "", INIT_DESCRIPTION + f" Seed {seed}.", "", "## Use", ""]


def hf_use_section(seed: int | None) -> list[str]:
    return [
        *_weights_and_use(seed),
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('.')  # model_type lfm2, no remote code",
        "```",
        "",
        "Train it: `lfm2-nas train . --corpus stdlib --steps 1000` (see the README).",
        "",
    ]


def lfm2_use_section(spec: ArchSpec, seed: int | None) -> list[str]:
    """`--to lfm2`: where Lfm2 can express the spec the folder is also a Hugging Face one."""
    not_loadable = hf_representable(spec)
    if not_loadable is None:
        return hf_use_section(seed)
    return [
        *_weights_and_use(seed),
        f"This is an lfm2-nas folder, not a Hugging Face one: {not_loadable}, so there is no `config.json` "
        "and `transformers` cannot load it (`lfm2_nas.json` records `transformers.loadable: false`). "
        "`model.safetensors` holds the weights under Hugging Face LFM2's names (a sliding-window layer's "
        "under `self_attn.*`); the full architecture is the `spec` in `lfm2_nas.json`.",
        "",
        "```python",
        "from lfm2.hf_io import load_model_folder",
        "model = load_model_folder('.')  # lfm2.LFM2: model(tokens) -> logits, model.step(...) for decoding",
        "```",
        "",
        "Train it: `lfm2-nas train . --corpus stdlib --steps 1000` (see the README); the trained model is an lfm2-nas folder too.",
        "",
    ]


def arch_markdown(spec: ArchSpec, record: dict[str, Any], parameters: int) -> str:
    """ARCH.md: the architecture, what was measured, and the provenance of every number."""
    study, trial, measured = record["study"], record["trial"], record["measured"]
    context = study.get("context")
    device = record.get("device") or {}
    runtime = record.get("runtime") or {}
    family = record.get("family")
    title = f"{family['name']}-t{family['tier']}: " if family else ""
    lines = [
        f"# {title}{spec.layout} (`{spec.key}`)",
        "",
        f"Trial {trial['number']} of study `{study['name']}` ({study['storage']}), state {trial['state']}, status `{trial['status']}`"
        + (f", the {trial['preset']} preset" if trial.get("preset") else "")
        + f". Exported {record['exported_at']} as `{record['export_target']}`.",
    ]
    if trial.get("reason"):
        lines += ["", f"Note: {trial['reason']}"]
    if family:
        shown = _mib(family["tier_value"]) if family["tier_by"] == "memory" else _ms(family["tier_value"])
        lines += ["", f"Member {family['tier']} of {family['size']} of family `{family['name']}`, tiered by {family['tier_by']} ({family['tier_metric']} {shown}); see `../FAMILY.md`."]
    lines += ["", *architecture_section(spec, parameters)]
    lines += [
        "The full spec is in `lfm2_nas.json` (`lfm2.ArchSpec.from_dict` reads it).",
        "",
        f"## Measured on the device (context {context})",
        "",
        "| | median | spread |",
        "|---|---|---|",
        f"| prefill of {context} tokens | {_ms(measured.get('prefill_ms'))} | {_stats_cell(measured.get('prefill_stats'))} |",
        f"| decode, one token at depth {context} | {_ms(measured.get('decode_ms'))} | {_stats_cell(measured.get('decode_stats'))} |",
        f"| model footprint (vs budget {_mib(study.get('budget_bytes'))}) | {_mib(measured.get('footprint_bytes'))} | peak RSS {_mib(measured.get('peak_rss_bytes'))}, analytic estimate {_mib(measured.get('memory_estimate_bytes'))} |",
        f"| quality proxy ({study.get('quality')}) | {measured.get('quality', 'n/a')} | {measured.get('quality_signal') or ''} |",
        "",
        "Latencies are medians under the protocol below; `cached` = "
        f"{measured.get('cached', False)} (true: the figures were measured for an earlier trial of the same architecture).",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| device | {', '.join(f'{k}={v}' for k, v in device.items() if not isinstance(v, (dict, list))) or 'n/a'} |",
        f"| runtime | backend {runtime.get('backend')}, quant {runtime.get('quant')}, load {runtime.get('load_time_s')} s |",
        f"| runtime stack | `{json.dumps(runtime.get('stack'), sort_keys=True)}` |",
        f"| protocol | `{json.dumps(record.get('protocol'), sort_keys=True)}` |",
        f"| artifact | `{json.dumps(record.get('artifact'), sort_keys=True)}` |",
        f"| study | sampler {study.get('sampler')}, seed {study.get('seed')}, space {study.get('space')}, objectives {study.get('metric_names')} ({study.get('directions')}) |",
        f"| toolchain | `{json.dumps(record.get('versions'), sort_keys=True)}` |",
        "",
    ]
    if record["export_target"] == "hf":
        lines += hf_use_section(record["init"]["seed"])
    elif record["export_target"] == "lfm2":
        lines += lfm2_use_section(spec, record["init"]["seed"])
    else:
        lines += ["## Use", "", f"The files are the {record['export_target']} artifact that was measured; `devices.artifact.Artifact.load('.')` verifies them.", ""]
    return "\n".join(lines)


# -- writing -------------------------------------------------------------------------------


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
    info = member.trial.user_attrs.get("artifact")
    if not info or not info.get("path"):
        raise UserError(f"trial {number} records no measured artifact (status {member.trial.user_attrs.get('status')!r}); export it with --to hf or --to lfm2, or pick a measured trial")
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
    if target not in TARGETS:
        raise UserError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
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
            family = {"name": family_name, "tier": member.tier, "size": len(members), "tier_by": tier_by, "tier_metric": TIER_METRICS[tier_by], "tier_value": member.tier_value}
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
                **{k: member.trial.user_attrs.get(k) for k in ("footprint_bytes", "prefill_ms", "decode_ms", "quality")},
            }
        )
    if family_name:
        result.family_index = _write_family_index(study, out, family_name, tier_by, family_rows, target, storage_url)
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
    lines = [
        f"# Family `{name}`",
        "",
        f"{len(rows)} members of the Pareto set of study `{study.study_name}`, spread over {tier_by} "
        f"({TIER_METRICS[tier_by]}; budget {_mib(meta.get('budget_bytes'))}, context {meta.get('context')}).",
        "",
        "| tier | folder | trial | layout | parameters | footprint | prefill | decode | quality |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| t{row['tier']} | `{row['folder']}` | {row['trial']} | `{row['layout']}` | {row['parameters']:,} | {_mib(row['footprint_bytes'])} "
            f"| {_ms(row['prefill_ms'])} | {_ms(row['decode_ms'])} | {row['quality'] if row['quality'] is not None else 'n/a'} |"
        )
    (out / "FAMILY.md").write_text("\n".join(lines) + "\n")
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
    if target not in TARGETS:
        raise UserError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    if family is not None:
        pareto = True
    if (trial is None) == (not pareto):
        raise UserError("choose what to export: --trial N, or --pareto (optionally with --family K)")
    storage_url = storage or DEFAULT_STORAGE
    study = load_existing_study(study_name, storage_url)
    if trial is not None:
        members = [select_trial(study, trial)]
        state = members[0].trial.state
        if state != TrialState.COMPLETE or members[0].trial.user_attrs.get("status") not in (None, "ok"):
            log(f"note: trial {trial} is {state.name} with status {members[0].trial.user_attrs.get('status')!r}; exporting its architecture anyway")
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


__all__ = [
    "export_preset",
    "TARGETS",
    "MODEL_TARGETS",
    "TIER_METRICS",
    "INIT_DESCRIPTION",
    "Member",
    "ExportResult",
    "export_from_study",
    "export_members",
    "pareto_members",
    "pick_family",
    "select_trial",
    "arch_markdown",
    "redact_storage",
]
