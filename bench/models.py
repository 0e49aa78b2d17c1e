"""The architectures the benchmarks compare, and the arithmetic that says what a ratio
should be before anything is measured (FLOPs and bytes moved, from `search_space.costs`).

The comparison class of the LFM2 report's CPU claim is "similarly sized models": here
shaped like Qwen3-0.6B and Llama-3.2-1B (shapes from their public configs; random
weights: latency does not depend on the values).
"""

from __future__ import annotations

from lfm2.presets import ATTENTION_TWINS, LFM2_PRESETS
from lfm2.spec import ArchSpec
from search_space import costs

#: Qwen3-0.6B's shape: 28 layers of GQA attention (16 query / 8 kv heads of 128, so the
#: attention width 2048 is twice d_model), QK-norm, SwiGLU 3072, a 151,936-token tied vocabulary.
QWEN3_0_6B_SHAPED = ArchSpec(
    vocab_size=151_936,
    d_model=1024,
    layers=("attn",) * 28,
    n_heads=16,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=3072,
    rope_theta=1_000_000.0,
    norm_eps=1e-6,
    tie_embeddings=True,
    max_seq_len=40_960,
    qk_norm=True,
)

#: Llama-3.2-1B's shape: 16 layers of GQA attention (32 / 8 heads of 64), SwiGLU 8192, a
#: 128,256-token tied vocabulary, no QK-norm.
LLAMA_3_2_1B_SHAPED = ArchSpec(
    vocab_size=128_256,
    d_model=2048,
    layers=("attn",) * 16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    ffn_dim=8192,
    rope_theta=500_000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
    max_seq_len=131_072,
    qk_norm=False,
)

#: name -> spec of every model the LFM2-vs-attention benchmark knows.
MODELS: dict[str, ArchSpec] = {
    "LFM2-350M": LFM2_PRESETS["LFM2-350M"],
    "LFM2-350M-attn": ATTENTION_TWINS["LFM2-350M-attn"],
    "Qwen3-0.6B-shaped": QWEN3_0_6B_SHAPED,
    "LFM2-1.2B": LFM2_PRESETS["LFM2-1.2B"],
    "LFM2-1.2B-attn": ATTENTION_TWINS["LFM2-1.2B-attn"],
    "Llama-3.2-1B-shaped": LLAMA_3_2_1B_SHAPED,
}

#: (LFM2 model, the all-attention models it is compared with).
PAIRS: dict[str, tuple[str, ...]] = {
    "LFM2-350M": ("LFM2-350M-attn", "Qwen3-0.6B-shaped"),
    "LFM2-1.2B": ("LFM2-1.2B-attn", "Llama-3.2-1B-shaped"),
}


def tiny_lfm2(vocab_size: int = 4096, d_model: int = 256, n_layers: int = 8) -> ArchSpec:
    """A scaled-down LFM2 (attention at 2 of every ~3 layers, as in LFM2: layers 2 and 5 of
    8) for smoke runs: the same code paths at a fraction of the cost."""
    layers = tuple("attn" if i in (2, 5) else "conv" for i in range(n_layers))
    return ArchSpec(vocab_size=vocab_size, d_model=d_model, layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=3 * d_model, max_seq_len=8192)


#: Every --quick run measures the same tiny pair at the same point with the same context,
#: so that across the smoke runs (CI) each model is compiled once and then found in the cache.
QUICK_POINT = 128
QUICK_DECODE_TOKENS = 8
QUICK_BACKEND = ("onnx", "fp32")


def quick_models() -> dict[str, ArchSpec]:
    """The smoke runs' models: a 4-layer LFM2 (one attention layer) and its all-attention twin."""
    from lfm2.presets import all_attention_twin

    tiny = tiny_lfm2(vocab_size=2048, d_model=128, n_layers=4)
    return {"tiny-LFM2": tiny, "tiny-LFM2-attn": all_attention_twin(tiny)}


#: The linear weights' storage precision of each backend/quant (as `search_space.costs` names it).
#: llama.cpp's are its GGUF tensor types (`search_space.costs.llamacpp`), read with an f16 K/V cache.
WEIGHT_PRECISION = {
    ("executorch", "fp32"): "fp32",
    ("executorch", "8da4w"): "8da4w",
    ("onnx", "fp32"): "fp32",
    ("onnx", "int8"): "int8",
    ("eager", "fp32"): "fp32",
    ("llamacpp", "f16"): "gguf:f16",
    ("llamacpp", "q8_0"): "gguf:q8_0",
    ("llamacpp", "q4_0"): "gguf:q4_0",
}


def _gguf_decode_bytes(spec: ArchSpec, quant: str, depth: int) -> int:
    """`decode_bytes_per_token` for llama.cpp: the GGUF's tensors as stored (a tied head is
    the quantised embedding table), one embedding row, and an f16 K/V cache."""
    from search_space.costs import llamacpp

    parts = llamacpp.gguf_bytes_breakdown(spec, quant)
    head = parts["head"] or parts["embedding"]
    row = parts["embedding"] // spec.vocab_size
    return parts["linears"] + head + parts["other"] + row + costs.kv_cache_bytes(spec, depth, 2) + costs.conv_state_bytes(spec, 4)


def weight_bytes(spec: ArchSpec, precision: str) -> int:
    """The weights' bytes at `precision` (a `WEIGHT_PRECISION` value)."""
    if precision.startswith("gguf:"):
        from search_space.costs import llamacpp

        return sum(llamacpp.gguf_bytes_breakdown(spec, precision[5:]).values())
    return costs.weight_bytes(spec, precision)


def decode_bytes_per_token(spec: ArchSpec, precision: str, depth: int) -> int:
    """Bytes a decode step at context depth `depth` must read from memory at least: every
    layer's linear weights and the LM head at `precision` (a tied head is read as a matmul
    weight too), the norms and conv kernels, one embedding row, the K/V of `depth`
    tokens (fp32; f16 for llama.cpp) and the conv state. Activations are small and stay in cache."""
    if precision.startswith("gguf:"):
        return _gguf_decode_bytes(spec, precision[5:], depth)
    parts = costs.weight_bytes_breakdown(spec, precision)
    head = parts["head"] if parts["head"] else 4 * spec.vocab_size * spec.d_model  # tied fp32: the table is the head
    embedding_row = 4 * spec.d_model
    return parts["linears"] + head + parts["other"] + embedding_row + costs.kv_cache_bytes(spec, depth, 4) + costs.conv_state_bytes(spec, 4)


def arithmetic(spec: ArchSpec, prefill_lengths: tuple[int, ...], decode_depths: tuple[int, ...], precision: str = "fp32") -> dict:
    """FLOPs per prefill and per decode step, and bytes per decode step, of `spec`."""
    return {
        "parameters": costs.parameters(spec),
        "attention_layers": len(spec.attention_layers),
        "prefill_flops": {t: costs.prefill_flops(spec, t) for t in prefill_lengths},
        "decode_flops": {c: costs.decode_flops(spec, c) for c in decode_depths},
        "decode_bytes": {c: decode_bytes_per_token(spec, precision, c) for c in decode_depths},
        "kv_cache_bytes_fp32": {c: costs.kv_cache_bytes(spec, c, 4) for c in decode_depths},
        "weight_bytes": weight_bytes(spec, precision),
    }


def anchor_spec(space: str = "small") -> ArchSpec:
    """The space's anchor architecture (`SearchSpace.anchor_spec`), as a search measures beside every candidate."""
    from search_space import SearchSpace

    return SearchSpace.load(space).anchor_spec()


def sample_space(n: int, seed: int = 0, space: str = "small") -> list[ArchSpec]:
    """`n` distinct architectures drawn uniformly from a search space (Optuna's random
    sampler with `seed`, through the space's own trial encoding): the same list every time."""
    import optuna

    from search_space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space_obj = SearchSpace.load(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    specs: dict[str, ArchSpec] = {}
    for _ in range(100 * n):
        if len(specs) == n:
            break
        trial = study.ask()
        spec = space_obj.sample(trial)
        study.tell(trial, 0.0)
        specs.setdefault(spec.key, spec)
    return list(specs.values())


def by_size(specs: list[ArchSpec], count: int) -> list[ArchSpec]:
    """`count` of `specs` spread over their parameter counts: the smallest, the largest and
    evenly spaced ranks between (a few architectures that span the space)."""
    ordered = sorted(specs, key=costs.parameters)
    if count >= len(ordered):
        return ordered
    if count == 1:
        return [ordered[len(ordered) // 2]]
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


__all__ = ["QUICK_POINT", "QUICK_DECODE_TOKENS", "QUICK_BACKEND", "quick_models", "sample_space", "by_size", "QWEN3_0_6B_SHAPED", "LLAMA_3_2_1B_SHAPED", "MODELS", "PAIRS", "WEIGHT_PRECISION", "tiny_lfm2", "decode_bytes_per_token", "arithmetic"]
