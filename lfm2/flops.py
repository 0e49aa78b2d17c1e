"""FLOPs (and parameters) from an `ArchSpec` alone: the one place they are counted. `search_space.costs`
(the search's cost model and the predictor's features) and `lfm2.train` (MFU) both use it.

Conventions: 2 FLOPs per multiply-accumulate (MAC). Counted: every matmul (the projections
of conv and attention layers, the SwiGLU, the LM head), attention scores (q.k) and values
(p.v) with causal counting (the query at position t sees t+1 keys; an `swa` query at most
`swa_window`), and the depthwise convolution (conv_kernel MACs per channel and token). Not
counted: RMSNorm, rotary embeddings, softmax, SiLU, the gating products and residual adds
(O(d_model) per token, under 1% of the total for any model of the spaces), and the
embedding lookup (a copy, no arithmetic). A prefill computes logits for its last position
only, as `LFM2.step` and the exported prefill graphs do (`all_logits=True` counts all
positions, as training does). See `search_space/costs/counts.py` for the rest of the
conventions (algorithmic FLOPs, not what a masked static-buffer kernel executes).
"""

from __future__ import annotations

from lfm2.spec import ArchSpec


def linear_shapes(spec: ArchSpec, op: str) -> list[tuple[int, int]]:
    """(out_features, in_features) of the linear layers of one layer with operator `op`."""
    d, f = spec.d_model, spec.ffn_dim
    ffn = [(f, d), (f, d), (d, f)]  # w1, w3, w2
    if op == "conv":
        return [(3 * d, d), (d, d), *ffn]  # in_proj (B, C, x), out_proj
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return [(q, d), (kv, d), (kv, d), (d, q), *ffn]  # q, k, v, out_proj


def linear_macs_per_token(spec: ArchSpec) -> int:
    """MACs of every layer's matmuls for one token (LM head not included)."""
    return sum(o * i for op in spec.layers for o, i in linear_shapes(spec, op))


def _keys_seen_in_prefill(tokens: int, window: int | None) -> int:
    """Sum over the queries t = 0..T-1 of the keys each sees: t+1, or at most `window`."""
    if window is None or tokens <= window:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def _attention_macs(spec: ArchSpec, keys_seen: int) -> int:
    # scores q.k and values p.v: head_dim MACs each, per query head and key seen
    return 2 * spec.n_heads * spec.head_dim * keys_seen


def prefill_flops(spec: ArchSpec, tokens: int, *, all_logits: bool = False) -> int:
    """FLOPs of a prefill of `tokens` tokens from an empty context (conventions above)."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    macs = tokens * linear_macs_per_token(spec)
    for op in spec.layers:
        if op == "conv":
            macs += tokens * spec.d_model * spec.conv_kernel
        else:
            window = spec.swa_window if op == "swa" else None
            macs += _attention_macs(spec, _keys_seen_in_prefill(tokens, window))
    macs += (tokens if all_logits else 1) * spec.d_model * spec.vocab_size
    return 2 * macs


def decode_flops(spec: ArchSpec, context: int) -> int:
    """FLOPs of one decode step with `context` tokens already in the state (the new token
    attends to context + 1 keys, itself included; at most `swa_window` in an swa layer)."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    macs = linear_macs_per_token(spec)
    for op in spec.layers:
        if op == "conv":
            macs += spec.d_model * spec.conv_kernel
        else:
            keys = context + 1 if op == "attn" else min(context + 1, spec.swa_window)
            macs += _attention_macs(spec, keys)
    macs += spec.d_model * spec.vocab_size
    return 2 * macs


def training_flops_per_token(spec: ArchSpec, seq_len: int) -> float:
    """Model FLOPs of one training token, forward + backward = 3x forward, counted the way
    MFU usually is (PaLM, appendix B): a full-logits forward of `seq_len` tokens (the
    embedding lookup not counted), per token."""
    return 3 * prefill_flops(spec, seq_len, all_logits=True) / seq_len


# -- parameters: the same shapes, counted once ------------------------------------------------


def small_weights(spec: ArchSpec, op: str) -> int:
    """Elements of one layer that are not linear weights: norms and conv kernels."""
    n = 2 * spec.d_model  # operator_norm, ffn_norm
    if op == "conv":
        n += spec.d_model * spec.conv_kernel  # depthwise kernel, no bias
    elif spec.qk_norm:
        n += 2 * spec.head_dim  # q_layernorm, k_layernorm
    return n


def layer_parameters(spec: ArchSpec, op: str) -> int:
    """Parameters of one layer with operator `op` (its SwiGLU and two norms included)."""
    return sum(o * i for o, i in linear_shapes(spec, op)) + small_weights(spec, op)


def parameters(spec: ArchSpec) -> int:
    """Unique parameters, as `lfm2.count_parameters(lfm2.build_model(spec))` counts them."""
    embed = spec.vocab_size * spec.d_model
    head = 0 if spec.tie_embeddings else embed
    return embed + head + sum(layer_parameters(spec, op) for op in spec.layers) + spec.d_model  # final norm


__all__ = ["small_weights", "layer_parameters", "parameters", "linear_shapes", "linear_macs_per_token", "prefill_flops", "decode_flops", "training_flops_per_token"]
