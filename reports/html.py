"""The report page: one payload (figures + HTML sections), one page that renders it.

`report_payload(data)` turns `StudyData` into plain JSON: plotly figures and the HTML of
each section (summary, device/runtime/protocol facts, the Pareto table, the
architectures' layout strips, every trial). The page's script renders a payload; the
static report embeds its payload and plotly.js, so the file opens with no network, and
the live dashboard serves the same page that then polls for new payloads.
"""

from __future__ import annotations

import datetime as _dt
import json
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Any, Collection, Iterable

import plotly.io
import plotly.offline

from lfm2.errors import UserError
from lfm2.spec import ArchSpec
from reports.devices import device_names, device_view, on_every_front
from reports.figures import OUTCOME_COLOURS, OUTCOME_LABELS, multi_device_figures, report_figures
from reports.pareto import REFERENCE_MARGIN
from reports.sizes import format_bytes
from reports.style import REPORT_CSS
from reports.study_data import OUTCOMES, StudyData, TrialRow, to_jsonable

BLOCK_NAMES = {"C": "conv", "A": "attn", "S": "swa"}
_HERE = Path(__file__).parent


# -- small formatters --------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 10 else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _millions(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.1f} M"


def _num(value: Any) -> str:
    """A cell's sort key: the exact number (repr keeps every digit) or empty for none."""
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) if value else "–"
    if value is None:
        return "–"
    return str(value)


# -- the pieces ----------------------------------------------------------------------------


def layout_strip(layout: str | None, small: bool = False) -> str:
    """The layer stack as a strip of coloured blocks: conv, attention, sliding window."""
    if not layout:
        return '<span class="muted">no layout</span>'
    blocks = "".join(
        f'<span class="blk {BLOCK_NAMES.get(letter, "other")}" title="layer {i}: {BLOCK_NAMES.get(letter, letter)}"></span>'
        for i, letter in enumerate(layout)
    )
    return f'<span class="strip{" small" if small else ""}" data-layout="{escape(layout)}" aria-label="{escape(layout)}">{blocks}</span>'


def _table(table_id: str, columns: list[tuple[str, str, str]], rows: Iterable[tuple[TrialRow, dict[str, tuple[Any, str]]]], caption: str) -> str:
    """A sortable table. `columns`: (key, label, "number"|"text"); each row: the trial and
    key -> (sort value, cell HTML)."""
    head = "".join(f'<th data-key="{key}" data-type="{kind}" title="sort by {escape(label)}">{escape(label)}</th>' for key, label, kind in columns)
    body = []
    for trial, cells in rows:
        tds = "".join(f'<td data-key="{key}" data-value="{escape(_num(cells[key][0]) if kind == "number" else str(cells[key][0] or ""))}">{cells[key][1]}</td>' for key, _label, kind in columns)
        css = " ".join(c for c in ("pareto" if trial.on_pareto_set else "", "preset" if trial.preset else "", trial.outcome) if c)
        body.append(f'<tr data-trial="{trial.number}" class="{css}">{tds}</tr>')
    return f'<table class="sortable" id="{table_id}"><caption>{caption}</caption><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _stats_cells(prefix: str, stats: dict[str, Any] | None, median: float | None) -> dict[str, tuple[Any, str]]:
    stats = stats or {}
    get = stats.get
    samples = get("samples_ms")
    noisy = " ⚠" if get("noisy") else ""
    return {
        f"{prefix}_ms": (median, _ms(median) + noisy),
        f"{prefix}_trimmed_mean_ms": (get("trimmed_mean_ms"), _ms(get("trimmed_mean_ms"))),
        f"{prefix}_p10_ms": (get("p10_ms"), _ms(get("p10_ms"))),
        f"{prefix}_p90_ms": (get("p90_ms"), _ms(get("p90_ms"))),
        f"{prefix}_cv": (get("cv"), _pct(get("cv"))),
        f"{prefix}_runs": (len(samples) if isinstance(samples, list) else None, str(len(samples)) if isinstance(samples, list) else "–"),
    }


def _spec_cells(trial: TrialRow) -> dict[str, tuple[Any, str]]:
    arch = trial.arch
    if arch is None:
        return {k: (None, "–") for k in ("d_model", "n_layers", "n_attention", "heads", "ffn_dim")}
    return {
        "d_model": (arch.d_model, str(arch.d_model)),
        "n_layers": (arch.n_layers, str(arch.n_layers)),
        "n_attention": (len(arch.attention_layers), str(len(arch.attention_layers))),
        "heads": (arch.n_kv_heads, f"{arch.n_heads}/{arch.n_kv_heads}×{arch.head_dim}"),
        "ffn_dim": (arch.ffn_dim, str(arch.ffn_dim)),
    }


def _latency_columns(prefix: str) -> list[tuple[str, str, str]]:
    return [
        (f"{prefix}_ms", f"{prefix} ms", "number"),
        (f"{prefix}_trimmed_mean_ms", f"{prefix} trimmed mean", "number"),
        (f"{prefix}_p10_ms", f"{prefix} p10", "number"),
        (f"{prefix}_p90_ms", f"{prefix} p90", "number"),
        (f"{prefix}_cv", f"{prefix} CV", "number"),
        (f"{prefix}_runs", f"{prefix} runs", "number"),
    ]


def pareto_table(data: StudyData, table_id: str = "pareto-table", source: str = "Optuna's <code>study.best_trials</code>") -> str:
    """The Pareto set (`study.best_trials`) with every headline figure and its spread."""
    columns: list[tuple[str, str, str]] = [("trial", "trial", "number"), ("preset", "preset", "text"), ("layout", "layout", "text"), ("params", "params", "number")]
    if data.has_quality:
        columns.append(("quality", "quality", "number"))
    columns += _latency_columns("prefill") + _latency_columns("decode")
    columns += [
        ("footprint_bytes", "peak memory", "number"),
        ("peak_rss_bytes", "peak RSS", "number"),
        ("memory_estimate_bytes", "memory estimate", "number"),
        ("load_time_s", "load s", "number"),
        ("d_model", "d_model", "number"),
        ("n_layers", "layers", "number"),
        ("n_attention", "attention layers", "number"),
        ("heads", "heads/kv×dim", "number"),
        ("ffn_dim", "FFN", "number"),
        ("spec_key", "spec key", "text"),
        ("cached", "cached", "text"),
    ]
    rows = []
    for trial in data.pareto_set:
        load_time = (trial.measurement or {}).get("load_time_s")
        cells: dict[str, tuple[Any, str]] = {
            **_identity_cells(trial),
            "footprint_bytes": (trial.footprint_bytes, format_bytes(trial.footprint_bytes)),
            "peak_rss_bytes": (trial.peak_rss_bytes, format_bytes(trial.peak_rss_bytes)),
            "memory_estimate_bytes": (trial.memory_estimate_bytes, format_bytes(trial.memory_estimate_bytes)),
            "load_time_s": (load_time, "–" if load_time is None else f"{load_time:.2f}"),
            "spec_key": (trial.spec_key or "", f"<code>{escape(trial.spec_key or '–')}</code>"),
            "cached": ("yes" if trial.cached else "", "yes" if trial.cached else ""),
        }
        cells |= _stats_cells("prefill", trial.prefill_stats, trial.prefill_ms)
        cells |= _stats_cells("decode", trial.decode_stats, trial.decode_ms)
        cells |= _spec_cells(trial)
        rows.append((trial, cells))
    context = data.facts.get("context")
    at = f" at context {context}" if context else ""
    caption = (
        f"Pareto set: {len(rows)} architecture(s) that no other feasible trial beats on every objective "
        f"({source}). Latencies are medians{at} in ms with their spread "
        "(trimmed mean, p10, p90, coefficient of variation, timed runs; ⚠ marks a point still noisy after re-measuring). "
        "Click a column to sort."
    )
    if not rows:
        return '<p class="muted">No feasible trial yet: the Pareto set is empty.</p>'
    return _table(table_id, columns, rows, caption)


def trials_table(data: StudyData) -> str:
    """Every trial, with its outcome and reason: the failures and prefiltered ones too."""
    columns = [("trial", "trial", "number"), ("outcome", "outcome", "text"), ("status", "status", "text"), ("preset", "preset", "text"), ("layout", "layout", "text"), ("params", "params", "number")]
    columns += [(name, name, "number") for name in data.metric_names]
    columns += [("footprint_bytes", "peak memory", "number"), ("memory_estimate_bytes", "memory estimate", "number"), ("reason", "reason", "text")]
    rows = []
    for trial in data.trials:
        colour = OUTCOME_COLOURS[trial.outcome]
        cells = {
            "trial": (trial.number, str(trial.number) + (" ◆" if trial.on_pareto_set else "")),
            "outcome": (trial.outcome, f'<span class="dot" style="background:{colour}"></span>{escape(trial.outcome)}'),
            "status": (trial.status, escape(trial.status)),
            "preset": (trial.preset or "", escape(trial.preset or "")),
            "layout": (trial.layout or "", layout_strip(trial.layout, small=True)),
            "params": (trial.params, _millions(trial.params)),
            "footprint_bytes": (trial.footprint_bytes, format_bytes(trial.footprint_bytes)),
            "memory_estimate_bytes": (trial.memory_estimate_bytes, format_bytes(trial.memory_estimate_bytes)),
            "reason": (trial.reason or "", escape(trial.reason or "")),
        }
        for name in data.metric_names:
            value = trial.values.get(name)
            cells[name] = (value, "–" if value is None else f"{value:.4f}" if name == "quality" else _ms(value))
        rows.append((trial, cells))
    caption = "Every trial (◆: in the Pareto set). Prefiltered trials were never compiled: their estimate was certainly over the budget."
    return _table("trials-table", columns, rows, caption)


def _measured_points(measurement: dict[str, Any] | None) -> str:
    """Every prefill length and decode depth the protocol measured, with its spread."""
    if not measurement:
        return ""
    rows = []
    for kind in ("prefill", "decode"):
        points = measurement.get(kind) or {}
        for key in sorted(points, key=lambda k: int(k)):
            s = points[key]
            label = f"prefill {key} tokens" if kind == "prefill" else f"decode at depth {key}"
            tps = s.get("tokens_per_s")
            rows.append(
                f"<tr><td>{label}</td><td>{_ms(s.get('median_ms'))}</td><td>{_ms(s.get('p10_ms'))}</td><td>{_ms(s.get('p90_ms'))}</td>"
                f"<td>{_pct(s.get('cv'))}</td><td>{len(s.get('samples_ms') or [])}</td><td>{'–' if tps is None else f'{tps:.1f}'}</td></tr>"
            )
    if not rows:
        return ""
    head = "<tr><th>point</th><th>median ms</th><th>p10</th><th>p90</th><th>CV</th><th>runs</th><th>tokens/s</th></tr>"
    return f'<details><summary>all measured points</summary><table class="points">{head}{"".join(rows)}</table></details>'


def architecture_card(trial: TrialRow, has_quality: bool) -> str:
    arch = trial.arch
    title = f"Trial {trial.number}" + (f" · {escape(trial.preset)}" if trial.preset else "")
    tags = []
    if trial.on_pareto_set:
        tags.append('<span class="tag pareto">Pareto set</span>')
    if trial.preset:
        tags.append('<span class="tag preset">LFM2 preset</span>')
    if trial.outcome != "feasible":
        tags.append(f'<span class="tag" style="background:{OUTCOME_COLOURS[trial.outcome]}">{escape(trial.outcome)}</span>')
    facts = []
    if has_quality:
        facts.append(("quality", "–" if trial.quality is None else f"{trial.quality:.4f}"))
    worst = " (slowest device)" if trial.devices else ""
    facts += [
        ("prefill" + worst, f"{_ms(trial.prefill_ms)} ms"),
        ("decode" + worst, f"{_ms(trial.decode_ms)} ms/token"),
        ("peak memory" + (" (largest)" if trial.devices else ""), format_bytes(trial.footprint_bytes)),
        ("params", _millions(trial.params)),
    ]
    for device, record in trial.devices.items():
        record = record if isinstance(record, dict) else {}
        facts.append((f"on {escape(device)}", f"{_ms(record.get('prefill_ms'))} ms prefill, {_ms(record.get('decode_ms'))} ms/token, "
                                               f"{format_bytes(record.get('footprint_bytes'))}, {escape(str(record.get('status') or '–'))}"))
    if arch is not None:
        facts += [
            ("d_model", str(arch.d_model)),
            ("layers", f"{arch.n_layers} ({len(arch.conv_layers)} conv, {len(arch.attention_layers)} attention)"),
            ("heads / kv × dim", f"{arch.n_heads} / {arch.n_kv_heads} × {arch.head_dim}"),
            ("FFN", str(arch.ffn_dim)),
            ("KV bytes/token (bf16)", f"{arch.kv_cache_bytes_per_token(2):,}"),
        ]
        if arch.swa_window:
            facts.append(("SWA window", str(arch.swa_window)))
    facts.append(("spec key", f"<code>{escape(trial.spec_key or '–')}</code>"))
    dl = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    spec_json = escape(json.dumps(trial.spec, indent=1, sort_keys=True)) if trial.spec else ""
    spec = f"<details><summary>ArchSpec</summary><pre>{spec_json}</pre></details>" if spec_json else ""
    return (
        f'<article class="arch" id="arch-{trial.number}" data-trial="{trial.number}"><h3>{title} {"".join(tags)}</h3>'
        f"{layout_strip(trial.layout)}<dl>{dl}</dl>{_measured_points(trial.measurement)}{spec}</article>"
    )


def architectures_section(data: StudyData, extra: Collection[int] = ()) -> str:
    """Cards of the Pareto set, the presets, and the trials numbered in `extra`."""
    shown = data.pareto_set + [t for t in data.trials if (t.preset or t.number in extra) and not t.on_pareto_set]
    if not shown:
        return '<p class="muted">No architecture measured yet.</p>'
    legend = "".join(f'<span class="legend-item">{layout_strip(letter)} {name}</span>' for letter, name in (("C", "gated short convolution"), ("A", "full attention (GQA)"), ("S", "sliding-window attention")))
    return f'<p class="legend">{legend}</p><div class="arch-grid">{"".join(architecture_card(t, data.has_quality) for t in shown)}</div>'


def _facts_table(facts: dict[str, Any], depth: int = 0) -> str:
    """Facts as a key/value table; a nested dict of any size folds away below the first
    level (a device's full stack runs to dozens of lines)."""
    rows = []
    for key, value in facts.items():
        if isinstance(value, dict):
            small = len(value) <= 4 and not any(isinstance(v, (dict, list)) for v in value.values())
            inner = _facts_table(value, depth + 1) if value else "–"
            cell = inner if (depth == 0 and small) or not value else f"<details><summary>{len(value)} fields</summary>{inner}</details>"
        elif isinstance(value, str) and "\n" in value:
            cell = f"<details><summary>{len(value.splitlines())} lines</summary><pre>{escape(value)}</pre></details>"
        elif str(key).endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool):
            cell = f"{format_bytes(value)} ({value:,} bytes)"
        else:
            cell = escape(_text(value))
        rows.append(f"<tr><th>{escape(str(key))}</th><td>{cell}</td></tr>")
    return f'<table class="facts">{"".join(rows)}</table>'


def _latency_basis(facts: dict) -> str:
    """How the study's latency objectives were taken: anchored (a ratio to the anchor
    architecture times the study's reference) or the medians as measured."""
    anchor = facts.get("anchor")
    if not isinstance(anchor, dict):
        return "medians as measured"
    try:
        spec = ArchSpec.from_dict(anchor)
    except (UserError, ValueError, TypeError, KeyError):  # a damaged attr: say so rather than fail the report
        return "anchored (the anchor's spec is unreadable)"
    return (f"anchored: the candidate's lower quartile over the anchor's ({spec.layout}, d {spec.d_model}), timed side by side, "
            "times the anchor's own lower quartile in the study's first measurement (study attr anchor_reference)")


def facts_section(data: StudyData) -> str:
    facts = data.facts
    if not facts:
        return '<p class="muted">This study has no <code>lfm2_nas</code> attribute: it was not written by <code>lfm2-nas search</code>, so its device, runtime and protocol are unknown.</p>'
    budget = data.budget_bytes
    runtime = {
        "backend": facts.get("backend"),
        "quant": facts.get("quant"),
        "context (tokens)": facts.get("context"),
        "memory budget": f"{format_bytes(budget)} ({budget:,} bytes)" if budget else None,
        "quality proxy": facts.get("quality"),
        "quality signal version": facts.get("quality_signal"),  # absent from studies before it was recorded
        "sampler": facts.get("sampler"),
        "seed": facts.get("seed"),
        "latency figures": _latency_basis(facts),
        "lfm2-nas version": facts.get("version"),
    }
    devices = recorded if isinstance(recorded := facts.get("devices"), dict) else {}
    budgets = recorded if isinstance(recorded := facts.get("budgets_bytes"), dict) else {}
    if devices:
        runtime["memory budget"] = ", ".join(f"{escape(str(name))} {format_bytes(budgets.get(name))}" for name in devices)
    device_boxes = [(f"Device {name}", box if isinstance(box, dict) else {}) for name, box in devices.items()] or [("Device", facts.get("device") or {})]
    boxes = [*device_boxes, ("Runtime and search", {k: v for k, v in runtime.items() if v is not None}), ("Measurement protocol", facts.get("protocol") or {})]
    stack = next((t.measurement for t in data.trials if t.measurement and t.measurement.get("stack")), None)
    if stack:
        boxes.append(("Measured stack (as the device reported it)", {**(stack.get("stack") or {}), "device": stack.get("device") or {}}))
    boxes.append(("Toolchain versions", facts.get("versions") or {}))
    space = facts.get("space")
    if isinstance(space, dict):
        boxes.append(("Search space", space))
    known = {"device", "devices", "budgets_bytes", "backend", "quant", "context", "budget_bytes", "quality", "quality_signal", "sampler", "seed", "version", "protocol", "versions", "space", "anchor"}
    others = {k: v for k, v in facts.items() if k not in known}
    if others:
        boxes.append(("Other facts", others))
    return '<div class="facts-grid">' + "".join(f"<section><h3>{escape(title)}</h3>{_facts_table(box) if box else '–'}</section>" for title, box in boxes) + "</div>"


def summary_section(data: StudyData) -> str:
    counts = data.outcome_counts()
    chips = "".join(
        f'<span class="chip" title="{escape(OUTCOME_LABELS[o])}"><span class="dot" style="background:{OUTCOME_COLOURS[o]}"></span>{o}: <b>{counts[o]}</b></span>'
        for o in OUTCOMES
        if counts[o]
    )
    facts = data.facts
    device = facts.get("device") or {}
    bits = [
        f"<b>{len(data.trials)}</b> trials",
        f"<b>{len(data.pareto_numbers)}</b> in the Pareto set",
        f"objectives: {', '.join(f'{n} ({d[:3]})' for n, d in zip(data.metric_names, data.directions))}",
    ]
    if data.budget_bytes:
        bits.append(f"memory budget <b>{format_bytes(data.budget_bytes)}</b>")
    if device.get("name"):
        bits.append(f"device <b>{escape(str(device['name']))}</b>")
    budgets = recorded if isinstance(recorded := facts.get("budgets_bytes"), dict) else {}
    if isinstance(facts.get("devices"), dict):
        bits.append("devices " + ", ".join(f"<b>{escape(str(name))}</b>" + (f" (budget {format_bytes(budgets[name])})" if name in budgets else "") for name in facts["devices"]))
    if facts.get("backend"):
        bits.append(f"runtime <b>{escape(str(facts.get('backend')))}</b> {escape(str(facts.get('quant') or ''))}")
    hv = data.hypervolume
    hv_text = ""
    if hv:
        reference = ", ".join(f"{n} {v:.4g}" for n, v in zip(data.metric_names, hv["reference_point"]))
        hv_text = (
            f'<p class="muted">Hypervolume (Optuna, feasible trials): <b>{hv["hypervolume"][-1]:.4g}</b>, '
            f"{hv['fraction'][-1]:.1%} of the box from the best value of each objective to the reference point ({reference}). "
            f"The reference point is each objective's worst feasible value pushed {REFERENCE_MARGIN:.0%} of its observed range further out.</p>"
        )
    return f'<p>{" · ".join(bits)}</p><p class="chips">{chips}</p>{hv_text}'


# -- the payload and the page ------------------------------------------------------------------


def _device_cells(trial: TrialRow, device: str) -> dict[str, tuple[Any, str]]:
    record = trial.devices.get(device) or {}
    status = record.get("status") or "–"
    return {
        f"{device}:prefill_ms": (record.get("prefill_ms"), _ms(record.get("prefill_ms"))),
        f"{device}:decode_ms": (record.get("decode_ms"), _ms(record.get("decode_ms"))),
        f"{device}:footprint_bytes": (record.get("footprint_bytes"), format_bytes(record.get("footprint_bytes"))),
        f"{device}:status": (status, escape(str(status))),
    }


def across_devices_table(data: StudyData, trials: list[TrialRow], table_id: str, caption: str) -> str:
    """Trials with each device's latencies, footprint and status side by side."""
    devices = device_names(data)
    columns = [("trial", "trial", "number"), ("preset", "preset", "text"), ("layout", "layout", "text"), ("params", "params", "number")]
    if data.has_quality:
        columns.append(("quality", "quality", "number"))
    for device in devices:
        columns += [(f"{device}:prefill_ms", f"{device} prefill ms", "number"), (f"{device}:decode_ms", f"{device} decode ms", "number"),
                    (f"{device}:footprint_bytes", f"{device} peak memory", "number"), (f"{device}:status", f"{device} status", "text")]
    rows = []
    for trial in trials:
        cells: dict[str, tuple[Any, str]] = {
            **_identity_cells(trial),
        }
        for device in devices:
            cells |= _device_cells(trial, device)
        rows.append((trial, cells))
    return _table(table_id, columns, rows, caption)


def devices_pareto_section(data: StudyData, views: dict[str, StudyData], everywhere: list[int]) -> str:
    """A multi-device study's fronts: the candidates on every device's front, the joint
    Pareto set (feasible everywhere, unbeaten on all devices' objectives), each device's own."""
    by_number = {t.number: t for t in data.trials}
    parts = ["<h3>On every device's front</h3>"]
    if everywhere:
        parts.append(across_devices_table(data, [by_number[n] for n in everywhere], "everywhere-table",
                                          f"{len(everywhere)} architecture(s) in the Pareto set of every device ({', '.join(escape(d) for d in views)}), each within that device's budget."))
    else:
        parts.append('<p class="muted" id="everywhere-table">No architecture is on every device\'s front yet.</p>')
    parts.append("<h3>Joint Pareto set (feasible on every device)</h3>")
    if data.pareto_set:
        parts.append(across_devices_table(data, data.pareto_set, "pareto-table",
                                          "Optuna's <code>study.best_trials</code>: within every device's budget, and no other such trial beats it on every objective of every device."))
    else:
        parts.append('<p class="muted">No trial is feasible on every device yet: the joint Pareto set is empty.</p>')
    for device, view in views.items():
        parts.append(f"<h3>{escape(device)}: its own Pareto set</h3>")
        parts.append(pareto_table(view, table_id=f"pareto-table-{''.join(c if c.isalnum() or c in '_-' else '-' for c in device)}",
                                  source=f"on {escape(device)} alone: its latencies, within its budget"))
    return "".join(parts)



def _identity_cells(trial: TrialRow) -> dict[str, tuple[Any, str]]:
    """The cells every trial table starts with: (sort value, html) of trial, preset, layout,
    parameters and quality."""
    return {
        "trial": (trial.number, f'<a href="#arch-{trial.number}">{trial.number}</a>'),
        "preset": (trial.preset or "", escape(trial.preset or "")),
        "layout": (trial.layout or "", layout_strip(trial.layout, small=True)),
        "params": (trial.params, _millions(trial.params)),
        "quality": (trial.quality, "–" if trial.quality is None else f"{trial.quality:.4f}"),
    }

def report_payload(data: StudyData) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (see the module docstring)."""
    devices = device_names(data)
    if devices:
        return _multi_device_payload(data, devices)
    return _payload(
        data,
        report_figures(data),
        pareto=pareto_table(data),
        architectures=architectures_section(data),
    )


def _multi_device_payload(data: StudyData, devices: list[str]) -> dict[str, Any]:
    """The payload of a multi-device study: a front per device (reports.devices)."""
    views = {device: device_view(data, device) for device in devices}
    everywhere = on_every_front(views)
    return _payload(
        data,
        multi_device_figures(data, views, everywhere),
        pareto=devices_pareto_section(data, views, everywhere),
        architectures=architectures_section(data, extra=everywhere),
        devices={device: {"pareto_numbers": view.pareto_numbers} for device, view in views.items()},
        on_every_front=everywhere,
    )


def _payload(data: StudyData, figures: dict[str, Any], *, pareto: Any, architectures: Any, **extra: Any) -> dict[str, Any]:
    """What the page renders: the study's facts, its figures as plotly JSON and its sections
    (`pareto` and `architectures` differ between one device and several; `extra` adds keys)."""
    return to_jsonable(
        {
            "study": data.name,
            "revision": data.revision,
            "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n_trials": len(data.trials),
            "pareto_numbers": data.pareto_numbers,
            **extra,
            "figures": {key: json.loads(plotly.io.to_json(figure, validate=False)) for key, figure in figures.items()},
            "sections": {
                "summary": summary_section(data),
                "facts": facts_section(data),
                "pareto": pareto,
                "architectures": architectures,
                "trials": trials_table(data),
            },
        }
    )


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element (no `</script>`, no `<!--`)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js as the installed plotly package bundles it (inlined: no network needed)."""
    return plotly.offline.get_plotlyjs()


@lru_cache(maxsize=1)
def page_script() -> str:
    """The page's own script (`reports/report.js`): renders a payload, sorts tables, polls."""
    return (_HERE / "report.js").read_text(encoding="utf-8")


def render_page(payload: dict[str, Any], *, live: dict[str, Any] | None = None, plotly_src: str | None = None) -> str:
    """The HTML page for `payload`. Static (`live=None`): plotly.js inlined. Live:
    `live={"url": JSON endpoint, "interval_s": seconds}` and plotly.js from `plotly_src`."""
    figure_divs = "".join(f'<div class="plot" id="{escape(key)}"></div>' for key in payload["figures"])
    plotly_tag = f'<script src="{escape(plotly_src)}"></script>' if plotly_src else f"<script>{plotly_js()}</script>"
    live_tag = f"<script>window.LFM2_NAS_LIVE = {_script_json(live)};</script>" if live else ""
    mode = "live dashboard" if live else "report"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{escape(payload["study"])} · lfm2-nas {mode}</title>
<style>{REPORT_CSS}</style>
</head><body data-revision="{escape(payload["revision"])}">
<header><h1>lfm2-nas {mode}: study <code>{escape(payload["study"])}</code></h1>
<p class="muted" id="status">generated {escape(payload["generated_at"])}</p></header>
<section id="summary"></section>
<h2>Pareto fronts</h2>
<div id="figures" class="plots">{figure_divs}</div>
<h2>The Pareto set</h2>
<div id="pareto" class="table-wrap"></div>
<h2>Architectures</h2>
<div id="architectures"></div>
<h2>Device, runtime and protocol</h2>
<div id="facts"></div>
<h2>All trials</h2>
<details open><summary>every trial with its outcome</summary><div id="trials" class="table-wrap"></div></details>
{plotly_tag}
<script type="application/json" id="report-data">{_script_json(payload)}</script>
{live_tag}
<script>{page_script()}</script>
</body></html>
"""


def render_report(data: StudyData) -> str:
    """A self-contained HTML report (plotly.js inlined: opens with no network)."""
    return render_page(report_payload(data))


def write_report(data: StudyData, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(data), encoding="utf-8")
    return path


__all__ = ["report_payload", "render_page", "render_report", "write_report", "layout_strip", "plotly_js"]
