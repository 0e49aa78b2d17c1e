"""Plain helpers and constants that several test modules share; no tests, no fixtures.

One module per area: `agent` (small artifacts, hostile bundles, the agent tests' protocol),
`anchored` (a tiny candidate and anchor, a quick protocol, one core: the anchored and
several-processes measurement tests),
`adb` (a stand-in `adb` and phone), `export_study` (the study the export tests read),
`reports` (the study the report tests read, headless Chromium), `reliability` (a cuttable
proxy, RSS sampling, isolated CLI environments). Shared fixtures live in tests/conftest.py.

Test modules import it as `testkit` (`from testkit.agent import handmade_artifact`), never
each other. It is importable because pytest, in its default "prepend" import mode, puts
tests/ on sys.path before it imports tests/conftest.py (tests/ has no __init__.py), so the
same holds for `python -m pytest` from the repository root and for a single file
(`python -m pytest tests/test_x.py`). pytest collects none of it: its module names do not
match `test_*.py`.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root (commands run from here, as a user runs them).
REPO = Path(__file__).resolve().parents[2]
#: Committed test data (tests/data), e.g. the study a real search wrote.
DATA = REPO / "tests" / "data"
