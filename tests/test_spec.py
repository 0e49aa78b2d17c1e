"""ArchSpec: validation with errors that name the field, canonical JSON, stable keys."""

import dataclasses
import json

import pytest

from lfm2 import ArchSpec, SpecError, presets

BASE = dict(vocab_size=1000, d_model=128, layers=("conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=256)


def make(**changes):
    return ArchSpec(**{**BASE, **changes})


def test_json_round_trip_and_key_are_stable():
    spec = make()
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec and again.key == spec.key
    assert json.loads(spec.to_json())["layers"] == ["conv", "attn"]
    assert make(rope_theta=1e6).key == make(rope_theta=1_000_000).key  # numbers normalised
    assert make(layers=["conv", "attn"]) == spec  # a list is taken as a tuple
    assert make(layers=("attn", "conv")).key != spec.key
    assert spec.head_dim == 32


def test_key_is_fixed_for_a_published_preset():
    # The key names artifacts and cached results on disk: it must not drift between versions.
    assert presets["LFM2-350M"].key == ArchSpec.from_json(presets["LFM2-350M"].to_json()).key
    assert len(presets["LFM2-350M"].key) == 16


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_heads=3), "n_heads"),  # does not divide d_model
        (dict(n_kv_heads=3), "n_kv_heads"),  # does not divide n_heads
        (dict(layers=("conv", "mamba")), "layers[1]"),
        (dict(layers=()), "layers"),
        (dict(layers="conv"), "layers"),
        (dict(d_model=-8), "d_model"),
        (dict(ffn_dim=0), "ffn_dim"),
        (dict(vocab_size=True), "vocab_size"),
        (dict(conv_kernel=1), "conv_kernel"),
        (dict(head_dim=31), "head_dim"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(layers=("swa", "conv")), "swa_window"),
        (dict(swa_window=64), "swa_window"),
    ],
)
def test_bad_specs_name_the_field(changes, field):
    with pytest.raises(SpecError) as info:
        make(**changes)
    assert field in str(info.value)


def test_unknown_and_missing_fields_in_json():
    with pytest.raises(SpecError, match="unknown ArchSpec field"):
        ArchSpec.from_dict({**BASE, "layres": ["conv"]})
    data = dict(BASE)
    del data["ffn_dim"]
    with pytest.raises(SpecError, match="ffn_dim"):
        ArchSpec.from_dict(data)
    with pytest.raises(SpecError, match="not valid JSON"):
        ArchSpec.from_json("{")


def test_frozen():
    spec = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.d_model = 256  # type: ignore[misc]


def test_kv_bytes_per_token():
    spec = presets["LFM2-350M"]
    # 6 attention layers x K and V x 8 kv heads x 64 dims x 2 bytes
    assert spec.kv_cache_bytes_per_token(2) == 6 * 2 * 8 * 64 * 2
    assert make(layers=("swa", "conv"), swa_window=16).kv_cache_bytes_per_token() == 0
