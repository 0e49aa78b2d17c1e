"""Exact counts from an `ArchSpec` alone: parameters, FLOPs, weight bytes, state bytes.

Conventions
-----------
* FLOPs: 2 per multiply-accumulate (MAC). Counted: every matmul (the projections of conv
  and attention layers, the SwiGLU, the LM head), attention scores (q.k) and values
  (p.v) with causal counting (the query at position t sees t+1 keys; an `swa` query at
  most `swa_window`), and the depthwise convolution (conv_kernel MACs per channel and
  token). Not counted: RMSNorm, rotary embeddings, softmax, SiLU, the gating products
  and residual adds (O(d_model) per token, under 1% of the total for any model of the
  spaces), and the embedding lookup (a copy, no arithmetic).
* The LM head is included. A prefill computes logits for its last position only, as
  `LFM2.step` and the exported prefill graphs do (`all_logits=True` counts all positions,
  as training does).
* These are algorithmic FLOPs: the portable attention of `lfm2.model` attends over the
  whole static K/V buffer and masks the unused slots, so it executes more than this at
  short contexts; a runtime's KV-cache attention kernel executes about this.
* Weight bytes per precision, and what stays unquantised:
  - `fp32` 4 bytes and `bf16` 2 bytes per parameter (a tied head is stored once);
  - `int8` (ONNX Runtime `quantize_dynamic`): every linear weight, the LM head included, 1
    byte per element plus one fp32 scale per tensor (symmetric, no zero point), and the
    embedding table too (a uint8 table and a scale, dequantised after the lookup); a *tied*
    head is a second int8 copy of the table (transposed for the MatMul);
  - `8da4w` (ExecuTorch/XNNPACK, int8 dynamic activations, int4 weights): every linear
    weight 4 bits per element (two per byte) plus one fp32 scale per group of
    `group_size` input elements (symmetric; an input width that is not a multiple of
    the group size is padded to one);
  - for `8da4w` the embedding is a 4-bit table quantised like a linear (the head's own table
    when tied: ExecuTorch's `embedding_4bit` reads it, and XNNPACK packs the head apart), so
    a tied model stores that table twice at 4 bits;
  - norms and conv kernels stay fp32.
"""

from __future__ import annotations

import math

from lfm2.flops import decode_flops, layer_parameters, linear_macs_per_token, linear_shapes, parameters, prefill_flops, small_weights  # FLOPs' one home
from lfm2.spec import ArchSpec

PRECISIONS = ("fp32", "bf16", "int8", "8da4w")
SCALE_BYTES = 4  # a quantisation scale is an fp32


# -- parameters ----------------------------------------------------------------------------


# `small_weights`, `layer_parameters` and `parameters` live in `lfm2.flops`, beside the linear
# shapes they count (so that `lfm2-nas presets` counts without building a model).


# -- weight bytes --------------------------------------------------------------------------


def _quantised_linear_bytes(out_features: int, in_features: int, precision: str, group_size: int) -> int:
    if precision == "int8":
        return out_features * in_features + SCALE_BYTES  # one scale per tensor
    groups = math.ceil(in_features / group_size)  # 8da4w: rows padded to whole groups
    return out_features * groups * (group_size // 2 + SCALE_BYTES)


def weight_bytes_breakdown(spec: ArchSpec, precision: str, group_size: int = 32) -> dict[str, int]:
    """Bytes of the weights by part: `embedding`, `linears` (all layers' projections and
    SwiGLUs), `head` (0 when tied and unquantised), `other` (norms, conv kernels)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size}")
    small = sum(small_weights(spec, op) for op in spec.layers) + spec.d_model  # + final norm
    embed = spec.vocab_size * spec.d_model
    shapes = [shape for op in spec.layers for shape in linear_shapes(spec, op)]
    head_shape = (spec.vocab_size, spec.d_model)
    if precision in ("fp32", "bf16"):
        per = 4 if precision == "fp32" else 2
        return {
            "embedding": per * embed,
            "linears": per * sum(o * i for o, i in shapes),
            "head": 0 if spec.tie_embeddings else per * embed,
            "other": per * small,
        }
    return {
        "embedding": embed + SCALE_BYTES if precision == "int8" else (_quantised_linear_bytes(*head_shape, precision, group_size) if precision == "8da4w" else 4 * embed),
        "linears": sum(_quantised_linear_bytes(o, i, precision, group_size) for o, i in shapes),
        "head": _quantised_linear_bytes(*head_shape, precision, group_size),
        "other": 4 * small,
    }


def weight_bytes(spec: ArchSpec, precision: str, group_size: int = 32) -> int:
    """Bytes of all weights as stored at `precision` ('fp32', 'bf16', 'int8', '8da4w');
    `group_size` applies to 8da4w only (see the module docstring for what is assumed)."""
    return sum(weight_bytes_breakdown(spec, precision, group_size).values())


# -- decode state --------------------------------------------------------------------------


def kv_cache_bytes(spec: ArchSpec, context: int, bytes_per_element: int = 4) -> int:
    """K and V held for `context` tokens: every `attn` layer holds all of them, an `swa`
    layer at most `swa_window`."""
    per_token_layer = 2 * spec.n_kv_heads * spec.head_dim * bytes_per_element
    tokens = sum(context if op == "attn" else min(context, spec.swa_window) for op in spec.layers if op != "conv")
    return per_token_layer * tokens


def conv_state_bytes(spec: ArchSpec, bytes_per_element: int = 4) -> int:
    """The conv layers' state: the last conv_kernel - 1 gated inputs of each channel."""
    return len(spec.conv_layers) * spec.d_model * (spec.conv_kernel - 1) * bytes_per_element


def state_bytes(spec: ArchSpec, max_context: int, bytes_per_element: int = 4) -> int:
    """The decode state as `lfm2.LFM2.state_shapes(1, max_context)` allocates it: conv
    states, full-attention K/V buffers of `max_context` slots, and swa rings of exactly
    `swa_window` slots (allocated whole even when the context is shorter)."""
    slots = sum(max_context if op == "attn" else spec.swa_window for op in spec.layers if op != "conv")
    return conv_state_bytes(spec, bytes_per_element) + 2 * spec.n_kv_heads * spec.head_dim * slots * bytes_per_element


__all__ = [
    "PRECISIONS",
    "parameters",
    "layer_parameters",
    "linear_shapes",
    "linear_macs_per_token",
    "prefill_flops",
    "decode_flops",
    "weight_bytes",
    "weight_bytes_breakdown",
    "kv_cache_bytes",
    "conv_state_bytes",
    "state_bytes",
]
