"""The backends an architecture compiles to and the precisions each compiles: one table at
the bottom of the packages, so that `devices` (which compiles) and `search_space.costs`
(which estimates what a compile will need, and may not import `devices`) read the same one."""

from __future__ import annotations

from lfm2.errors import UserError

#: Backends and the precisions each one compiles.
QUANTS: dict[str, tuple[str, ...]] = {
    "executorch": ("fp32", "8da4w"),
    "onnx": ("fp32", "int8"),
    "llamacpp": ("f16", "q8_0", "q4_0"),
    "eager": ("fp32",),
}
BACKENDS = tuple(QUANTS)


def check_backend_quant(backend: str, quant: str) -> None:
    """A `UserError` naming the choices when `backend` or its `quant` is not in the table."""
    if backend not in QUANTS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if quant not in QUANTS[backend]:
        raise UserError(f"backend {backend!r} compiles {', '.join(QUANTS[backend])}, not {quant!r}")


__all__ = ["BACKENDS", "QUANTS", "check_backend_quant"]
