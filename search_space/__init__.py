"""The space of `ArchSpec`s: choices, sampling from an Optuna trial, analytic costs.

    space = SearchSpace.load("default")        # or "small", or a .toml/.yaml file
    spec = space.sample(trial)                 # define-by-run, a fixed set of parameters
    study.enqueue_trial(space.params_for(lfm2.LFM2_PRESETS["LFM2-350M"]))
    costs.parameters(spec), costs.estimate_peak_memory(spec, 2048, "executorch", "8da4w")
"""

from importlib import import_module
from typing import Any

from lfm2.lazy import lazy_attributes

# Loaded on first use (PEP 562): `search_space.space` imports Optuna (~0.7 s), which
# `lfm2-nas --help` (it imports `search_space.cli`, so this file) must not pay for.
_LAZY = {
    "MemoryEstimate": "search_space.costs",
    "SpaceFileError": "search_space.schema",
    "ffn_width": "search_space.schema",
    "BUILTIN_SPACES": "search_space.space",
    "NotInSpaceError": "search_space.space",
    "SearchSpace": "search_space.space",
}
_attribute = lazy_attributes(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    if name == "costs":  # the subpackage, as `search_space.costs` after `import search_space`
        return import_module("search_space.costs")
    return _attribute(name)


__all__ = ["SearchSpace", "SpaceFileError", "NotInSpaceError", "BUILTIN_SPACES", "MemoryEstimate", "costs", "ffn_width"]
