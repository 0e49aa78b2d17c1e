"""An estimate of a compiled model's memory footprint, before anything is compiled.

What is estimated: the *footprint* that the measurement reports, i.e. how far the peak
RSS of the measuring process rises above its baseline just before the model is loaded
(so not the ~355 MiB that `import executorch` costs, nor the ONNX Runtime library
itself), for an artifact compiled for contexts up to `context` and a prefill of
`prefill_tokens` tokens (default: `context`) followed by decode steps.

    total = weights + state + activation workspace + runtime overhead

Each runtime's parameters (`RuntimeMemoryModel`, in `RUNTIME_MODELS`) say how it holds
the model, and are the knobs that measured errors tune:

* `packed_copies`: resident copies of the linear weights in the form the kernels use.
  XNNPACK packs the weights of every *loaded method* into its own buffers, so a `.pte`
  with a prefill and a decode method holds two packed copies (FEASIBILITY.md);
  `loaded_methods` sets how many methods the measurement loads (default 2).
  ONNX Runtime pre-packs MatMul weights once per session; eager PyTorch uses the
  parameters as they are.
* `serialized_copy`: the fraction of the serialised weights (the program or model file
  data) that is still resident at the peak, next to the packed copies: the loader reads
  (or maps and touches) them while packing.
* the embedding table is held once, in fp32 for every quantised variant (see
  `counts.py`); a tied LM head is a separate packed linear in the compiled runtimes, and
  the table itself in eager PyTorch.
* `state_copies`: copies of the whole decode state alive at once: the runner's input
  buffers, the graph's outputs, and for ExecuTorch a planned output slot per method.
* the activation workspace is the largest working set of one layer in the prefill
  graph (including the attention scores over the static cache, which the portable
  attention computes against every slot), times `activation_factor` for the runtime's
  arena policy.
* `overhead_bytes`: what loading any model costs the runtime beyond the above.

`lower_bound_bytes` is a figure the footprint cannot be below whatever the parameters:
90% of the layers' linear weights in their most compact form (4 bits, 1 byte or 4 bytes
per weight, no scales), counted once. Every runtime must read each of these weights
into memory to compute a prefill; the 10% margin covers allocator reuse of memory freed
before the baseline. The search uses it to skip compiling a candidate that is certainly
over budget; `total_bytes` is the best guess, whose error the measurements report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lfm2.errors import UserError
from lfm2.spec import ArchSpec
from search_space.costs import counts

MIB = 1 << 20

#: Backends and the precisions each compiles (the same table as `devices.artifact.QUANTS`,
#: repeated here because `search_space` may not import `devices`).
BACKEND_QUANTS: dict[str, tuple[str, ...]] = {
    "executorch": ("fp32", "8da4w"),
    "onnx": ("fp32", "int8"),
    "eager": ("fp32",),
}


@dataclass(frozen=True)
class RuntimeMemoryModel:
    """How a runtime holds a model in RAM: the parameters of the estimate (module doc)."""

    linear_precision: str  # how linear weights are stored: fp32, int8 or 8da4w
    packed_copies: int  # per loaded method (ExecuTorch) or per session
    per_method: bool  # packed copies multiply with the loaded methods
    serialized_copy: float
    head_is_separate: bool  # a tied head is a packed linear of its own
    state_copies: float
    activation_factor: float
    overhead_bytes: int


RUNTIME_MODELS: dict[tuple[str, str], RuntimeMemoryModel] = {
    ("executorch", "fp32"): RuntimeMemoryModel("fp32", 1, True, 1.0, True, 3.0, 1.0, 16 * MIB),
    ("executorch", "8da4w"): RuntimeMemoryModel("8da4w", 1, True, 1.0, True, 3.0, 1.0, 16 * MIB),
    ("onnx", "fp32"): RuntimeMemoryModel("fp32", 1, False, 1.0, True, 2.0, 1.5, 150 * MIB),
    ("onnx", "int8"): RuntimeMemoryModel("int8", 1, False, 1.0, True, 2.0, 1.5, 150 * MIB),
    ("eager", "fp32"): RuntimeMemoryModel("fp32", 1, False, 0.0, False, 2.0, 1.0, 8 * MIB),
}

LOWER_BOUND_MARGIN = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of an estimated footprint, in bytes."""

    backend: str
    quant: str
    context: int
    prefill_tokens: int
    weights_bytes: int
    state_bytes: int
    activation_bytes: int
    runtime_overhead_bytes: int
    lower_bound_bytes: int
    assumptions: dict[str, Any] = field(default_factory=dict)
    #: the estimated footprint: the sum of the parts (a field, so that `asdict` carries it)
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        total = self.weights_bytes + self.state_bytes + self.activation_bytes + self.runtime_overhead_bytes
        object.__setattr__(self, "total_bytes", total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_backend_quant(backend: str, quant: str) -> None:
    if backend not in BACKEND_QUANTS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_QUANTS)}")
    if quant not in BACKEND_QUANTS[backend]:
        raise UserError(f"backend {backend!r} compiles {', '.join(BACKEND_QUANTS[backend])}, not {quant!r}")


def activation_workspace_bytes(spec: ArchSpec, tokens: int, max_context: int, bytes_per_element: int = 4) -> int:
    """The largest working set of one layer in a prefill of `tokens` tokens against a
    static cache of `max_context` slots: the residual stream plus the biggest of the
    SwiGLU (w1, w3 and their product), the conv operator (B, C, x and the gated input)
    and attention (q, k, v with their rotated copies, and the scores and probabilities
    over every cache slot; an swa layer scores its ring plus the new tokens)."""
    t, d, f = tokens, spec.d_model, spec.ffn_dim
    largest = max(3 * t * f, 4 * t * d)
    for op in set(spec.layers) - {"conv"}:
        keys = max_context if op == "attn" else spec.swa_window + t
        projections = 2 * t * (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim
        largest = max(largest, projections + 2 * spec.n_heads * t * keys)
    logits = spec.vocab_size  # the last position's logits only
    return bytes_per_element * (2 * t * d + largest + logits)


def estimate_peak_memory(
    spec: ArchSpec,
    context: int,
    backend: str,
    quant: str,
    *,
    prefill_tokens: int | None = None,
    loaded_methods: int = 2,
    group_size: int = 32,
) -> MemoryEstimate:
    """The estimated footprint of `spec` compiled for `backend`/`quant` with a context of
    `context` tokens (the module docstring says what is counted and assumed)."""
    check_backend_quant(backend, quant)
    if context < 1:
        raise UserError(f"context must be >= 1 token, got {context}")
    tokens = context if prefill_tokens is None else prefill_tokens
    if not 1 <= tokens <= context:
        raise UserError(f"prefill_tokens must be between 1 and the context ({context}), got {tokens}")
    model = RUNTIME_MODELS[(backend, quant)]

    stored = counts.weight_bytes_breakdown(spec, model.linear_precision, group_size)
    head = stored["head"]
    if spec.tie_embeddings and model.head_is_separate and model.linear_precision == "fp32":
        head = 4 * spec.vocab_size * spec.d_model  # the packed head is a copy of the table
    packed = stored["linears"] + head
    copies = model.packed_copies * (loaded_methods if model.per_method else 1)
    weights = copies * packed + model.serialized_copy * packed + stored["embedding"] + stored["other"]

    state = model.state_copies * counts.state_bytes(spec, context)
    activation = model.activation_factor * activation_workspace_bytes(spec, tokens, context)

    most_compact = {"fp32": 4.0, "int8": 1.0, "8da4w": 0.5}[model.linear_precision]
    layer_linears = counts.linear_macs_per_token(spec)  # = the layers' linear weight count
    lower = LOWER_BOUND_MARGIN * most_compact * layer_linears

    return MemoryEstimate(
        backend=backend,
        quant=quant,
        context=context,
        prefill_tokens=tokens,
        weights_bytes=int(weights),
        state_bytes=int(state),
        activation_bytes=int(activation),
        runtime_overhead_bytes=model.overhead_bytes,
        lower_bound_bytes=int(lower),
        assumptions={**asdict(model), "loaded_methods": loaded_methods, "group_size": group_size},
    )


__all__ = ["MemoryEstimate", "RuntimeMemoryModel", "RUNTIME_MODELS", "BACKEND_QUANTS", "estimate_peak_memory", "activation_workspace_bytes", "check_backend_quant"]
