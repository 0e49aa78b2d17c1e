"""What a running search shows: trials done/total, candidates per stage, device
utilisation, ETA, and the Pareto front so far: on a terminal refreshed in place (rich
`Live`); when the output is piped or logged, one plain line per finished trial (a `Live`
draws nothing off a terminal, so a piped search printed nothing until it ended)."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table


def largest_footprint(attrs: dict) -> int | None:
    """A multi-device trial's largest footprint over its devices (each is in `devices`)."""
    footprints = [r.get("footprint_bytes") for r in (attrs.get("devices") or {}).values() if isinstance(r, dict) and r.get("footprint_bytes")]
    return max(footprints) if footprints else None


def pareto_table(study, title: str = "Pareto front (feasible trials)") -> Table:
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    table = Table(title=title)
    for column in ("trial", "layout", "params", *names, "footprint MiB", "status"):
        table.add_column(column, justify="left" if column in ("layout", "status") else "right")
    try:
        best = sorted(study.best_trials, key=lambda t: t.values[-1])
    except (ValueError, RuntimeError):
        best = []
    for trial in best:
        attrs = trial.user_attrs
        footprint = attrs.get("footprint_bytes") or largest_footprint(attrs)
        table.add_row(
            str(trial.number),
            (attrs.get("preset") + " " if attrs.get("preset") else "") + attrs.get("layout", "?"),
            f"{attrs.get('params', 0) / 1e6:.1f}M",
            *(f"{v:.4g}" for v in trial.values),
            f"{footprint / 2**20:.0f}" if footprint else "-",
            attrs.get("status", ""),
        )
    return table


class Progress:
    def __init__(self, search, enabled: bool, console: Console | None):
        self.search = search
        self.enabled = enabled
        self.console = console or Console()
        self.live: Live | None = None
        self.last = 0.0
        self.lines_for_told = -1  # off a terminal: the trial count of the last line printed

    def __enter__(self) -> Progress:
        if self.enabled and self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self._render(with_front=False))  # the caller prints the final front
            self.live.__exit__(*exc)

    def update(self) -> None:
        if self.live is not None and time.perf_counter() - self.last > 1.0:
            self.last = time.perf_counter()
            self.live.update(self._render())
        elif self.enabled and self.live is None:
            told = sum(self.search.stats.told.values())
            if told != self.lines_for_told:
                self.lines_for_told = told
                self.console.print(self._render(with_front=False), highlight=False, soft_wrap=True)

    def _render(self, with_front: bool = True):
        from nas.study import finished_trials

        s = self.search
        stats = s.stats
        stages = {"compiling": 0, "measuring": 0, "scoring": 0}
        for candidate in s.pending.values():
            stages["compiling"] += candidate.compile_ref is not None
            stages["measuring"] += bool(candidate.measure_refs)
            stages["scoring"] += candidate.quality_ref is not None
        done = finished_trials(s.study) if hasattr(s, "study") else 0
        target = s.config.trials
        wall = stats.wall_s
        told = sum(stats.told.values())
        eta = f"{(target - done) * wall / told:.0f} s" if told else "-"
        devices = max(1, len(getattr(s, "devices", None) or ()))  # busy seconds add up over the devices
        utilisation = stats.device_busy_s / (wall * devices) if wall > 0 else 0.0
        header = (
            f"[bold]{s.config.study}[/] on {s.config.device}: {done}/{target} trials  |  "
            f"compiling {stages['compiling']}, measuring {stages['measuring']}, scoring {stages['scoring']}  |  "
            f"device busy {utilisation:.0%}  |  {wall:.0f} s elapsed, ETA {eta}  |  "
            + ", ".join(f"{k} {v}" for k, v in sorted(stats.told.items()))
        )
        if with_front and hasattr(s, "study"):
            return Group(header, pareto_table(s.study))
        return header


__all__ = ["Progress", "pareto_table"]
