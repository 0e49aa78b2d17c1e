"""Save our model as a Hugging Face folder, and load such a folder back into our model.

A folder holds what `transformers.AutoModelForCausalLM.from_pretrained` needs, with no
remote code: `config.json` (model_type `lfm2`, architectures `Lfm2ForCausalLM`),
`model.safetensors` (our weights under Hugging Face's names) and `generation_config.json`.
With tied embeddings the head is left out of the file, as `transformers` itself saves it:
`Lfm2ForCausalLM` ties `lm_head.weight` to `model.embed_tokens.weight` on load.
Next to them, `lfm2_nas.json` keeps our `ArchSpec` and where the weights came from.

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
from lfm2.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from lfm2.model import LFM2, build_model
from lfm2.spec import ArchSpec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
PROVENANCE = "lfm2_nas.json"

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


def save_hf_folder(
    model: LFM2,
    folder: str | Path,
    *,
    token_ids: dict[str, int | None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a Hugging Face LFM2 folder (created if needed) and return its path."""
    spec = model.spec
    token_ids = token_ids if token_ids is not None else default_token_ids(spec)
    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in to_hf_state_dict(model).items()}
    dtypes = {tensor.dtype for tensor in weights.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    config = hf_config_dict(spec, token_ids, dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / GENERATION_CONFIG).write_text(json.dumps(generation_config_dict(token_ids), indent=2) + "\n")
    record = {"spec": spec.to_dict(), "spec_key": spec.key, **(provenance or {})}
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return folder


def read_spec(folder: str | Path) -> ArchSpec:
    """The architecture of a Hugging Face LFM2 folder (from its `config.json`)."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UserError(f"{folder} is not a Hugging Face model folder: it has no {CONFIG} (make one with `lfm2-nas export --to hf`)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from exc
    spec = from_hf_config(config)
    provenance = read_provenance(folder)
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
    return json.loads(path.read_text()) if path.is_file() else {}


def load_hf_folder(folder: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LFM2:
    """Our model with the weights of a Hugging Face LFM2 folder."""
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
        model.head.weight = model.embed.weight  # `assign` replaced the shared Parameter
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


__all__ = [
    "CONFIG",
    "WEIGHTS",
    "GENERATION_CONFIG",
    "PROVENANCE",
    "default_token_ids",
    "hf_config_dict",
    "generation_config_dict",
    "save_hf_folder",
    "read_spec",
    "read_provenance",
    "load_hf_folder",
]
