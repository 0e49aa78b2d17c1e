"""The report's plotly figures, built from `StudyData` (no Optuna objects here).

Every front plots measured trials only (a prefiltered, failed or OOM trial has no
latency); those are counted in the outcomes chart and listed in the trials table. Peak
memory (the measured footprint, the figure the budget is compared with) is the colour:
a viridis scale up to the budget and solid red above it, with the budget as a colour-bar
tick, and the memory-vs-decode chart draws the budget as a line.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from reports.intervals import LoadSpread, measured_interval
from reports.pareto import front_2d
from reports.sizes import format_bytes
from reports.study_data import OUTCOMES, StudyData, TrialRow

MIB = 2**20
OUTCOME_COLOURS = {
    "feasible": "#4c78a8",
    "infeasible": "#e45756",
    "prefiltered": "#b279a2",
    "skipped": "#d6a5c9",
    "oom": "#ff9da6",
    "failed": "#9d755d",
    "running": "#bab0ac",
}
OUTCOME_LABELS = {
    "feasible": "feasible (measured, within budget)",
    "infeasible": "infeasible (measured, over budget)",
    "prefiltered": "prefiltered (estimate over budget, not compiled)",
    "skipped": "skipped (predicted over budget or dominated, not compiled)",
    "oom": "out of memory on the device",
    "failed": "failed (compile error, error, timeout, lost)",
    "running": "running or queued",
}
AXIS_TITLES = {
    "quality": "quality (proxy score, higher is better)",
    "prefill_ms": "prefill latency, ms (median, bars: 95% CI)",
    "decode_ms": "decode latency per token, ms (median, bars: 95% CI)",
}
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]
OVER_BUDGET_COLOUR = "#d62728"


def memory_mib(trial: TrialRow) -> float | None:
    return trial.footprint_bytes / MIB if trial.footprint_bytes is not None else None


def memory_colour_axis(data: StudyData) -> dict[str, Any]:
    """A colour scale for peak memory (MiB) that turns red above the budget, given to each
    trace alike (a shared layout `coloraxis` makes plotly.js's legend warn about colours)."""
    memories = [t.footprint_bytes / MIB for t in data.trials if t.measured and t.footprint_bytes is not None]
    budget = data.budget_bytes / MIB if data.budget_bytes else None
    if not memories:
        memories = [budget or 1.0]
    low = min(memories) * 0.95
    high = max(max(memories), budget or 0) * 1.02
    if high <= low:
        high = low + 1.0
    colorbar: dict[str, Any] = {"title": {"text": "peak memory, MiB"}}
    if budget is None or budget <= low:
        scale = [[i / (len(_VIRIDIS) - 1), c] for i, c in enumerate(_VIRIDIS)]
        if budget is not None:  # everything measured is over budget
            scale = [[0.0, OVER_BUDGET_COLOUR], [1.0, OVER_BUDGET_COLOUR]]
    else:
        cut = min((budget - low) / (high - low), 1.0)
        scale = [[cut * i / (len(_VIRIDIS) - 1), c] for i, c in enumerate(_VIRIDIS)]
        if cut < 1.0:
            scale += [[cut, OVER_BUDGET_COLOUR], [1.0, OVER_BUDGET_COLOUR]]
        ticks = [low + (budget - low) * f for f in (0.0, 0.5)]
        colorbar["tickvals"] = [*ticks, budget]
        colorbar["ticktext"] = [f"{v:.0f}" for v in ticks] + [f"budget {budget:.0f}"]
    return {"cmin": low, "cmax": high, "colorscale": scale, "colorbar": colorbar}


def _hover(trial: TrialRow, spreads: dict[str, LoadSpread | None]) -> str:
    parts = [f"trial {trial.number}" + (f" · {trial.preset}" if trial.preset else ""), f"layout {trial.layout or '?'}"]
    if trial.quality is not None:
        parts.append(f"quality {trial.quality:.4f}")
    for metric, label, digits in (("prefill_ms", "prefill", 1), ("decode_ms", "decode", 2)):
        value = getattr(trial, metric)
        if value is not None:
            interval = _interval(trial, metric, spreads)
            spread = f" (95% CI −{interval[0]:.{digits}f}/+{interval[1]:.{digits}f})" if interval else ""
            parts.append(f"{label} {value:.{digits}f} ms{spread}")
    parts.append(f"memory {format_bytes(trial.footprint_bytes)}")
    if trial.params is not None:
        parts.append(f"{trial.params / 1e6:.1f} M params")
    parts.append(trial.outcome + (" · Pareto set" if trial.on_pareto_set else ""))
    return "<br>".join(parts)


def _interval(trial: TrialRow, metric: str, spreads: dict[str, LoadSpread | None]) -> tuple[float, float] | None:
    """(below, above) the plotted figure: the measured 95% interval of a latency objective,
    widened to the study's pooled between-load spread (`reports.intervals`)."""
    stats = {"prefill_ms": trial.prefill_stats, "decode_ms": trial.decode_stats}.get(metric)
    if metric not in trial.values:
        return None
    return measured_interval(stats, trial.values[metric], spreads.get(metric))


def _error_bars(trials: list[TrialRow], metric: str, spreads: dict[str, LoadSpread | None]) -> dict[str, Any] | None:
    """Plotly error bars of the measured intervals, or None when no trial has one (a study
    stored before intervals, or the quality axis)."""
    intervals = [_interval(t, metric, spreads) for t in trials]
    if not any(intervals):
        return None
    return {
        "type": "data",
        "symmetric": False,
        "array": [i[1] if i else 0 for i in intervals],
        "arrayminus": [i[0] if i else 0 for i in intervals],
        "thickness": 1,
        "width": 3,
        "color": "#666",
    }


def _scatter(trials: list[TrialRow], x: str, y: str, name: str, marker: dict[str, Any], spreads: dict[str, LoadSpread | None], **extra: Any) -> go.Scatter:
    return go.Scatter(
        x=[t.values[x] for t in trials],
        y=[t.values[y] for t in trials],
        error_x=_error_bars(trials, x, spreads),
        error_y=_error_bars(trials, y, spreads),
        mode=extra.pop("mode", "markers"),
        name=name,
        marker=marker,
        customdata=[t.number for t in trials],
        hovertext=[_hover(t, spreads) for t in trials],
        hoverinfo="text",
        **extra,
    )


def front_figure(data: StudyData, x: str, y: str) -> go.Figure:
    """Measured trials on two objectives: feasible, Pareto set, over budget, presets, and
    the staircase of this projection's own front."""
    measured = [t for t in data.trials if t.measured and x in t.values and y in t.values]
    feasible = [t for t in measured if t.outcome == "feasible" and not t.on_pareto_set]
    pareto = [t for t in measured if t.on_pareto_set]
    over = [t for t in measured if t.outcome == "infeasible"]
    presets = [t for t in measured if t.preset]

    def colour(trials: list[TrialRow]) -> list[float | None]:
        return [memory_mib(t) for t in trials]

    figure = go.Figure()
    maximize = (data.directions[data.metric_names.index(x)] == "maximize", data.directions[data.metric_names.index(y)] == "maximize")
    staircase = front_2d([(t.values[x], t.values[y], t.number) for t in measured if t.outcome == "feasible"], maximize)
    if len(staircase) > 1:
        figure.add_trace(
            go.Scatter(
                x=[p[0] for p in staircase],
                y=[p[1] for p in staircase],
                mode="lines",
                # x ascending: the best y so far holds until the next point's x.
                line={"color": "#888", "dash": "dot", "shape": "hv"},
                name="front of these two objectives",
                hoverinfo="skip",
            )
        )
    scale = memory_colour_axis(data)
    colour_bar = {"showscale": True, "colorbar": scale.pop("colorbar")}
    groups = [
        (feasible, "feasible", {"size": 9, "symbol": "circle", "line": {"width": 0.5, "color": "#333"}}),
        (pareto, "Pareto set (all objectives)", {"size": 14, "symbol": "diamond", "line": {"width": 2, "color": "#000"}}),
        (over, "over budget (infeasible)", {"size": 11, "symbol": "x", "line": {"width": 1, "color": OVER_BUDGET_COLOUR}}),
    ]
    with_bar = next((name for group, name, _style in groups if group), None)  # an empty trace shows no colour bar
    for group, name, style in groups:
        figure.add_trace(_scatter(group, x, y, name, {"color": colour(group), **scale, **(colour_bar if name == with_bar else {}), **style}, data.load_spreads))
    if presets:
        figure.add_trace(
            _scatter(
                presets, x, y, "LFM2 preset",
                {"size": 22, "symbol": "star-open", "color": "#000", "line": {"width": 1.5}}, data.load_spreads,
                mode="markers+text", text=[t.preset for t in presets], textposition="top center",
            )
        )  # fmt: skip
    figure.update_layout(
        title={"text": f"{_short(y)} vs {_short(x)}"},
        xaxis_title=AXIS_TITLES.get(x, x),
        yaxis_title=AXIS_TITLES.get(y, y),
        legend={"orientation": "h", "y": -0.22},
        margin={"t": 50, "l": 70, "r": 20, "b": 40},
        template="plotly_white",
        height=460,
    )
    return figure


def _short(metric: str) -> str:
    return {"quality": "Quality", "prefill_ms": "prefill latency", "decode_ms": "decode latency"}.get(metric, metric)


def memory_figure(data: StudyData) -> go.Figure:
    """Peak memory against decode latency, with the budget as a line."""
    measured = [t for t in data.trials if t.measured and t.footprint_bytes is not None and t.decode_ms is not None]
    figure = go.Figure()
    for outcome in ("feasible", "infeasible"):
        group = [t for t in measured if t.outcome == outcome]
        figure.add_trace(
            go.Scatter(
                x=[t.decode_ms for t in group],
                y=[memory_mib(t) for t in group],
                mode="markers",
                name=OUTCOME_LABELS[outcome],
                marker={"color": OUTCOME_COLOURS[outcome], "size": [14 if t.on_pareto_set else 9 for t in group], "symbol": "circle" if outcome == "feasible" else "x", "line": {"width": [2 if t.on_pareto_set else 0.5 for t in group], "color": "#000"}},
                customdata=[t.number for t in group],
                hovertext=[_hover(t, data.load_spreads) for t in group],
                hoverinfo="text",
            )
        )
    if data.budget_bytes:
        budget = data.budget_bytes / MIB
        figure.add_hline(y=budget, line={"color": OVER_BUDGET_COLOUR, "dash": "dash"}, annotation_text=f"budget {format_bytes(data.budget_bytes)}", annotation_position="top left")
    figure.update_layout(
        title={"text": "Peak memory vs decode latency"},
        xaxis_title=AXIS_TITLES["decode_ms"],
        yaxis_title="peak memory (footprint), MiB",
        legend={"orientation": "h", "y": -0.22},
        margin={"t": 50, "l": 70, "r": 20, "b": 40},
        template="plotly_white",
        height=460,
    )
    return figure


def hypervolume_figure(data: StudyData) -> go.Figure:
    history = data.hypervolume
    figure = go.Figure()
    if history:
        figure.add_trace(
            go.Scatter(
                x=history["trial_numbers"],
                y=history["fraction"],
                mode="lines+markers",
                name="hypervolume",
                line={"shape": "hv", "color": "#4c78a8"},
                hovertext=[f"after trial {n}: {v:.4g} ({f:.1%} of the box)" for n, v, f in zip(history["trial_numbers"], history["hypervolume"], history["fraction"])],
                hoverinfo="text",
            )
        )
    else:
        figure.add_annotation(text="no feasible trial yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_layout(
        title={"text": "Hypervolume of the feasible front over trials (Optuna)"},
        xaxis_title="trial number",
        xaxis={"dtick": 1} if len(data.trials) <= 20 else {},  # whole trial numbers only
        yaxis_title="fraction of the ideal-to-reference box",
        yaxis={"rangemode": "tozero"},
        margin={"t": 50, "l": 70, "r": 20, "b": 40},
        template="plotly_white",
        height=360,
        showlegend=False,
    )
    return figure


def outcomes_figure(data: StudyData) -> go.Figure:
    """How every trial ended: the ones with no latency to plot are told apart here."""
    figure = go.Figure()
    for outcome in OUTCOMES:
        group = [t for t in data.trials if t.outcome == outcome]
        if not group:
            continue
        figure.add_trace(
            go.Bar(
                x=[len(group)],
                y=["trials"],
                orientation="h",
                name=OUTCOME_LABELS[outcome],
                marker={"color": OUTCOME_COLOURS[outcome]},
                hovertext=[f"{OUTCOME_LABELS[outcome]}: trials " + ", ".join(str(t.number) for t in group)],
                hoverinfo="text",
                text=[str(len(group))],
                textposition="inside",
            )
        )
    figure.update_layout(
        barmode="stack",
        title={"text": f"Outcomes of {len(data.trials)} trials"},
        xaxis_title="trials",
        yaxis={"visible": False},
        legend={"orientation": "h", "y": -0.5},
        margin={"t": 50, "l": 20, "r": 20, "b": 40},
        template="plotly_white",
        height=260,
    )
    return figure


def report_figures(data: StudyData) -> dict[str, go.Figure]:
    """The figures of a report, keyed by the id of the element that shows each."""
    figures: dict[str, go.Figure] = {}
    if data.has_quality:
        figures["fig-quality-prefill"] = front_figure(data, "prefill_ms", "quality")
        figures["fig-quality-decode"] = front_figure(data, "decode_ms", "quality")
    else:
        figures["fig-decode-prefill"] = front_figure(data, "prefill_ms", "decode_ms")
    figures["fig-memory"] = memory_figure(data)
    figures["fig-hypervolume"] = hypervolume_figure(data)
    figures["fig-outcomes"] = outcomes_figure(data)
    return figures


def _element_id(text: str) -> str:
    """`text` as a piece of an element id that CSS selectors take as it is."""
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in text)


def device_figures(device: str, view: StudyData, everywhere: list[int]) -> dict[str, go.Figure]:
    """One device's fronts and memory chart (`view` is reports.devices.device_view), titled
    with the device, its own Pareto set marked, and the trials on every device's front ringed."""
    if view.has_quality:
        pairs = {"quality-prefill": ("prefill_ms", "quality"), "quality-decode": ("decode_ms", "quality")}
    else:
        pairs = {"decode-prefill": ("prefill_ms", "decode_ms")}
    figures: dict[str, go.Figure] = {}
    for suffix, (x, y) in pairs.items():
        figure = front_figure(view, x, y)
        for trace in figure.data:
            if trace.name == "Pareto set (all objectives)":
                trace.name = f"Pareto set on {device}"
        ringed = [t for t in view.trials if t.number in everywhere and x in t.values and y in t.values]
        if ringed:
            figure.add_trace(_scatter(ringed, x, y, "on every device's front", {"size": 24, "symbol": "circle-open", "color": "#2ca02c", "line": {"width": 2.5}}, view.load_spreads))
        figure.update_layout(title={"text": f"{device}: {_short(y)} vs {_short(x)}"})
        figures[f"fig-{_element_id(device)}-{suffix}"] = figure
    memory = memory_figure(view)
    memory.update_layout(title={"text": f"{device}: peak memory vs decode latency"})
    figures[f"fig-{_element_id(device)}-memory"] = memory
    return figures


def multi_device_figures(data: StudyData, views: dict[str, StudyData], everywhere: list[int]) -> dict[str, go.Figure]:
    """A multi-device report's figures: each device's, then the joint hypervolume and outcomes."""
    figures: dict[str, go.Figure] = {}
    for device, view in views.items():
        figures |= device_figures(device, view, everywhere)
    figures["fig-hypervolume"] = hypervolume_figure(data)
    figures["fig-outcomes"] = outcomes_figure(data)
    return figures


__all__ = ["report_figures", "device_figures", "multi_device_figures", "front_figure", "memory_figure", "hypervolume_figure", "outcomes_figure", "memory_colour_axis", "OUTCOME_COLOURS", "OUTCOME_LABELS"]
