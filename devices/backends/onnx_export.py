"""Export an `ArchSpec` to ONNX: ONE step graph for prefill and decode, weights in one file.

The graph is `model.step` (explicit state in, new state out), exported with
`torch.onnx.export(..., dynamo=True)`:

* `step.onnx`: `(embeds [1, T, d_model], pos [1], *state) -> (logits [1, V], *new_state)`,
  T dynamic (1..max_context); every state tensor has a fixed shape.
* `embedding.bin`: the token embedding table (`[V, d_model]`; uint8 with the scale and zero
  point ONNX Runtime's quantiser gives it for int8, float32 for fp32). The runner reads the
  rows of a step's tokens from the file (`onnx_runner.EmbeddingRows`) and feeds them to
  the graph. A Gather over a table that ONNX Runtime maps from the weights file made the
  whole table resident on a prompt of random tokens: each lookup faults in the kernel's
  fault-around window (64 KiB, 64 rows of LFM2-350M's table) around its row, so 2,048
  tokens touched nearly all of the 64 MiB.

A decode step is a step of one token. A prefill is a run of steps of at most
`prefill_chunk` tokens from the empty state (the runner's loop, as ExecuTorch's LLM runner
and llama.cpp's ubatch do): attention scores of one chunk against the keys so far, never
T x T, and every activation bounded by the chunk, so a long prompt costs memory that grows
only with its K/V cache. One graph in one session also means the weights are loaded and
pre-packed once for prefill and decode alike (two sessions each packed their own copy).

Full-attention layers run ONNX Runtime's `com.microsoft.GroupQueryAttention` over K/V
buffers of `max_context` positions (`[1, Hkv, max_context, D]`), which the runner binds as
the op's input and output so that it writes a step's new keys in place
(`devices.backends.onnx_gqa`): one copy of the cache, nothing copied per token (a growing,
concatenated cache held the old and the new cache during every step, and copied it whole
per decoded token). The op attends over the pos + T filled positions only, so decode cost
follows the context depth, as a deployed runtime's does (the portable static-buffer form
of `lfm2.model` scores every slot). Sliding-window layers keep their ring of `swa_window`
slots: bounded by construction.

The weights (after `quantize_dynamic` for int8) are written deduplicated by content into
`weights.bin`, page-aligned; the graph points into it.

int8: `reference_model` is the eager model at the same precision: the seeded weights
quantised by ONNX Runtime's own quantiser function (`quant_utils.quantize_data`, with the
settings `quantize_dynamic` uses), dequantised into the model, and every quantised
linear's input quantised per tensor to uint8 as `DynamicQuantizeLinear` does, taking the
artifact's own rounding of a value wherever it is within one step of the reference's
(`DynamicInt8Linear`, `RoundingOracle`: rounding is discontinuous, and float-level
differences upstream would otherwise grow through the layers into a gap the size of the
quantisation error); prefill in the runner's chunks. Verification then tests export and
runtime, not the quantiser.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from devices.backends.onnx_runner import PREFILL_CHUNK, EmbeddingRows
from lfm2.model import LFM2, Attention, AttentionCore, build_model
from lfm2.spec import ArchSpec

STEP = "step.onnx"
WEIGHTS = "weights.bin"
#: Where each graph's initializers lie in weights.bin (offset, length, dtype, shape): lets the
#: runner load the shared weights without parsing the graphs (or importing `onnx`).
WEIGHTS_INDEX = "weights_index.json"
#: Offsets in the weights file are multiples of this: page-aligned, so that a runtime may
#: map a tensor in place, and aligned for SIMD loads.
ALIGNMENT = 4096
#: ONNX Runtime's dynamic quantisation: the linear layers (MatMul, incl. the tied head) and
#: the embedding lookup (Gather). The depthwise conv (3 weights per channel) stays fp32.
INT8_OP_TYPES = ("MatMul",)
#: The token embedding table, read by the runner row by row (module doc).
EMBEDDING = "embedding.bin"
REDUCE_RANGE = False
#: The full-attention K/V cache's precision by artifact precision. int8 holds K and V in
#: fp16, as deployed runtimes do (llama.cpp's f16 cache, onnxruntime-genai's fp16 models):
#: half the cache (-24 MiB for LFM2-350M at 2,064); the int8 reference then rounds q, k, v
#: and the attention output to fp16 alike (`Fp16AttentionReference`), so verification keeps
#: int8's tight bound (LFM2-350M at 2,048: BENCHMARKS.md, "ONNX int8 fourth pass"). fp32
#: artifacts keep an fp32 cache: they are checked against the fp32 eager model.
KV_DTYPES = {"fp32": "float32", "int8": "float16"}


class SharedKVAttention(AttentionCore):
    """Full attention through ONNX Runtime's `GroupQueryAttention` over a cache buffer of
    `max_context` positions that the op updates in place (`devices.backends.onnx_gqa`):
    the T new tokens at positions pos..pos+T-1 attend over the pos + T filled positions.
    Sliding-window layers keep the ring buffer of `AttentionCore`. With an fp16 cache the
    op runs in fp16 (its inputs, cache and output; it computes in fp32 inside)."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, window: int | None, kv_dtype: torch.dtype = torch.float32):
        super().__init__(n_heads, n_kv_heads, head_dim, window)
        self.kv_dtype = kv_dtype

    def forward(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor):
        if self.window is not None:
            return super().forward(q, k, v, k_cache, v_cache, positions)
        from devices.backends.onnx_gqa import group_query_attention

        bsz, t = q.shape[:2]
        q, k, v = (x.reshape(bsz, t, -1).to(self.kv_dtype) for x in (q, k, v))
        out, k_cache, v_cache = group_query_attention(q, k, v, k_cache, v_cache, positions[:1], self.n_heads, self.n_kv_heads)
        return out.float(), k_cache, v_cache


class Fp16AttentionReference(AttentionCore):
    """The eager reference of `SharedKVAttention` with an fp16 cache: q, k and v rounded to
    fp16 (what the op and its cache hold), attention in fp32 (as the op computes inside),
    the output rounded to fp16 (the op's output type). Sliding-window layers unchanged."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor):
        if self.window is not None:
            return super().forward(q, k, v, k_cache, v_cache, positions)
        q, k, v = (x.half().float() for x in (q, k, v))
        out, k_cache, v_cache = super().forward(q, k, v, k_cache, v_cache, positions)
        return out.half().float(), k_cache, v_cache


def use_shared_cache(model: LFM2, kv_dtype: torch.dtype = torch.float32) -> LFM2:
    """Swap the core of every full-attention layer for `SharedKVAttention` (same weights:
    the core has none)."""
    for operator in full_attention_operators(model):
        core = operator.core
        operator.core = SharedKVAttention(core.n_heads, core.n_kv_heads, core.head_dim, core.window, kv_dtype)
    return model


def full_attention_operators(model: LFM2) -> list[Attention]:
    """The operators of `model`'s full-attention layers (whose cores the exports swap)."""
    found = []
    for block in model.blocks:
        if block.kind == "attn":
            operator = block.operator
            if not isinstance(operator, Attention):
                raise TypeError(f"an 'attn' layer holds a {type(operator).__name__}, not an lfm2.model.Attention")
            found.append(operator)
    return found


def state_layout(spec: ArchSpec, max_context: int, kv_dtype: str = "float32") -> list[dict[str, Any]]:
    """The flat decode state, in `step` order: name, layer, kind, shape and dtype. A
    full-attention layer's K and V are buffers of `max_context` positions updated in place
    (`kv_shared`, in `kv_dtype`); a sliding-window layer's a ring of `swa_window` slots
    (`kv_ring`); the rings and conv windows are float32."""
    layout: list[dict[str, Any]] = []
    for index, op in enumerate(spec.layers):
        if op == "conv":
            layout.append({"name": f"state_{len(layout)}", "layer": index, "kind": "conv", "shape": [1, spec.d_model, spec.conv_kernel - 1]})
        else:
            slots = max_context if op == "attn" else spec.swa_window
            kind = "kv_shared" if op == "attn" else "kv_ring"
            dtype = kv_dtype if op == "attn" else "float32"
            for part in ("k", "v"):
                layout.append({"name": f"state_{len(layout)}", "layer": index, "kind": f"{kind}_{part}", "shape": [1, spec.n_kv_heads, slots, spec.head_dim], "dtype": dtype})
    return layout


def empty_state(layout: list[dict[str, Any]]) -> list[Tensor]:
    """The state before the first token: zero conv windows, rings and cache buffers."""
    return [torch.zeros(entry["shape"], dtype=getattr(torch, entry.get("dtype", "float32"))) for entry in layout]


class EmbeddedInput(nn.Module):
    """Stands in for `model.embed_tokens` in the exported graph: the step takes the embedded rows
    (the runner looks them up), so the table is no graph initializer. A tied head keeps
    its own reference to the table's parameter."""

    def forward(self, embeds: Tensor) -> Tensor:
        return embeds


class StepGraph(nn.Module):
    def __init__(self, model: LFM2):
        super().__init__()
        self.model = model

    def forward(self, embeds: Tensor, pos: Tensor, *state: Tensor):
        return self.model.step(embeds, pos, *state)  # step reads T from dim 1, then embeds


def _example_lengths(spec: ArchSpec, upper: int, count: int, max_context: int = 0) -> list[int]:
    """`count` distinct example sizes for the dynamic axes. None may equal a static
    dimension of the graph, nor another example (torch.export would tie the two together,
    and it specialises 0 and 1), and they exceed the sliding window when they can: a ring
    layer's `min(T, window)` is traced for the side of the window the example lies on (past
    it, the graph keeps a `Min`)."""
    static = {1, spec.d_model, spec.n_kv_heads, spec.n_heads, spec.head_dim, spec.conv_kernel - 1, spec.swa_window, spec.vocab_size, spec.ffn_dim, max_context}
    start = spec.swa_window + 1 if 0 < spec.swa_window < upper - count else 5
    found: list[int] = []
    for candidate in [*range(start, upper + 1), *range(2, start)]:
        if candidate not in static:
            found.append(candidate)
            static.add(candidate)
            if len(found) == count:
                return found
    raise ValueError(f"no {count} usable example lengths up to {upper}; raise max_context")


def _export_graph(module: nn.Module, args: tuple, dynamic_shapes: tuple, input_names: list[str], output_names: list[str], path: Path) -> None:
    from devices.backends.onnx_gqa import translation_table

    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=input_names,
        output_names=output_names,
        optimize=True,
        verbose=False,
        custom_translation_table=translation_table(),
    )
    if program is None:  # only the legacy exporter (dynamo=False) returns none
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    program.save(str(path), external_data=True)


def export_fp32_graph(spec: ArchSpec, max_context: int, seed: int, out_dir: Path, stages, kv_dtype: str = "float32") -> dict[str, Any]:
    """Write step.onnx (with its own external data, fp32 weights; the K/V cache in
    `kv_dtype`) into out_dir."""
    if max_context < 4:
        raise ValueError(f"the ONNX backend needs max_context >= 4, got {max_context}")
    with stages("build"):
        model = use_shared_cache(build_model(spec, seed=seed).eval(), getattr(torch, kv_dtype))
    layout = state_layout(spec, max_context, kv_dtype)
    state_names = [entry["name"] for entry in layout]
    new_state_names = [f"new_{name}" for name in state_names]
    with torch.no_grad(), stages("export"):
        t, s = _example_lengths(spec, max_context - 1, 2, max_context)
        length = torch.export.Dim.DYNAMIC(min=1, max=max_context)
        table = model.embed_tokens.weight.detach().clone()
        model.add_module("embed_tokens", EmbeddedInput())  # in place of the nn.Embedding (LFM2 types the attribute as one)
        embeds = torch.randn(1, t, spec.d_model, generator=torch.Generator().manual_seed(seed))
        args = (embeds, torch.tensor([s], dtype=torch.long), *empty_state(layout))
        _export_graph(StepGraph(model).eval(), args, ({1: length}, None, tuple(None for _ in layout)), ["embeds", "pos", *state_names], ["logits", *new_state_names], out_dir / STEP)
    return {"state": layout, "table": table}


def write_embedding(table: Tensor, quant: str, out_dir: Path) -> dict[str, Any]:
    """Write the embedding table as `embedding.bin` (rows of d_model values); returns its
    manifest facts. int8: quantised by ONNX Runtime's quantiser as `quantize_dynamic`
    quantises a Gather's table (uint8, asymmetric, per tensor): what the int8 reference
    dequantises into its own table."""
    facts: dict[str, Any] = {"file": EMBEDDING, "shape": list(table.shape)}
    if quant == "int8":
        zero_point, scale, quantized = _ort_quantized(table, False)
        data = quantized.astype("uint8")
        facts.update(dtype="uint8", scale=float(scale), zero_point=int(zero_point))
    else:
        data = table.float().numpy()
        facts.update(dtype="float32")
    (out_dir / EMBEDDING).write_bytes(data.tobytes(order="C"))
    return facts


def quantize_int8(src_dir: Path, out_dir: Path, stages) -> dict[str, Any]:
    """ONNX Runtime dynamic quantisation (int8 weights, activations quantised per call) of
    the graph; returns the settings used."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "op_types": list(INT8_OP_TYPES), "per_channel": False, "reduce_range": REDUCE_RANGE}
    with stages("quantize"):
        for name in (STEP,):
            quantize_dynamic(
                src_dir / name,
                out_dir / name,
                op_types_to_quantize=list(INT8_OP_TYPES),
                weight_type=QuantType.QInt8,
                per_channel=False,
                reduce_range=REDUCE_RANGE,
                use_external_data_format=True,
            )
    return settings


def _tensors(graph: onnx.GraphProto, top: bool = True):
    """(tensor, is_top_level_initializer) for every TensorProto of a graph: initializers, and
    tensors inside node attributes (recursively through subgraphs)."""
    for tensor in graph.initializer:
        yield tensor, top
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t, False
            for tensor in attribute.tensors:
                yield tensor, False
            if attribute.HasField("g"):
                yield from _tensors(attribute.g, top=False)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph, top=False)


def share_weights(src_dir: Path, names: tuple[str, ...], out_dir: Path) -> dict[str, Any]:
    """Rewrite the graphs `names` from src_dir into out_dir so that all their external
    tensors live once, deduplicated by content, in out_dir/weights.bin."""
    offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    index: dict[str, dict[str, dict[str, Any]]] = {}
    referenced = 0
    with open(out_dir / WEIGHTS, "wb") as weights:
        for name in names:
            model = onnx.load(str(src_dir / name), load_external_data=False)
            entries = index.setdefault(name, {})
            for tensor, is_initializer in _tensors(model.graph):
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {entry.key: entry.value for entry in tensor.external_data}
                location = src_dir / info["location"]
                offset = int(info.get("offset", 0))
                with open(location, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read(int(info["length"])) if "length" in info else handle.read()
                digest = hashlib.sha256(data).hexdigest()
                referenced += len(data)
                if digest not in offsets:
                    position = weights.tell()
                    padding = -position % ALIGNMENT
                    weights.write(b"\0" * padding)
                    offsets[digest] = (position + padding, len(data))
                    weights.write(data)
                start, length = offsets[digest]
                if is_initializer:
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
                    entries[tensor.name] = {"offset": start, "length": length, "dtype": dtype, "shape": list(tensor.dims)}
                del tensor.external_data[:]
                for key, value in (("location", WEIGHTS), ("offset", str(start)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            onnx.save(model, str(out_dir / name))
    (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, sort_keys=True))
    stored = sum(length for _, length in offsets.values())
    return {"weights_file": WEIGHTS, "index_file": WEIGHTS_INDEX, "distinct_tensors": len(offsets), "stored_bytes": stored, "referenced_bytes": referenced}


def export_onnx(spec: ArchSpec, quant: str, max_context: int, prompt_lengths: tuple[int, ...], out_dir: Path, seed: int, stages) -> tuple[list[str], dict[str, Any]]:
    """Export, quantise if asked, and pack the weights; the backend's `export`."""
    import onnxruntime

    work = out_dir / ".onnx-export"  # inside the compile's temporary folder; removed below
    work.mkdir()
    try:
        fp32_dir = work / "fp32"
        fp32_dir.mkdir()
        graph_facts = export_fp32_graph(spec, max_context, seed, fp32_dir, stages, KV_DTYPES[quant])
        source = fp32_dir
        quantization = None
        if quant == "int8":
            source = work / "int8"
            source.mkdir()
            quantization = quantize_int8(fp32_dir, source, stages)
        with stages("pack_weights"):
            sharing = share_weights(source, (STEP,), out_dir)
            embedding = write_embedding(graph_facts["table"], quant, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in onnx.load(str(out_dir / STEP), load_external_data=False).opset_import}
    facts = {
        "stages_s": dict(stages.seconds),
        "methods": ["prefill", "decode"],
        "onnx": {
            "step": STEP,
            "weights": WEIGHTS,
            "weights_index": WEIGHTS_INDEX,
            "state": graph_facts["state"],
            "embedding": embedding,
            "prefill_chunk": PREFILL_CHUNK,
            "opsets": opsets,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "onnxruntime": onnxruntime.__version__,
            "quantization": quantization,
            "weights_sharing": sharing,
            "kv_dtype": KV_DTYPES[quant],
            "kv_cache": f"full attention: one {KV_DTYPES[quant]} buffer of max_context positions per K and V, updated in place by com.microsoft.GroupQueryAttention (the runner binds it as the op's input and output); sliding window: a ring of swa_window slots",
            "attention": f"one graph for prefill and decode; a prefill runs in steps of at most {PREFILL_CHUNK} tokens, so scores are [chunk, max_context] (only the filled keys computed), never [T, T]",
        },
        "weights_stored_once": True,
        "decode_cost_follows_context": True,
        "prefill_lengths": f"dynamic (one graph serves every length up to max_context, in chunks of {PREFILL_CHUNK})",
    }
    return [STEP, WEIGHTS, WEIGHTS_INDEX, EMBEDDING], facts


# -- the eager reference at the artifact's precision ---------------------------------------


def _dynamic_quantize_params(x: Tensor) -> tuple[Tensor, Tensor]:
    """ONNX's DynamicQuantizeLinear parameters of x: per-tensor uint8 over [min(0, x),
    max(0, x)]; the zero point rounded half to even (as `torch.round` does)."""
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255.0
    return scale, torch.clamp(torch.round(-low / scale), 0, 255)


class DynamicInt8Linear(nn.Module):
    """A linear layer as ONNX Runtime runs the quantised MatMul: the input quantised per call
    (`DynamicQuantizeLinear`), the weight the dequantised int8 tensor, the product exact.

    `decisions`, when set, holds ONNX Runtime's own quantised input for this call (uint8
    values, scale, zero point: see `RoundingOracle`). Per-tensor 8-bit rounding is
    discontinuous: a float-level difference upstream (another summation order in a norm
    or a conv) moves a value across a rounding boundary, that one-step change reaches every
    output of the row, and through the next layers' rounding it grows into a difference as
    large as the quantisation error itself (LFM2-350M: cosine 0.981 between two faithful
    implementations). So the reference takes ONNX Runtime's rounding where its own input
    rounds to within one step of it, and its own rounding elsewhere: a faithful artifact
    then agrees to float precision, while an artifact whose values are off by more than
    one step anywhere (a wrong scale, a wrong op) diverges as before."""

    def __init__(self, weight: Tensor, name: str = ""):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.name = name  # the graph's quantised input feeding this MatMul (set by the oracle)
        self.decisions: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None
        self.steps_followed = 0
        self.steps_own = 0

    def forward(self, x: Tensor) -> Tensor:
        scale, zero_point = _dynamic_quantize_params(x)
        if float(scale) == 0.0:
            return torch.nn.functional.linear(x, self.weight)
        decided = self.decisions.get(self.name) if self.decisions is not None else None
        if decided is not None and decided[0].shape == x.shape and torch.isclose(decided[1], scale, rtol=1e-3):
            # ONNX Runtime's grid (its scale and zero point may differ from ours by float
            # noise, its zero point then by one) and its values where ours are within a step
            theirs, scale, zero_point = decided
            own = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
            close = (x / scale + zero_point - theirs).abs() <= 1.0
            own = torch.where(close, theirs, own)
            self.steps_followed += int(close.sum())
            self.steps_own += int((~close).sum())
        else:
            own = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
            self.steps_own += own.numel() if decided is not None else 0
        return torch.nn.functional.linear((own - zero_point) * scale, self.weight)


def _ort_quantized(weight: Tensor, symmetric_int8: bool, reduce_range: bool = False):
    """`weight` quantised by ONNX Runtime's quantiser function as `quantize_dynamic` calls it
    (int8 symmetric per tensor for a MatMul weight; uint8 asymmetric for the Gather's table,
    which it quantises as an activation): (zero_point, scale, quantized) as numpy."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    qtype = TensorProto.INT8 if symmetric_int8 else TensorProto.UINT8
    return quantize_data(weight.detach().float().numpy(), qtype, symmetric_int8, reduce_range=reduce_range)


def _dequantized(zero_point, scale, quantized) -> Tensor:
    """(q - zero_point) * scale, in float32 as DequantizeLinear computes it."""
    return (torch.from_numpy(quantized.astype("int32")) - int(zero_point)).float() * torch.tensor(float(scale))


class RoundingOracle:
    """Runs the artifact's step graph in its own ONNX Runtime session, with the quantised
    input of every quantised MatMul (`DynamicQuantizeLinear`'s uint8 output, scale and zero
    point) as extra outputs, and maps each to the eager linear whose int8 weight that MatMul
    holds (found by content: the seeded weight through ONNX Runtime's quantiser)."""

    def __init__(self, step_path: Path, layout: list[dict[str, Any]], weights_by_content: dict[bytes, nn.Module], embedding: EmbeddingRows):
        import onnxruntime as ort
        from onnx import numpy_helper

        graph = onnx.load(str(step_path))
        producers = {out: node for node in graph.graph.node for out in node.output}
        initializers = {t.name: t for t in graph.graph.initializer}
        self.inputs: dict[str, tuple[str, str, str]] = {}
        for node in graph.graph.node:
            if node.op_type != "MatMulInteger" or node.input[1] not in initializers:
                continue
            module = weights_by_content.get(numpy_helper.to_array(initializers[node.input[1]]).tobytes())
            quantize = producers.get(node.input[0])
            if module is None or quantize is None or quantize.op_type != "DynamicQuantizeLinear":
                continue  # not a weight of the seeded model: that linear keeps its own rounding
            module.name = node.input[0]
            self.inputs[node.input[0]] = tuple(quantize.output[:3])
        types = {0: onnx.TensorProto.UINT8, 1: onnx.TensorProto.FLOAT, 2: onnx.TensorProto.UINT8}
        for outputs in self.inputs.values():
            for i, name in enumerate(outputs):
                graph.graph.output.append(onnx.helper.make_tensor_value_info(name, types[i], None))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
        self.layout = layout
        self.embedding = embedding  # the runner's lookup: the graph takes embedded rows
        self.state_names = [entry["name"] for entry in layout]
        self.n_outputs = 1 + len(layout)
        self.extra = [name for outputs in self.inputs.values() for name in outputs]

    def run(self, tokens: Tensor, pos: Tensor, state: list) -> tuple[dict[str, tuple[Tensor, ...]], list]:
        feeds = {"embeds": self.embedding(tokens.numpy()), "pos": pos.numpy()}
        feeds.update(zip(self.state_names, state))
        names = [o.name for o in self.session.get_outputs()[: self.n_outputs]] + self.extra
        values = self.session.run(names, feeds)
        found = dict(zip(self.extra, values[self.n_outputs :]))
        decisions = {key: tuple(torch.from_numpy(found[name].astype("float32")) for name in outputs) for key, outputs in self.inputs.items()}
        return decisions, list(values[1 : self.n_outputs])


class ChunkedPrefill(nn.Module):
    """`model.step` in steps of at most `chunk` tokens: the runner's prefill loop, eagerly
    (per-tensor activation scales are per step, so the reference must step alike). With an
    oracle, every step first runs the artifact's graph to learn its rounding decisions."""

    def __init__(self, model: LFM2, chunk: int, oracle: RoundingOracle | None = None):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.spec = model.spec
        self.oracle = oracle
        self._oracle_state: list | None = None
        self._next_pos = 0

    def init_state(self, *args, **kwargs):
        self._oracle_state = None
        return self.model.init_state(*args, **kwargs)

    def _linears(self):
        return [m for m in self.model.modules() if isinstance(m, DynamicInt8Linear)]

    def step(self, tokens: Tensor, pos: Tensor, *state: Tensor):
        for start in range(0, tokens.shape[1], self.chunk):
            piece, at = tokens[:, start : start + self.chunk], pos + start
            if self.oracle is not None:
                if self._oracle_state is None or int(at) != self._next_pos:
                    self._oracle_state = [z.numpy() for z in empty_state(self.oracle.layout)] if int(at) == 0 else None
                if self._oracle_state is not None:
                    decisions, self._oracle_state = self.oracle.run(piece, at, self._oracle_state)
                    self._next_pos = int(at) + piece.shape[1]
                    for linear in self._linears():
                        linear.decisions = decisions
            logits, *state = self.model.step(piece, at, *state)
            for linear in self._linears():
                linear.decisions = None
        return (logits, *state)

    def rounding_followed(self) -> dict[str, int]:
        linears = self._linears()
        return {"followed": sum(m.steps_followed for m in linears), "own": sum(m.steps_own for m in linears)}


def int8_reference_model(spec: ArchSpec, seed: int, chunk: int, reduce_range: bool = False, step_path: Path | None = None, layout=None, embedding: EmbeddingRows | None = None) -> nn.Module:
    """The eager model that an int8 artifact must reproduce (module doc); with `step_path`
    (and the artifact's `embedding` reader), it takes the artifact's rounding decisions
    where they are within one step of its own (see `DynamicInt8Linear`)."""
    if step_path is not None and embedding is None:
        raise ValueError("int8_reference_model: step_path needs the artifact's embedding reader too (embedding=)")
    model = build_model(spec, seed=seed).eval()
    by_content: dict[bytes, nn.Module] = {}
    with torch.no_grad():
        table = model.embed_tokens.weight
        # The graph's MatMul holds W^T: quantised per tensor, the same scale as W's.
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    zero_point, scale, quantized = _ort_quantized(child.weight.T, True, reduce_range)
                    linear = DynamicInt8Linear(_dequantized(zero_point, scale, quantized).T.contiguous())
                    by_content[quantized.tobytes()] = linear
                    setattr(parent, name, linear)
        model.embed_tokens.weight = nn.Parameter(_dequantized(*_ort_quantized(table, False)), requires_grad=False)  # unties a tied head
    if layout is not None and any(entry.get("dtype") == "float16" for entry in layout if entry["kind"].startswith("kv_shared")):
        for operator in full_attention_operators(model):
            core = operator.core
            operator.core = Fp16AttentionReference(core.n_heads, core.n_kv_heads, core.head_dim, core.window)
    oracle = RoundingOracle(step_path, layout, by_content, embedding) if step_path is not None and embedding is not None else None
    return ChunkedPrefill(model, chunk, oracle).eval()


__all__ = [
    "SharedKVAttention",
    "Fp16AttentionReference",
    "KV_DTYPES",
    "use_shared_cache",
    "state_layout",
    "empty_state",
    "export_onnx",
    "share_weights",
    "int8_reference_model",
    "RoundingOracle",
    "write_embedding",
    "STEP",
    "WEIGHTS",
    "WEIGHTS_INDEX",
    "EMBEDDING",
]
