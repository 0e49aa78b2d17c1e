"""Shared pytest plumbing.

`figures`: a scenario records what it did (jobs, faults injected, inputs tried, losses)
with `figures("network cut", jobs=3, faults=2, losses=0)`; the terminal summary prints
every record under "reliability figures", so a CI log shows the numbers behind a pass.
"""

from __future__ import annotations

import pytest

_FIGURES: list[tuple[str, dict[str, object]]] = []


@pytest.fixture(scope="session")
def figures():
    def record(scenario: str, **numbers: object) -> None:
        _FIGURES.append((scenario, numbers))

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for scenario, numbers in _FIGURES:
        terminalreporter.write_line(f"{scenario}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in numbers.items()))
