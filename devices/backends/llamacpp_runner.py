"""Run a GGUF artifact with llama.cpp on the CPU, through llama-cpp-python's low-level API
(the `llama_cpp.llama_*` ctypes functions: no `Llama` object, no sampling, no tokenizer).

Settled the way `llama-bench` runs a model: weights memory-mapped, `n_batch` 2048 and
`n_ubatch` 512, an f16 K/V cache, flash attention on llama.cpp's "auto", CPU weight repacking
on (llama.cpp's default), one sequence. A prefill is one `llama_decode` of the prompt (in
chunks of `n_batch`, as llama-bench does past 2,048 tokens) from an empty memory, with
logits for the last token only; a decode is one `llama_decode` of one token.

llama.cpp places every token right after the sequence's last position, so a decode at a
position that does not follow the state (the measurement's `reset()` then a decode at depth
C) needs a C-token context first. As llama-bench does for its depth tests, the runner
builds that context once (one prefill of C filler tokens), saves the sequence state
(`llama_state_seq_get_data`: the attention layers' K/V and the conv windows) and restores
it (a copy, milliseconds) every later time; one snapshot is kept, so its size (the K/V of C
tokens) is part of the measured footprint.

Importing this module imports llama-cpp-python (the runtime a measurement pays for), not
torch or gguf.
"""

from __future__ import annotations

import collections
import ctypes
import os

import numpy as np

from devices.artifact import Artifact, ArtifactError
from devices.runner import Runner
from lfm2.errors import UserError

MISSING = (
    "the llamacpp backend needs llama-cpp-python, which is not installed: "
    'pip install -e ".[llamacpp]" (it builds llama.cpp from source with cmake and a C++ compiler: '
    "about 10 minutes on 2 cores; pip caches the wheel for later installs)"
)

try:
    import llama_cpp
except ModuleNotFoundError as exc:  # the optional extra is absent
    raise UserError(MISSING) from exc

#: llama-bench's defaults (tools/llama-bench/llama-bench.cpp, cmd_params_defaults).
N_BATCH = 2048
N_UBATCH = 512

_GGML_LOG_LEVEL_ERROR = 4
_errors: collections.deque[str] = collections.deque(maxlen=20)


@llama_cpp.llama_log_callback
def _log(level, text, _user_data):  # keep llama.cpp's errors for our messages, drop the chatter
    if level >= _GGML_LOG_LEVEL_ERROR and text:
        _errors.append(text.decode(errors="replace").strip())


llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


def _last_errors() -> str:
    lines = [line for line in _errors if line]
    return f" (llama.cpp said: {' | '.join(lines[-5:])})" if lines else ""


class LlamaCppRunner(Runner):
    def __init__(self, artifact: Artifact, threads: int | None = None):
        super().__init__(artifact, threads)
        facts = artifact.manifest.get("llamacpp")
        if not isinstance(facts, dict) or "gguf" not in facts:
            raise ArtifactError(f"{artifact.path} is not a llamacpp artifact made by this version (its manifest has no 'llamacpp' facts); compile it again")
        self.threads = threads or len(os.sched_getaffinity(0))
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # Read into memory, not mapped: ggml's CPU backend repacks the q4_0 projections into
        # its interleaved layout, and with a mapping the file's copy stays resident beside the
        # repacked one (LFM2-350M q4_0 at 2,048 tokens: 453 MiB mapped against 299 read in,
        # BENCHMARKS.md). Read in, each weight is held once: what a deployment should ship.
        model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        _errors.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(artifact.file(facts["gguf"])).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {artifact.file(facts['gguf'])}{_last_errors()}")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = artifact.max_context
        context_params.n_batch = N_BATCH
        context_params.n_ubatch = N_UBATCH
        context_params.n_seq_max = 1
        context_params.n_threads = self.threads
        context_params.n_threads_batch = self.threads
        context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        context_params.type_k = context_params.type_v = llama_cpp.GGML_TYPE_F16
        context_params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise RuntimeError(f"llama.cpp could not create a context of {artifact.max_context} tokens{_last_errors()}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        if self.n_vocab != artifact.spec.vocab_size:
            raise ArtifactError(f"{artifact.path}: llama.cpp sees {self.n_vocab} tokens, the spec has {artifact.spec.vocab_size}; compile it again")
        self.next_pos = 0  # where the next token goes: the length of the context in memory
        self._snapshot: tuple[int, ctypes.Array] | None = None  # (positions, sequence state)

    # -- llama.cpp calls ------------------------------------------------------------------

    def _decode(self, tokens: np.ndarray) -> None:
        """Append `tokens` to the sequence, in chunks of n_batch; logits for the last one."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise ValueError(f"token ids must lie in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        if self.next_pos + ids.size > self.artifact.max_context:
            raise ValueError(f"positions {self.next_pos}..{self.next_pos + ids.size - 1} exceed max_context={self.artifact.max_context}")
        for start in range(0, ids.size, N_BATCH):
            chunk = ids[start : start + N_BATCH]
            batch = llama_cpp.llama_batch_get_one(chunk.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)), chunk.size)
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode of {chunk.size} tokens at position {self.next_pos} returned {status}{_last_errors()}")
            self.next_pos += chunk.size

    def _logits(self) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()[None, :]

    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)
        self.next_pos = 0

    def _seek(self, pos: int) -> None:
        """Make the memory hold a `pos`-token context (module doc)."""
        self._clear()
        if pos == 0:
            return
        if self._snapshot is None or self._snapshot[0] != pos:
            self._snapshot = None  # one snapshot at a time
            self._decode(np.zeros(pos, dtype=np.int32))
            size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
            buffer = (ctypes.c_uint8 * size)()
            written = llama_cpp.llama_state_seq_get_data(self.ctx, buffer, size, 0)
            if written != size:
                raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes{_last_errors()}")
            self._snapshot = (pos, buffer)
            return
        buffer = self._snapshot[1]
        if llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(buffer), 0) != len(buffer):
            raise RuntimeError(f"llama_state_seq_set_data could not restore a {pos}-token context{_last_errors()}")
        self.next_pos = pos

    # -- Runner ---------------------------------------------------------------------------

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        self._clear()
        self._decode(tokens)
        return self._logits()

    def decode(self, token: np.ndarray, pos: int) -> np.ndarray:
        if not 0 <= pos < self.artifact.max_context:
            raise ValueError(f"position {pos} is outside max_context={self.artifact.max_context}")
        if pos != self.next_pos:
            self._seek(pos)
        self._decode(np.asarray(token).reshape(1))
        return self._logits()

    def reset(self) -> None:
        self._clear()

    def stack(self) -> dict:
        system = llama_cpp.llama_print_system_info()
        return {
            "backend": "llamacpp",
            "runtime": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": system.decode(errors="replace").strip() if isinstance(system, bytes) else str(system),
            "delegate": "ggml CPU backend",
            "threads": self.threads,
            "n_batch": N_BATCH,
            "n_ubatch": N_UBATCH,
            "kv_cache_type": "f16",
            "flash_attn": "auto",
            "weights": "GGUF read into memory (load_mode none, llama-bench --mmap 0); CPU repacking on (llama.cpp default)",
            "model_bytes": int(llama_cpp.llama_model_size(self.model)),
            "depth_context": "built once per depth by a prefill, then restored from a saved sequence state (as llama-bench)",
        }

    def close(self) -> None:
        self._snapshot = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["LlamaCppRunner", "MISSING", "N_BATCH", "N_UBATCH"]
