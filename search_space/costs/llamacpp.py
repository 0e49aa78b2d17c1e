"""The footprint estimate for the llama.cpp backend (`devices.backends.llamacpp`): a GGUF of
llama.cpp's `lfm2` (or `qwen3`) architecture at f16, q8_0 or q4_0, read into memory (not
memory-mapped: `LLAMA_LOAD_MODE_NONE`, llama-bench `--mmap 0`) and run by the ggml CPU
backend with llama-bench's other settings (n_ubatch 512, f16 K/V cache, flash attention).

    total = weights + K/V cache + conv state + compute buffer + overhead

* weights: every projection and the embedding table at the chosen type where its input
  width is a whole number of 32-weight blocks (Q4_0 18 bytes and Q8_0 34 bytes per 32
  weights), else f16; norms and conv kernels f32; a tied head is not stored (llama.cpp
  reads the embedding table for it). On CPUs with AVX2 (x86) or int8 matmul (ARM), ggml's
  CPU backend repacks every q4_0 projection into an interleaved layout for its GEMM kernels
  (`ggml-cpu/repack.cpp`); read into memory, the repacked copy *replaces* the loaded one,
  so each weight is held once, at the file's size. (Memory-mapped, as llama.cpp does by
  default, the file's pages stay resident next to the repacked copy: +the q4_0
  projections' bytes, `repacked`, reported but not counted.)
* the K/V cache: f16, `n_kv_heads * head_dim` keys and values per attention layer and
  token, for the context rounded up to llama.cpp's 256-token padding; the conv state:
  f32, `conv_kernel - 1` inputs per conv layer. The measurement keeps one saved copy of the
  state at its deepest decode depth (the runner restores it before each decode run, as
  llama-bench does), so the state counts twice.
* the compute buffer: the largest activations of one micro-batch of min(prefill, 512)
  tokens (SwiGLU's two hidden tensors and the residual stream, f32), times
  `COMPUTE_FACTOR` for what ggml's allocator keeps alive at once.
* overhead: the ggml context, graph and thread buffers (`OVERHEAD_BYTES`).

Checked at full size in BENCHMARKS.md ("llama.cpp backend"). `COMPUTE_FACTOR` and
`OVERHEAD_BYTES` are one model's worth of evidence, not a fit over many; the search records
each trial's estimate error against its measured footprint.
"""

from __future__ import annotations

import math

from lfm2.spec import ArchSpec
from search_space.costs import counts

MIB = 1 << 20
QUANTS = ("f16", "q8_0", "q4_0")
BLOCK = 32
#: bytes per weight of a projection stored at each type (Q4_0: 2-byte scale + 16 bytes per 32)
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
N_UBATCH = 512
KV_PADDING = 256
COMPUTE_FACTOR = 2.0
#: the live state and the runner's saved copy of it (module doc)
STATE_COPIES = 2
OVERHEAD_BYTES = 16 * MIB
#: the types ggml's CPU backend repacks (x86 with AVX2): a second copy only when memory-mapped
REPACKED = ("q4_0",)


def _matrix_bytes(out_features: int, in_features: int, quant: str) -> float:
    per_weight = BYTES_PER_WEIGHT[quant] if in_features % BLOCK == 0 else 2.0
    return out_features * in_features * per_weight


def gguf_bytes_breakdown(spec: ArchSpec, quant: str) -> dict[str, int]:
    """Bytes of the GGUF's tensor data: the layers' projections, the embedding table, an
    untied head, and the f32 rest (norms, conv kernels)."""
    if quant not in QUANTS:
        raise ValueError(f"llamacpp quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    linears = sum(_matrix_bytes(o, i, quant) for op in spec.layers for o, i in counts.linear_shapes(spec, op))
    embedding = _matrix_bytes(spec.vocab_size, spec.d_model, quant)
    head = 0.0 if spec.tie_embeddings else _matrix_bytes(spec.vocab_size, spec.d_model, quant)
    other = 4 * (sum(counts.small_weights(spec, op) for op in spec.layers) + spec.d_model)
    return {"linears": int(linears), "embedding": int(embedding), "head": int(head), "other": int(other)}


def kv_cache_bytes(spec: ArchSpec, context: int) -> int:
    padded = math.ceil(context / KV_PADDING) * KV_PADDING
    return 2 * 2 * len(spec.attention_layers) * spec.n_kv_heads * spec.head_dim * padded


def compute_buffer_bytes(spec: ArchSpec, prefill_tokens: int) -> int:
    u = min(prefill_tokens, N_UBATCH)
    return int(COMPUTE_FACTOR * 4 * u * (2 * spec.ffn_dim + 3 * spec.d_model))


def estimate(spec: ArchSpec, context: int, quant: str, prefill_tokens: int) -> dict[str, int]:
    """The parts of the estimated footprint, in bytes (module doc)."""
    stored = gguf_bytes_breakdown(spec, quant)
    file_bytes = sum(stored.values())
    repacked = stored["linears"] + stored["head"] if quant in REPACKED else 0
    return {
        "weights": file_bytes,  # read into memory: the repacked copy replaces the loaded one
        "state": STATE_COPIES * (kv_cache_bytes(spec, context) + counts.conv_state_bytes(spec, 4)),
        "activation": compute_buffer_bytes(spec, prefill_tokens),
        "overhead": OVERHEAD_BYTES,
        "file": file_bytes,
        "repacked": repacked,
    }


__all__ = ["QUANTS", "BYTES_PER_WEIGHT", "gguf_bytes_breakdown", "kv_cache_bytes", "compute_buffer_bytes", "estimate"]
