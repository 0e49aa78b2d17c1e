"""Interop with Hugging Face `transformers` LFM2 (`Lfm2Config`, `Lfm2ForCausalLM`).

`to_hf_config(spec)` gives keyword arguments for `transformers.Lfm2Config`; the state-dict
converters map our parameter names to theirs and back. `transformers` is not imported
here: the dicts are plain data, so that exporting needs no extra dependency.

What `Lfm2` cannot express is refused with a clear error: sliding-window layers, a
head_dim other than d_model / n_heads, attention without q/k norm, untied embeddings
with a vocabulary mismatch do not exist in Hugging Face's LFM2.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from lfm2.spec import ArchSpec, SpecError

_HF_LAYER_TYPE = {"conv": "conv", "attn": "full_attention"}


class NotRepresentableError(SpecError):
    """The spec uses a feature that Hugging Face's `Lfm2` model does not have."""


def _check_representable(spec: ArchSpec) -> None:
    if "swa" in spec.layers:
        raise NotRepresentableError(
            "Hugging Face Lfm2 has no sliding-window attention layers; "
            f"layers {[i for i, op in enumerate(spec.layers) if op == 'swa']} are 'swa'"
        )
    if spec.head_dim * spec.n_heads != spec.d_model:
        raise NotRepresentableError(
            f"Hugging Face Lfm2 needs head_dim * n_heads == d_model; got {spec.head_dim} * {spec.n_heads} != {spec.d_model}"
        )
    if not spec.qk_norm:
        raise NotRepresentableError("Hugging Face Lfm2 always normalises q and k; qk_norm=False cannot be exported")


def to_hf_config(spec: ArchSpec) -> dict[str, Any]:
    """Keyword arguments for `transformers.Lfm2Config` (model_type "lfm2").

    The FFN width is given exactly (`block_auto_adjust_ff_dim=False`) rather than through
    LFM2's 2/3-and-round-up rule, so that any width of the search space round-trips.
    """
    _check_representable(spec)
    return {
        "model_type": "lfm2",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "intermediate_size": spec.ffn_dim,
        "block_auto_adjust_ff_dim": False,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "max_position_embeddings": spec.max_seq_len,
        "norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "conv_bias": False,
        "conv_L_cache": spec.conv_kernel,
        "layer_types": [_HF_LAYER_TYPE[op] for op in spec.layers],
    }


def from_hf_config(config: Any) -> ArchSpec:
    """An `ArchSpec` from an `Lfm2Config` or its dict (as in a `config.json`)."""
    data = config if isinstance(config, dict) else config.to_dict()
    if data.get("model_type", "lfm2") != "lfm2":
        raise SpecError(f"not an LFM2 config: model_type is {data.get('model_type')!r}")
    n_layers = data["num_hidden_layers"]
    layer_types = data.get("layer_types")
    if layer_types is None:
        attention = set(data.get("full_attn_idxs") or [])
        layer_types = ["full_attention" if i in attention else "conv" for i in range(n_layers)]
    ops = {"conv": "conv", "full_attention": "attn"}
    unknown = sorted({t for t in layer_types if t not in ops})
    if unknown:
        raise SpecError(f"layer_types holds {unknown}; LFM2 layers are 'conv' or 'full_attention'")
    ffn_dim = data["intermediate_size"]
    if data.get("block_auto_adjust_ff_dim", True):
        # LFM2's published configs give 3/2 of a pre-rounding width; apply its rule.
        ffn_dim = int(2 * ffn_dim / 3)
        multiplier = data.get("block_ffn_dim_multiplier")
        if multiplier is not None:
            multiple = data.get("block_multiple_of", 256)
            ffn_dim = int(multiplier * ffn_dim)
            ffn_dim = multiple * ((ffn_dim + multiple - 1) // multiple)
    rope = data.get("rope_parameters") or {}
    return ArchSpec(
        vocab_size=data["vocab_size"],
        d_model=data["hidden_size"],
        layers=tuple(ops[t] for t in layer_types),
        n_heads=data["num_attention_heads"],
        n_kv_heads=data["num_key_value_heads"],
        ffn_dim=ffn_dim,
        conv_kernel=data.get("conv_L_cache", 3),
        rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 1_000_000.0))),
        norm_eps=float(data.get("norm_eps", 1e-5)),
        tie_embeddings=bool(data.get("tie_word_embeddings", True)),
        max_seq_len=data.get("max_position_embeddings", 128_000),
    )


# Our name pattern -> theirs. `{i}` is the layer index.
_LAYER_NAMES = {
    "op_norm.weight": "operator_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.w1.weight": "feed_forward.w1.weight",
    "ffn.w2.weight": "feed_forward.w2.weight",
    "ffn.w3.weight": "feed_forward.w3.weight",
}
_CONV_NAMES = {
    "op.in_proj.weight": "conv.in_proj.weight",
    "op.conv.weight": "conv.conv.weight",
    "op.out_proj.weight": "conv.out_proj.weight",
}
_ATTN_NAMES = {
    "op.q_proj.weight": "self_attn.q_proj.weight",
    "op.k_proj.weight": "self_attn.k_proj.weight",
    "op.v_proj.weight": "self_attn.v_proj.weight",
    "op.out_proj.weight": "self_attn.out_proj.weight",
    "op.q_norm.weight": "self_attn.q_layernorm.weight",
    "op.k_norm.weight": "self_attn.k_layernorm.weight",
}


def _name_map(spec: ArchSpec) -> dict[str, str]:
    """Our parameter names -> Hugging Face's. Defined for every spec: an `swa` layer has the
    parameters of an attention layer and takes its names (`self_attn.*`), and without q/k
    norm those two weights are simply absent. Only `to_hf_state_dict` insists that
    `Lfm2ForCausalLM` could use the result."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.embedding_norm.weight"}
    if not spec.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    for i, op in enumerate(spec.layers):
        per_op = _CONV_NAMES if op == "conv" else _ATTN_NAMES
        for ours, theirs in {**_LAYER_NAMES, **per_op}.items():
            if not spec.qk_norm and ours in ("op.q_norm.weight", "op.k_norm.weight"):
                continue
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def hf_named_state_dict(model: Any) -> dict[str, Tensor]:
    """Our model's weights under Hugging Face LFM2's names (the tied head left out), for any
    spec: what an lfm2-nas folder stores, whether or not `transformers` could load it."""
    ours = model.state_dict()
    return {theirs: ours[name] for name, theirs in _name_map(model.spec).items()}


def to_hf_state_dict(model: Any) -> dict[str, Tensor]:
    """Our model's weights under `Lfm2ForCausalLM`'s names (the tied head is left out)."""
    _check_representable(model.spec)
    return hf_named_state_dict(model)


def hf_representable(spec: ArchSpec) -> str | None:
    """None when `transformers.Lfm2ForCausalLM` can express `spec`, else the reason it cannot."""
    try:
        _check_representable(spec)
    except NotRepresentableError as exc:
        return str(exc)
    return None


def from_hf_state_dict(state_dict: dict[str, Tensor], spec: ArchSpec) -> dict[str, Tensor]:
    """`Lfm2ForCausalLM` weights renamed for our model of `spec` (load with `load_state_dict`)."""
    names = _name_map(spec)
    missing = [theirs for theirs in names.values() if theirs not in state_dict]
    if missing:
        raise KeyError(f"the Hugging Face state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    converted = {ours: state_dict[theirs] for ours, theirs in names.items()}
    if spec.tie_embeddings:
        converted["head.weight"] = converted["embed.weight"]
    leftover = sorted(set(state_dict) - set(names.values()) - {"lm_head.weight"})
    if leftover and not all(re.search(r"rotary|inv_freq", key) for key in leftover):
        raise KeyError(f"the Hugging Face state dict has weights this spec has no place for: {leftover[:5]}")
    return converted


__all__ = ["to_hf_config", "from_hf_config", "to_hf_state_dict", "from_hf_state_dict", "hf_named_state_dict", "hf_representable", "NotRepresentableError"]
