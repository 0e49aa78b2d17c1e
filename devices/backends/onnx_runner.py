"""Run an ONNX artifact with ONNX Runtime on the CPU: one session per graph, weights shared.

This module imports only numpy and onnxruntime (never torch or onnx): a measurement of an
ONNX artifact pays for the runtime a device would carry, not for the exporter.

The weights: `weights.bin` is read once into memory; every distinct tensor becomes one
`OrtValue` handed to both sessions through `SessionOptions.add_initializer` (ONNX
Runtime then uses that buffer instead of reading the model's external data), so prefill
and decode share the stored weights. What each session derives from them (MLAS's
pre-packed GEMM weights) is per session, as it would be on a device; the measured
footprint includes it.

The state lives in the runner as `OrtValue`s and goes from one step's outputs to the
next step's inputs without a copy through numpy. Full-attention caches grow by one
position per decoded token; a decode at position `pos` needs a cache of exactly `pos`
positions, so after `reset()` (or a jump) the cache is cut or zero-padded to `pos`, which
is what a static buffer holds at that point (the measurement primes the state outside the
timed tokens, see `devices.measure`).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort

from devices.artifact import Artifact, ArtifactError
from devices.runner import Runner

PROVIDER = "CPUExecutionProvider"


class OnnxRunner(Runner):
    def __init__(self, artifact: Artifact, threads: int | None = None):
        super().__init__(artifact, threads)
        facts = artifact.manifest.get("onnx")
        if not isinstance(facts, dict) or "state" not in facts:
            raise ArtifactError(f"{artifact.path} is not an ONNX artifact made by this version (its manifest has no 'onnx' facts); compile it again")
        self.layout = facts["state"]
        self.state_names = [entry["name"] for entry in self.layout]
        index = json.loads(artifact.file(facts["weights_index"]).read_text())
        # One read of the weights file into anonymous memory: what a runtime that loads its
        # weights (rather than mapping them) holds. Views into it back the OrtValues.
        self._weights = np.fromfile(artifact.file(facts["weights"]), dtype=np.uint8)
        self._shared: dict[tuple, ort.OrtValue] = {}  # (offset, length, dtype, shape) -> value
        self.sessions = {graph: self._session(artifact.file(facts[graph]), index[facts[graph]]) for graph in ("prefill", "decode")}
        self.output_names = {graph: [o.name for o in session.get_outputs()] for graph, session in self.sessions.items()}
        self.state: list[ort.OrtValue] = []
        self.reset()

    # -- loading ------------------------------------------------------------------------

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or 0  # 0: ONNX Runtime's default (physical cores)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return options

    def _session(self, path, initializers: dict[str, dict]) -> ort.InferenceSession:
        options = self._options()
        for name, entry in initializers.items():
            key = (entry["offset"], entry["length"], entry["dtype"], tuple(entry["shape"]))
            value = self._shared.get(key)
            if value is None:
                raw = self._weights[entry["offset"] : entry["offset"] + entry["length"]]
                array = raw.view(np.dtype(entry["dtype"])).reshape(entry["shape"])
                value = self._shared[key] = ort.OrtValue.ortvalue_from_numpy(array)
            options.add_initializer(name, value)
        return ort.InferenceSession(str(path), sess_options=options, providers=[PROVIDER])

    # -- running ------------------------------------------------------------------------

    def _empty(self, entry: dict, length: int = 0) -> ort.OrtValue:
        shape = [length if n < 0 else n for n in entry["shape"]]
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=np.float32))

    def reset(self) -> None:
        self.state = [self._empty(entry) for entry in self.layout]

    def _check_positions(self, pos: int, count: int) -> None:
        if pos < 0 or pos + count > self.artifact.max_context:
            raise ValueError(f"positions {pos}..{pos + count - 1} exceed max_context={self.artifact.max_context}")

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self._check_positions(0, tokens.shape[1])
        outputs = self.sessions["prefill"].run_with_ort_values(self.output_names["prefill"], {"tokens": ort.OrtValue.ortvalue_from_numpy(tokens)})
        self.state = list(outputs[1:])
        return outputs[0].numpy()

    def _cache_at(self, pos: int) -> None:
        """Make every growing cache hold exactly `pos` positions (cut, or zero-padded)."""
        for i, entry in enumerate(self.layout):
            if not entry["kind"].startswith("kv_growing"):
                continue
            length = self.state[i].shape()[2]
            if length == pos:
                continue
            if length == 0:
                self.state[i] = self._empty(entry, pos)
                continue
            cache = self.state[i].numpy()
            if length > pos:
                cache = np.ascontiguousarray(cache[:, :, :pos])
            else:
                pad = np.zeros((cache.shape[0], cache.shape[1], pos - length, cache.shape[3]), dtype=cache.dtype)
                cache = np.concatenate((cache, pad), axis=2)
            self.state[i] = ort.OrtValue.ortvalue_from_numpy(cache)

    def decode(self, token: np.ndarray, pos: int) -> np.ndarray:
        token = np.ascontiguousarray(token, dtype=np.int64).reshape(1, 1)
        self._check_positions(pos, 1)
        self._cache_at(pos)
        feeds = {"token": ort.OrtValue.ortvalue_from_numpy(token), "pos": ort.OrtValue.ortvalue_from_numpy(np.array([pos], dtype=np.int64))}
        feeds.update(zip(self.state_names, self.state))
        outputs = self.sessions["decode"].run_with_ort_values(self.output_names["decode"], feeds)
        self.state = list(outputs[1:])
        return outputs[0].numpy()

    def stack(self) -> dict:
        session = self.sessions["decode"]
        return {
            "backend": "onnx",
            "runtime": f"onnxruntime {ort.__version__}",
            "onnxruntime": ort.__version__,
            "providers": session.get_providers(),
            "available_providers": ort.get_available_providers(),
            "delegate": PROVIDER,
            "threads": self.threads,
            "intra_op_threads": self.threads or "onnxruntime default (physical cores)",
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "weights": "weights.bin read once; each distinct tensor shared by both sessions (add_initializer)",
            "shared_weight_tensors": len(self._shared),
        }

    def close(self) -> None:
        self.sessions = {}
        self.state = []
        self._shared = {}


__all__ = ["OnnxRunner"]
