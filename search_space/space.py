"""`SearchSpace`: the architectures a search may propose, and how an Optuna trial picks one.

The encoding (one fixed set of trial parameters per space)
---------------------------------------------------------
A trial always suggests the same parameters, in the same order, with the same
distributions, whatever values it draws:

* one parameter per choice key that has more than one value: `d_model`, `n_layers`,
  `ffn_multiplier`, `n_kv_heads`, `conv_kernel`, `swa_window`, `tie_embeddings`, `qk_norm`.
  Evenly spaced integers are suggested with `suggest_int(low, high, step=...)`, so that
  TPE and GP can use their order; anything else (floats such as 5.25, irregular integers,
  booleans) with `suggest_categorical`;
* one operator per layer *slot*, `layer_00` ... `layer_{max_depth-1}`, each a categorical
  over the space's operators. An architecture of depth L uses the first L slots; the
  others are drawn but ignored.

Why: NSGA-II's crossover and mutation, multivariate TPE and the GP sampler all work on a
fixed vector of parameters whose distributions never change between trials. A
define-by-run encoding whose parameters depend on earlier draws (a variable number of
slots, or operator choices conditional on depth) turns into "dynamic search space"
fallbacks in TPE (independent sampling), and NSGA-II and GP then sample the missing
parameters at random. Per-slot operators also make each LFM2 layout (attention exactly at
layers 2, 5, 8, ...) an exact point, which an "attention count plus placement rule"
encoding would not. The price is that ignored slots (beyond the depth) and an ignored
`swa_window` (no `swa` layer) make several parameter vectors give one architecture;
`params_for` returns a canonical one (ignored slots take the first operator, an ignored
window the first window, the FFN width the first multiplier that reaches it) and
`count()` counts distinct `ArchSpec`s, not parameter vectors.

A trial's parameters decide its `ArchSpec` completely (`spec_from_params`), so a study
can always rebuild the spec of any past trial from `trial.params`.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from lfm2.errors import UserError
from lfm2.spec import ArchSpec
from search_space.schema import Choice, SpaceDefinition, SpaceFileError, check_definition, ffn_width, format_of, parse_text

# The two kinds of distribution a space's trial parameters have (a range of ints or a set of choices).
SpaceDistribution = IntDistribution | CategoricalDistribution

#: The spaces shipped with the package (search_space/spaces/<name>.toml).
BUILTIN_SPACES = ("default", "small", "lfm2_350m")


class NotInSpaceError(UserError):
    """An `ArchSpec` is not a point of a search space (for `params_for`)."""


class SearchSpace:
    """A validated space file plus the trial-parameter encoding described in the module doc."""

    def __init__(self, definition: SpaceDefinition, source_text: str, origin: str):
        self.definition = definition
        self.source_text = source_text
        self.origin = origin
        self._slot_width = max(2, len(str(self.max_depth - 1)))
        self._distributions = self._make_distributions()

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str | Path) -> SearchSpace:
        """'default', 'small', or a path to a .toml/.yaml/.yml space file."""
        text = str(name_or_path)
        if text in BUILTIN_SPACES:
            source = resources.files("search_space").joinpath("spaces", f"{text}.toml").read_text(encoding="utf-8")
            return cls.from_text(source, fmt="toml", origin=f"built-in space {text!r}")
        path = Path(text)
        if not path.exists():
            raise SpaceFileError(
                f"no space {text!r}: give one of the built-in spaces ({', '.join(BUILTIN_SPACES)}) "
                "or the path of a .toml/.yaml space file"
            )
        if not path.is_file():
            raise SpaceFileError(f"space file {text!r} is not a file")
        fmt = format_of(path)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaceFileError(f"cannot read space file {text!r}: {exc}") from exc
        return cls.from_text(source, fmt=fmt, origin=f"space file {text!r}")

    @classmethod
    def from_text(cls, text: str, fmt: str = "toml", origin: str = "space file") -> SearchSpace:
        """A space from the text of a space file, e.g. the copy kept in a study's metadata."""
        return cls(check_definition(parse_text(text, fmt, origin), origin), text, origin)

    # -- facts -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.definition.name

    def values(self, key: str) -> tuple[Any, ...]:
        """The allowed values of a choice key (`d_model`, `n_layers`, `operators`, ...)."""
        return self.definition.values(key)

    @property
    def max_depth(self) -> int:
        return max(self.values("n_layers"))

    def slot_name(self, index: int) -> str:
        return f"layer_{index:0{self._slot_width}d}"

    def distributions(self) -> dict[str, BaseDistribution]:
        """The trial parameters, in the order `sample` suggests them, with their distributions
        (for `optuna.trial.create_trial` or a custom sampler)."""
        return dict(self._distributions)

    def _make_distributions(self) -> dict[str, SpaceDistribution]:
        out: dict[str, SpaceDistribution] = {}
        for key, choice in self.definition.choices.items():
            if key == "operators" or len(choice.values) < 2:
                continue
            out[key] = _distribution(choice)
        operators = self.values("operators")
        if len(operators) > 1:
            for index in range(self.max_depth):
                out[self.slot_name(index)] = CategoricalDistribution(operators)
        return out

    # -- sampling --------------------------------------------------------------------------

    def sample(self, trial: optuna.Trial) -> ArchSpec:
        """Suggest every parameter of the space on `trial` and return the architecture."""
        params: dict[str, Any] = {}
        for name, dist in self._distributions.items():
            if isinstance(dist, IntDistribution):
                params[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step)
            else:
                params[name] = trial.suggest_categorical(name, dist.choices)
        return self.spec_from_params(params)

    def spec_from_params(self, params: dict[str, Any]) -> ArchSpec:
        """The architecture that trial parameters `params` (all of this space's) stand for."""
        expected = set(self._distributions)
        missing, unknown = sorted(expected - set(params)), sorted(set(params) - expected)
        if missing or unknown:
            raise UserError(
                f"trial parameters do not fit {self.origin}: missing {missing}, unknown {unknown}; "
                "was the study created with another space file?"
            )
        for name, value in params.items():
            if not _allowed(self._distributions[name], value):
                raise UserError(f"trial parameter {name}={value!r} is outside {self.origin}")

        def pick(key: str) -> Any:
            return params[key] if key in params else self.values(key)[0]

        d = self.definition
        d_model = pick("d_model")
        n_layers = pick("n_layers")
        operators = self.values("operators")
        layers = tuple(params[self.slot_name(i)] if len(operators) > 1 else operators[0] for i in range(n_layers))
        return ArchSpec(
            vocab_size=d.vocab_size,
            d_model=d_model,
            layers=layers,
            n_heads=d_model // d.head_dim,
            n_kv_heads=pick("n_kv_heads"),
            head_dim=d.head_dim,
            ffn_dim=ffn_width(pick("ffn_multiplier"), d_model, d.ffn_multiple_of),
            conv_kernel=pick("conv_kernel"),
            rope_theta=d.rope_theta,
            norm_eps=d.norm_eps,
            tie_embeddings=pick("tie_embeddings"),
            max_seq_len=d.max_seq_len,
            swa_window=pick("swa_window") if "swa" in layers else 0,
            qk_norm=pick("qk_norm"),
        )

    def anchor_spec(self) -> ArchSpec:
        """The space's anchor: one fixed architecture timed beside every candidate of an
        anchored measurement (`devices.measure`'s anchor), so that every candidate's ratio has
        the same denominator. A typical member, so that drift slows it as it slows the
        candidates: the middle value of every choice (the upper of two middles), and LFM2's
        own choices where the space offers them: its operator pattern (convolutions, attention
        at the third and sixth layers) and its convolution kernel of 3.
        Small space: CCACCA, d 512, FFN 1792, 2 K/V heads, 26M parameters."""
        operators = self.values("operators")
        base = "conv" if "conv" in operators else operators[0]
        mixer = "attn" if "attn" in operators else base
        params: dict[str, Any] = {}
        for name, dist in self._distributions.items():
            if name.startswith("layer_"):
                params[name] = mixer if int(name.removeprefix("layer_")) in (2, 5) else base
            elif name == "conv_kernel" and _allowed(dist, 3):
                params[name] = 3
            elif isinstance(dist, IntDistribution):
                steps = (dist.high - dist.low) // dist.step
                params[name] = dist.low + ((steps + 1) // 2) * dist.step
            else:
                params[name] = dist.choices[len(dist.choices) // 2]
        return self.spec_from_params(params)

    # -- membership ------------------------------------------------------------------------

    def ffn_widths(self, d_model: int) -> dict[int, float]:
        """The SwiGLU widths reachable at `d_model`, each with the first multiplier giving it."""
        widths: dict[int, float] = {}
        for multiplier in self.values("ffn_multiplier"):
            widths.setdefault(ffn_width(multiplier, d_model, self.definition.ffn_multiple_of), multiplier)
        return widths

    def _mismatches(self, spec: ArchSpec) -> list[str]:
        d = self.definition
        problems = []
        for fixed in ("vocab_size", "max_seq_len", "head_dim", "rope_theta", "norm_eps"):
            if getattr(spec, fixed) != getattr(d, fixed):
                problems.append(f"{fixed} is {getattr(spec, fixed)!r}, the space fixes it at {getattr(d, fixed)!r}")
        for key in ("d_model", "n_kv_heads", "conv_kernel", "tie_embeddings", "qk_norm"):
            if getattr(spec, key) not in self.values(key):
                problems.append(f"{key} is {getattr(spec, key)!r}, allowed: {list(self.values(key))}")
        if spec.n_heads * d.head_dim != spec.d_model:
            problems.append(f"n_heads is {spec.n_heads}, the space uses d_model / head_dim = {spec.d_model / d.head_dim:g}")
        if spec.n_layers not in self.values("n_layers"):
            problems.append(f"n_layers is {spec.n_layers}, allowed: {list(self.values('n_layers'))}")
        outside = sorted(set(spec.layers) - set(self.values("operators")))
        if outside:
            problems.append(f"layers use {outside}, allowed operators: {list(self.values('operators'))}")
        if spec.swa_window and spec.swa_window not in self.values("swa_window"):
            problems.append(f"swa_window is {spec.swa_window}, allowed: {list(self.values('swa_window'))}")
        widths = self.ffn_widths(spec.d_model)
        if spec.ffn_dim not in widths:
            problems.append(
                f"ffn_dim is {spec.ffn_dim}, reachable at d_model {spec.d_model}: {sorted(widths)} "
                f"(ffn_multiplier {list(self.values('ffn_multiplier'))} rounded to {d.ffn_multiple_of})"
            )
        return problems

    def contains(self, spec: ArchSpec) -> bool:
        return not self._mismatches(spec)

    def params_for(self, spec: ArchSpec) -> dict[str, Any]:
        """Trial parameters that reproduce `spec` exactly (for `study.enqueue_trial`)."""
        problems = self._mismatches(spec)
        if problems:
            raise NotInSpaceError(f"the architecture {spec.layout} ({spec.key}) is not in {self.origin}: " + "; ".join(problems))
        values = {
            "d_model": spec.d_model,
            "n_layers": spec.n_layers,
            "ffn_multiplier": self.ffn_widths(spec.d_model)[spec.ffn_dim],
            "n_kv_heads": spec.n_kv_heads,
            "conv_kernel": spec.conv_kernel,
            # an ignored window (no swa layer) takes the first value: a canonical choice
            "swa_window": spec.swa_window or next(iter(self.values("swa_window")), 0),
            "tie_embeddings": spec.tie_embeddings,
            "qk_norm": spec.qk_norm,
        }
        first_operator = self.values("operators")[0]
        params: dict[str, Any] = {}
        for name in self._distributions:
            if name in values:
                params[name] = values[name]
            else:  # a layer slot
                index = int(name.rsplit("_", 1)[1])
                params[name] = spec.layers[index] if index < spec.n_layers else first_operator
        rebuilt = self.spec_from_params(params)
        if rebuilt != spec:  # a bug in this module, not in the user's input
            raise AssertionError(f"params_for({spec.to_json()}) rebuilt {rebuilt.to_json()}")
        return params

    # -- size ------------------------------------------------------------------------------

    def layouts(self, n_layers: int) -> int:
        """Distinct (layers, swa_window) pairs of depth `n_layers`."""
        operators = self.values("operators")
        k = len(operators)
        if "swa" not in operators:
            return k**n_layers
        without_swa = (k - 1) ** n_layers
        return without_swa + (k**n_layers - without_swa) * len(self.values("swa_window"))

    def count(self) -> int:
        """The number of distinct `ArchSpec`s in the space (an exact Python int; may be huge).

        Distinct specs, not distinct models: an all-attention spec with conv_kernel 3 and
        one with 4 are two specs (their keys differ) but compute the same function."""
        widths = sum(len(self.ffn_widths(d_model)) for d_model in self.values("d_model"))
        per_layout = widths
        for key in ("n_kv_heads", "conv_kernel", "tie_embeddings", "qk_norm"):
            per_layout *= len(self.values(key))
        return per_layout * sum(self.layouts(n) for n in self.values("n_layers"))

    def parameter_range(self) -> tuple[int, int]:
        """The fewest and the most parameters of any architecture in the space."""
        from search_space.costs import layer_parameters, parameters

        smallest: int | None = None
        largest: int | None = None
        d = self.definition
        for d_model in self.values("d_model"):
            for ffn_dim in self.ffn_widths(d_model):
                for kv in self.values("n_kv_heads"):
                    for kernel in self.values("conv_kernel"):
                        for tie in self.values("tie_embeddings"):
                            for qk in self.values("qk_norm"):
                                base = ArchSpec(
                                    vocab_size=d.vocab_size, d_model=d_model, layers=("conv",), n_heads=d_model // d.head_dim,
                                    n_kv_heads=kv, head_dim=d.head_dim, ffn_dim=ffn_dim, conv_kernel=kernel,
                                    tie_embeddings=tie, qk_norm=qk, max_seq_len=d.max_seq_len,
                                )
                                per_op = [layer_parameters(base, op) for op in self.values("operators")]
                                outside = parameters(base) - layer_parameters(base, "conv")
                                low = outside + min(per_op) * min(self.values("n_layers"))
                                high = outside + max(per_op) * max(self.values("n_layers"))
                                smallest = low if smallest is None else min(smallest, low)
                                largest = high if largest is None else max(largest, high)
        if smallest is None or largest is None:
            raise ValueError("the search space has no architecture (a choice has no values); give every choice at least one value")
        return smallest, largest

    def describe(self) -> dict[str, Any]:
        """The space as JSON-ready data: fixed values, choices, trial parameters, size."""
        from lfm2.presets import presets

        d = self.definition
        low, high = self.parameter_range()
        count = self.count()
        return {
            "name": d.name,
            "description": d.description,
            "origin": self.origin,
            "fixed": {
                "vocab_size": d.vocab_size,
                "max_seq_len": d.max_seq_len,
                "head_dim": d.head_dim,
                "rope_theta": d.rope_theta,
                "norm_eps": d.norm_eps,
                "ffn_multiple_of": d.ffn_multiple_of,
            },
            "choices": {key: list(choice.values) for key, choice in d.choices.items() if choice.values},
            "ffn_widths": {str(d_model): sorted(self.ffn_widths(d_model)) for d_model in self.values("d_model")},
            "trial_parameters": {name: _describe_distribution(dist) for name, dist in self._distributions.items()},
            "architectures": count,
            "architectures_log10": round(_log10(count), 3),
            "parameters_min": low,
            "parameters_max": high,
            "presets_in_space": [name for name, spec in presets.items() if self.contains(spec)],
        }

    def __repr__(self) -> str:
        return f"SearchSpace({self.name!r}, {len(self._distributions)} trial parameters, {self.count():.3e} architectures)"


def _distribution(choice: Choice) -> SpaceDistribution:
    if choice.int_range is not None:
        low, high, step = choice.int_range
        return IntDistribution(low, high, step=step)
    return CategoricalDistribution(choice.values)


def _describe_distribution(dist: SpaceDistribution) -> dict[str, Any]:
    if isinstance(dist, IntDistribution):
        return {"kind": "int", "low": dist.low, "high": dist.high, "step": dist.step}
    return {"kind": "categorical", "choices": list(dist.choices)}


def _log10(value: int) -> float:
    """log10 of a possibly huge int without overflowing a float."""
    digits = str(value)
    return len(digits) + math.log10(float("0." + digits[:17]))


def _allowed(dist: SpaceDistribution, value: Any) -> bool:
    if isinstance(dist, IntDistribution):
        return _is_int(value) and dist.low <= value <= dist.high and (value - dist.low) % dist.step == 0
    # `True == 1` in Python: keep booleans and numbers apart
    return any(value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in dist.choices)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["SearchSpace", "NotInSpaceError", "BUILTIN_SPACES"]
