"""Interop with Hugging Face `transformers` LFM2 (`Lfm2Config`, `Lfm2ForCausalLM`).

`to_hf_config(spec)` gives keyword arguments for `transformers.Lfm2Config`; our modules
carry `Lfm2ForCausalLM`'s names, so the state-dict converters only add or strip the
`model.` prefix (and store a tied head once). `transformers` is not imported
here: the dicts are plain data, so that exporting needs no extra dependency.

What `Lfm2` cannot express is refused with a clear error: sliding-window layers, a
head_dim other than d_model / n_heads, attention without q/k norm, untied embeddings
with a vocabulary mismatch do not exist in Hugging Face's LFM2.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from lfm2.model import build_model
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
    data: dict[str, Any] = config if isinstance(config, dict) else config.to_dict()
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
    rope: dict[str, Any] = data.get("rope_parameters") or {}
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


#: `LFM2`'s module names are `Lfm2ForCausalLM`'s (see `lfm2.model`): theirs sit under
#: `model.` except the head. The tied head is one tensor, stored once (under the embedding).
HEAD = "lm_head.weight"


def _hf_name(ours: str) -> str:
    return ours if ours == HEAD else f"model.{ours}"


def hf_named_state_dict(model: Any) -> dict[str, Tensor]:
    """Our model's weights under Hugging Face LFM2's names (the tied head left out), for any
    spec: what an lfm2-nas folder stores, whether or not `transformers` could load it. An
    `swa` layer has the parameters of an attention layer and takes its names."""
    tied = model.spec.tie_embeddings
    return {_hf_name(name): tensor for name, tensor in model.state_dict().items() if not (tied and name == HEAD)}


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
    """`Lfm2ForCausalLM` weights under our model's names for `spec` (load with `load_state_dict`):
    the same names less the `model.` prefix, and the tied head pointed at the embedding."""
    # The names of `spec`'s model (built on the meta device: no memory, no init).
    ours = [name for name in build_model(spec, device="meta").state_dict() if not (spec.tie_embeddings and name == HEAD)]
    missing = [_hf_name(name) for name in ours if _hf_name(name) not in state_dict]
    if missing:
        raise KeyError(f"the Hugging Face state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    converted = {name: state_dict[_hf_name(name)] for name in ours}
    if spec.tie_embeddings:
        converted[HEAD] = converted["embed_tokens.weight"]
    leftover = sorted(set(state_dict) - {_hf_name(name) for name in ours} - {HEAD})
    if leftover and not all(re.search(r"rotary|inv_freq", key) for key in leftover):
        raise KeyError(f"the Hugging Face state dict has weights this spec has no place for: {leftover[:5]}")
    return converted


__all__ = ["to_hf_config", "from_hf_config", "to_hf_state_dict", "from_hf_state_dict", "hf_named_state_dict", "hf_representable", "NotRepresentableError"]
