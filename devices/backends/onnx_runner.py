"""Run an ONNX artifact with ONNX Runtime on the CPU: one session of the step graph.

This module imports only numpy and onnxruntime (never torch or onnx): a measurement of an
ONNX artifact pays for the runtime a device would carry, not for the exporter.

One session serves prefill and decode (see `devices.backends.onnx_export`): ONNX Runtime
loads the weights from `weights.bin` and MLAS pre-packs the quantised MatMul weights once;
`session.disable_prepacking` would keep the stored form instead (see `PREPACKING`).
A prefill runs the graph in steps of at most `prefill_chunk` tokens, so it never holds a
T x T score matrix nor activations for the whole prompt.

The state lives in the runner as `OrtValue`s. A full-attention layer's K and V are
buffers of `max_context` positions, bound through IO binding as both the input and the
output of the layer's `GroupQueryAttention`, which writes a step's new positions into them
in place (`devices.backends.onnx_gqa`): one copy of the cache, nothing copied per token.
Each buffer lies in its own anonymous mapping, emptied in place on reset (`KVBuffer`).
The conv windows and sliding-window rings (small, bounded) go from one step's outputs to
the next step's inputs without a copy through numpy.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from devices.artifact import Artifact, ArtifactError
from devices.runner import Runner

PROVIDER = "CPUExecutionProvider"
#: The most tokens one prefill step runs: bounds the attention scores to [chunk, keys so far]
#: and every other activation to the chunk. 128 as ExecuTorch's program and its LLM runner:
#: LFM2-350M int8, prefill 2,048 + one decode step, peak RSS growth 639 MiB at 256,
#: 583 MiB at 128, 565 MiB at 64 (BENCHMARKS.md, "ONNX Runtime int8 at context 2,048"); a
#: 29M-parameter model prefilled a few % slower at 128 than at 256, 20% slower at 64.
PREFILL_CHUNK = 128
#: MLAS pre-packs the weights of the quantised MatMuls when the session is built. With one
#: session the packed copy replaces the stored one (ONNX Runtime drops an initializer its
#: kernels packed), so packing costs no memory and keeps the fast kernels.
PREPACKING = True
#: ONNX Runtime's memory pattern plans one block for a run's intermediate tensors from the
#: shapes it saw, and keeps it per input shape beside the arena's own blocks. It only pays
#: for inputs of a fixed shape (ONNX Runtime's docs); the step graph sees 128-token chunks,
#: a shorter last chunk and 1-token decode steps. LFM2-350M int8, prefill 2,048 + decode at
#: 2,048 (BENCHMARKS.md, "ONNX int8 fifth pass"): footprint 453.3-453.5 MiB with the
#: pattern, 431.6-431.7 MiB without it, in every run of the measuring child; prefill +3.5% (median of 7
#: interleaved pairs, within this host's drift of -13%..+32%), decode the same (22.0 vs
#: 22.1 ms). Turning off the CPU arena instead gave 438-466 MiB, run to run: not used.
MEMORY_PATTERN = False
#: The size of this process's one ONNX Runtime thread pool, once `share_threads` made it
#: (None: every session makes its own). Why one pool: a measurement times the candidate and
#: the anchor side by side in one process, and with a pool per session, a run right after
#: the other session's ran 20-40% slower (prefill 512 and decode at 512 of a 2-thread
#: small-space pair: the "cold" runs of an alternating pair, against the runs that followed
#: their own session), which a pool per process removes (0-8%) at the same latency for one
#: session alone (BENCHMARKS.md, "One ONNX Runtime thread pool per process").
_SHARED_POOL_THREADS: int | None = None


def share_threads(threads: int | None) -> None:
    """The backend's `share_threads` hook (`devices.backends`): make one intra-op pool of
    `threads` (None or 0: ONNX Runtime's default, the physical cores) that every session
    this process opens afterwards with the same thread count runs on (a session of another
    count keeps a pool of its own). ONNX Runtime builds its environment, and with it the
    global pools, at the first session: call this before any; a second call changes nothing."""
    global _SHARED_POOL_THREADS
    if _SHARED_POOL_THREADS is None:
        ort.set_global_thread_pool_sizes(threads or 0, 1)  # intra-op threads, inter-op threads (sequential execution)
        _SHARED_POOL_THREADS = threads or 0


class EmbeddingRows:
    """The token embedding table of an artifact (`embedding.bin`, see
    `devices.backends.onnx_export`), read row by row with `os.pread`: a step holds only its
    own tokens' rows. Mapping the file would not do: each lookup then faults in the
    kernel's fault-around window (64 KiB) of the page cache around its row, and a prompt of
    random tokens makes nearly the whole table resident (LFM2-350M int8: ~64 MiB at 2,048
    tokens). int8 rows are dequantised as DequantizeLinear does: (q - zero_point) * scale
    in float32."""

    def __init__(self, path: str | Path, facts: dict):
        self.vocab, self.dim = (int(n) for n in facts["shape"])
        self.dtype = np.dtype(facts["dtype"])
        self.row_bytes = self.dim * self.dtype.itemsize
        self.scale = np.float32(facts["scale"]) if "scale" in facts else None
        self.zero_point = int(facts.get("zero_point", 0))
        size = os.path.getsize(path)
        if size != self.vocab * self.row_bytes:
            raise ArtifactError(f"{path} holds {size} bytes, not the {self.vocab} x {self.dim} {self.dtype} table its manifest describes; compile the artifact again")
        self._fd: int | None = os.open(path, os.O_RDONLY)  # None once closed

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [1, T] -> float32 rows [1, T, d_model]."""
        flat = np.asarray(tokens).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab):
            raise ValueError(f"token ids must be in 0..{self.vocab - 1}, got {int(flat.min())}..{int(flat.max())}")
        fd = self._fd
        if fd is None:
            raise ValueError("the embedding table was closed; open the artifact's runner again to read it")
        rows = b"".join(os.pread(fd, self.row_bytes, int(token) * self.row_bytes) for token in flat)
        table = np.frombuffer(rows, dtype=self.dtype).reshape(1, flat.size, self.dim)
        if self.scale is None:
            return table.astype(np.float32)
        return (table.astype(np.int32) - self.zero_point).astype(np.float32) * self.scale

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class KVBuffer:
    """A full-attention K or V buffer (`[1, Hkv, max_context, D]`) in its own anonymous
    mapping, made once per runner and emptied in place by `MADV_DONTNEED` on reset: its pages
    go back to the kernel, and read back as zeros without becoming resident (the shared zero
    page) until the cache writes them. So a buffer holds in RSS only the positions written
    since the last reset, whatever the process allocated before.

    Before, reset made new buffers with `np.zeros` through malloc, whose footprint depended
    on the allocator's history: glibc raises its mmap threshold to the size of a freed
    mapped block, so the buffers of the second reset came from the heap, where calloc
    clears (and so makes resident) the whole buffer (BENCHMARKS.md, "ONNX int8 fourth pass")."""

    def __init__(self, entry: dict):
        self.dtype = np.dtype(entry.get("dtype", "float32"))
        self.shape = tuple(int(n) for n in entry["shape"])
        size = int(np.prod(self.shape)) * self.dtype.itemsize
        self._map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self._map, dtype=self.dtype, count=int(np.prod(self.shape))).reshape(self.shape)
        # ONNX Runtime reads and writes the mapping itself (no copy): the OrtValue keeps the array
        self.value = ort.OrtValue.ortvalue_from_numpy(self.array)

    def empty(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)  # Linux: private anonymous pages read back as zeros
        else:
            self.array.fill(0)


class OnnxRunner(Runner):
    def __init__(self, artifact: Artifact, threads: int | None = None):
        super().__init__(artifact, threads)
        facts = artifact.manifest.get("onnx")
        if not isinstance(facts, dict) or "step" not in facts:
            raise ArtifactError(f"{artifact.path} is not an ONNX artifact made by this version (its manifest has no single 'step' graph); compile it again")
        self.layout = facts["state"]
        self.state_names = [entry["name"] for entry in self.layout]
        self.chunk = int(facts.get("prefill_chunk", PREFILL_CHUNK))
        self.shares_pool = _SHARED_POOL_THREADS is not None and _SHARED_POOL_THREADS == (self.threads or 0)
        self.session = ort.InferenceSession(str(artifact.file(facts["step"])), sess_options=self._options(), providers=[PROVIDER])
        self.output_names = [o.name for o in self.session.get_outputs()]
        if not isinstance(facts.get("embedding"), dict):
            raise ArtifactError(f"{artifact.path} is not an ONNX artifact made by this version (its manifest has no embedding table); compile it again")
        self.embedding = EmbeddingRows(artifact.file(facts["embedding"]["file"]), facts["embedding"])
        self.shared = [entry["kind"].startswith("kv_shared") for entry in self.layout]
        # one anonymous mapping per full-attention K or V buffer, made once (see `reset`)
        self.kv_buffers = {i: KVBuffer(entry) for i, entry in enumerate(self.layout) if self.shared[i]}
        self.state: list[ort.OrtValue] = []
        self.reset()

    # -- loading ------------------------------------------------------------------------

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        if self.shares_pool:
            options.use_per_session_threads = False  # the process's pool (`share_threads`) sets the threads
        else:
            options.intra_op_num_threads = self.threads or 0  # 0: ONNX Runtime's default (physical cores)
            options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not PREPACKING:
            options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_mem_pattern = MEMORY_PATTERN
        return options

    # -- running ------------------------------------------------------------------------

    def _zeros(self, entry: dict) -> ort.OrtValue:
        # a conv window or ring: small and bounded, replaced by every step's output
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(entry["shape"], dtype=entry.get("dtype", "float32")))

    def reset(self) -> None:
        """The empty state: the K/V buffers emptied in place (`KVBuffer.empty`), fresh zero
        conv windows and rings (small)."""
        for buffer in self.kv_buffers.values():
            buffer.empty()
        self.state = [self.kv_buffers[i].value if i in self.kv_buffers else self._zeros(entry) for i, entry in enumerate(self.layout)]

    def _check_positions(self, pos: int, count: int) -> None:
        if pos < 0 or pos + count > self.artifact.max_context:
            raise ValueError(f"positions {pos}..{pos + count - 1} exceed max_context={self.artifact.max_context}")

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """One run of the step graph. A full-attention cache is bound as the input and the
        output of its layer's GroupQueryAttention, which then writes the new positions into
        it in place; the small conv windows and rings come back as new values."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("embeds", ort.OrtValue.ortvalue_from_numpy(self.embedding(tokens)))
        binding.bind_ortvalue_input("pos", ort.OrtValue.ortvalue_from_numpy(np.array([pos], dtype=np.int64)))
        binding.bind_output(self.output_names[0])
        for name, output, value, shared in zip(self.state_names, self.output_names[1:], self.state, self.shared):
            binding.bind_ortvalue_input(name, value)
            if shared:
                binding.bind_ortvalue_output(output, value)
            else:
                binding.bind_output(output)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.state = [value if shared else new for value, new, shared in zip(self.state, outputs[1:], self.shared)]
        return outputs[0].numpy()

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self._check_positions(0, tokens.shape[1])
        self.reset()
        for start in range(0, tokens.shape[1], self.chunk):
            logits = self._step(np.ascontiguousarray(tokens[:, start : start + self.chunk]), start)
        return logits

    def decode(self, token: np.ndarray, pos: int) -> np.ndarray:
        """One token at `pos`: the caches' positions from `pos` on are (over)written, those
        before it are whatever the state holds (the measurement primes it outside the timed
        tokens, see `devices.measure`)."""
        token = np.ascontiguousarray(token, dtype=np.int64).reshape(1, 1)
        self._check_positions(pos, 1)
        return self._step(token, pos)

    def stack(self) -> dict:
        session = self.session
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
            "thread_pool": "the process's (shared with every other session it runs, e.g. the anchor)" if self.shares_pool else "the session's own",
            "execution_mode": "sequential",
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "weights": "one session for prefill and decode; weights.bin loaded by ONNX Runtime" + (", MatMul weights pre-packed once" if PREPACKING else ", pre-packing disabled"),
            "memory_pattern": MEMORY_PATTERN,
            "activations": "ONNX Runtime's CPU arena" + (" with its memory pattern (one planned block per input shape)" if MEMORY_PATTERN else ", memory pattern off (no planned block per input shape)"),
            "prefill_chunk": self.chunk,
            "kv_cache": "one buffer of max_context positions per full-attention K and V, bound as GroupQueryAttention's input and output (updated in place)",
            "embedding": "rows read from embedding.bin per step (os.pread), not mapped",
        }

    def close(self) -> None:
        self.session = None
        self.state = []
        self.kv_buffers = {}
        self.embedding.close()


__all__ = ["OnnxRunner", "EmbeddingRows", "KVBuffer"]
