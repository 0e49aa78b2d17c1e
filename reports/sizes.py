"""Byte sizes for `pick --budget` and the report's tables.

Parsing is `lfm2.sizes.parse_size`, the one parser every flag of lfm2-nas uses; this
module adds how the report shows memory (binary units).
"""

from __future__ import annotations

from lfm2.sizes import ACCEPTED as SPELLINGS
from lfm2.sizes import format_size, parse_size


def format_bytes(n_bytes: float | int | None) -> str:
    """`1.50 GiB` -> `1.5 GiB`, `640.0 MiB`: `lfm2.sizes.format_size` with one decimal and an
    en dash for a missing value, as the report's tables show memory."""
    return format_size(n_bytes, digits=1, missing="–")


__all__ = ["parse_size", "format_bytes", "SPELLINGS"]
