"""The ONNX Runtime backend: `torch.onnx.export` (dynamo) graphs run by ONNX Runtime's CPU
provider, fp32 or int8 (`onnxruntime.quantization.quantize_dynamic`).

An artifact holds `step.onnx`, one graph for prefill (run in chunks) and decode, its
`weights.bin` and `weights_index.json`, and the token embedding table `embedding.bin`, which
the runner reads row by row (see `devices.backends.onnx_export`). Full-attention K/V caches
are buffers of `max_context` positions updated in place by ONNX Runtime's
GroupQueryAttention, which attends over the filled positions only, so decode cost follows
the context depth (`decode_cost_follows_context` in the manifest).

Importing this module imports ONNX Runtime (the runtime a measurement pays for) but not
torch: the exporter is imported when `export` or `reference_model` is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devices.backends.onnx_runner import OnnxRunner, share_threads
from lfm2.spec import ArchSpec

QUANTS = ("fp32", "int8")
#: The int8 check (devices.compile): the reference reproduces ONNX Runtime's int8 arithmetic
#: (its quantiser, its activation rounding), observed to 1.2e-7 (a 64-wide model) and 7e-7
#: (LFM2-350M at 2,048 tokens) of the largest logit. So the bound is on the largest logit
#: difference, 1e-3 of the largest logit: below the distance to fp32 (9e-3 and more), so it
#: sees damage smaller than quantisation noise, which a cosine bound cannot (a doubled
#: projection scale left the cosine at 0.9995).
VERIFY_TOLERANCES: dict[str, dict[str, float]] = {"int8": {"max_abs_diff_rel": 1e-3, "min_cosine": 0.999, "top1_agreement": 0.95}}


def export(spec: ArchSpec, quant: str, max_context: int, prompt_lengths: tuple[int, ...], out_dir: Path, seed: int) -> tuple[list[str], dict[str, Any]]:
    """Write the ONNX graphs and their shared weights into `out_dir`; returns the file
    names and the manifest facts (stage times, state layout, weights sharing)."""
    from devices.backends.onnx_export import export_onnx
    from devices.compile import Stages

    if quant not in QUANTS:
        raise ValueError(f"the onnx backend compiles {', '.join(QUANTS)}, not {quant!r}")
    return export_onnx(spec, quant, max_context, tuple(prompt_lengths), Path(out_dir), seed, Stages())


def reference_model(artifact, seed: int):
    """The eager model an int8 artifact must reproduce: the seeded weights quantised by ONNX
    Runtime's quantiser as `quantize_dynamic` does, the MatMul inputs quantised per call as
    `DynamicQuantizeLinear` does, the prefill in the runner's chunks (see
    `onnx_export.int8_reference_model`). Verification then tests the exporter and the
    runtime, not the quantiser."""
    from devices.backends.onnx_export import int8_reference_model
    from devices.backends.onnx_runner import PREFILL_CHUNK, EmbeddingRows

    facts = artifact.manifest.get("onnx", {})
    settings = facts.get("quantization") or {}
    chunk = int(facts.get("prefill_chunk", PREFILL_CHUNK))
    embedding = EmbeddingRows(artifact.file(facts["embedding"]["file"]), facts["embedding"])
    model = int8_reference_model(artifact.spec, seed, chunk, bool(settings.get("reduce_range", False)), artifact.file(facts["step"]), facts["state"], embedding)
    return model, "eager int8 (onnxruntime's quantiser, dynamic uint8 activations with the artifact's rounding where within one step, same chunks)"


RUNNER = OnnxRunner

__all__ = ["export", "reference_model", "OnnxRunner", "RUNNER", "QUANTS", "share_threads"]
