"""The eager backend: the PyTorch model itself, the reference every other backend is
checked against.

The artifact stores no weights: `eager.json` holds the seed (and dtype), and the runner
regenerates the same weights with `lfm2.build_model(spec, seed=seed)` -- deterministic on
CPU, and it keeps a 2.5B-parameter reference from costing 10 GB of cache. The manifest
records `weights_bytes` (what the weights would take) so sizes can still be compared.
Eager decode is bound by Python overhead: it is a reference, not a deployment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.artifact import Artifact
from devices.runner import Runner
from lfm2.model import build_model, count_parameters
from lfm2.spec import ArchSpec

CONFIG = "eager.json"


def export(spec: ArchSpec, quant: str, max_context: int, prompt_lengths: tuple[int, ...], out_dir: Path, seed: int) -> tuple[list[str], dict[str, Any]]:
    from devices.compile import Stages

    stages = Stages()
    with stages("export"):
        model = build_model(spec, device="meta")
        (out_dir / CONFIG).write_text(json.dumps({"seed": seed, "dtype": "float32", "weights": "regenerated from seed by lfm2.build_model"}, sort_keys=True))
    return [CONFIG], {
        "stages_s": stages.seconds,
        "methods": ["step"],
        "weights": "regenerated from the seed at load",
        "weights_bytes": 4 * count_parameters(model),
        "decode_cost_follows_context": False,  # attention reads the whole max_context buffer
    }


class EagerRunner(Runner):
    def __init__(self, artifact: Artifact, threads: int | None = None):
        super().__init__(artifact, threads)
        if threads:
            torch.set_num_threads(threads)
        config = json.loads(artifact.file(CONFIG).read_text())
        self.seed = config["seed"]
        self.model = build_model(artifact.spec, seed=self.seed).eval()
        self.state: tuple[torch.Tensor, ...] = ()
        self.reset()

    def _step(self, tokens: np.ndarray, pos: int, state: tuple[torch.Tensor, ...]) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        if pos + ids.shape[1] > self.artifact.max_context:
            raise ValueError(f"positions {pos}..{pos + ids.shape[1] - 1} exceed max_context={self.artifact.max_context}")
        with torch.no_grad():
            logits, *new_state = self.model.step(ids, torch.tensor([pos], dtype=torch.long), *state)
        self.state = tuple(new_state)
        return logits.numpy()

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        return self._step(tokens, 0, self.model.init_state(1, max_context=self.artifact.max_context))

    def decode(self, token: np.ndarray, pos: int) -> np.ndarray:
        return self._step(token, pos, self.state)

    def reset(self) -> None:
        self.state = self.model.init_state(1, max_context=self.artifact.max_context)

    def stack(self) -> dict:
        return {
            "backend": "eager",
            "runtime": f"torch {torch.__version__}",
            "delegate": None,
            "threads": torch.get_num_threads(),
        }


RUNNER = EagerRunner

__all__ = ["EagerRunner", "RUNNER", "export"]
