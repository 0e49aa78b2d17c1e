"""The analytic cost model: what an architecture costs before anything is compiled.

`counts` holds the exact figures (parameters, FLOPs, weight bytes, KV and conv state),
`memory` the footprint estimate of a compiled model per runtime and precision.
"""

from __future__ import annotations

from typing import Any

from lfm2.backends import DEFAULT_BACKEND, DEFAULT_QUANT
from lfm2.spec import ArchSpec
from search_space.costs.counts import (
    PRECISIONS,
    conv_state_bytes,
    decode_flops,
    kv_cache_bytes,
    layer_parameters,
    linear_macs_per_token,
    linear_shapes,
    parameters,
    prefill_flops,
    state_bytes,
    weight_bytes,
    weight_bytes_breakdown,
)
from search_space.costs.memory import (
    BACKEND_QUANTS,
    RUNTIME_MODELS,
    MemoryEstimate,
    RuntimeMemoryModel,
    activation_workspace_bytes,
    estimate_peak_memory,
)


def describe(spec: ArchSpec, context: int, backend: str = DEFAULT_BACKEND, quant: str = DEFAULT_QUANT[DEFAULT_BACKEND]) -> dict[str, Any]:
    """Every figure of the cost model for `spec` at `context` tokens, as JSON-ready data."""
    estimate = estimate_peak_memory(spec, context, backend, quant)
    return {
        "parameters": parameters(spec),
        "layout": spec.layout,
        "attention_layers": len(spec.attention_layers),
        "context": context,
        "prefill_flops": prefill_flops(spec, context),
        "decode_flops": decode_flops(spec, context),
        "weight_bytes": {precision: weight_bytes(spec, precision) for precision in PRECISIONS},
        "kv_cache_bytes_fp32": kv_cache_bytes(spec, context, 4),
        "kv_cache_bytes_bf16": kv_cache_bytes(spec, context, 2),
        "conv_state_bytes_fp32": conv_state_bytes(spec, 4),
        "memory": estimate.to_dict(),
    }


__all__ = [
    "PRECISIONS",
    "BACKEND_QUANTS",
    "RUNTIME_MODELS",
    "MemoryEstimate",
    "RuntimeMemoryModel",
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
    "activation_workspace_bytes",
    "estimate_peak_memory",
    "describe",
]
