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

#: The backend every command uses when none is given: what the card ships (ExecuTorch, XNNPACK).
DEFAULT_BACKEND = "executorch"
#: Each backend's precision when none is given: the one a deployment ships on a phone or board
#: (LFM2's report measures ExecuTorch 8da4w and llama.cpp Q4_0), so that `bench`, `search` and
#: the rest measure the same artifact for the same `--backend`.
DEFAULT_QUANT: dict[str, str] = {"executorch": "8da4w", "onnx": "int8", "llamacpp": "q4_0", "eager": "fp32"}


def check_backend_quant(backend: str, quant: str) -> None:
    """A `UserError` naming the choices when `backend` or its `quant` is not in the table."""
    if backend not in QUANTS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if quant not in QUANTS[backend]:
        raise UserError(f"backend {backend!r} compiles {', '.join(QUANTS[backend])}, not {quant!r}")


def default_quant(backend: str) -> str:
    """`backend`'s shipped precision (`DEFAULT_QUANT`), or the `UserError` naming the backends."""
    check_backend_quant(backend, DEFAULT_QUANT.get(backend, ""))
    return DEFAULT_QUANT[backend]


__all__ = ["BACKENDS", "QUANTS", "DEFAULT_BACKEND", "DEFAULT_QUANT", "check_backend_quant", "default_quant"]
