"""The LFM2 model family in one file: gated short convolutions, GQA attention, SwiGLU.

Two ways to run the same weights:

* `model(tokens)` -- training / scoring: logits for every position, no state kept.
  Attention goes through `scaled_dot_product_attention` so that it is fast on a GPU.
* `model.step(tokens, pos, *state)` -- inference: T new tokens starting at absolute
  position `pos`, with the decode state passed in and returned explicitly. A prefill is a
  `step` from `model.init_state(...)` at pos 0, a decode step is a `step` of one token.
  This form is what gets exported: it has no data-dependent Python control flow, its
  state is plain tensors (so it runs unchanged in eager, ExecuTorch and ONNX Runtime),
  and it is written with the operators XNNPACK delegates (see FEASIBILITY.md): RMSNorm
  as a mean over the last two dims of a 4-D view, plain slices instead of `chunk`,
  3-D `bmm` with the query groups folded into rows instead of `repeat_interleave`,
  softmax with an additive float mask instead of SDPA with a boolean mask, and the
  depthwise conv as `conv1d` with groups.

State, in layer order: a conv layer keeps its last `conv_kernel - 1` gated inputs
`[B, d_model, K-1]`; an `attn` layer keeps K and V in static buffers
`[B, n_kv_heads, max_seq_len, head_dim]`; an `swa` layer keeps K and V in a ring buffer of
`swa_window` slots, so its memory is bounded by the window. Each operator type (`OPERATOR_TYPES`)
owns its state's shapes and its `step`; the model only concatenates them.

Module names are those of Hugging Face's `Lfm2ForCausalLM` (`embed_tokens`, `operator_norm`,
`conv` / `self_attn`, `q_layernorm`, `feed_forward`, `embedding_norm`, `lm_head`), so that a
checkpoint maps onto ours by one prefix (`model.`): see `lfm2.hf`. State dicts saved under the
names before (`embed`, `op_norm`, `op`, `ffn`, `head`, ...) still load (`lfm2.legacy_names`).

Attention over the static buffer costs O(max_seq_len) per step in this portable form.
Runtimes that can do better swap the `AttentionCore` of each attention layer (for example
for ExecuTorch's KV-cache SDPA op, which only reads the filled part of the cache).
"""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm2.legacy_names import upgrade_legacy_keys
from lfm2.spec import ArchSpec


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # mean over the last two dims of a [N, M, 1, D] view: same numbers as mean(-1), but an
    # op that XNNPACK takes (a mean over the last dim alone is left to the portable runtime).
    shape = x.shape
    x4 = x.reshape(-1, 1, 1, shape[-1])
    variance = (x4 * x4).mean(dim=(-2, -1), keepdim=True)
    # Back to x's shape with its one dynamic dimension (a SymInt under torch.export) inferred:
    # XNNPACK takes a reshape with one -1, not one with a symbolic size (BENCHMARKS.md).
    target = [d if isinstance(d, int) else -1 for d in shape]
    return (x4 * torch.rsqrt(variance + eps)).reshape(target if target.count(-1) <= 1 else shape) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [T, head_dim] for integer positions [T]; computed on the fly rather
    than tabulated, because a table for a 128k context would outweigh a small model."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D]. The rotate-half convention of Hugging Face LFM2."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Operator(nn.Module):
    """The mixing operator of a block, one type per name in `ArchSpec.layers`.

    A type names the `Block` attribute that holds it (its checkpoint name: `conv` or
    `self_attn`, as in transformers' `Lfm2DecoderLayer`), the decode state it keeps
    (`state_names`, `state_shapes`) and runs one `step` over it; `LFM2` only slices the
    flat state by `len(state_names)`."""

    kind: ClassVar[str]
    attribute: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]]

    @classmethod
    def from_spec(cls, spec: ArchSpec) -> Operator:
        raise NotImplementedError

    def state_shapes(self, batch_size: int, max_context: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def step(self, x: Tensor, positions: Tensor, *state: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """T new tokens `x` [B, T, d_model] at absolute `positions` [T], with this layer's
        state; returns the output and the new state (same shapes, same order)."""
        raise NotImplementedError


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ShortConv(Operator):
    """y = out_proj(C * causal_depthwise_conv(B * x)), with B, C, x from one projection.
    State: the last `kernel - 1` gated inputs."""

    kind = "conv"
    attribute = "conv"
    state_names = ("conv",)

    @classmethod
    def from_spec(cls, spec: ArchSpec) -> ShortConv:
        return cls(spec.d_model, spec.conv_kernel)

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.d_model = d_model
        self.kernel = kernel
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def gated_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        d = self.d_model
        bcx = self.in_proj(x)
        b, c, v = bcx[..., :d], bcx[..., d : 2 * d], bcx[..., 2 * d :]
        return (b * v).transpose(1, 2), c  # [B, D, T], [B, T, D]

    def forward(self, x: Tensor) -> Tensor:
        bx, c = self.gated_input(x)
        conv = self.conv(F.pad(bx, (self.kernel - 1, 0)))
        return self.out_proj(c * conv.transpose(1, 2))

    def state_shapes(self, batch_size: int, max_context: int) -> list[tuple[int, ...]]:
        return [(batch_size, self.d_model, self.kernel - 1)]

    def step(self, x: Tensor, positions: Tensor, *state: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        (conv_state,) = state
        bx, c = self.gated_input(x)
        window = torch.cat((conv_state, bx), dim=2)  # [B, D, K-1+T]
        conv = self.conv(window)  # [B, D, T]
        new_state = window[:, :, window.shape[2] - (self.kernel - 1) :]
        return self.out_proj(c * conv.transpose(1, 2)), (new_state,)


class AttentionCore(nn.Module):
    """Writes the new K/V into the cache and attends; the part a runtime may replace.

    q: [B, T, H, D] (rotary applied), k, v: [B, T, Hkv, D], positions: [T] absolute.
    Returns the attention output [B, T, H*D] and the new caches.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, window: int | None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.window = window  # None: full attention over a static cache; else a ring of `window`

    def cache_len(self, max_seq_len: int) -> int:
        return max_seq_len if self.window is None else self.window

    def forward(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor):
        k = k.transpose(1, 2)  # [B, Hkv, T, D]
        v = v.transpose(1, 2)
        if self.window is None:
            # Write first, then attend over the whole static buffer; unwritten slots are masked.
            k_cache = k_cache.index_copy(2, positions, k)
            v_cache = v_cache.index_copy(2, positions, v)
            slots = torch.arange(k_cache.shape[2], device=q.device)
            last = positions[-1]
            key_positions = torch.where(slots <= last, slots, torch.full_like(slots, -1))
            keys, values = k_cache, v_cache
            out = self._attend(q, keys, values, key_positions, positions)
        else:
            # A ring of `window` slots: attend over [old ring ; new keys], then write the
            # newest min(T, window) keys into their slots (pos % window).
            window = self.window
            first = positions[0]
            slots = torch.arange(window, device=q.device)
            # The latest position < first held by each slot (negative: never written).
            held = (first - 1) - torch.remainder(first - 1 - slots, window)
            key_positions = torch.cat((held, positions))
            keys = torch.cat((k_cache, k), dim=2)
            values = torch.cat((v_cache, v), dim=2)
            out = self._attend(q, keys, values, key_positions, positions)
            keep = min(k.shape[2], window)
            write_slots = torch.remainder(positions[positions.shape[0] - keep :], window)
            k_cache = k_cache.index_copy(2, write_slots, k[:, :, k.shape[2] - keep :])
            v_cache = v_cache.index_copy(2, write_slots, v[:, :, v.shape[2] - keep :])
        return out, k_cache, v_cache

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, key_positions: Tensor, positions: Tensor) -> Tensor:
        bsz, t, n_heads, d = q.shape
        groups = n_heads // self.n_kv_heads
        s = keys.shape[2]
        # Fold each key/value head's query group into rows: [B*Hkv, G*T, D].
        qf = q.reshape(bsz, t, self.n_kv_heads, groups, d).permute(0, 2, 3, 1, 4).reshape(bsz * self.n_kv_heads, groups * t, d)
        kf = keys.reshape(bsz * self.n_kv_heads, s, d)
        vf = values.reshape(bsz * self.n_kv_heads, s, d)
        visible = (key_positions[None, :] >= 0) & (key_positions[None, :] <= positions[:, None])
        if self.window is not None:
            visible = visible & (key_positions[None, :] > positions[:, None] - self.window)
        mask = torch.where(visible, 0.0, float("-inf")).to(q.dtype)  # [T, S]
        scores = torch.bmm(qf, kf.transpose(1, 2)) * (1.0 / math.sqrt(d))
        scores = scores.reshape(bsz * self.n_kv_heads, groups, t, s) + mask
        probs = torch.softmax(scores.reshape(bsz * self.n_kv_heads, groups * t, s), dim=-1)
        out = torch.bmm(probs, vf)  # [B*Hkv, G*T, D]
        return out.reshape(bsz, self.n_kv_heads, groups, t, d).permute(0, 3, 1, 2, 4).reshape(bsz, t, n_heads * d)


class Attention(Operator):
    """GQA with per-head RMSNorm on q and k before rotary embeddings; output `out_proj`.
    State: K and V in static buffers of the whole context."""

    kind = "attn"
    attribute = "self_attn"
    state_names = ("k", "v")

    @classmethod
    def from_spec(cls, spec: ArchSpec) -> Attention:
        return cls(spec, window=None)

    def __init__(self, spec: ArchSpec, window: int | None):
        super().__init__()
        hd = spec.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, hd
        self.rope_theta = spec.rope_theta
        self.q_proj = nn.Linear(spec.d_model, spec.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(spec.d_model, spec.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(spec.d_model, spec.n_kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(spec.n_heads * hd, spec.d_model, bias=False)
        self.q_layernorm = RMSNorm(hd, spec.norm_eps) if spec.qk_norm else None
        self.k_layernorm = RMSNorm(hd, spec.norm_eps) if spec.qk_norm else None
        self.core = AttentionCore(spec.n_heads, spec.n_kv_heads, hd, window)

    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        bsz, t, _ = x.shape
        q = self.q_proj(x).reshape(bsz, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(bsz, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(bsz, t, self.n_kv_heads, self.head_dim)
        if self.q_layernorm is not None and self.k_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: Tensor) -> Tensor:
        bsz, t, _ = x.shape
        q, k, v = self.project(x, torch.arange(t, device=x.device))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        window = self.core.window
        if window is None or window >= t:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            i = torch.arange(t, device=x.device)
            allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, t, -1))

    def state_shapes(self, batch_size: int, max_context: int) -> list[tuple[int, ...]]:
        return [(batch_size, self.n_kv_heads, self.core.cache_len(max_context), self.head_dim)] * 2

    def step(self, x: Tensor, positions: Tensor, *state: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        k_cache, v_cache = state
        q, k, v = self.project(x, positions)
        out, k_cache, v_cache = self.core(q, k, v, k_cache, v_cache, positions)
        return self.out_proj(out), (k_cache, v_cache)


class SlidingWindowAttention(Attention):
    """Attention over the last `swa_window` positions. State: K and V in a ring of
    `swa_window` slots, so its memory is bounded by the window, not the context. Same
    parameters (and checkpoint names) as full attention."""

    kind = "swa"

    @classmethod
    def from_spec(cls, spec: ArchSpec) -> SlidingWindowAttention:
        return cls(spec, window=spec.swa_window)


#: The operator type of each name `ArchSpec.layers` may hold (`lfm2.spec.OPERATORS`).
OPERATOR_TYPES: dict[str, type[Operator]] = {cls.kind: cls for cls in (ShortConv, Attention, SlidingWindowAttention)}


class Block(nn.Module):
    """x + op(norm(x)), then h + swiglu(norm(h)). The operator sits under its checkpoint
    name (`conv` or `self_attn`); `operator` reaches it whatever its type."""

    def __init__(self, spec: ArchSpec, op: str):
        super().__init__()
        operator_type = OPERATOR_TYPES[op]
        self.kind = op
        self.operator_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self._operator_attribute = operator_type.attribute
        self.add_module(operator_type.attribute, operator_type.from_spec(spec))
        self.ffn_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.feed_forward = SwiGLU(spec.d_model, spec.ffn_dim)

    @property
    def operator(self) -> Operator:
        return self._modules[self._operator_attribute]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.operator(self.operator_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))

    def step(self, x: Tensor, positions: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        y, new_state = self.operator.step(self.operator_norm(x), positions, *state)
        h = x + y
        return h + self.feed_forward(self.ffn_norm(h)), new_state


class LFM2(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        # Registration order fixes `init_weights`' draws: keep it (seeded weights stay the same).
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.d_model)
        self.layers = nn.ModuleList(Block(spec, op) for op in spec.layers)
        self.embedding_norm = RMSNorm(spec.d_model, spec.norm_eps)  # the final norm, by transformers' name
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_load_state_dict_pre_hook(upgrade_legacy_keys)

    @property
    def blocks(self) -> list[Block]:
        """`layers`, typed: an `nn.ModuleList` hands out plain `Module`s."""
        return cast("list[Block]", list(self.layers))

    # -- training / scoring ---------------------------------------------------------------

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, T, vocab] for tokens [B, T], from an empty context."""
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.embedding_norm(x))

    # -- inference with explicit state ----------------------------------------------------

    def state_shapes(self, batch_size: int = 1, max_context: int | None = None) -> list[tuple[int, ...]]:
        """Shapes of the flat decode state, in the order `step` takes and returns it.

        `max_context` sizes the full-attention K/V buffers (default: `spec.max_seq_len`); a
        compiled artifact allocates only the context it is built for."""
        max_context = max_context or self.spec.max_seq_len
        return [shape for layer in self.blocks for shape in layer.operator.state_shapes(batch_size, max_context)]

    def init_state(self, batch_size: int = 1, dtype: torch.dtype | None = None, device=None, max_context: int | None = None) -> tuple[Tensor, ...]:
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in self.state_shapes(batch_size, max_context))

    def step(self, tokens: Tensor, pos: Tensor, *state: Tensor, all_logits: bool = False):
        """Run T tokens [B, T] starting at absolute position `pos` (int64 tensor [1]).

        Returns (logits, *new_state): logits [B, vocab] for the last token (a prefill needs
        no more, and [B, T, vocab] at T=2048 would cost more memory than the model), or
        [B, T, vocab] when `all_logits`.
        """
        positions = pos + torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens)
        new_state: list[Tensor] = []
        i = 0
        for layer in self.blocks:
            n = len(layer.operator.state_names)  # the operator type says how many tensors are its
            x, layer_state = layer.step(x, positions, state[i : i + n])
            new_state.extend(layer_state)
            i += n
        if not all_logits:
            x = x[:, -1, :]
        return (self.lm_head(self.embedding_norm(x)), *new_state)


def init_weights(model: LFM2, seed: int | None = 0, std: float = 0.02) -> LFM2:
    """Our initialisation: normal(0, std) for embeddings and projections, with the residual
    outputs (`out_proj`, `w2`) scaled by 1/sqrt(2 * n_layers) as in GPT-2; RMSNorm weights
    one; depthwise conv kernels uniform(+-1/sqrt(kernel)), PyTorch's default for a conv."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    residual_std = std / math.sqrt(2 * model.spec.n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta":
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("conv.weight"):
                bound = 1.0 / math.sqrt(param.shape[-1])
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))
            elif name.endswith(("out_proj.weight", "w2.weight")):
                param.copy_(torch.empty(param.shape).normal_(0.0, residual_std, generator=generator))
            else:
                param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))
    return model


def build_model(spec: ArchSpec, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, seed: int | None = 0) -> LFM2:
    """The model of `spec`, initialised (seeded) unless built on the meta device."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(device):
        model = LFM2(spec)
    if device.type != "meta":
        init_weights(model, seed=seed)
    if dtype is not None:
        model = model.to(dtype)
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied head counts once), as published parameter counts do."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "LFM2",
    "build_model",
    "init_weights",
    "count_parameters",
    "AttentionCore",
    "RMSNorm",
    "Operator",
    "OPERATOR_TYPES",
    "ShortConv",
    "Attention",
    "SlidingWindowAttention",
]
