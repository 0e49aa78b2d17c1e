"""What a running search shows: trials done/total, candidates per stage, device
utilisation, ETA, and the Pareto front so far: on a terminal refreshed in place (rich
`Live`); when the output is piped or logged, one plain line per finished trial (a `Live`
draws nothing off a terminal, so a piped search printed nothing until it ended)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table


def pareto_table(study, title: str = "Pareto front (feasible trials)") -> Table:
    from nas.study_schema import read_trials

    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    table = Table(title=title)
    for column in ("trial", "layout", "params", *names, "footprint MiB", "status"):
        table.add_column(column, justify="left" if column in ("layout", "status") else "right")
    try:
        best = {t.number for t in study.best_trials}
    except (ValueError, RuntimeError):
        best = set()
    records = [r for r in read_trials(study) if r.number in best]
    for record in sorted(records, key=lambda r: list(r.values.values())[-1]):
        footprint = record.largest_footprint_bytes
        table.add_row(
            str(record.number),
            (record.preset + " " if record.preset else "") + (record.layout or "?"),
            f"{(record.params or 0) / 1e6:.1f}M",
            *(f"{v:.4g}" for v in record.values.values()),
            f"{footprint / 2**20:.0f}" if footprint else "-",
            record.written_status or "",
        )
    return table


@dataclass(frozen=True)
class SearchSnapshot:
    """What a running search shows, taken by the driver (`nas.search.Search.snapshot`): the
    display reads this, never the driver's own fields."""

    study_name: str
    device: str  # as given to --device (one name, or several separated by commas)
    trials_done: int
    trials_target: int
    compiling: int  # candidates with a compile in flight
    measuring: int  # candidates with a measurement in flight on some device
    scoring: int  # candidates with a quality proxy in flight
    wall_s: float
    told: dict[str, int]  # trials told so far, by status
    device_busy_s: float  # summed over the devices
    devices: int
    study: Any = None  # the optuna.Study once it is open (for the Pareto table), else None

    @property
    def utilisation(self) -> float:
        return self.device_busy_s / (self.wall_s * max(1, self.devices)) if self.wall_s > 0 else 0.0

    @property
    def eta(self) -> str:
        told = sum(self.told.values())
        return f"{(self.trials_target - self.trials_done) * self.wall_s / told:.0f} s" if told else "-"

    def header(self) -> str:
        return (
            f"[bold]{self.study_name}[/] on {self.device}: {self.trials_done}/{self.trials_target} trials  |  "
            f"compiling {self.compiling}, measuring {self.measuring}, scoring {self.scoring}  |  "
            f"device busy {self.utilisation:.0%}  |  {self.wall_s:.0f} s elapsed, ETA {self.eta}  |  "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.told.items()))
        )


class Progress:
    """`snapshot` is called for each refresh (a terminal) or each check for a finished trial
    (off a terminal)."""

    def __init__(self, snapshot: Callable[[], SearchSnapshot], enabled: bool, console: Console | None):
        self.snapshot = snapshot
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
            snapshot = self.snapshot()
            told = sum(snapshot.told.values())
            if told != self.lines_for_told:
                self.lines_for_told = told
                self.console.print(snapshot.header(), highlight=False, soft_wrap=True)

    def _render(self, with_front: bool = True):
        snapshot = self.snapshot()
        if with_front and snapshot.study is not None:
            return Group(snapshot.header(), pareto_table(snapshot.study))
        return snapshot.header()


__all__ = ["Progress", "SearchSnapshot", "pareto_table"]
