"""`QualitySettings`: everything that fixes what a quality score means, in one frozen record.

Two scores are comparable only when they were computed with equal settings (and seed);
`QualitySettings.key` hashes them for caches. Two presets:

* `cpu_small()` -- for tests and a quick search on a laptop: 1/32 width, 32-token tasks,
  one learning rate, a few seconds per candidate on a free CPU core for a 16-layer layout.
* `default()` -- for real runs on a GPU: 1/8 width, 128-token tasks, two learning rates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lfm2.corpus import CORPORA
from lfm2.errors import UserError
from nas.quality.tasks import TASKS, TaskConfig


class SettingsError(UserError):
    """A quality setting is out of range."""


@dataclass(frozen=True)
class QualitySettings:
    """How a candidate's proxy is built, trained and scored.

    Proxy: widths (`d_model`, `ffn_dim`, `head_dim`) times `width_factor`, rounded to
    `width_multiple` (head_dim to an even number), floored at `min_d_model` / `min_head_dim`;
    layers, head counts, conv kernel and SWA window unchanged (see `nas.quality.proxy`).

    Training: AdamW, linear warm-up for `warmup_fraction` of the steps then cosine decay to
    10%; every rate in `learning_rates` trains the first `sweep_fraction` of the steps, and
    only the best at that point trains on (successive halving with one survivor).
    """

    name: str = "custom"
    width_factor: float = 1 / 8
    width_multiple: int = 8
    min_d_model: int = 32
    min_head_dim: int = 8
    learning_rates: tuple[float, ...] = (1e-3, 3e-3)
    sweep_fraction: float = 0.25
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    bf16_on_cuda: bool = True
    # MAD suite
    tasks: tuple[str, ...] = TASKS
    task_config: TaskConfig = field(default_factory=TaskConfig)
    # 1000: at 400 steps (38 s on an H200) no proxy learned any in-context task (recall at
    # chance, 1/64) and the score reduced to memorisation speed; at 1000 the LFM2-350M proxy's
    # recall and selective copy are learning
    mad_steps: int = 1000
    mad_batch_size: int = 96  # rows per step, split evenly over the tasks
    mad_train_examples: int = 4_000  # per task: a fixed training set (epochs over it), as in MAD
    mad_eval_examples: int = 256  # per task, held out (drawn from another seed stream)
    # LM proxy
    lm_steps: int = 200
    lm_batch_size: int = 64
    lm_seq_len: int = 256
    lm_eval_windows: int = 256
    lm_corpus_max_bytes: int | None = None  # None: the whole corpus
    lm_corpus: str = "stdlib"  # a name of lfm2.corpus.CORPORA ("python-sources": ~10x the text, for long runs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "learning_rates", tuple(float(lr) for lr in self.learning_rates))
        if not 0 < self.width_factor <= 1:
            raise SettingsError(f"width_factor must be in (0, 1], got {self.width_factor}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise SettingsError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise SettingsError(f"learning_rates must be positive numbers, got {self.learning_rates}")
        if not 0 < self.sweep_fraction <= 1:
            raise SettingsError(f"sweep_fraction must be in (0, 1], got {self.sweep_fraction}")
        for name in ("mad_steps", "lm_steps", "eval_every", "mad_train_examples", "mad_eval_examples", "lm_batch_size", "lm_seq_len", "lm_eval_windows", "width_multiple", "min_d_model", "min_head_dim"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mad_batch_size < len(self.tasks):
            raise SettingsError(f"mad_batch_size={self.mad_batch_size} must give each of the {len(self.tasks)} tasks at least one row")
        if self.lm_corpus not in CORPORA:
            raise SettingsError(f"lm_corpus must be one of {', '.join(CORPORA)}, got {self.lm_corpus!r}")
        if self.min_head_dim % 2:
            raise SettingsError(f"min_head_dim must be even (rotary embeddings), got {self.min_head_dim}")

    # -- presets -------------------------------------------------------------------------

    @classmethod
    def cpu_small(cls) -> QualitySettings:
        """Seconds per candidate on a 2-core CPU: for tests and a quick local search."""
        return cls(
            name="cpu_small",
            width_factor=1 / 32,
            learning_rates=(3e-3,),
            eval_every=25,
            task_config=TaskConfig(
                seq_len=32, n_keys=16, n_values=16, n_noise=4, recall_pairs=4, noise_fraction=0.3,
                fuzzy_pairs=2, fuzzy_max_motif=2, copy_tokens=4, compress_tokens=4, memorise_keys=16,
            ),
            mad_steps=100,
            mad_batch_size=24,
            mad_train_examples=400,
            mad_eval_examples=48,
            lm_steps=50,
            lm_batch_size=16,
            lm_seq_len=32,
            lm_eval_windows=32,
            lm_corpus_max_bytes=2_000_000,
        )

    @classmethod
    def default(cls) -> QualitySettings:
        """For real runs on a GPU (tens of seconds per candidate on an H200)."""
        return cls(name="default")

    # -- identity ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tasks"] = list(self.tasks)
        data["learning_rates"] = list(self.learning_rates)
        return data

    @classmethod
    def named(cls, name: str, flag: str = "--quality-settings") -> QualitySettings:
        """The preset `name` (one of `PRESET_NAMES`); a `SettingsError` naming the choices."""
        if name not in PRESET_NAMES:
            raise SettingsError(f"{flag} {name!r} is not a quality settings preset; choose one of {', '.join(PRESET_NAMES)}")
        return getattr(cls, name)()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualitySettings:
        data = dict(data)
        if isinstance(data.get("task_config"), dict):
            data["task_config"] = TaskConfig(**data["task_config"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown QualitySettings field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> QualitySettings:
        return dataclasses.replace(self, **changes)

    @property
    def key(self) -> str:
        """Hash of every field but the name: equal settings give equal keys, whatever they are called."""
        data = self.to_dict()
        data.pop("name")
        if data["lm_corpus"] == "stdlib":  # the corpus every key before this field was made with: those keys stay valid
            data.pop("lm_corpus")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


#: The named presets (`QualitySettings.named`): `default` is sized for a GPU, `cpu_small` for a CPU.
PRESET_NAMES = ("default", "cpu_small")

__all__ = ["PRESET_NAMES", "QualitySettings", "SettingsError"]
