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
  XNNPACK packs the weights of every *loaded method* into its own buffers (FEASIBILITY.md),
  which is why the ExecuTorch program has one computing method (`forward`, prefill in
  chunks and decode through one graph): one packed copy. ONNX Runtime runs one session of
  one step graph, whose MatMul weights MLAS packs once; `loaded_methods` sets how many
  methods or sessions the measurement loads (default 2) where `per_method`. Eager PyTorch
  uses the parameters as they are.
* `serialized_copy`: the fraction of the serialised weights (the program or model file
  data) that is still resident at the peak, next to the packed copies: the loader reads
  (or maps and touches) them while packing.
* the embedding table is held once, at the precision `counts.py` gives it (fp32; a 4-bit
  table for ExecuTorch 8da4w; not resident in ONNX Runtime, whose runner reads a step's
  rows from the artifact's table file); a tied LM head is a separate packed linear in the
  compiled runtimes, and the table itself in eager PyTorch.
* `state_copies`: copies of the whole decode state (`counts.state_bytes` at `context`)
  alive at once: one in ExecuTorch's shared mutable buffers and in ONNX Runtime's in-place
  K/V buffers (`kv_bytes_per_element`: 2 for an fp16 cache); a step's input and output
  state in eager PyTorch.
* the activation workspace is the largest working set of one layer in the prefill graph
  (`activation_workspace_bytes`; `full_attention` says whether the runtime materialises
  full attention's scores over the static cache, over the prompt, or not at all;
  `prefill_chunk` bounds the rows of a prefill step), times `activation_factor` for the
  runtime's arena policy.
* `overhead_bytes`: what loading any model costs the runtime beyond the above, per loaded
  method or session where `per_method`.

`lower_bound_bytes` is a figure the footprint cannot be below whatever the parameters:
90% of the layers' linear weights and the LM head in their most compact form (4 bits,
1 byte or 4 bytes per weight, no scales), counted once. Every runtime must bring each of
these weights into memory to compute a prefill's logits (the embedding table is left
out: a memory-mapped lookup touches only the rows it reads); the 10% margin covers
allocator reuse of memory freed before the baseline. The search uses it to skip compiling a candidate that is certainly
over budget; `total_bytes` is the best guess, whose error the measurements report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lfm2.errors import UserError
from lfm2.spec import ArchSpec
from lfm2.backends import QUANTS, check_backend_quant
from search_space.costs import counts

MIB = 1 << 20

#: Backends and the precisions each compiles: the one table, `lfm2.backends` (devices compiles by it).
BACKEND_QUANTS = QUANTS


@dataclass(frozen=True)
class RuntimeMemoryModel:
    """How a runtime holds a model in RAM: the parameters of the estimate (module doc)."""

    linear_precision: str  # how linear weights are stored: fp32, int8 or 8da4w
    packed_copies: int  # resident packed copies of the linear weights, per method or session
    per_method: bool  # packed copies multiply with the loaded methods (ExecuTorch) / sessions (ORT)
    serialized_copy: float  # fraction of the stored linear weights resident next to the packed ones
    head_is_separate: bool  # a tied head is a packed linear of its own (not the embedding table)
    state_copies: float  # copies of the whole decode state alive at once
    full_attention: str  # how full attention's prefill scores are held: static, prefix or flash
    activation_factor: float  # the runtime's arena policy on top of the working set
    overhead_bytes: int  # per method/session when per_method, else once
    prefill_chunk: int = 0  # tokens per prefill step (0: the whole prompt in one step)
    embedding_resident: bool = True  # False: the runtime reads a step's rows from the table's file
    layer_buffer_factor: float = 0.0  # arena blocks kept per layer: this x one step's SwiGLU rows
    kv_bytes_per_element: int = 4  # the full-attention K/V cache's precision (2: fp16)


#: What the measuring process itself allocates after its baseline, next to the model: the
#: prompts and Python objects of the timing loops, and what the harness's allocations do to
#: the allocator (freed temporaries move the runtime's later buffers to the heap). Measured:
#: the harness's footprint of LFM2-350M int8 (ONNX, 256-token steps, prefill 2,048) was
#: 663 MiB, a bare runner's 639 MiB (24 MiB), when the calibration kernel's arrays (12 MiB)
#: were made after the baseline. Since 2026-12-02 the child makes them before its baseline
#: (`devices.measure_child`): LFM2-350M int8 (fp16 K/V, 128-token steps) measured 454.5 MiB
#: by the harness, 440.7 MiB bare (14 MiB). So 12 MiB now: the arrays no longer count, for
#: every backend (an ONNX int8 model of 31 MB measured 70.7 MiB against 87.9 estimated with
#: the old 24). The ExecuTorch and eager fits were made with the old harness, whose footprints
#: held the 12 MiB of arrays too, so their estimates move with their measurements. Counted
#: with the activations of every backend, since it appears after loading.
MEASUREMENT_BYTES = 12 * MIB


#: The runtimes as the devices backends build them (devices/backends/*.py):
#: * ExecuTorch: a `.pte` with one computing method, `forward(tokens [1, T <= 128], pos)`
#:   (a prefill is a loop of 128-token chunks, a decode step a chunk of one) and `reset`,
#:   sharing the state in mutable buffers (one copy, `max_context` slots); full attention
#:   through the KV-cache `custom_sdpa` op (flash-style: no score matrix); XNNPACK packs the
#:   weights once (one method). 8da4w, fitted on one measurement (LFM2-350M, context 2,064,
#:   prefill 2,048, decode at 2,048; BENCHMARKS.md, "ExecuTorch artifacts shaped like what
#:   ships"): footprint 367 MiB, RSS right after loading 335 MiB; the serialised weights are
#:   not resident at the peak (the program is memory-mapped and XNNPACK frees each weight's
#:   source after packing). Fitted (2026-12-01) on LFM2-350M and the three small-space
#:   models a default-backend search measured (footprints 52-71 MiB), within 4.8% each: what
#:   grows with the model beyond packed weights, int4 embedding and state is 16.5% of the
#:   packed linears (`serialized_copy`: program pages or packing scratch still resident), the
#:   constant is the measuring process's `MEASUREMENT_BYTES` and ~1 MiB. For LFM2-350M
#:   loading (`reset` zeroes the whole state) is 336 MiB estimated, 335 measured; running
#:   adds one chunk's working set and `MEASUREMENT_BYTES`: 32 / 33.
#:   The fp32 row keeps the serialised copy (not measured with this program).
#: * ONNX Runtime: one session of one step graph for prefill and decode; MLAS packs the
#:   MatMul weights once (the packed copy replaces the stored one); int8 stores a tied head
#:   as its own int8 tensor; the runner reads the embedding rows from the table's file (not
#:   resident); a prefill runs in steps of 128 tokens; full attention is ONNX Runtime's
#:   GroupQueryAttention over one K/V buffer of `context` positions updated in place (fp16
#:   for int8, fp32 for fp32; each buffer its own mapping, resident as far as written),
#:   whose scores are [heads, 128, context] (parameters below).
#: * eager PyTorch: the parameters as they are; the portable static cache of `max_context`
#:   slots, input and output state both alive, scores over every slot. Fitted on one
#:   model (29M parameters, d 512, 2 of 8 layers attention, prefill then one decode step):
#:   measured growth 159 / 272 / 494 MiB at contexts 256 / 1024 / 2048, estimated
#:   159 / 246 / 502 MiB (8 MiB of overhead and the measurement's 24 MiB).
#: The search records each trial's `memory_estimate_error`, which is what should keep tuning
#: these parameters across sizes.
#: ONNX Runtime's parameters: `devices.backends.onnx_runner.PREFILL_CHUNK` (repeated:
#: search_space may not import devices); the rest fitted (2026-12-01, BENCHMARKS.md "ONNX
#: Runtime int8: the K/V cache updated in place, the table out of the graph") to LFM2-350M
#: int8 at prefill 2,048 measured by the harness (footprint 488 and 517 MiB in two runs of
#: the same artifact; 457 MiB without the harness's calibration kernel) and a 4-layer model
#: of its width (d 1,024, vocab 65,536, 2 attention layers) by a bare runner; with the fp16
#: K/V cache (2026-12-02, fourth pass): 454.5 MiB measured, 466.0 estimated (+2.5%). Loading adds
#: the packed weights and ~19 MiB (LFM2-350M int8: +356 MiB for 338 MiB of packed weights).
#: Running adds one copy of the state (the K/V buffers, written in place), the largest
#: working set of one step (a step's scores against every position of the buffer) times
#: `ONNX_ACTIVATION_FACTOR`, a step's SwiGLU rows times `ONNX_LAYER_BUFFERS` per layer (the
#: arena keeps blocks across layers) and the measuring process's own `MEASUREMENT_BYTES`.
#: Refitted (2026-12-02, fifth pass) after the runner turned ONNX Runtime's memory pattern off
#: (`devices.backends.onnx_runner.MEMORY_PATTERN`: it kept a planned block per input shape
#: beside the arena's): factor 1.4 -> 0.9 and layer buffers 0.3 -> 0.22, solved from what
#: running adds in two harness measurements, weights and overhead unchanged. LFM2-350M int8,
#: prefill 2,048 + decode at 2,048 (BENCHMARKS.md, "ONNX int8 fifth pass"): load 356.2 /
#: run 76.2 / footprint 432.4 MiB (was 454.5 with the pattern), estimated 357.2 / 76.1 /
#: 433.4 (+0.2%); the test model of tests/test_space_costs.py (d 512, 8 layers, 2
#: of them attention, int8, prefill 1,000): load 42.8 / run 22.4 / 65.2 MiB (was 70.7), estimated
#: 48.3 / 22.5 / 70.9 (+8.7%: loading a model this small adds ~13 MiB, not 19).
#: Checked on fp32: the first small-space model of `python -m bench.memory_estimate` (ASSCACA,
#: 29.8M parameters) 152.6 MiB measured, 157.5 estimated (+3.2%), lower bound 107.3.
#: LFM2-350M int8 at prefill 8,192 (context 8,192): 557.8 MiB measured, 591.4 estimated (+6.0%).
#: Loading also has a transient of the largest weight (read while its packed copy is built:
#: the head, 64 MiB for LFM2-350M int8), below the running peak from a prompt of a few
#: hundred tokens on.
ONNX_PREFILL_CHUNK = 128
ONNX_ACTIVATION_FACTOR = 0.9
ONNX_LAYER_BUFFERS = 0.22
ONNX_OVERHEAD = 19 * MIB
#: An int8 artifact's full-attention K/V cache is fp16 (`devices.backends.onnx_export.KV_DTYPES`;
#: repeated: search_space may not import devices); fp32 artifacts keep an fp32 cache.
ONNX_INT8_KV_BYTES = 2
RUNTIME_MODELS: dict[tuple[str, str], RuntimeMemoryModel] = {
    ("executorch", "fp32"): RuntimeMemoryModel("fp32", 1, False, 1.0, True, 1.0, "flash", 1.0, 8 * MIB, prefill_chunk=128),
    ("executorch", "8da4w"): RuntimeMemoryModel("8da4w", 1, False, 0.165, True, 1.0, "flash", 1.0, 1 * MIB, prefill_chunk=128),
    ("onnx", "fp32"): RuntimeMemoryModel("fp32", 1, False, 0.0, True, 1.0, "static", ONNX_ACTIVATION_FACTOR, ONNX_OVERHEAD, ONNX_PREFILL_CHUNK, False, ONNX_LAYER_BUFFERS),
    ("onnx", "int8"): RuntimeMemoryModel("int8", 1, False, 0.0, True, 1.0, "static", ONNX_ACTIVATION_FACTOR, ONNX_OVERHEAD, ONNX_PREFILL_CHUNK, False, ONNX_LAYER_BUFFERS, ONNX_INT8_KV_BYTES),
    ("eager", "fp32"): RuntimeMemoryModel("fp32", 1, False, 0.0, False, 2.0, "static", 1.25, 8 * MIB),
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


def activation_workspace_bytes(
    spec: ArchSpec, tokens: int, max_context: int, full_attention: str = "static", bytes_per_element: int = 4, chunk: int = 0
) -> int:
    """The largest working set of one layer in a prefill of `tokens` tokens: the residual
    stream plus the biggest of the SwiGLU (w1, w3 and their product), the conv operator
    (B, C, x and the gated input) and attention (q, k, v with their rotated copies, plus
    scores and probabilities). Full attention scores `max_context` keys per query with a
    static cache ('static'), the prompt's own keys with a growing cache ('prefix'), and
    holds no score matrix in a flash-style kernel ('flash'); an swa layer always scores
    its ring of `swa_window` slots plus the new tokens. With `chunk` > 0 the prefill runs in
    steps of at most `chunk` tokens: every activation holds at most `chunk` rows, and the
    last step's queries score all `tokens` keys ('prefix')."""
    if full_attention not in ("static", "prefix", "flash"):
        raise ValueError(f"full_attention must be static, prefix or flash, got {full_attention!r}")
    t = min(tokens, chunk) if chunk > 0 else tokens
    d, f = spec.d_model, spec.ffn_dim
    largest = max(3 * t * f, 4 * t * d)
    for op in set(spec.layers) - {"conv"}:
        if op == "attn":
            keys = {"static": max_context, "prefix": tokens, "flash": 0}[full_attention]
        else:
            keys = spec.swa_window + t
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
    if backend == "llamacpp":
        return _estimate_llamacpp(spec, context, quant, tokens)
    model = RUNTIME_MODELS[(backend, quant)]

    stored = counts.weight_bytes_breakdown(spec, model.linear_precision, group_size)
    head = stored["head"]
    if spec.tie_embeddings and model.head_is_separate and model.linear_precision == "fp32":
        head = 4 * spec.vocab_size * spec.d_model  # the packed head is a copy of the table
    packed = stored["linears"] + head
    copies = model.packed_copies * (loaded_methods if model.per_method else 1)
    embedding = stored["embedding"] if model.embedding_resident else 0
    weights = copies * packed + model.serialized_copy * packed + embedding + stored["other"]

    # full-attention K/V at the cache's precision; conv windows and swa rings in fp32
    full_kv_per_element = 2 * spec.n_kv_heads * spec.head_dim * context * sum(op == "attn" for op in spec.layers)
    state = model.state_copies * (counts.state_bytes(spec, context) - (4 - model.kv_bytes_per_element) * full_kv_per_element)
    activation = model.activation_factor * activation_workspace_bytes(spec, tokens, context, model.full_attention, chunk=model.prefill_chunk)
    rows = min(tokens, model.prefill_chunk) if model.prefill_chunk else tokens
    activation += model.layer_buffer_factor * spec.n_layers * rows * spec.ffn_dim * 4
    activation += MEASUREMENT_BYTES

    most_compact = {"fp32": 4.0, "int8": 1.0, "8da4w": 0.5}[model.linear_precision]
    # the layers' linear weights (one per MAC of a token) and the LM head, which every
    # logits computation reads whole, tied or not
    read_by_every_prefill = counts.linear_macs_per_token(spec) + spec.vocab_size * spec.d_model
    lower = LOWER_BOUND_MARGIN * most_compact * read_by_every_prefill

    return MemoryEstimate(
        backend=backend,
        quant=quant,
        context=context,
        prefill_tokens=tokens,
        weights_bytes=int(weights),
        state_bytes=int(state),
        activation_bytes=int(activation),
        runtime_overhead_bytes=model.overhead_bytes * (loaded_methods if model.per_method else 1),
        lower_bound_bytes=int(lower),
        assumptions={**asdict(model), "loaded_methods": loaded_methods, "group_size": group_size},
    )


def _estimate_llamacpp(spec: ArchSpec, context: int, quant: str, tokens: int) -> MemoryEstimate:
    """llama.cpp holds a model its own way (a GGUF read into memory, q4_0 repacked in place,
    an f16 K/V cache): `search_space.costs.llamacpp` says how."""
    from search_space.costs import llamacpp

    parts = llamacpp.estimate(spec, context, quant, tokens)
    stored = llamacpp.gguf_bytes_breakdown(spec, quant)
    # every projection and the head are read by a prefill: at least their stored bytes
    lower = LOWER_BOUND_MARGIN * (stored["linears"] + (stored["head"] or stored["embedding"]))
    return MemoryEstimate(
        backend="llamacpp",
        quant=quant,
        context=context,
        prefill_tokens=tokens,
        weights_bytes=parts["weights"],
        state_bytes=parts["state"],
        activation_bytes=parts["activation"],
        runtime_overhead_bytes=parts["overhead"],
        lower_bound_bytes=int(lower),
        assumptions={
            "model": "search_space.costs.llamacpp",
            "file_bytes": parts["file"],
            "repacked_bytes": parts["repacked"],
            "kv_cache": "f16, context padded to 256",
            "n_ubatch": llamacpp.N_UBATCH,
            "compute_factor": llamacpp.COMPUTE_FACTOR,
        },
    )


__all__ = ["MemoryEstimate", "RuntimeMemoryModel", "RUNTIME_MODELS", "BACKEND_QUANTS", "estimate_peak_memory", "activation_workspace_bytes", "check_backend_quant"]
