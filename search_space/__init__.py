"""The space of `ArchSpec`s: choices, sampling from an Optuna trial, analytic costs.

    space = SearchSpace.load("default")        # or "small", or a .toml/.yaml file
    spec = space.sample(trial)                 # define-by-run, a fixed set of parameters
    study.enqueue_trial(space.params_for(lfm2.LFM2_PRESETS["LFM2-350M"]))
    costs.parameters(spec), costs.estimate_peak_memory(spec, 2048, "executorch", "8da4w")
"""

from search_space import costs
from search_space.costs import MemoryEstimate
from search_space.schema import SpaceFileError, ffn_width
from search_space.space import BUILTIN_SPACES, NotInSpaceError, SearchSpace

__all__ = ["SearchSpace", "SpaceFileError", "NotInSpaceError", "BUILTIN_SPACES", "MemoryEstimate", "costs", "ffn_width"]
