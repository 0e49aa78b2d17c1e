"""The import direction of DESIGN.md, checked on the source (every import, function-level too):

    lfm2 <- search_space <- nas;  lfm2 <- devices <- nas;  reports reads studies through Optuna,
    `lfm2` and the study schema (`nas.study_schema`, the bottom of `nas/`), never the search or
    `devices`. No shipped package imports `bench` or the tests, and test modules share code
    through `testkit` only, never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from testkit import REPO

PROJECT = {"lfm2", "search_space", "devices", "nas", "reports", "bench", "tests", "testkit", "conftest"}
#: package -> the project modules it may import (a package name allows all of it)
ALLOWED = {
    "lfm2": set(),
    "search_space": {"lfm2"},
    "devices": {"lfm2"},
    "reports": {"lfm2", "nas.study_schema"},
    "nas": {"lfm2", "search_space", "devices", "reports"},
}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a project module in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from nas import study_schema` imports the submodule: count it as such
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PROJECT]
    return found


def allowed(module: str, rules: set[str]) -> bool:
    return any(module == rule or module.startswith(rule + ".") for rule in rules)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_the_design_lets_it(package):
    rules = ALLOWED[package] | {package}
    wrong = [f"{path.relative_to(REPO)}:{line} imports {module}" for path in sorted((REPO / package).rglob("*.py")) for line, module in project_imports(path) if not allowed(module, rules)]
    assert not wrong, "against DESIGN.md's import direction:\n" + "\n".join(wrong)


def test_the_study_schema_stays_at_the_bottom_of_nas():
    """`reports` may read the schema only because the schema imports nothing but `lfm2`."""
    wrong = [module for _line, module in project_imports(REPO / "nas" / "study_schema.py") if not allowed(module, {"lfm2"})]
    assert not wrong


def test_test_modules_do_not_import_each_other():
    wrong = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        wrong += [f"{path.name}:{line} imports {module}" for line, module in project_imports(path) if module.split(".")[0] in {"tests", "conftest"} or module.split(".")[0].startswith("test_")]
    assert not wrong, "share code through tests/testkit instead:\n" + "\n".join(wrong)


def test_the_checker_sees_every_kind_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import nas.search\nfrom devices import measure\n\ndef later():\n    from reports.pick import pick\n    from . import sibling\n")
    assert project_imports(sample) == [(1, "nas.search"), (2, "devices.measure"), (5, "reports.pick.pick")]
    assert not allowed("reports.pick.pick", ALLOWED["devices"]) and allowed("nas.study_schema.open_storage", ALLOWED["reports"])
