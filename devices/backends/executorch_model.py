"""The LFM2 model rewritten for ExecuTorch: decode state in mutable buffers shared by the
methods of one program, full attention through ExecuTorch's KV-cache ops.

`lfm2.model.LFM2.step` takes and returns its state explicitly, which is portable but makes
every decode read the whole `max_context` K/V buffer. Here, using the same weights
(the submodules of an `LFM2`):

* each full-attention layer keeps K and V in mutable buffers `[1, max_context, Hkv, D]`,
  written by `llama::update_cache` and read by `llama::custom_sdpa`, which attends over
  the first `start_pos + T` positions only: decode cost follows the context depth;
* sliding-window layers keep a ring of `swa_window` slots (bounded anyway) and attend
  with the model's own `AttentionCore` arithmetic (cat + bmm + additive mask);
* conv layers keep their last `K - 1` gated inputs in a buffer.

All buffers are shared between the methods (`share_mutable_buffers`), so a `prefill_<T>`
hands its state to `decode` inside the runtime, and `reset` zeroes it. Everything that
depends only on the position (rotary cos/sin, the window mask, ring slots) is computed
once at the top of the graph -- for a prefill it is a constant -- so that it does not cut
the XNNPACK partitions; what remains outside XNNPACK is the embedding lookup, the custom
attention ops and the int64 position arithmetic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lfm2.model import LFM2


def _inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _cos_sin_table(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    freqs = positions.to(torch.float64)[:, None] * _inv_freq(head_dim, theta)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [1, T, H, D], cos/sin [T, 1, D] (already broadcastable): rotate-half RoPE."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ExecuTorchLFM2(nn.Module):
    """One method of the program: `prefill` (tokens [1, T] from position 0, T static),
    `decode` (token [1, 1], pos int64 [1]) or `reset` (zero the state). Returns logits
    [1, vocab] of the last token (`reset` returns a dummy zero)."""

    def __init__(self, model: LFM2, max_context: int, mode: str, prompt_length: int | None = None):
        super().__init__()
        if mode not in ("prefill", "decode", "reset"):
            raise ValueError(f"mode must be prefill, decode or reset, not {mode!r}")
        spec = model.spec
        self.model = model
        self.mode = mode
        self.max_context = max_context
        self.window = spec.swa_window
        self.head_dim = spec.head_dim
        self.kinds = [layer.kind for layer in model.layers]
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
        self.register_buffer("inv_freq", _inv_freq(spec.head_dim, spec.rope_theta).float(), persistent=False)
        if mode == "prefill":
            # Static positions 0..T-1: the rotary tables and window masks are constants.
            positions = torch.arange(prompt_length)
            cos, sin = _cos_sin_table(positions, spec.head_dim, spec.rope_theta)
            self.register_buffer("prefill_cos", cos[:, None, :].contiguous(), persistent=False)
            self.register_buffer("prefill_sin", sin[:, None, :].contiguous(), persistent=False)
            if "swa" in self.kinds:
                mask, slots = self._window_geometry(positions, first=0)
                self.register_buffer("prefill_mask", mask, persistent=False)
                self.register_buffer("prefill_slots", slots, persistent=False)
                self.prefill_keep = int(slots.shape[0])

    # -- position-dependent tensors ----------------------------------------------------

    def _window_geometry(self, positions: Tensor, first) -> tuple[Tensor, Tensor]:
        """The additive mask [T, W + T] over [ring ; new keys] and the ring slots that the
        newest min(T, W) keys go to -- the same arithmetic as `AttentionCore`."""
        window = self.window
        slots = torch.arange(window)
        held = (first - 1) - torch.remainder(first - 1 - slots, window)
        key_positions = torch.cat((held, positions))
        visible = (key_positions[None, :] >= 0) & (key_positions[None, :] <= positions[:, None]) & (key_positions[None, :] > positions[:, None] - window)
        mask = torch.where(visible, 0.0, float("-inf")).to(torch.float32)
        keep = min(positions.shape[0], window)
        return mask, torch.remainder(positions[positions.shape[0] - keep :], window)

    # -- the graph ------------------------------------------------------------------------

    def forward(self, tokens: Tensor, pos: Tensor | None = None) -> Tensor:
        if self.mode == "reset":
            return self._reset(tokens)
        model = self.model
        t = tokens.shape[1]
        if self.mode == "prefill":
            start = 0
            cos, sin = self.prefill_cos, self.prefill_sin
            if "swa" in self.kinds:
                mask, slots = self.prefill_mask, self.prefill_slots
        else:
            start = pos[0].item()
            torch._check(start >= 0)
            torch._check(start + t <= self.max_context)
            freqs = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().reshape(1, 1, self.head_dim), emb.sin().reshape(1, 1, self.head_dim)
            if "swa" in self.kinds:
                mask, slots = self._window_geometry(pos, first=pos[0])
        x = model.embed(tokens)
        for i, layer in enumerate(model.layers):
            h = layer.op_norm(x)
            if layer.kind == "conv":
                y = self._conv(i, layer.op, h)
            elif layer.kind == "attn":
                y = self._full_attention(i, layer.op, h, cos, sin, start)
            else:
                y = self._window_attention(i, layer.op, h, cos, sin, mask, slots)
            x = x + y
            x = x + layer.ffn(layer.ffn_norm(x))
        last = x[:, t - 1 :, :]  # a slice, not a select: XNNPACK takes it
        return model.head(model.norm(last)).reshape(1, -1)

    def _conv(self, i: int, op, h: Tensor) -> Tensor:
        buffer = getattr(self, f"conv_{i}")
        bx, c = op.gated_input(h)  # [1, D, T], [1, T, D]
        state = torch.zeros_like(buffer) if self.mode == "prefill" else buffer
        window = torch.cat((state, bx), dim=2)
        conv = op.conv(window)
        buffer.copy_(window[:, :, window.shape[2] - (op.kernel - 1) :])
        return op.out_proj(c * conv.transpose(1, 2))

    def _project(self, att, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = h.shape[1]
        q = att.q_proj(h).reshape(1, t, att.n_heads, att.head_dim)
        k = att.k_proj(h).reshape(1, t, att.n_kv_heads, att.head_dim)
        v = att.v_proj(h).reshape(1, t, att.n_kv_heads, att.head_dim)
        if att.q_norm is not None:
            q, k = att.q_norm(q), att.k_norm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _full_attention(self, i: int, att, h: Tensor, cos: Tensor, sin: Tensor, start) -> Tensor:
        q, k, v = self._project(att, h, cos, sin)  # [1, T, H(kv), D]: the ops' layout
        k_cache, v_cache = getattr(self, f"k_{i}"), getattr(self, f"v_{i}")
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        # Attends over positions [0, start + T) only, causally; groups of query heads share a KV head.
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, 1.0 / math.sqrt(att.head_dim))
        return att.out_proj(out.reshape(1, h.shape[1], att.n_heads * att.head_dim))

    def _window_attention(self, i: int, att, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor) -> Tensor:
        q, k, v = self._project(att, h, cos, sin)
        k_ring, v_ring = getattr(self, f"k_{i}"), getattr(self, f"v_{i}")
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [1, Hkv, T, D]
        if self.mode == "prefill":
            k_old, v_old = torch.zeros_like(k_ring), torch.zeros_like(v_ring)
        else:
            k_old, v_old = k_ring, v_ring
        keys, values = torch.cat((k_old, k), dim=2), torch.cat((v_old, v), dim=2)
        out = self._attend(att, q, keys, values, mask)
        keep = slots.shape[0]
        t = k.shape[2]
        k_ring.index_copy_(2, slots, k[:, :, t - keep :])
        v_ring.index_copy_(2, slots, v[:, :, t - keep :])
        return att.out_proj(out)

    @staticmethod
    def _attend(att, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        # `AttentionCore._attend` with the mask precomputed: query groups folded into rows.
        _, t, n_heads, d = q.shape
        n_kv = att.n_kv_heads
        groups = n_heads // n_kv
        s = keys.shape[2]
        qf = q.reshape(t, n_kv, groups, d).permute(1, 2, 0, 3).reshape(n_kv, groups * t, d)
        kf = keys.reshape(n_kv, s, d)
        vf = values.reshape(n_kv, s, d)
        scores = torch.bmm(qf, kf.transpose(1, 2)) * (1.0 / math.sqrt(d))
        scores = scores.reshape(n_kv, groups, t, s) + mask
        probs = torch.softmax(scores.reshape(n_kv, groups * t, s), dim=-1)
        out = torch.bmm(probs, vf)
        return out.reshape(n_kv, groups, t, d).permute(2, 0, 1, 3).reshape(1, t, n_heads * d)

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


__all__ = ["ExecuTorchLFM2", "state_buffer_bytes"]
