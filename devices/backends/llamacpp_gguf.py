"""Write an `ArchSpec` and its seeded weights as a GGUF file that llama.cpp runs as its `lfm2`
architecture (llama.cpp `src/models/lfm2.cpp`), at f16, q8_0 or q4_0.

What llama.cpp's lfm2 reads, and how this writer provides it:

* hyperparameters: block count, embedding length, feed-forward length, head count, a
  *per-layer* `head_count_kv` array (0 marks a conv layer: that is how lfm2 tells conv from
  attention layers), `shortconv.l_cache` = the conv kernel, the RMSNorm eps, the rope base
  and the context length; `vocab_size` with tokenizer model "none", so that llama.cpp
  creates that many dummy tokens and takes token ids as they are (no tokenizer runs);
* tensors under the `gguf.MODEL_ARCH.LFM2` names: `token_embd`, `token_embd_norm` (lfm2's
  name for the *final* norm), per block `attn_norm` (the operator norm), `ffn_norm`,
  `ffn_gate|up|down`, `shortconv.in_proj|conv|out_proj` (the depthwise kernel squeezed to
  [d_model, kernel]) or `attn_q|k|v|output` with `attn_q_norm|attn_k_norm`; `output` only
  when the head is not tied (llama.cpp reuses `token_embd` otherwise).

Precision: every 2-D projection and the embedding table are stored at the chosen type
(`gguf.quants`, numpy: Q4_0 = 18 bytes per 32 weights, Q8_0 = 34 bytes per 32) where the
input dimension is a multiple of the 32-weight block, else at f16; norms and conv kernels
stay f32 (small, and ggml's conv kernel reads f32). `stored_weights` gives the values as
llama.cpp will see them (quantised then dequantised), which is what the check against
eager compares with: it tests the writer and the runtime, not the quantiser.

An all-attention stack whose heads do not tile d_model (shaped like Qwen3-0.6B) is written
as llama.cpp's `qwen3` instead (`architecture`): the final norm is `output_norm`, the head
size `attention.key_length`. What neither can express is refused (`unsupported_reason`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lfm2.spec import ArchSpec

GGUF_FILE = "model.gguf"
QUANTS = ("f16", "q8_0", "q4_0")
BLOCK = 32  # weights per Q4_0 / Q8_0 block


def _types():
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    return {"f16": (T.F16, F.MOSTLY_F16), "q8_0": (T.Q8_0, F.MOSTLY_Q8_0), "q4_0": (T.Q4_0, F.MOSTLY_Q4_0)}


def architecture(spec: ArchSpec) -> str:
    """The llama.cpp architecture `spec` is written as: `lfm2`, except for an all-attention
    stack with q/k RMSNorm, written as `qwen3`: the same block (RMSNorm, GQA with per-head q/k
    RMSNorm and NEOX rope, SwiGLU), with the head size given by `attention.key_length` instead
    of d_model / n_heads. Two reasons: llama.cpp's lfm2 cannot size heads that do not tile
    d_model (Qwen3-0.6B's shape: 16 heads of 128 on d_model 1024), and with no conv layer its
    hybrid memory has no recurrent buffer, which aborts llama_decode (GGML_ASSERT(buffer) in
    llm_graph_input_mem_hybrid::set_input; seen measuring LFM2-350M's all-attention twin)."""
    all_attention = all(op == "attn" for op in spec.layers)
    if all_attention and spec.qk_norm:
        return "qwen3"
    return "lfm2"


def unsupported_reason(spec: ArchSpec) -> str | None:
    """Why llama.cpp cannot run `spec` (None when it can), with the way out."""
    if architecture(spec) == "qwen3":
        return None
    if all(op == "conv" for op in spec.layers):
        return (
            f"layout {spec.layout} has no attention layer; llama.cpp's lfm2 architecture then allocates no K/V buffer and "
            "llama_decode aborts (GGML_ASSERT(buffer) in its hybrid memory): measure this layout with the onnx or "
            "executorch backend"
        )
    if "swa" in spec.layers and "attn" in spec.layers:
        return (
            f"layout {spec.layout} mixes full ('attn') and sliding-window ('swa') attention layers; llama.cpp's lfm2 "
            "architecture makes every attention layer sliding-window once a window is set, so it cannot run this mix: "
            "measure this layout with the onnx or executorch backend, or use only one kind of attention"
        )
    if spec.n_heads * spec.head_dim != spec.d_model:
        return (
            f"n_heads * head_dim = {spec.n_heads * spec.head_dim} differs from d_model = {spec.d_model}; llama.cpp's lfm2 "
            "architecture sizes the q and output projections as d_model x d_model (an all-attention stack with q/k norm "
            "is written as qwen3, which can): use the onnx or executorch backend"
        )
    if any(op != "conv" for op in spec.layers) and not spec.qk_norm:
        return "the spec has no q/k RMSNorm (qk_norm=false); llama.cpp's lfm2 always applies it: use the onnx or executorch backend"
    return None


def gguf_name(param: str, arch: str = "lfm2") -> str:
    """Our parameter name (`lfm2.model.LFM2.state_dict`) -> the GGUF tensor name in `arch`."""
    if param == "embed_tokens.weight":
        return "token_embd.weight"
    if param == "embedding_norm.weight":
        return "token_embd_norm.weight" if arch == "lfm2" else "output_norm.weight"  # lfm2's name for its final norm
    if param == "lm_head.weight":
        return "output.weight"
    parts = param.split(".")
    if parts[0] != "layers":
        raise KeyError(f"no GGUF name for {param!r}")
    block, rest = parts[1], ".".join(parts[2:])
    names = {
        "operator_norm.weight": "attn_norm",
        "ffn_norm.weight": "ffn_norm",
        "feed_forward.w1.weight": "ffn_gate",
        "feed_forward.w3.weight": "ffn_up",
        "feed_forward.w2.weight": "ffn_down",
        "conv.in_proj.weight": "shortconv.in_proj",
        "conv.conv.weight": "shortconv.conv",
        "conv.out_proj.weight": "shortconv.out_proj",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.out_proj.weight": "attn_output",
        "self_attn.q_layernorm.weight": "attn_q_norm",
        "self_attn.k_layernorm.weight": "attn_k_norm",
    }
    if rest not in names:
        raise KeyError(f"no GGUF name for {param!r}")
    return f"blk.{block}.{names[rest]}.weight"


def model_tensors(spec: ArchSpec, state: dict[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (our parameter name, fp32 array as stored: conv kernels squeezed to 2-D).
    A tied head is left out (llama.cpp reads `token_embd` for it)."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    arch = architecture(spec)
    for param, tensor in state.items():
        if param == "lm_head.weight" and spec.tie_embeddings:
            continue
        name = gguf_name(param, arch)
        array = tensor.detach().to("cpu").float().numpy()
        if param.endswith("conv.conv.weight"):
            array = array.reshape(array.shape[0], array.shape[-1])  # [d, 1, K] -> [d, K]: ggml ne {K, d}
        out[name] = (param, np.ascontiguousarray(array, dtype=np.float32))
    return out


def storage_type(name: str, array: np.ndarray, quant: str):
    """The ggml type tensor `name` is stored at (module doc: matrices at `quant`, the rest f32)."""
    from gguf import GGMLQuantizationType as T

    if array.ndim != 2 or name.endswith("shortconv.conv.weight"):  # norms; conv kernels [d, K]
        return T.F32
    wanted = _types()[quant][0]
    if wanted != T.F16 and array.shape[1] % BLOCK:
        return T.F16  # rows that are not whole blocks: what llama.cpp's quantiser falls back to
    return wanted


def encode(array: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == T.F32:
        return array
    if qtype == T.F16:
        return array.astype(np.float16)
    return quantize(array, qtype)


def decode(data: np.ndarray, qtype) -> np.ndarray:
    """Stored data -> the fp32 values llama.cpp computes with."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    if qtype in (T.F32, T.F16):
        return data.astype(np.float32)
    return dequantize(data, qtype).astype(np.float32)


def stored_weights(spec: ArchSpec, state: dict[str, Any], quant: str) -> dict[str, np.ndarray]:
    """Our parameter name -> the fp32 values the GGUF holds for it (after the round trip
    through its storage type), in our shapes; a tied head shares the embedding's values."""
    values: dict[str, np.ndarray] = {}
    for name, (param, array) in model_tensors(spec, state).items():
        qtype = storage_type(name, array, quant)
        values[param] = decode(encode(array, qtype), qtype).reshape(tuple(state[param].shape))
    if spec.tie_embeddings:
        values["lm_head.weight"] = values["embed_tokens.weight"]
    return values


def write_gguf(spec: ArchSpec, state: dict[str, Any], quant: str, path: Path, *, context_length: int | None = None) -> dict[str, Any]:
    """Write `state` (an `LFM2.state_dict()` of `spec`) as a `quant` GGUF at `path`; returns
    facts for the manifest (tensor types and counts, bytes of tensor data)."""
    import gguf

    if quant not in QUANTS:
        raise ValueError(f"the llamacpp backend writes {', '.join(QUANTS)}, not {quant!r}")
    reason = unsupported_reason(spec)
    if reason:
        raise ValueError(reason)
    file_type = _types()[quant][1]
    arch = architecture(spec)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"lfm2-nas {spec.layout} {spec.key}")
    writer.add_block_count(spec.n_layers)
    writer.add_context_length(context_length or spec.max_seq_len)
    writer.add_embedding_length(spec.d_model)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.n_heads)
    if arch == "qwen3":
        writer.add_head_count_kv(spec.n_kv_heads)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    else:
        writer.add_head_count_kv([0 if op == "conv" else spec.n_kv_heads for op in spec.layers])
    writer.add_rope_freq_base(float(spec.rope_theta))
    writer.add_layer_norm_rms_eps(float(spec.norm_eps))
    if arch == "lfm2":
        writer.add_shortconv_l_cache(spec.conv_kernel)
    writer.add_vocab_size(spec.vocab_size)
    if "swa" in spec.layers:
        writer.add_sliding_window(spec.swa_window)  # every attention layer (unsupported_reason refuses a mix)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # No tokenizer: "none" makes llama.cpp take `vocab_size` token ids as they are.
    writer.add_tokenizer_model("none")

    types: dict[str, int] = {}
    data_bytes = 0
    for name, (_param, array) in model_tensors(spec, state).items():
        qtype = storage_type(name, array, quant)
        data = encode(array, qtype)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        data_bytes += data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensor_types": types, "tensor_data_bytes": data_bytes, "tokenizer": "none (token ids fed directly)", "tied_head": "token_embd" if spec.tie_embeddings else "output"}


__all__ = ["GGUF_FILE", "QUANTS", "architecture", "unsupported_reason", "gguf_name", "model_tensors", "storage_type", "stored_weights", "write_gguf"]
