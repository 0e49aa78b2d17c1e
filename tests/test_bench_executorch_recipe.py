"""bench.experiments.executorch_recipe compares the project's ExecuTorch program with ExecuTorch's own
LFM2 recipe: that comparison is only fair if the recipe builds the same model from the
weights the project hands it. Checked here on a small spec, in eager PyTorch on both sides
(the recipe's `construct_transformer` with the params JSON and the converted checkpoint)."""

from __future__ import annotations

import pytest
import torch

from bench.experiments.executorch_recipe import params_from_hf
from lfm2.hf import to_hf_state_dict
from lfm2.hf_io import hf_config_dict
from lfm2.model import build_model
from lfm2.presets import LFM2_PRESETS
from lfm2.spec import ArchSpec

SPEC = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=64)


def test_the_recipe_builds_the_same_model_from_the_converted_weights():
    pytest.importorskip("executorch.examples.models.lfm2.convert_weights")
    from executorch.examples.models.lfm2.convert_weights import lfm_2_to_meta
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    model = build_model(SPEC, seed=0).eval()
    recipe = construct_transformer(ModelArgs(**params_from_hf(hf_config_dict(SPEC)), max_seq_len=64, max_context_len=64)).eval()
    missing, unexpected = recipe.load_state_dict(lfm_2_to_meta(to_hf_state_dict(model)), strict=False)
    assert not unexpected and all(name.endswith("conv_state") for name in missing)  # buffers, not weights
    tokens = torch.randint(0, SPEC.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)[0, -1]
        out = recipe(tokens)
        theirs = (out[0] if isinstance(out, tuple) else out).reshape(-1, SPEC.vocab_size)[-1]
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


def test_params_of_the_preset_name_its_layers_as_the_recipe_does():
    params = params_from_hf(hf_config_dict(LFM2_PRESETS["LFM2-350M"]))
    assert (params["dim"], params["hidden_dim"], params["n_layers"], params["vocab_size"]) == (1024, 4608, 16, 65536)
    assert params["layer_types"].count("full_attention") == 6 and set(params["layer_types"]) == {"conv", "full_attention"}
