"""The LFM2 model family: `ArchSpec` -> torch model, presets, Hugging Face interop.

`lfm2` imports nothing from the rest of lfm2-nas; everything else builds on it. The spec
and presets are plain Python; the model needs torch, which is imported only when a name
that needs it is first used (PEP 562), so that a measurement child running ONNX Runtime,
an agent or a report does not pay ~220 MB and seconds for an `import lfm2.spec`.
"""

from lfm2.errors import UserError
from lfm2.lazy import lazy_attributes
from lfm2.presets import ATTENTION_TWINS, LFM2_PRESETS, PUBLISHED_PARAMETERS, all_attention_twin, get_preset, preset_name, presets
from lfm2.spec import OPERATORS, ArchSpec, SpecError

_LAZY = {"LFM2": "lfm2.model", "build_model": "lfm2.model", "count_parameters": "lfm2.model"}
__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "ArchSpec",
    "SpecError",
    "UserError",
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
