"""Full attention over a K/V cache updated in place: ONNX Runtime's `GroupQueryAttention`.

The exported step graph calls `com.microsoft.GroupQueryAttention` (a contrib op of ONNX
Runtime, the one onnxruntime-genai runs LLMs with) for every full-attention layer. Its
caches are buffers of `max_context` positions (`[1, Hkv, max_context, D]`); the op writes
the new keys and values at `pos..pos+T-1` and attends causally over the `pos + T` filled
positions only, so decode cost still follows the context depth. When the runner binds a
layer's cache to the op's input *and* output (`past_present_share_buffer`, detected by the
kernel from the two pointers), the write happens in place: no step holds an old and a new
copy of the cache, and nothing is copied per token. Unbound, ONNX Runtime allocates the
output and the kernel copies the filled part into it (same values; what the int8
reference's rounding oracle runs).

Here: a torch custom op with the op's semantics (eager implementation and a fake one for
`torch.export`) and its translation to the ONNX node, for `torch.onnx.export(...,
custom_translation_table=TRANSLATION)`.
"""

from __future__ import annotations

import math

import onnx
import torch
from torch import Tensor

DOMAIN = "com.microsoft"


@torch.library.custom_op("lfm2_onnx::group_query_attention", mutates_args=())
def group_query_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, n_heads: int, n_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, T, H*D], k and v [B, T, Hkv*D] (rotary applied), caches [B, Hkv, S_max, D],
    pos int64 [1]: writes k, v at pos..pos+T-1 and attends causally over 0..pos+T-1.
    Returns (out [B, T, H*D], new k cache, new v cache)."""
    bsz, t, _ = q.shape
    d = k_cache.shape[3]
    start = int(pos.reshape(-1)[0])
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[:, :, start : start + t] = k.reshape(bsz, t, n_kv_heads, d).transpose(1, 2)
    v_cache[:, :, start : start + t] = v.reshape(bsz, t, n_kv_heads, d).transpose(1, 2)
    total = start + t
    groups = n_heads // n_kv_heads
    keys = k_cache[:, :, :total].repeat_interleave(groups, dim=1)  # [B, H, S, D]
    values = v_cache[:, :, :total].repeat_interleave(groups, dim=1)
    queries = q.reshape(bsz, t, n_heads, d).transpose(1, 2)
    scores = queries @ keys.transpose(2, 3) * (1.0 / math.sqrt(d))
    visible = torch.arange(total)[None, :] <= (start + torch.arange(t))[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # [B, H, T, D]
    return out.transpose(1, 2).reshape(bsz, t, n_heads * d), k_cache, v_cache


@group_query_attention.register_fake
def _(q, k, v, k_cache, v_cache, pos, n_heads, n_kv_heads):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)


def _schema() -> onnx.defs.OpSchema:
    """The part of the contrib op's schema the export uses (onnx itself does not know the
    com.microsoft ops); the runtime checks the node against its own schema."""
    formal = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    return onnx.defs.OpSchema(
        "GroupQueryAttention",
        DOMAIN,
        1,
        inputs=[
            formal("query", "T"),
            formal("key", "T"),
            formal("value", "T"),
            formal("past_key", "T", param_option=optional),
            formal("past_value", "T", param_option=optional),
            formal("seqlens_k", "M"),
            formal("total_sequence_length", "M"),
        ],
        outputs=[formal("output", "T"), formal("present_key", "T"), formal("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[
            onnx.defs.OpSchema.Attribute("num_heads", onnx.defs.OpSchema.AttrType.INT, ""),
            onnx.defs.OpSchema.Attribute("kv_num_heads", onnx.defs.OpSchema.AttrType.INT, ""),
        ],
    )


def _translation():
    import onnxscript
    from onnxscript import opset18 as op

    gqa = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "GroupQueryAttention", _schema())

    def translate(q, k, v, k_cache, v_cache, pos, n_heads: int, n_kv_heads: int):
        # total = pos + T; the op takes it as an int32 scalar and seqlens_k = total - 1 per row
        total = op.Add(pos, op.Shape(q, start=1, end=2))
        total = op.Cast(total, to=onnx.TensorProto.INT32)
        # onnxscript types Cast's result as a tensor of any type, whatever `to` says (here INT32)
        seqlens = op.Sub(total, op.Constant(value=onnx.helper.make_tensor("one", onnx.TensorProto.INT32, [1], [1])))  # type: ignore[type-var]
        return gqa(q, k, v, k_cache, v_cache, seqlens, op.Squeeze(total), num_heads=n_heads, kv_num_heads=n_kv_heads)  # type: ignore[type-var]

    return translate


def translation_table() -> dict:
    """For `torch.onnx.export(custom_translation_table=...)`."""
    return {torch.ops.lfm2_onnx.group_query_attention.default: _translation()}


__all__ = ["group_query_attention", "translation_table", "DOMAIN"]
