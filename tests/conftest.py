"""Shared pytest plumbing.

`figures`: a scenario records what it did (jobs, faults injected, inputs tried, losses)
with `figures("network cut", jobs=3, faults=2, losses=0)`; the terminal summary prints
the records under "reliability figures", so a CI log shows the numbers behind a pass.
Records of one scenario (e.g. from a parametrized test) are added up field by field.
"""

from __future__ import annotations

import pytest

_FIGURES: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="session")
def figures():
    def record(scenario: str, **numbers: object) -> None:
        totals = _FIGURES.setdefault(scenario, {})
        for key, value in numbers.items():
            summable = isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(totals.get(key), (int, float))
            totals[key] = totals[key] + value if summable else value

    return record


@pytest.fixture
def private_core_locks(tmp_path_factory, monkeypatch):
    """Measurements lock their cores host-wide; tests that assert no timing take locks of
    their own instead of queueing behind other suites' measurements (use it with
    `pytestmark = pytest.mark.usefixtures("private_core_locks")`)."""
    monkeypatch.setenv("LFM2_NAS_LOCKS", str(tmp_path_factory.getbasetemp() / "core-locks"))


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for scenario, numbers in _FIGURES.items():
        terminalreporter.write_line(f"{scenario}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in numbers.items()))
