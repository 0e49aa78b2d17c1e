"""Byte sizes for `pick --max-memory` and the report's tables.

Parsing is `lfm2.sizes.parse_size`, the one parser every flag of lfm2-nas uses; this
module adds how the report shows memory (binary units).
"""

from __future__ import annotations

from lfm2.sizes import ACCEPTED as SPELLINGS
from lfm2.sizes import parse_size


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
