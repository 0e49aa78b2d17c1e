"""BENCHMARKS.md block rewriting: each benchmark touches only its own block."""

import re

import pytest

from bench.report import HEADER, BlockError, end_marker, markdown_table, rewrite_block, start_marker, write_block

OTHER = "## Quality proxy fidelity\n\nTheir section, with <!-- a comment --> and numbers 1.23.\n"


def block(name, body):
    return f"{start_marker(name)}\n{body}\n{end_marker(name)}"


def test_creates_file_with_header(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_block("roofline", "## Roofline\n\nnumbers", path)
    text = path.read_text()
    assert text.startswith(HEADER)
    assert block("roofline", "## Roofline\n\nnumbers") in text


def test_replaces_only_its_block_and_keeps_other_content_byte_for_byte():
    text = "# Benchmarks\n\n" + OTHER + "\n" + block("roofline", "old") + "\n\n" + block("repeatability", "rep") + "\n\ntrailing text\n"
    new = rewrite_block(text, "roofline", "new body")
    assert new == text.replace(block("roofline", "old"), block("roofline", "new body"))
    # idempotent
    assert rewrite_block(new, "roofline", "new body") == new


def test_appends_after_foreign_content_when_no_block_exists():
    text = "# Benchmarks\n\n" + OTHER
    new = rewrite_block(text, "repeatability", "x")
    assert new.startswith(text.rstrip("\n"))
    assert new.endswith(block("repeatability", "x") + "\n")


def test_inserts_in_canonical_order_among_siblings():
    text = "# B\n\n" + block("lfm2_vs_attention", "a") + "\n\n" + OTHER + "\n" + block("memory_estimate", "m") + "\n"
    new = rewrite_block(text, "roofline", "r")
    order = [new.index(start_marker(n)) for n in ("lfm2_vs_attention", "roofline", "memory_estimate")]
    assert order == sorted(order)
    assert OTHER in new
    # a block that comes last goes after the last sibling
    newer = rewrite_block(new, "search_efficiency", "s")
    assert newer.index(start_marker("search_efficiency")) > newer.index(end_marker("memory_estimate"))
    assert new in newer.replace("\n\n" + block("search_efficiency", "s"), "")


def test_damaged_block_is_refused_with_advice():
    text = start_marker("roofline") + "\nno end\n"
    with pytest.raises(BlockError, match="damaged 'roofline' block"):
        rewrite_block(text, "roofline", "x")
    twice = block("roofline", "a") + "\n" + block("roofline", "b")
    with pytest.raises(BlockError):
        rewrite_block(twice, "roofline", "x")


def test_markdown_table_checks_row_width():
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [[1]])


def test_other_work_is_judged_by_the_load_before_the_run_only():
    from bench.report import machine_markdown

    facts = {"versions": {"python": "3.11"}, "cpu_flags": ["avx2"], "usable_cores": 2, "logical_cores": 2, "cpu_model": "cpu", "memory_bytes": 2**34, "os": "linux"}
    quiet = machine_markdown(facts, load_before=(0.3, 0.5, 0.6), load_after=(2.0, 1.2, 0.9))  # the run itself loaded both cores
    assert "Other work" not in quiet
    busy = machine_markdown(facts, load_before=(3.5, 3.0, 2.0), load_after=(2.0, 2.0, 2.0))
    assert "**Other work was running** (1-minute load 3.5 before the run" in busy


def test_the_repositorys_benchmarks_file_has_no_damaged_block():
    # A stray second start marker once sat in BENCHMARKS.md: every later run that inserts a new
    # block would have stopped on it. Each block named there has one start followed by one end.
    from bench.report import BENCHMARKS_MD, _block_span

    text = BENCHMARKS_MD.read_text(encoding="utf-8")
    names = set(re.findall(r"<!-- bench:([A-Za-z0-9_]+):(?:start|end) -->", text))
    assert names, "no benchmark block found"
    for name in sorted(names):
        assert _block_span(text, name) is not None
