"""What people read in an exported folder: ARCH.md (the architecture, the measured figures
and where each comes from, how to use the weights) and a family's FAMILY.md. Rendering
only: `nas.export.provenance` makes the record it renders, `nas.export.writers` writes."""

from __future__ import annotations

import json
from typing import Any

from lfm2.hf import hf_representable
from lfm2.sizes import format_size
from lfm2.spec import ArchSpec
from nas.export.selection import TIER_METRICS

INIT_DESCRIPTION = (
    "Weights are our seeded initialisation (`lfm2.model.init_weights`): normal(0, 0.02) for the "
    "embedding (tied to the output head) and every projection, with the residual outputs "
    "(`out_proj` of conv and attention, `w2` of the SwiGLU) scaled down to 0.02 / sqrt(2 * n_layers) "
    "as in GPT-2; RMSNorm gains one; depthwise conv kernels uniform(+-1/sqrt(kernel)), PyTorch's "
    "default for a conv. The model is untrained: train it with `lfm2-nas train`."
)


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


def family_markdown(study_name: str, name: str, tier_by: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """FAMILY.md: the members of a family, one row each (`rows` as family.json lists them)."""
    lines = [
        f"# Family `{name}`",
        "",
        f"{len(rows)} members of the Pareto set of study `{study_name}`, spread over {tier_by} "
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
    return "\n".join(lines) + "\n"


__all__ = ["INIT_DESCRIPTION", "arch_markdown", "architecture_section", "family_markdown", "hf_use_section", "lfm2_use_section"]
