"""Writing results: BENCHMARKS.md blocks, markdown tables, the machine facts, JSON files.

BENCHMARKS.md is shared: each benchmark owns exactly the text between its two markers

    <!-- bench:NAME:start -->
    ...
    <!-- bench:NAME:end -->

and rewrites only that; everything outside the markers (other benchmarks, other people's
sections) is kept byte for byte.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lfm2.sizes import format_size

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
RESULTS_DIR = REPO_ROOT / "bench" / "results"

#: The order of the blocks in BENCHMARKS.md; a new block is inserted among its siblings
#: in this order.
BLOCK_ORDER = ("lfm2_vs_attention", "roofline", "repeatability", "memory_estimate", "search_efficiency")

HEADER = """# Benchmarks

What lfm2-nas measures on the machine these numbers came from, how, and how to reproduce
each number with one command. Every benchmark measures side by side in one run; the
scripts live in `bench/` and rewrite only their own block below.
"""


class BlockError(ValueError):
    """BENCHMARKS.md has a damaged block (a start marker without its end, or twice)."""


def start_marker(name: str) -> str:
    return f"<!-- bench:{name}:start -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def _block_span(text: str, name: str) -> tuple[int, int] | None:
    """(start of the start marker, end of the end marker) of block `name`, or None."""
    start, end = start_marker(name), end_marker(name)
    starts, ends = text.count(start), text.count(end)
    if starts == 0 and ends == 0:
        return None
    if starts != 1 or ends != 1 or text.index(start) > text.index(end):
        raise BlockError(
            f"BENCHMARKS.md has a damaged {name!r} block ({starts} start and {ends} end markers): "
            f"keep exactly one '{start}' followed by one '{end}', or delete both to start the block afresh"
        )
    return text.index(start), text.index(end) + len(end)


def _existing_blocks(text: str) -> list[tuple[str, int, int]]:
    names = re.findall(r"<!-- bench:([A-Za-z0-9_]+):start -->", text)
    found = []
    for name in dict.fromkeys(names):
        span = _block_span(text, name)
        if span is not None:
            found.append((name, *span))
    return sorted(found, key=lambda item: item[1])


def rewrite_block(text: str, name: str, body: str) -> str:
    """`text` with block `name` holding `body`: replaced in place when the block exists;
    otherwise inserted among the other benchmark blocks in `BLOCK_ORDER`, or appended
    at the end. Nothing outside the block changes."""
    block = f"{start_marker(name)}\n{body.strip()}\n{end_marker(name)}"
    span = _block_span(text, name)
    if span is not None:
        return text[: span[0]] + block + text[span[1] :]
    rank = BLOCK_ORDER.index(name) if name in BLOCK_ORDER else len(BLOCK_ORDER)
    siblings = _existing_blocks(text)
    later = [s for s in siblings if s[0] in BLOCK_ORDER and BLOCK_ORDER.index(s[0]) > rank]
    if later:  # before the first block that comes after this one
        at = later[0][1]
        return text[:at] + block + "\n\n" + text[at:]
    earlier = [s for s in siblings if s[0] in BLOCK_ORDER and BLOCK_ORDER.index(s[0]) < rank]
    if earlier:  # right after the last block that comes before this one
        at = earlier[-1][2]
        return text[:at] + "\n\n" + block + text[at:]
    if not text.strip():
        return HEADER + "\n" + block + "\n"
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_block(name: str, body: str, path: Path = BENCHMARKS_MD) -> Path:
    """Rewrite block `name` of the file at `path` (created when missing), atomically."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    new_text = rewrite_block(text, name, body)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(new_text)
    os.replace(handle.name, path)
    return path


# -- tables --------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed (format numbers before)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: '-' for missing, thousands separators for large ones."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def gb(value_bytes: float | None) -> str:
    return "-" if value_bytes is None else f"{value_bytes / 1e9:.2f} GB"


def mib(value_bytes: float | None) -> str:
    return format_size(value_bytes, unit="MiB", digits=0)


# -- the machine ---------------------------------------------------------------------------


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))} ({platform.system()} {platform.release()})"
    except OSError:
        pass
    return platform.platform()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts() -> dict[str, Any]:
    """CPU model and flags, cores, memory, OS, Python and the toolchain's versions: the
    facts `devices.stack.machine_facts` records with every measurement (the one home), plus
    what a benchmark table adds (the OS's pretty name, the load average, optuna/scipy/ray)."""
    from devices.stack import machine_facts as stack_facts

    facts = stack_facts()
    versions = dict(facts["runtimes"])
    for package in ("optuna", "scipy", "ray"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "absent"
    return {
        "cpu_model": facts["cpu_model"],
        "cpu_flags": facts["cpu_flags"],
        "logical_cores": facts["logical_cores"],
        "usable_cores": len(facts["usable_cpus"]),
        "memory_bytes": facts["memory_bytes"],
        "os": _os_name(),
        "versions": versions,
        "load_average": load_average(),
    }


def machine_markdown(facts: dict[str, Any], load_before: Sequence[float], load_after: Sequence[float]) -> str:
    versions = facts["versions"]
    shown = ", ".join(f"{k} {versions[k]}" for k in ("python", "torch", "executorch", "torchao", "onnxruntime", "numpy", "optuna", "scipy") if k in versions)
    flags = ", ".join(facts.get("cpu_flags") or []) or "unknown"
    cores = facts["usable_cores"]
    # Judged on the load before the run only: the run itself keeps the cores busy, so the
    # load after it says nothing about other work (a benchmark run just before still shows
    # in the 1-minute average for a minute or two).
    busy = float(load_before[0]) if len(load_before) else 0.0
    note = (
        f" **Other work was running** (1-minute load {busy:g} before the run, on {cores} cores): absolute timings are pessimistic and noisy; ratios measured side by side are the robust figures."
        if busy > cores * 0.75
        else ""
    )
    load = f"Load average (1/5/15 min) before: {'/'.join(str(x) for x in load_before)}, after: {'/'.join(str(x) for x in load_after)}.{note}" if len(load_before) else ""
    return (
        f"Machine: {facts['cpu_model']} ({flags}), {cores} usable of {facts['logical_cores']} logical cores, "
        f"{facts['memory_bytes'] / 2**30:.1f} GiB RAM, {facts['os']}. Versions: {shown}. " + load
    ).rstrip()


def today() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# -- results files -------------------------------------------------------------------------


def save_json(path: Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


__all__ = [
    "BENCHMARKS_MD",
    "RESULTS_DIR",
    "BLOCK_ORDER",
    "BlockError",
    "start_marker",
    "end_marker",
    "rewrite_block",
    "write_block",
    "markdown_table",
    "fmt",
    "pct",
    "gb",
    "mib",
    "machine_facts",
    "machine_markdown",
    "load_average",
    "today",
    "save_json",
    "load_json",
]
