"""Reading and checking a space file (TOML or YAML) into a `SpaceDefinition`.

A space file is flat: each key is either *fixed* (one value for every architecture of the
space: `vocab_size`, `max_seq_len`, ...) or a *choice* (a value, a list of values, or for
integers a range table `{min = 6, max = 32, step = 2}`). Every combination of choices must
be a valid `ArchSpec`; the loader checks that up front, so that sampling can never fail.
Every error names the key, what was found and what is allowed.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from lfm2.errors import UserError
from lfm2.spec import OPERATORS


class SpaceFileError(UserError):
    """A space file cannot be read, or a key in it is missing, unknown or out of range."""


#: Keys with one value for the whole space, with their defaults (None: required).
FIXED_KEYS: dict[str, Any] = {
    "name": None,
    "description": "",
    "vocab_size": None,
    "max_seq_len": None,
    "head_dim": 64,
    "rope_theta": 1_000_000.0,
    "norm_eps": 1e-5,
    "ffn_multiple_of": 256,
}

#: Keys that may hold several values, with their defaults (None: required). The order is
#: the order in which `SearchSpace.sample` suggests them: it never changes for a space.
CHOICE_KEYS: dict[str, Any] = {
    "d_model": None,
    "n_layers": None,
    "ffn_multiplier": None,
    "n_kv_heads": None,
    "conv_kernel": [3],
    "operators": None,
    "swa_window": [],  # required (non-empty) exactly when "swa" is an operator
    "tie_embeddings": [True],
    "qk_norm": [True],
}

_INTEGER_CHOICES = {"d_model": 1, "n_layers": 1, "n_kv_heads": 1, "conv_kernel": 2, "swa_window": 1}
_BOOLEAN_CHOICES = ("tie_embeddings", "qk_norm")

#: What each key means, for error messages and `space show`.
KEY_HELP = {
    "name": "the space's name (text)",
    "description": "one line about the space (text)",
    "vocab_size": "vocabulary size, fixed for the space (integer >= 1)",
    "max_seq_len": "longest context an architecture supports (integer >= 1)",
    "head_dim": "width of every attention head; n_heads = d_model / head_dim (even integer >= 2)",
    "rope_theta": "rotary embedding base (number > 0)",
    "norm_eps": "RMSNorm epsilon (number > 0)",
    "ffn_multiple_of": "SwiGLU widths are rounded to a multiple of this (integer >= 1)",
    "d_model": "model width; a multiple of head_dim (integers)",
    "n_layers": "depth (integers >= 1)",
    "ffn_multiplier": "SwiGLU width = ffn_multiplier * d_model rounded to ffn_multiple_of (numbers > 0)",
    "n_kv_heads": "key/value heads of attention layers; must divide n_heads for every d_model (integers)",
    "conv_kernel": "kernel of the gated short convolution (integers >= 2)",
    "operators": f"operators a layer may use, from {', '.join(OPERATORS)}",
    "swa_window": "sliding-window sizes for 'swa' layers, one per architecture (integers, below max_seq_len)",
    "tie_embeddings": "whether the LM head shares the embedding (true/false)",
    "qk_norm": "whether attention normalises q and k per head (true/false)",
}


@dataclass(frozen=True)
class Choice:
    """The allowed values of one choice key, in file order; `int_range` (low, high, step)
    when the values are evenly spaced integers (then they are sampled as an integer)."""

    key: str
    values: tuple[Any, ...]
    int_range: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class SpaceDefinition:
    name: str
    description: str
    vocab_size: int
    max_seq_len: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    ffn_multiple_of: int
    choices: dict[str, Choice] = field(default_factory=dict)

    def values(self, key: str) -> tuple[Any, ...]:
        return self.choices[key].values


def ffn_width(multiplier: float | int, d_model: int, multiple_of: int) -> int:
    """`multiplier * d_model` rounded to the nearest multiple of `multiple_of` (halves up),
    in exact rational arithmetic so that 5.25 * 2048 gives 10752 and not 10751.999."""
    exact = Fraction(str(multiplier)) * d_model / multiple_of
    return multiple_of * math.floor(exact + Fraction(1, 2))


# -- reading ---------------------------------------------------------------------------------


def parse_text(text: str, fmt: str, origin: str) -> dict[str, Any]:
    """The raw mapping of a TOML ('toml') or YAML ('yaml') space file."""
    if fmt == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpaceFileError(f"{origin}: not valid TOML ({exc}); fix the syntax at that line") from exc
    elif fmt == "yaml":
        import yaml  # optuna depends on PyYAML

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpaceFileError(f"{origin}: not valid YAML ({exc}); fix the syntax there") from exc
    else:
        raise SpaceFileError(f"{origin}: unknown space file format {fmt!r}; use .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise SpaceFileError(f"{origin}: a space file is a mapping of keys to values, got {type(data).__name__}")
    return data


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise SpaceFileError(f"space file {str(path)!r} must end in .toml, .yaml or .yml")


# -- checking --------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fixed(data: dict[str, Any], key: str, origin: str) -> Any:
    value = data.get(key, FIXED_KEYS[key])
    if value is None:
        raise SpaceFileError(f"{origin}: key '{key}' is required: {KEY_HELP[key]}")
    bad = f"{origin}: key '{key}' must be {KEY_HELP[key]}, got {value!r}"
    if key in ("name", "description"):
        if not isinstance(value, str) or (key == "name" and not value.strip()):
            raise SpaceFileError(bad)
    elif key in ("vocab_size", "max_seq_len", "ffn_multiple_of"):
        if not _is_int(value) or value < 1:
            raise SpaceFileError(bad)
    elif key == "head_dim":
        if not _is_int(value) or value < 2 or value % 2:
            raise SpaceFileError(bad)
    elif not _is_number(value) or value <= 0:  # rope_theta, norm_eps
        raise SpaceFileError(bad)
    return value


def _choice_values(key: str, raw: Any, origin: str) -> tuple[tuple[Any, ...], tuple[int, int, int] | None]:
    """The values of one choice key and, for evenly spaced integers, their (low, high, step)."""
    where = f"{origin}: key '{key}'"
    if isinstance(raw, dict):
        if key not in _INTEGER_CHOICES:
            raise SpaceFileError(f"{where}: a range table {{min, max, step}} is only for integer keys; give a list of values")
        unknown = sorted(set(raw) - {"min", "max", "step"})
        if unknown or "min" not in raw or "max" not in raw:
            raise SpaceFileError(f"{where}: a range table has 'min', 'max' and optionally 'step' (integers), got {raw!r}")
        low, high, step = raw["min"], raw["max"], raw.get("step", 1)
        if not all(_is_int(v) for v in (low, high, step)) or step < 1 or high < low:
            raise SpaceFileError(f"{where}: range needs integers with min <= max and step >= 1, got {raw!r}")
        if (high - low) % step:
            raise SpaceFileError(f"{where}: max - min ({high - low}) must be a multiple of step ({step}), got {raw!r}")
        values: tuple[Any, ...] = tuple(range(low, high + 1, step))
    elif isinstance(raw, list):
        if not raw:
            raise SpaceFileError(f"{where}: the list is empty; give at least one value ({KEY_HELP[key]})")
        values = tuple(raw)
    else:
        values = (raw,)

    for value in values:
        if key in _INTEGER_CHOICES:
            ok = _is_int(value) and value >= _INTEGER_CHOICES[key]
        elif key in _BOOLEAN_CHOICES:
            ok = isinstance(value, bool)
        elif key == "operators":
            ok = value in OPERATORS
        else:  # ffn_multiplier
            ok = _is_number(value) and value > 0
        if not ok:
            raise SpaceFileError(f"{where}: {value!r} is not allowed; {KEY_HELP[key]}")
    if key == "ffn_multiplier":
        values = tuple(float(v) for v in values)  # 4 and 4.0 are one choice: keep trial params uniform
    if len(set(values)) != len(values):
        duplicates = sorted({repr(v) for v in values if values.count(v) > 1})
        raise SpaceFileError(f"{where}: values repeat ({', '.join(duplicates)}); list each value once")

    int_range = None
    if key in _INTEGER_CHOICES and len(values) > 1:
        step = values[1] - values[0]
        if step > 0 and all(b - a == step for a, b in zip(values, values[1:])):
            int_range = (values[0], values[-1], step)
    return values, int_range


def check_definition(data: dict[str, Any], origin: str) -> SpaceDefinition:
    """Validate the raw mapping of a space file; every combination of choices must be a valid
    architecture, so that sampling never fails."""
    unknown = sorted(set(data) - set(FIXED_KEYS) - set(CHOICE_KEYS))
    if unknown:
        allowed = ", ".join([*FIXED_KEYS, *CHOICE_KEYS])
        raise SpaceFileError(f"{origin}: unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed keys: {allowed}")
    fixed = {key: _fixed(data, key, origin) for key in FIXED_KEYS}

    choices: dict[str, Choice] = {}
    for key, default in CHOICE_KEYS.items():
        raw = data.get(key, default)
        if raw is None:
            raise SpaceFileError(f"{origin}: key '{key}' is required: {KEY_HELP[key]}")
        if key == "swa_window" and raw == []:
            choices[key] = Choice(key, ())
            continue
        values, int_range = _choice_values(key, raw, origin)
        choices[key] = Choice(key, values, int_range)

    head_dim = fixed["head_dim"]
    kv_heads = choices["n_kv_heads"].values
    for d_model in choices["d_model"].values:
        if d_model % head_dim:
            raise SpaceFileError(
                f"{origin}: key 'd_model': {d_model} is not a multiple of head_dim = {head_dim} "
                f"(n_heads = d_model / head_dim); use multiples of {head_dim}"
            )
        n_heads = d_model // head_dim
        for kv in kv_heads:
            if n_heads % kv:
                raise SpaceFileError(
                    f"{origin}: key 'n_kv_heads': {kv} does not divide n_heads = {n_heads} of d_model = {d_model}; "
                    "every combination of choices must be valid: drop one of them or change head_dim"
                )
        for multiplier in choices["ffn_multiplier"].values:
            if ffn_width(multiplier, d_model, fixed["ffn_multiple_of"]) < fixed["ffn_multiple_of"]:
                raise SpaceFileError(
                    f"{origin}: key 'ffn_multiplier': {multiplier} * d_model {d_model} rounds to a SwiGLU width of 0 "
                    f"(widths are multiples of ffn_multiple_of = {fixed['ffn_multiple_of']}); use a larger multiplier"
                )

    has_swa = "swa" in choices["operators"].values
    windows = choices["swa_window"].values
    if has_swa and not windows:
        raise SpaceFileError(f"{origin}: key 'swa_window' is required when 'swa' is in operators: {KEY_HELP['swa_window']}")
    if windows and not has_swa:
        raise SpaceFileError(f"{origin}: key 'swa_window' is set but 'swa' is not in operators; remove swa_window or add 'swa'")
    for window in windows:
        if window >= fixed["max_seq_len"]:
            raise SpaceFileError(
                f"{origin}: key 'swa_window': {window} is not below max_seq_len = {fixed['max_seq_len']} "
                "(a window that covers the whole context is full attention); use smaller windows"
            )
    return SpaceDefinition(
        name=fixed["name"],
        description=fixed["description"],
        vocab_size=fixed["vocab_size"],
        max_seq_len=fixed["max_seq_len"],
        head_dim=head_dim,
        rope_theta=float(fixed["rope_theta"]),
        norm_eps=float(fixed["norm_eps"]),
        ffn_multiple_of=fixed["ffn_multiple_of"],
        choices=choices,
    )


__all__ = ["SpaceFileError", "SpaceDefinition", "Choice", "FIXED_KEYS", "CHOICE_KEYS", "KEY_HELP", "ffn_width", "parse_text", "format_of", "check_definition"]
