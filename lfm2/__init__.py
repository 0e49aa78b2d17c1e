"""The LFM2 model family: `ArchSpec` -> torch model, presets, Hugging Face interop.

`lfm2` imports nothing from the rest of lfm2-nas; everything else builds on it.
"""

from lfm2.model import LFM2, build_model, count_parameters
from lfm2.presets import ATTENTION_TWINS, LFM2_PRESETS, PUBLISHED_PARAMETERS, all_attention_twin, get_preset, preset_name, presets
from lfm2.spec import OPERATORS, ArchSpec, SpecError

__all__ = [
    "ArchSpec",
    "SpecError",
    "OPERATORS",
    "LFM2",
    "build_model",
    "count_parameters",
    "presets",
    "LFM2_PRESETS",
    "ATTENTION_TWINS",
    "PUBLISHED_PARAMETERS",
    "all_attention_twin",
    "get_preset",
    "preset_name",
]
