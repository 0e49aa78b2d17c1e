"""The ExecuTorch backend: one `.pte` lowered to XNNPACK, run by ExecuTorch's Python runtime.

Methods of `model.pte`:

* `forward`: tokens int64 [1, T] (1 <= T <= `PREFILL_CHUNK`, a dynamic dimension), pos int64
  [1] -> logits [1, vocab] of the last token, continuing the state. A prefill of any length
  is a loop of chunks through it from position 0 (the runner does it; the tail is a shorter
  chunk) and a decode step is a chunk of one token, as ExecuTorch's own LLM export and
  llama.cpp's ubatches do. One graph, so the weights are packed once in RAM (each loaded
  method holds its own XNNPACK-packed copy, and the Python runtime cannot switch the XNNPACK
  weight cache on) and nothing is lowered per prompt length.
* `reset`: zeroes the state (takes a dummy token); no weights.

The decode state (conv windows, K/V) lives in mutable buffers shared by both methods
(`share_mutable_buffers=True`). Full-attention layers use ExecuTorch's `llama::update_cache`
/ `llama::custom_sdpa` ops, which read only the filled part of the cache: decode cost follows
the context depth, not `max_context` (see `executorch_model.py`).

Quantisation `8da4w`: torchao's `Int8DynamicActivationIntxWeightConfig` (int8 dynamic
per-token activations, int4 symmetric weights in groups of 32) applied to every linear
layer as a source transform before `torch.export`, as ExecuTorch's LLM export does; XNNPACK
takes the resulting pattern as its dynamically quantised 4-bit GEMM. The embedding is the
same int4 table as the (tied) head, stored apart in ExecuTorch's packed 4-bit layout and read
by `quantized_decomposed::embedding_4bit` (only the looked-up rows are dequantised): the
XNNPACK head packs its own copy at load, so the tied matrix is in RAM twice at 4 bits.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from devices.artifact import Artifact
from devices.runner import Runner
from lfm2.spec import ArchSpec

PROGRAM = "model.pte"
GROUP_SIZE = 32
#: Tokens per prefill chunk: the upper bound of `forward`'s dynamic token dimension. It sizes
#: the activation plan (a chunk's activations, not a whole prompt's); 128 as ExecuTorch's LLM
#: export uses for LFM2.
PREFILL_CHUNK = 128
#: Nodes that are graph plumbing, not operators that run outside XNNPACK.
_PLUMBING = {"getitem", "executorch_call_delegate"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The toolchain warns on every export (deprecations, experimental APIs): not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _load_toolchain() -> None:
    """Import what export needs: the runtime's kernels and the torch definition of
    `quantized_decomposed::embedding_4bit` (which pulls in `executorch.exir`)."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401

    import_runtime()


def import_runtime() -> None:
    """Import what running a program needs, and only that (the measurement takes its memory
    baseline after this): the `llama::` custom ops (their torch and ExecuTorch kernel
    registrations live in one shared library), the quantized kernels
    (`quantized_decomposed::embedding_4bit`) and the Python runtime."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    import executorch.runtime  # noqa: F401
    from executorch.extension.pybindings import portable_lib  # noqa: F401


def quantize_8da4w(model) -> dict[str, Any]:
    """Quantise `model` in place for 8da4w: every nn.Linear (the head included) to int8 dynamic
    activations and int4 weights in groups of 32 (per output channel where in_features is not
    a multiple of 32); the embedding to the same int4 table as the head when they are tied
    (else its own, quantised the same way). The embedding's fp32 weight is replaced by its
    dequantised values, so eager runs what the 4-bit table gives; `embedding_table(model)`
    returns that table for export."""
    import torch
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    int4 = torch.int4  # type: ignore[attr-defined]  # torch's type stubs leave out the int4 dtype it has (torch >= 2.6)

    def linear(divisible: bool):
        return lambda module, _fqn: isinstance(module, nn.Linear) and (module.in_features % GROUP_SIZE == 0) == divisible

    def granularity(in_features: int):
        return PerGroup(GROUP_SIZE) if in_features % GROUP_SIZE == 0 else PerAxis(0)

    tied = model.lm_head.weight is model.embed_tokens.weight
    grouped = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE == 0)
    per_channel = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE != 0)
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerGroup(GROUP_SIZE)), filter_fn=linear(True))
    if per_channel:
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerAxis(0)), filter_fn=linear(False))
    _round_scales_to_bf16(model)
    vocab, width = model.embed_tokens.weight.shape
    if tied:
        table = model.lm_head.weight
    else:
        holder = nn.Sequential(nn.Linear(width, vocab, bias=False))
        holder[0].weight = nn.Parameter(model.embed_tokens.weight.detach().clone(), requires_grad=False)
        quantize_(holder, IntxWeightOnlyConfig(weight_dtype=int4, granularity=granularity(width)))
        table = holder[0].weight
        _round_scales_to_bf16(holder)
    qdata, scale, zero_point = table.qdata.detach(), table.scale.detach().float(), table.zero_point
    if zero_point is not None and bool((zero_point != 0).any()):
        raise ValueError("the int4 embedding table must be symmetric (zero points 0)")
    qdata, scale = qdata.reshape(vocab, width), scale.reshape(vocab, -1)
    dequantised = (qdata.float().reshape(vocab, scale.shape[1], -1) * scale[:, :, None]).reshape(vocab, width)
    model.embed_tokens.weight = nn.Parameter(dequantised, requires_grad=False)
    model.embedding_int4 = (qdata, scale)  # for export: the packed table
    return {
        "scheme": "8da4w",
        "method": "torchao Int8DynamicActivationIntxWeightConfig(weight_dtype=int4) via quantize_, before torch.export",
        "activations": "int8 dynamic, per token, asymmetric",
        "weights": f"int4 symmetric, groups of {GROUP_SIZE} (per output channel where in_features % {GROUP_SIZE} != 0); scales rounded to bf16 (XNNPACK's)",
        "linear_layers_grouped": grouped,
        "linear_layers_per_channel": per_channel,
        "embedding": "int4 symmetric, " + ("the head's table (tied)" if tied else "its own table") + f", {scale.shape[1]} scale(s) a row; "
        "quantized_decomposed::embedding_4bit (packed two values a byte)",
        "lm_head": "8da4w (XNNPACK packs its own copy at load)",
    }


def _round_scales_to_bf16(model) -> None:
    """XNNPACK's 4-bit GEMM keeps the group scales in bf16: round them to bf16 values here, so
    that the program computes exactly what the quantised eager model does (a linear then
    agrees to ~3e-7 relative; with fp32 scales it differed by ~2e-3, which 16 layers of random
    weights amplify to a logit cosine of 0.989 at 2,048 tokens)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            scale = getattr(getattr(module, "weight", None), "scale", None) if isinstance(module, nn.Linear) else None
            if scale is not None:
                scale.copy_(scale.to(torch.bfloat16).to(scale.dtype))


def embedding_table(model):
    """The 4-bit embedding module of a model that `quantize_8da4w` quantised, else None."""
    from devices.backends.executorch_model import QuantizedEmbedding

    table = getattr(model, "embedding_int4", None)
    return None if table is None else QuantizedEmbedding(*table)


def reference_model(artifact: Artifact, seed: int):
    """The eager model an 8da4w artifact must reproduce: the same seeded model quantised by
    the same `quantize_8da4w` (torchao's int8-dynamic/int4-weight linears, run eagerly), so
    verification checks export, lowering and the XNNPACK kernels, not the quantiser."""
    from lfm2.model import build_model

    model = build_model(artifact.spec, seed=seed).eval()
    if artifact.quant == "8da4w":
        quantize_8da4w(model)
    return model, f"eager {artifact.quant} (torchao, same quantisation)"


def _graph_facts(edge, methods: list[str]) -> dict[str, Any]:
    partitions: dict[str, int] = {}
    outside: dict[str, dict[str, int]] = {}
    for name in methods:
        counts: Counter[str] = Counter()
        delegates = 0
        for node in edge.exported_program(name).graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            op = getattr(node.target, "__name__", str(node.target))
            if op == "executorch_call_delegate":
                delegates += 1
            elif op not in _PLUMBING:
                counts[op] += 1
        partitions[name] = delegates
        outside[name] = dict(sorted(counts.items()))
    return {
        "partitions": partitions,
        "not_delegated_ops": sorted({op for counts in outside.values() for op in counts}),
        "not_delegated_by_method": outside,
    }


def export(spec: ArchSpec, quant: str, max_context: int, prompt_lengths: tuple[int, ...], out_dir: Path, seed: int) -> tuple[list[str], dict[str, Any]]:
    from devices.compile import Stages

    stages = Stages()
    with _quiet():
        with stages("import"):
            import torch
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
            from executorch.exir.passes import MemoryPlanningPass

            from devices.backends.executorch_model import ExecuTorchLFM2, state_buffer_bytes
            from lfm2.model import build_model, count_parameters

            _load_toolchain()
        with stages("build"):
            model = build_model(spec, seed=seed).eval()
            parameters = count_parameters(model)
        facts: dict[str, Any] = {}
        if quant == "8da4w":
            with stages("quantise"):
                facts["quantization"] = quantize_8da4w(model)
        chunk = min(PREFILL_CHUNK, max_context)
        methods = ["forward", "reset"]
        with stages("export"), torch.no_grad():
            embedding = embedding_table(model)
            example = min(chunk, 2)  # not 1: an example of size 1 would specialise the dimension
            tokens = torch.export.Dim.DYNAMIC(min=1, max=chunk) if chunk > 1 else None
            programs = {
                "forward": torch.export.export(
                    ExecuTorchLFM2(model, max_context, "forward", embedding),
                    (torch.zeros(1, example, dtype=torch.long), torch.tensor([0])),
                    dynamic_shapes=({1: tokens}, None) if tokens is not None else None,
                    strict=False,
                ),
                "reset": torch.export.export(ExecuTorchLFM2(model, max_context, "reset"), (torch.zeros(1, 1, dtype=torch.long),), strict=False),
            }
        with stages("lower"):
            # Custom `llama::` ops are not core ATen: the IR validity check must be off.
            # `reset` only fills buffers with zeros: left to the portable kernels, it costs no
            # XNNPACK partition (lowering time grows with the number of partitions).
            partitioners = {name: ([] if name == "reset" else [XnnpackPartitioner()]) for name in methods}
            edge = to_edge_transform_and_lower(programs, partitioner=partitioners, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        facts.update(_graph_facts(edge, methods))
        with stages("serialize"):
            program = edge.to_executorch(
                ExecutorchBackendConfig(
                    extract_delegate_segments=True,
                    # One set of state buffers for all methods: prefill hands its state to decode.
                    memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
                )
            )
            (out_dir / PROGRAM).write_bytes(program.buffer)
    facts.update(
        {
            "stages_s": stages.seconds,
            "methods": methods,
            "prefill_chunk": chunk,
            # Any prompt up to max_context runs (in chunks); `prompt_lengths` are those asked for
            # at compile time, and verification runs the shortest of them.
            "dynamic_prompt_lengths": True,
            "parameters": parameters,
            "delegate": "XnnpackPartitioner (XNNPACK)",
            "state": "mutable buffers shared by forward and reset (share_mutable_buffers); a prefill resets, then runs its chunks from position 0",
            "state_bytes": state_buffer_bytes(model, max_context),
            "attention": "full attention: llama::update_cache + llama::custom_sdpa over [0, pos]; sliding window: ring buffer, bmm + additive mask",
            "decode_cost_follows_context": True,
            "weights_stored_once": True,
            "packed_weight_copies": 1,
            "weights_in_ram": "one XNNPACK-packed copy: a single method (`forward`) computes; `reset` holds no weights",
        }
    )
    return [PROGRAM], facts


class ExecuTorchRunner(Runner):
    """Loads `model.pte` with `executorch.runtime.Runtime`. `methods`: which methods to load
    now (default: all); any other is loaded on first use. Each loaded method holds its own
    packed weights, so a memory measurement should load only what it runs."""

    def __init__(self, artifact: Artifact, threads: int | None = None, methods: list[str] | None = None):
        super().__init__(artifact, threads)
        with _quiet():
            import_runtime()
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

            self._portable_lib = portable_lib
            if threads:
                portable_lib._unsafe_reset_threadpool(int(threads))
            start = time.perf_counter()
            self.program = Runtime.get().load_program(str(artifact.file(PROGRAM)))
            self._methods: dict[str, Any] = {}
            for name in methods if methods is not None else artifact.manifest.get("methods", sorted(self.program.method_names)):
                self._method(name)
            self.load_s = time.perf_counter() - start
        self.reset()

    def _method(self, name: str):
        if name not in self._methods:
            if name not in self.program.method_names:
                raise ValueError(f"{self.artifact.path / PROGRAM} has no method {name!r}; it has {sorted(self.program.method_names)}")
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def _run(self, name: str, inputs: list) -> np.ndarray:
        import torch

        outputs = self._method(name).execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)) for x in inputs])
        return outputs[0].numpy()

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        """From an empty state: the prompt in chunks of `prefill_chunk` tokens (the last one
        shorter) through `forward`; any length up to max_context."""
        length = int(tokens.shape[1])
        if not 1 <= length <= self.artifact.max_context:
            raise ValueError(f"a prompt of {length} tokens does not fit this artifact's max_context={self.artifact.max_context}")
        self.reset()
        chunk = int(self.artifact.manifest["prefill_chunk"])
        for start in range(0, length, chunk):
            logits = self._run("forward", [tokens[:, start : start + chunk], np.array([start], dtype=np.int64)])
        return logits

    def decode(self, token: np.ndarray, pos: int) -> np.ndarray:
        if not 0 <= pos < self.artifact.max_context:
            raise ValueError(f"decode position {pos} is outside [0, max_context={self.artifact.max_context})")
        return self._run("forward", [token, np.array([pos], dtype=np.int64)])

    def reset(self) -> None:
        if "reset" not in self.artifact.manifest.get("methods", ["reset"]):
            return  # a program without `reset` (ExecuTorch's own LLM export, bench.experiments.executorch_recipe): a prefill from 0 overwrites what it attends to
        self._run("reset", [np.zeros((1, 1), dtype=np.int64)])

    def stack(self) -> dict:
        from importlib import metadata

        return {
            "backend": "executorch",
            "runtime": f"executorch {metadata.version('executorch')} (Python runtime, executorch.runtime)",
            "delegate": "XNNPACK",
            "quant": self.artifact.quant,
            "threads": int(self._portable_lib._threadpool_get_thread_count()),
            "methods_loaded": sorted(self._methods),
            "custom_ops": ["llama::update_cache", "llama::custom_sdpa"],
        }


RUNNER = ExecuTorchRunner

__all__ = ["ExecuTorchRunner", "RUNNER", "export", "import_runtime", "quantize_8da4w", "embedding_table", "reference_model", "PROGRAM", "PREFILL_CHUNK"]
