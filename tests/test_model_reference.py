"""Our LFM2 against the numerical reference, `transformers.Lfm2ForCausalLM`."""

import pytest
import torch

from lfm2 import ArchSpec, build_model
from lfm2.hf import from_hf_state_dict, to_hf_config, to_hf_state_dict

transformers = pytest.importorskip("transformers")

LAYOUTS = {
    "350M-layout-narrow": dict(layers=("conv", "conv", "attn", "conv", "conv", "attn", "conv", "conv", "attn", "conv", "attn", "conv", "attn", "conv", "attn", "conv"), conv_kernel=3),
    "all-conv": dict(layers=("conv",) * 4, conv_kernel=3),
    "all-attention": dict(layers=("attn",) * 4, conv_kernel=3),
    "2.6B-layout-narrow": dict(layers=tuple("attn" if i in (2, 5, 9, 13, 17, 21, 24, 27) else "conv" for i in range(30)), conv_kernel=3),
    "kernel-4": dict(layers=("conv", "attn", "conv", "conv"), conv_kernel=4),
}


def small_spec(layers, conv_kernel):
    return ArchSpec(vocab_size=512, d_model=64, layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=160, conv_kernel=conv_kernel, max_seq_len=128)


def reference_pair(spec, seed=0):
    ours = build_model(spec, seed=seed).eval()
    config = transformers.Lfm2Config(**{k: v for k, v in to_hf_config(spec).items() if k != "model_type"})
    theirs = transformers.Lfm2ForCausalLM(config).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied to the embedding
    assert torch.equal(theirs.lm_head.weight, ours.lm_head.weight)
    return ours, theirs


@pytest.mark.parametrize("name", LAYOUTS)
def test_prefill_logits_equal_transformers(name):
    spec = small_spec(**LAYOUTS[name])
    ours, theirs = reference_pair(spec)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in (1, 2, 3, 7, 31, 67):
            tokens = torch.randint(0, spec.vocab_size, (2, length), generator=generator)
            expected = theirs(tokens, use_cache=False).logits
            assert (ours(tokens) - expected).abs().max() < 1e-4
            stepped = ours.step(tokens, torch.tensor([0]), *ours.init_state(2), all_logits=True)[0]
            assert (stepped - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", LAYOUTS)
def test_decode_with_explicit_state_equals_transformers_cache(name):
    spec = small_spec(**LAYOUTS[name])
    ours, theirs = reference_pair(spec)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, spec.vocab_size, (1, 9), generator=generator)
    continuation = torch.randint(0, spec.vocab_size, (1, 20), generator=generator)
    with torch.no_grad():
        # transformers cannot size masks or positions from a cache that holds only conv
        # layers (the all-conv layout): give positions, and masks (none are needed) directly.
        masks = {} if spec.attention_layers else {"attention_mask": {"full_attention": None, "conv": None}}
        out = theirs(prompt, use_cache=True, position_ids=torch.arange(prompt.shape[1])[None], **masks)
        cache = out.cache
        state = ours.init_state(1)
        logits, *state = ours.step(prompt, torch.tensor([0]), *state)
        assert (logits - out.logits[:, -1]).abs().max() < 1e-4
        for i in range(continuation.shape[1]):
            token = continuation[:, i : i + 1]
            position = prompt.shape[1] + i
            out = theirs(token, cache=cache, use_cache=True, position_ids=torch.tensor([[position]]), **masks)
            cache = out.cache
            logits, *state = ours.step(token, torch.tensor([position]), *state)
            assert (logits - out.logits[:, -1]).abs().max() < 1e-4, f"decode step {i}"


def test_hf_state_dict_round_trip():
    spec = small_spec(**LAYOUTS["kernel-4"])
    ours, theirs = reference_pair(spec)
    back = build_model(spec, seed=123)
    back.load_state_dict(from_hf_state_dict(theirs.state_dict(), spec))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


@pytest.mark.parametrize("tie", [True, False])
def test_our_parameter_names_are_transformers_less_the_model_prefix(tie):
    """A checkpoint loads by name: `Lfm2ForCausalLM`'s keys are ours with `model.` in front
    (the head aside), so `lfm2.hf` converts with no table."""
    spec = small_spec(**LAYOUTS["350M-layout-narrow"]).replace(tie_embeddings=tie)
    config = transformers.Lfm2Config(**{k: v for k, v in to_hf_config(spec).items() if k != "model_type"})
    theirs = {name.removeprefix("model.") for name in transformers.Lfm2ForCausalLM(config).state_dict()}
    assert set(build_model(spec, device="meta").state_dict()) == theirs
