"""Export a search's winners: trainable model folders, or the artifacts that were measured.

Reads the study only through its schema module, `nas.study_schema` (docs/study-schema.md).

* `--to hf`: one folder per architecture with `config.json` (model_type `lfm2`,
  `Lfm2ForCausalLM`, loadable without remote code), `model.safetensors` (our seeded
  initialisation, `lfm2.model.init_weights`), `generation_config.json`, `lfm2_nas.json`
  (spec and provenance, machine-readable) and `ARCH.md` (the measured figures and where
  they come from). Specs Hugging Face's Lfm2 cannot express (sliding-window layers, ...)
  are refused, naming the trial, the reason and `--to lfm2`.
* `--to lfm2`: the same folder for any spec (`lfm2.hf_io.save_model_folder`): a `--to hf`
  folder (the same config.json and weights, byte for byte) where Lfm2 can express the spec;
  otherwise an lfm2-nas folder with the same weights file and `lfm2_nas.json` (the full
  spec, marked not loadable by `transformers`) and no `config.json`. `lfm2-nas train`
  trains either, and `lfm2.hf_io.load_model_folder` loads either. This is the target for
  the small and default spaces, whose winners often have sliding-window layers.
* `--to executorch|onnx`: a copy of the compiled artifact each trial was measured with
  (files + `manifest.json`, verified against its sha256s before and after the copy), with
  the same `ARCH.md` and `lfm2_nas.json` next to it.

`--family K` picks K members of the Pareto set spread over the range they cover: by memory
(the measured footprint, the figure the budget is compared with) or by latency (decode
ms per token at the study's context). The member nearest each of K evenly spaced targets
between the smallest and largest value is taken (ties go to the better quality, then the
faster decode); members are named `<family>-t1` (smallest/fastest) .. `<family>-tK`, and
`family.json` / `FAMILY.md` list them.

The package by job: `selection` (which trials: one, the Pareto set, a family), `provenance`
(`lfm2_nas.json`: where every figure comes from, read through the study schema), `markdown`
(ARCH.md, FAMILY.md), `writers` (the folders, and the two entry points). Every name is
importable from `nas.export` as before.
"""

from __future__ import annotations

from nas.export.markdown import INIT_DESCRIPTION, arch_markdown, architecture_section, family_markdown, hf_use_section, lfm2_use_section
from nas.export.provenance import MODEL_TARGETS, provenance, redact_storage, study_metadata
from nas.export.selection import TIER_METRICS, Member, member, pareto_members, pick_family, select_trial
from nas.export.writers import ARTIFACT_TARGETS, TARGETS, ExportResult, export_from_study, export_members, export_preset

__all__ = [
    "export_preset",
    "TARGETS",
    "MODEL_TARGETS",
    "ARTIFACT_TARGETS",
    "TIER_METRICS",
    "INIT_DESCRIPTION",
    "Member",
    "ExportResult",
    "export_from_study",
    "export_members",
    "member",
    "pareto_members",
    "pick_family",
    "provenance",
    "select_trial",
    "arch_markdown",
    "architecture_section",
    "family_markdown",
    "hf_use_section",
    "lfm2_use_section",
    "redact_storage",
    "study_metadata",
]
