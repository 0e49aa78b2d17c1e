"""Byte sizes written by people: `2GB`, `1.5GiB`, `800M`, `512k`, `1048576`.

One parser for every flag and data file that takes a size (agent memory caps, upload
limits, device profiles, search budgets), so they all accept the same spellings.
Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB)
powers of 1024; a bare letter (k, M, G, T) is read as binary, as `ulimit`, `free -h`
and most memory flags mean it. Case does not matter except that a lone `b` is bytes.
"""

from __future__ import annotations

import math
import re

from lfm2.errors import UserError

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")

ACCEPTED = "a number of bytes with an optional unit: 800M, 1.5GiB, 2GB, 512k, 1048576 (kB/MB/GB/TB are powers of 1000; k/M/G/T and KiB/MiB/GiB/TiB powers of 1024)"


def parse_size(text: str | int, what: str = "size", *, require_unit: bool = False) -> int:
    """Bytes in `text`; raises `UserError` naming `what` and the accepted spellings.

    `require_unit`: refuse a bare number. Command-line flags ask for it: `--budget 500`
    meant as 500 MB would otherwise be read as 500 bytes and exclude every candidate."""
    if isinstance(text, bool):
        raise UserError(f"{what} must be {ACCEPTED}; got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise UserError(f"{what} must not be negative; got {text}")
        return text
    if not isinstance(text, str):
        raise UserError(f"{what} must be {ACCEPTED}; got {text!r}")
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"{what} {text!r} is not a size; use {ACCEPTED}")
    unit = match["unit"].lower()
    if require_unit and not unit:
        raise UserError(f"{what} {text!r} has no unit; write it with one, e.g. {match['number']}MB or {match['number']}MiB ({ACCEPTED})")
    if unit not in _UNITS:
        raise UserError(f"{what} {text!r} has an unknown unit {match['unit']!r}; use {ACCEPTED}")
    value = float(match["number"]) * _UNITS[unit]
    if not math.isfinite(value) or value >= 2**63:
        raise UserError(f"{what} {text!r} is too large")
    return int(round(value))


def format_size(n_bytes: int | float | None, *, unit: str | None = None, digits: int = 2, missing: str = "-") -> str:
    """Bytes in binary units: the one formatter of lfm2-nas (tables, messages, reports).

    Without `unit`, the largest unit that keeps the number under 1024 (`1.50 GiB`, `100 B`);
    with `unit` (`"MiB"`, `"GiB"`, ...), always that unit with thousands separators
    (`1,234.5 MiB`), as tables that compare rows want. `digits`: decimals (bytes are whole).
    `missing` stands for None (or anything that is not a number)."""
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, (int, float)):
        return missing
    value = float(n_bytes)
    if unit is not None:
        scale = _BINARY_UNITS.index(unit)
        return f"{value / 1024**scale:,.{digits}f} {unit}" if scale else f"{int(value):,} B"
    for index, name in enumerate(_BINARY_UNITS):
        if abs(value) < 1024 or index == len(_BINARY_UNITS) - 1:
            return f"{int(value)} B" if index == 0 else f"{value:.{digits}f} {name}"
        value /= 1024
    raise AssertionError("unreachable")


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


__all__ = ["parse_size", "format_size"]
