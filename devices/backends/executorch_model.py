"""The LFM2 model rewritten for ExecuTorch: one method for prefill and decode, decode state
in mutable buffers, full attention through ExecuTorch's KV-cache ops.

`lfm2.model.LFM2.step` takes and returns its state explicitly, which is portable but makes
every decode read the whole `max_context` K/V buffer. Here, using the same weights (the
submodules of an `LFM2`), `forward(tokens [1, T], pos [1])` runs T tokens (1 <= T <= the
prefill chunk, a dynamic dimension) from absolute position `pos`, continuing the state:

* a prefill of any length is a loop of chunks through this one graph (as ExecuTorch's LLM
  runner and llama.cpp's ubatches do) and a decode step is a chunk of one token, so the
  weights are packed once and nothing is lowered per prompt length;
* each full-attention layer keeps K and V in mutable buffers `[1, max_context, Hkv, D]`,
  written by `llama::update_cache` and read by `llama::custom_sdpa`, which attends over
  the first `pos + T` positions only: decode cost follows the context depth;
* sliding-window layers keep a ring of `swa_window` slots and attend with the model's own
  `AttentionCore` arithmetic (cat + bmm + additive mask); the ring is rewritten whole
  (a static shape, whatever T is);
* conv layers keep their last `K - 1` gated inputs in a buffer.

`reset` zeroes the state; the buffers are shared between the two methods
(`share_mutable_buffers`). The embedding may be replaced by a 4-bit table
(`QuantizedEmbedding`, ExecuTorch's `quantized_decomposed::embedding_4bit`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lfm2.model import LFM2


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [1, T, H, D], cos/sin [T, 1, D] (already broadcastable): rotate-half RoPE."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def pack_int4(qdata: Tensor) -> Tensor:
    """int8 values in [-8, 7], [V, D] (D even) -> uint8 [V, D/2], two values a byte, the
    even column in the high nibble, stored +8: the layout of `embedding_4bit`."""
    unsigned = (qdata.to(torch.int16) + 8).to(torch.uint8)
    return (unsigned[:, 0::2] << 4) | unsigned[:, 1::2]


class QuantizedEmbedding(nn.Module):
    """A 4-bit symmetric, group-wise embedding table read by ExecuTorch's
    `quantized_decomposed::embedding_4bit` kernel: only the looked-up rows are dequantised."""

    def __init__(self, qdata: Tensor, scale: Tensor):
        super().__init__()
        if qdata.shape[1] % 2:
            raise ValueError(f"a 4-bit embedding needs an even width, got {qdata.shape[1]}")
        self.register_buffer("packed", pack_int4(qdata))
        self.register_buffer("scale", scale.to(torch.float32).reshape(qdata.shape[0], -1).contiguous())

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.ops.quantized_decomposed.embedding_4bit.default(self.packed, self.scale, None, -8, 7, tokens)


class ExecuTorchLFM2(nn.Module):
    """One method of the program: `forward` (tokens [1, T] from position `pos` [1], T up to
    the chunk) or `reset` (zero the state). Returns logits [1, vocab] of the last token
    (`reset` returns a dummy zero). `embedding`: a module that replaces `model.embed_tokens`."""

    inv_freq: Tensor  # a buffer (registered in __init__)

    def __init__(self, model: LFM2, max_context: int, mode: str, embedding: nn.Module | None = None):
        super().__init__()
        if mode not in ("forward", "reset"):
            raise ValueError(f"mode must be forward or reset, not {mode!r}")
        spec = model.spec
        self.model = model
        self.embedding = embedding if embedding is not None else model.embed_tokens
        self.mode = mode
        self.max_context = max_context
        self.window = spec.swa_window
        self.head_dim = spec.head_dim
        self.kinds = [layer.kind for layer in model.layers]
        # `rotary_cos_sin`'s inverse frequencies (the same float32 arithmetic), as a constant.
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        kv = (spec.n_kv_heads, spec.head_dim)
        # Buffer names must be the same in every method: that is how they are shared.
        for i, kind in enumerate(self.kinds):
            if kind == "conv":
                self.register_buffer(f"conv_{i}", torch.zeros(1, spec.d_model, spec.conv_kernel - 1), persistent=False)
            elif kind == "attn":
                self.register_buffer(f"k_{i}", torch.zeros(1, max_context, *kv), persistent=False)
                self.register_buffer(f"v_{i}", torch.zeros(1, max_context, *kv), persistent=False)
            else:
                self.register_buffer(f"k_{i}", torch.zeros(1, kv[0], spec.swa_window, kv[1]), persistent=False)
                self.register_buffer(f"v_{i}", torch.zeros(1, kv[0], spec.swa_window, kv[1]), persistent=False)

    # -- sliding-window geometry (the arithmetic of `AttentionCore`) ------------------------

    def _window_mask(self, positions: Tensor, first: Tensor) -> Tensor:
        """The additive mask [G*T, W + T] over [ring ; new keys], repeated for the G query
        heads that share a KV head (row g*T + i is query i of group g: `_attend`'s rows).
        Made once a step: every sliding-window layer has the same geometry."""
        window = self.window
        slots = torch.arange(window)
        # Operands of `remainder` kept >= 0: ExecuTorch's integer kernel takes C's sign rule.
        held = (first - 1) - torch.remainder(first - 1 - slots + window, window)
        key_positions = torch.cat((held, positions))
        visible = (key_positions[None, :] >= 0) & (key_positions[None, :] <= positions[:, None]) & (key_positions[None, :] > positions[:, None] - window)
        groups = self.model.spec.n_heads // self.model.spec.n_kv_heads
        return torch.where(visible, 0.0, float("-inf")).to(torch.float32).repeat(groups, 1)

    def _ring_sources(self, first: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """For each ring slot s: the chunk index of the newest new key that goes there (the
        last position p in [first, first + T) with p % W == s) and whether there is one."""
        last = first + t - 1
        slots = torch.arange(self.window)
        newest = last - torch.remainder(last - slots + self.window, self.window)  # >= 0, as above
        index = newest - first
        return index.clamp(min=0), index >= 0

    # -- the graph ------------------------------------------------------------------------

    def forward(self, tokens: Tensor, pos: Tensor | None = None) -> Tensor:
        if self.mode == "reset":
            return self._reset(tokens)
        if pos is None:
            raise ValueError("the prefill and decode graphs take `pos` (the position of tokens[0]); only the reset graph runs without it")
        model = self.model
        t = tokens.shape[1]
        start = pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.max_context)
        positions = pos + torch.arange(t)
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = emb.cos(), emb.sin()
        if "swa" in self.kinds:
            mask = self._window_mask(positions, pos)
            sources = self._ring_sources(pos, t)
        x = self.embedding(tokens)
        for i, layer in enumerate(model.blocks):
            h = layer.operator_norm(x)
            if layer.kind == "conv":
                y = self._conv(i, layer.operator, h)
            elif layer.kind == "attn":
                y = self._full_attention(i, layer.operator, h, cos, sin, start)
            else:
                y = self._window_attention(i, layer.operator, h, cos, sin, mask, sources)
            x = x + y
            x = x + layer.feed_forward(layer.ffn_norm(x))
        last = x[:, t - 1 :, :]  # a slice, not a select: XNNPACK takes it
        return model.lm_head(model.embedding_norm(last)).reshape(1, -1)

    def _conv(self, i: int, op, h: Tensor) -> Tensor:
        buffer = getattr(self, f"conv_{i}")
        bx, c = op.gated_input(h)  # [1, D, T], [1, T, D]
        window = torch.cat((buffer, bx), dim=2)
        conv = op.conv(window)
        buffer.copy_(window[:, :, window.shape[2] - (op.kernel - 1) :])
        return op.out_proj(c * conv.transpose(1, 2))

    def _project(self, att, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Reshapes name the token dimension -1, never its symbolic size: XNNPACK takes a
        # reshape with one inferred dimension, and a symbolic one would cut the graph into
        # another partition (48 instead of a handful in one candidate: BENCHMARKS.md).
        q = att.q_proj(h).reshape(1, -1, att.n_heads, att.head_dim)
        k = att.k_proj(h).reshape(1, -1, att.n_kv_heads, att.head_dim)
        v = att.v_proj(h).reshape(1, -1, att.n_kv_heads, att.head_dim)
        if att.q_layernorm is not None:
            q, k = att.q_layernorm(q), att.k_layernorm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _full_attention(self, i: int, att, h: Tensor, cos: Tensor, sin: Tensor, start) -> Tensor:
        q, k, v = self._project(att, h, cos, sin)  # [1, T, H(kv), D]: the ops' layout
        k_cache, v_cache = getattr(self, f"k_{i}"), getattr(self, f"v_{i}")
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        # Attends over positions [0, start + T) only, causally; groups of query heads share a KV head.
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, 1.0 / math.sqrt(att.head_dim))
        return att.out_proj(out.reshape(1, -1, att.n_heads * att.head_dim))

    def _window_attention(self, i: int, att, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, sources: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self._project(att, h, cos, sin)
        k_ring, v_ring = getattr(self, f"k_{i}"), getattr(self, f"v_{i}")
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [1, Hkv, T, D]
        keys, values = torch.cat((k_ring, k), dim=2), torch.cat((v_ring, v), dim=2)
        out = self._attend(att, q, keys, values, mask)
        index, written = sources
        written = written[None, None, :, None]
        k_ring.copy_(torch.where(written, k.index_select(2, index), k_ring))
        v_ring.copy_(torch.where(written, v.index_select(2, index), v_ring))
        return att.out_proj(out)

    @staticmethod
    def _attend(att, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        # `AttentionCore._attend` with the mask precomputed: query groups folded into rows
        # (row g*T + i is query i of group g). Reshapes infer the token dimension (-1), as in
        # `_project` (a permuted tensor is made contiguous first: `reshape` of it would copy
        # and view with the computed, symbolic size); the mask comes repeated per group
        # (`_window_mask`) instead of viewing the scores [.., T, S] (two symbolic dimensions,
        # which XNNPACK cannot reshape).
        n_heads, d = q.shape[2], q.shape[3]
        n_kv = att.n_kv_heads
        groups = n_heads // n_kv
        qf = q.reshape(-1, n_kv, groups, d).permute(1, 2, 0, 3).contiguous().view(n_kv, -1, d)
        kf = keys.reshape(n_kv, -1, d)
        vf = values.reshape(n_kv, -1, d)
        scores = torch.bmm(qf, kf.transpose(1, 2)) * (1.0 / math.sqrt(d))
        probs = torch.softmax(scores + mask, dim=-1)
        out = torch.bmm(probs, vf)
        return out.reshape(n_kv, groups, -1, d).permute(2, 0, 1, 3).contiguous().view(1, -1, n_heads * d)

    def _reset(self, tokens: Tensor) -> Tensor:
        for name, buffer in self.named_buffers():
            if name.startswith(("conv_", "k_", "v_")):
                buffer.zero_()
        return torch.zeros(1) + tokens.shape[1] * 0.0


def state_buffer_bytes(model: LFM2, max_context: int) -> int:
    """Bytes of the decode state this program keeps (fp32), at full `max_context`."""
    spec = model.spec
    total = 0
    for kind in spec.layers:
        if kind == "conv":
            total += spec.d_model * (spec.conv_kernel - 1)
        else:
            slots = max_context if kind == "attn" else spec.swa_window
            total += 2 * slots * spec.n_kv_heads * spec.head_dim
    return 4 * total


__all__ = ["ExecuTorchLFM2", "QuantizedEmbedding", "pack_int4", "state_buffer_bytes"]
