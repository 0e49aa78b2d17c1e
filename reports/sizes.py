"""Byte sizes as people write them (`500MB`, `1.5GiB`, `800M`), for `pick --max-memory`.

`reports` may not import `devices`, so this is a small parser of its own. It reads the
same spellings as `devices.sizes` (decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB, and a bare
k/M/G/T read as binary, as memory flags usually mean it); the two should become one in
`lfm2` eventually.
"""

from __future__ import annotations

import re

from lfm2.errors import UserError

_UNIT_BYTES = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
SPELLINGS = "a size such as 800M, 500MB, 1.5GiB or 1048576 (MB/GB are powers of 1000; M/G and MiB/GiB powers of 1024)"


def parse_size(text: str, what: str = "size") -> int:
    """The number of bytes `text` names; a `UserError` saying the accepted spellings if none."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNIT_BYTES:
        raise UserError(f"{what} {text!r} is not {SPELLINGS}")
    return int(round(float(match.group(1)) * _UNIT_BYTES[unit]))


def format_bytes(n_bytes: float | int | None) -> str:
    """`1.50 GiB`, `640.0 MiB`: binary units, as tables and messages show memory."""
    if n_bytes is None:
        return "–"
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


__all__ = ["parse_size", "format_bytes", "SPELLINGS"]
