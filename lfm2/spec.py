"""`ArchSpec`: the one description of an architecture that every part of lfm2-nas trades in.

A spec is frozen, validated when it is made, and has a canonical JSON form whose hash
(`spec.key`) names the architecture everywhere: in caches, artifact folders, trials.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from lfm2.errors import UserError

#: Operators a layer may use. `conv`: LFM2's gated short convolution. `attn`: grouped-query
#: attention over the whole context. `swa`: the same attention over a sliding window of
#: `swa_window` tokens (one of the operators the LFM2 report considered).
OPERATORS = ("conv", "attn", "swa")
ATTENTION_OPERATORS = ("attn", "swa")


class SpecError(UserError):
    """A field of an `ArchSpec` is missing, of the wrong type or out of range."""


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value}")


def _require_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SpecError(f"{name} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class ArchSpec:
    """An LFM2-style hybrid language model: a stack of operator layers, each followed by SwiGLU.

    `head_dim` defaults to `d_model // n_heads` (which then must divide evenly); give it
    explicitly for shapes such as Qwen3's where heads * head_dim != d_model.
    `swa_window` is required (> 0) when any layer is `swa` and must be 0 otherwise.
    """

    vocab_size: int
    d_model: int
    layers: tuple[str, ...]
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    # None when constructed means d_model // n_heads; __post_init__ always leaves an int, so
    # every reader sees an int (the annotation says so; the default is the one exception).
    head_dim: int = None  # type: ignore[assignment]
    conv_kernel: int = 3
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 128_000
    swa_window: int = 0
    qk_norm: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) or not isinstance(self.layers, (tuple, list)):
            raise SpecError(
                f"layers must be a sequence of operator names from {OPERATORS}, got {self.layers!r}"
            )
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise SpecError(f"layers must hold at least one operator from {OPERATORS}, got none")
        for index, op in enumerate(self.layers):
            if op not in OPERATORS:
                raise SpecError(f"layers[{index}] is {op!r}; allowed operators: {', '.join(OPERATORS)}")
        _require_int("vocab_size", self.vocab_size, 1)
        _require_int("d_model", self.d_model, 1)
        _require_int("n_heads", self.n_heads, 1)
        _require_int("n_kv_heads", self.n_kv_heads, 1)
        _require_int("ffn_dim", self.ffn_dim, 1)
        _require_int("conv_kernel", self.conv_kernel, 2)
        _require_int("max_seq_len", self.max_seq_len, 1)
        _require_int("swa_window", self.swa_window, 0)
        _require_positive_float("rope_theta", self.rope_theta)
        _require_positive_float("norm_eps", self.norm_eps)
        for flag in ("tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise SpecError(
                    f"n_heads={self.n_heads} must divide d_model={self.d_model} "
                    "(or give head_dim explicitly)"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _require_int("head_dim", self.head_dim, 2)
        if self.head_dim % 2:
            raise SpecError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise SpecError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        has_swa = "swa" in self.layers
        if has_swa and self.swa_window < 1:
            raise SpecError("swa_window must be >= 1 when a layer is 'swa'")
        if not has_swa and self.swa_window:
            raise SpecError(f"swa_window must be 0 when no layer is 'swa', got {self.swa_window}")
        # Normalise numbers so that equal specs have equal JSON (1e6 vs 1000000).
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "norm_eps", float(self.norm_eps))

    # -- derived facts -------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """0-based indices of the layers that keep K/V (full or sliding-window attention)."""
        return tuple(i for i, op in enumerate(self.layers) if op in ATTENTION_OPERATORS)

    @property
    def conv_layers(self) -> tuple[int, ...]:
        return tuple(i for i, op in enumerate(self.layers) if op == "conv")

    @property
    def layout(self) -> str:
        """The layer stack as one letter per layer: C conv, A attention, S sliding window."""
        return "".join({"conv": "C", "attn": "A", "swa": "S"}[op] for op in self.layers)

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data

    def to_json(self, indent: int | None = None) -> str:
        """Canonical JSON: sorted keys, no whitespace unless `indent` asks for it."""
        if indent is None:
            return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        if not isinstance(data, dict):
            raise SpecError(f"an ArchSpec is a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown ArchSpec field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise SpecError(f"ArchSpec is missing required field(s) {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"not valid JSON for an ArchSpec: {exc}") from exc
        return cls.from_dict(data)

    @property
    def key(self) -> str:
        """A stable content hash of the canonical JSON (16 hex digits)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> ArchSpec:
        """A copy with some fields changed (validated like any new spec)."""
        data = self.to_dict()
        if ("d_model" in changes or "n_heads" in changes) and "head_dim" not in changes:
            data["head_dim"] = None  # derive it again from the new width
        data.update(changes)
        return ArchSpec.from_dict(data)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        """K and V bytes one more token of context adds (over all full-attention layers;
        sliding-window layers stop growing at their window)."""
        n_full = sum(op == "attn" for op in self.layers)
        return 2 * n_full * self.n_kv_heads * self.head_dim * bytes_per_element


__all__ = ["ArchSpec", "SpecError", "OPERATORS", "ATTENTION_OPERATORS"]
