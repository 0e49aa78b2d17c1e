"""The proxy of a candidate: the same architecture, narrower, with a task vocabulary.

Kept exactly: the layer layout (which layers are conv, attn, swa, hence depth and
attention placement), `n_heads` and `n_kv_heads` (hence the GQA ratio), `conv_kernel`,
`swa_window` (in tokens), `rope_theta`, `qk_norm`, `tie_embeddings`, `norm_eps`.

Scaled by one factor: `d_model`, `ffn_dim` and `head_dim`, so that relative widths (the
SwiGLU ratio, the attention width `n_heads * head_dim` against `d_model`) stay as they
were. Head counts are kept and `head_dim` shrinks with the width (floored at
`min_head_dim`), rather than keeping `head_dim` and dropping heads: that keeps the number
of key/value heads -- what the KV cache and the search trade on -- as the candidate has it.

Replaced: `vocab_size` by the task's vocabulary and `max_seq_len` by the task's length.
A sliding window at least as long as the task's sequences acts as full attention in the
proxy; choose task lengths longer than the windows the search compares.
"""

from __future__ import annotations

from lfm2.spec import ArchSpec


def _round_to(value: float, multiple: int, minimum: int) -> int:
    return max(minimum, multiple * max(1, round(value / multiple)))


def proxy_spec(spec: ArchSpec, *, width_factor: float, vocab_size: int, seq_len: int, width_multiple: int = 8, min_d_model: int = 32, min_head_dim: int = 8) -> ArchSpec:
    """The narrow proxy of `spec` (see the module docstring for what is kept and scaled)."""
    head_dim = max(min_head_dim, 2 * max(1, round(spec.head_dim * width_factor / 2)))
    return spec.replace(
        vocab_size=vocab_size,
        d_model=_round_to(spec.d_model * width_factor, width_multiple, min_d_model),
        ffn_dim=_round_to(spec.ffn_dim * width_factor, width_multiple, width_multiple),
        head_dim=head_dim,
        max_seq_len=seq_len,
    )


__all__ = ["proxy_spec"]
