"""The model: exact preset sizes, state handling, export-friendliness."""

import pytest
import torch

from lfm2 import ATTENTION_TWINS, PUBLISHED_PARAMETERS, ArchSpec, build_model, count_parameters, presets


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_preset_parameter_counts_equal_published(name):
    model = build_model(presets[name], device="meta")
    assert count_parameters(model) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_attention_twins_keep_width_ffn_heads_and_depth(name):
    spec, twin = presets[name], ATTENTION_TWINS[f"{name}-attn"]
    assert set(twin.layers) == {"attn"} and twin.n_layers == spec.n_layers
    for field in ("d_model", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        assert getattr(twin, field) == getattr(spec, field)


LAYOUTS = [
    ("conv", "attn", "conv", "attn"),
    ("conv",) * 3,
    ("attn",) * 3,
    ("conv", "swa", "attn", "swa"),
]


@pytest.mark.parametrize("layers", LAYOUTS)
@pytest.mark.parametrize("kernel", [3, 4])
def test_prefill_then_decode_equals_one_long_prefill(layers, kernel):
    spec = ArchSpec(vocab_size=300, d_model=64, layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=128, conv_kernel=kernel, max_seq_len=64, swa_window=5 if "swa" in layers else 0)
    model = build_model(spec, seed=3).eval()
    tokens = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        logits, *state = model.step(tokens[:, :11], torch.tensor([0]), *model.init_state(2), all_logits=True)
        assert (logits - full[:, :11]).abs().max() < 1e-4
        for i in range(11, 23):
            logits, *state = model.step(tokens[:, i : i + 1], torch.tensor([i]), *state)
            assert (logits - full[:, i]).abs().max() < 1e-4, i
        # a second chunked prefill longer than the sliding window continues correctly too
        logits, *state = model.step(tokens[:, :4], torch.tensor([0]), *model.init_state(2), all_logits=True)
        logits, *state = model.step(tokens[:, 4:], torch.tensor([4]), *state, all_logits=True)
        assert (logits - full[:, 4:]).abs().max() < 1e-4


def test_state_shapes_bound_sliding_window_memory():
    spec = ArchSpec(vocab_size=100, d_model=64, layers=("conv", "swa", "attn"), n_heads=4, n_kv_heads=1, ffn_dim=128, max_seq_len=1024, swa_window=32)
    shapes = build_model(spec, device="meta").state_shapes(batch_size=1)
    assert shapes == [(1, 64, 2), (1, 1, 32, 16), (1, 1, 32, 16), (1, 1, 1024, 16), (1, 1, 1024, 16)]


def test_untied_head_and_no_qk_norm_build():
    spec = ArchSpec(vocab_size=100, d_model=64, layers=("attn",), n_heads=4, n_kv_heads=4, head_dim=32, ffn_dim=128, tie_embeddings=False, qk_norm=False)
    model = build_model(spec)
    assert model.head.weight is not model.embed.weight
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 100)


def test_seeded_weights_are_reproducible():
    spec = ArchSpec(vocab_size=100, d_model=32, layers=("conv", "attn"), n_heads=2, n_kv_heads=1, ffn_dim=64)
    a, b, c = build_model(spec, seed=7), build_model(spec, seed=7), build_model(spec, seed=8)
    assert torch.equal(a.layers[0].op.in_proj.weight, b.layers[0].op.in_proj.weight)
    assert not torch.equal(a.layers[0].op.in_proj.weight, c.layers[0].op.in_proj.weight)


@pytest.mark.parametrize("tokens_len", [1, 16])
def test_step_is_capturable_by_torch_export_without_graph_breaks(tokens_len):
    spec = ArchSpec(vocab_size=128, d_model=64, layers=("conv", "attn", "swa", "conv"), n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64, swa_window=8)
    model = build_model(spec).eval()

    class Step(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens, pos, *state):
            return self.model.step(tokens, pos, *state)

    state = model.init_state(1)
    tokens = torch.zeros(1, tokens_len, dtype=torch.long)
    program = torch.export.export(Step(model), (tokens, torch.tensor([3]), *state), strict=True)
    with torch.no_grad():
        expected = model.step(tokens, torch.tensor([3]), *state)
        got = program.module()(tokens, torch.tensor([3]), *state)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-5)
