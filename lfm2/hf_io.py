"""Model folders: save our model, read its architecture, load it back.

One folder layout, two flavours, told apart by what `transformers` can express:

* **Hugging Face folder** (any spec `Lfm2ForCausalLM` can express: conv and full-attention
  layers, head_dim * heads == d_model, q/k norm): what `AutoModelForCausalLM.from_pretrained`
  needs, with no remote code -- `config.json` (model_type `lfm2`, architectures
  `Lfm2ForCausalLM`), `model.safetensors` and `generation_config.json`. With tied embeddings
  the head is left out of the file, as `transformers` itself saves it.
* **lfm2-nas folder** (any other spec, e.g. with sliding-window `swa` layers): the same
  `model.safetensors` and no `config.json`, so that no tool mistakes it for a model
  `transformers` can run (Lfm2 has no sliding window: the same weights in its full-attention
  layers would give other logits).
  lfm2-nas trains and loads it (`load_model_folder`); the export tools build it too.

Both keep `lfm2_nas.json`: the full `ArchSpec` (the source of truth where there is no
`config.json`), `transformers: {loadable, reason}`, the token ids and where the weights came
from. Weights are stored under Hugging Face LFM2's names in both (an `swa` layer has the
parameters of an attention layer and takes its names), so that a folder of a representable
spec has byte for byte the `config.json` and weights `--to hf` writes.

`transformers` is not imported: the files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lfm2.errors import UserError
from lfm2.hf import from_hf_config, from_hf_state_dict, hf_named_state_dict, hf_representable, to_hf_config
from lfm2.model import LFM2, build_model
from lfm2.spec import ArchSpec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
PROVENANCE = "lfm2_nas.json"
#: Version of the folder layout recorded in `lfm2_nas.json`.
FOLDER_FORMAT = 1

#: The byte-level tokenizer's end-of-text id (see `lfm2.tokenizer`): an exported folder
#: names it as bos/eos/pad until training replaces the tokenizer.
BYTE_END_OF_TEXT_ID = 256

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def default_token_ids(spec: ArchSpec) -> dict[str, int | None]:
    token = BYTE_END_OF_TEXT_ID if spec.vocab_size > BYTE_END_OF_TEXT_ID else None
    return {"bos_token_id": token, "eos_token_id": token, "pad_token_id": token}


def hf_config_dict(spec: ArchSpec, token_ids: dict[str, int | None] | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `config.json` of `spec` (raises `NotRepresentableError` for what Lfm2 lacks)."""
    config = to_hf_config(spec)
    config.update(
        {
            "architectures": ["Lfm2ForCausalLM"],
            "dtype": _DTYPE_NAMES[dtype],
            "use_cache": True,
            "initializer_range": 0.02,
            **(token_ids if token_ids is not None else default_token_ids(spec)),
        }
    )
    return dict(sorted(config.items()))


def generation_config_dict(token_ids: dict[str, int | None]) -> dict[str, Any]:
    return {**token_ids, "do_sample": False, "use_cache": True}


def save_model_folder(
    model: LFM2,
    folder: str | Path,
    *,
    token_ids: dict[str, int | None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a model folder (created if needed) and return its path: a Hugging Face
    folder when `transformers` can express the spec, an lfm2-nas folder otherwise (see the
    module docstring)."""
    spec = model.spec
    token_ids = token_ids if token_ids is not None else default_token_ids(spec)
    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in hf_named_state_dict(model).items()}
    dtypes = {tensor.dtype for tensor in weights.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    not_loadable = hf_representable(spec)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    if not_loadable is None:
        (folder / CONFIG).write_text(json.dumps(hf_config_dict(spec, token_ids, dtype), indent=2) + "\n")
        (folder / GENERATION_CONFIG).write_text(json.dumps(generation_config_dict(token_ids), indent=2) + "\n")
        transformers_note: dict[str, Any] = {"loadable": True}
    else:
        for stale in (CONFIG, GENERATION_CONFIG):  # a folder reused for another spec must not keep one
            (folder / stale).unlink(missing_ok=True)
        transformers_note = {"loadable": False, "reason": not_loadable, "load_with": "lfm2.hf_io.load_model_folder"}
    record: dict[str, Any] = {
        "spec": spec.to_dict(),
        "spec_key": spec.key,
        "folder_format": FOLDER_FORMAT,
        "transformers": transformers_note,
        "token_ids": token_ids,
    }
    record.update({k: v for k, v in (provenance or {}).items() if k not in record})
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return folder


def save_hf_folder(
    model: LFM2,
    folder: str | Path,
    *,
    token_ids: dict[str, int | None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a Hugging Face LFM2 folder; raises `NotRepresentableError` (naming
    the reason) for a spec `transformers` cannot express -- `save_model_folder` writes those."""
    to_hf_config(model.spec)  # refuses before anything is written
    return save_model_folder(model, folder, token_ids=token_ids, provenance=provenance)


def is_transformers_loadable(folder: str | Path) -> bool:
    """Whether `transformers` can load the folder (it has a Hugging Face `config.json`)."""
    return (Path(folder) / CONFIG).is_file()


def read_spec(folder: str | Path) -> ArchSpec:
    """The architecture of a model folder: from `config.json` when it has one (checked against
    `lfm2_nas.json`), else from `lfm2_nas.json` (an lfm2-nas folder)."""
    folder = Path(folder)
    config_path = folder / CONFIG
    provenance = read_provenance(folder)
    if not config_path.is_file():
        if provenance.get("spec"):
            return ArchSpec.from_dict(provenance["spec"])
        raise UserError(
            f"{folder} is not a model folder: it has neither {CONFIG} nor a {PROVENANCE} with a spec "
            "(make one with `lfm2-nas export --to lfm2` or `--to hf`)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from exc
    spec = from_hf_config(config)
    if provenance.get("spec"):
        # Our own record keeps fields config.json cannot (none today, but say so if they drift).
        recorded = ArchSpec.from_dict(provenance["spec"])
        if recorded.key != spec.key:
            raise UserError(
                f"{folder}: config.json describes architecture {spec.key} but {PROVENANCE} records {recorded.key}; "
                "the folder was edited by hand -- export it again"
            )
    return spec


def read_provenance(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); export the folder again") from exc


def load_model_folder(folder: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LFM2:
    """Our model with the weights of a model folder (Hugging Face or lfm2-nas)."""
    folder = Path(folder)
    spec = read_spec(folder)
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{folder} has no {WEIGHTS}; export it again")
    with safe_open(str(weights_path), framework="pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    model = build_model(spec, device="meta")
    model.load_state_dict(from_hf_state_dict(state, spec), assign=True)
    if spec.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # `assign` replaced the shared Parameter
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


#: The name this loader had when it read Hugging Face folders only.
load_hf_folder = load_model_folder


__all__ = [
    "CONFIG",
    "WEIGHTS",
    "GENERATION_CONFIG",
    "PROVENANCE",
    "default_token_ids",
    "hf_config_dict",
    "generation_config_dict",
    "FOLDER_FORMAT",
    "save_model_folder",
    "save_hf_folder",
    "is_transformers_loadable",
    "read_spec",
    "read_provenance",
    "load_model_folder",
    "load_hf_folder",
]
