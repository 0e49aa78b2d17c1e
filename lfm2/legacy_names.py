"""The one compatibility shim for state dicts saved before the model took transformers' names.

Before issue #24's rename, `lfm2.model.LFM2` called its modules `embed`, `norm`, `head`
and, in each layer, `op_norm`, `op` (whatever the operator), `ffn`, and in attention `q_norm` /
`k_norm`. Training checkpoints (`lfm2-nas train`'s `checkpoints/step-*.pt`) hold those names. `LFM2`
registers `upgrade_legacy_keys` as a load-state-dict pre-hook, so `load_state_dict` renames
an old dict's keys in place and an old checkpoint loads as it did; a current dict passes
through untouched. (Model folders never held these names: they store transformers' names.)
"""

from __future__ import annotations

import re
from typing import Any

_TOP = {"embed.weight": "embed_tokens.weight", "norm.weight": "embedding_norm.weight", "head.weight": "lm_head.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(op_norm|op|ffn)\.(.+)$")
_LAYER_PART = {"op_norm": "operator_norm", "ffn": "feed_forward"}
_ATTENTION_NORMS = {"q_norm.weight": "q_layernorm.weight", "k_norm.weight": "k_layernorm.weight"}


def current_name(name: str, layers: tuple[str, ...]) -> str:
    """The current name of parameter `name` of a model whose `spec.layers` is `layers`
    (unchanged when it is not a legacy name)."""
    if name in _TOP:
        return _TOP[name]
    match = _LAYER.match(name)
    if match is None:
        return name
    index, part, rest = match.groups()
    if part == "op":
        from lfm2.model import OPERATOR_TYPES  # here, not at the top: lfm2.model imports this module

        operator_type = OPERATOR_TYPES[layers[int(index)]]
        return f"layers.{index}.{operator_type.attribute}.{_ATTENTION_NORMS.get(rest, rest)}"
    return f"layers.{index}.{_LAYER_PART[part]}.{rest}"


def upgrade_legacy_keys(module: Any, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    """`LFM2`'s load-state-dict pre-hook: rename legacy keys under `prefix` in place."""
    layers = module.spec.layers
    for key in [key for key in state_dict if key.startswith(prefix)]:
        new = prefix + current_name(key[len(prefix) :], layers)
        if new != key and new not in state_dict:
            state_dict[new] = state_dict.pop(key)


__all__ = ["current_name", "upgrade_legacy_keys"]
