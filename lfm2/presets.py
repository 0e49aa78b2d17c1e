"""The dense LFM2 models as `ArchSpec`s, and their same-size all-attention twins.

Facts from the public Hugging Face configs (see DESIGN.md); the parameter counts equal
the published ones exactly, which tests check on the meta device.
"""

from __future__ import annotations

from lfm2.spec import ArchSpec

PUBLISHED_PARAMETERS = {
    "LFM2-350M": 354_483_968,
    "LFM2-700M": 742_489_344,
    "LFM2-1.2B": 1_170_340_608,
    "LFM2-2.6B": 2_569_272_320,
}

_ATTN_16 = (2, 5, 8, 10, 12, 14)
_ATTN_30 = (2, 5, 9, 13, 17, 21, 24, 27)


def _layout(n_layers: int, attention_at: tuple[int, ...]) -> tuple[str, ...]:
    return tuple("attn" if i in attention_at else "conv" for i in range(n_layers))


def _lfm2(d_model: int, n_heads: int, ffn_dim: int, n_layers: int, attention_at: tuple[int, ...]) -> ArchSpec:
    return ArchSpec(
        vocab_size=65_536,
        d_model=d_model,
        layers=_layout(n_layers, attention_at),
        n_heads=n_heads,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=ffn_dim,
        conv_kernel=3,
        rope_theta=1_000_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=128_000,
    )


def all_attention_twin(spec: ArchSpec) -> ArchSpec:
    """Same width, FFN, heads and depth; every layer full GQA attention."""
    return spec.replace(layers=("attn",) * spec.n_layers, swa_window=0)


LFM2_PRESETS: dict[str, ArchSpec] = {
    "LFM2-350M": _lfm2(1024, 16, 4608, 16, _ATTN_16),
    "LFM2-700M": _lfm2(1536, 24, 6912, 16, _ATTN_16),
    "LFM2-1.2B": _lfm2(2048, 32, 8192, 16, _ATTN_16),
    "LFM2-2.6B": _lfm2(2048, 32, 10752, 30, _ATTN_30),
}

ATTENTION_TWINS: dict[str, ArchSpec] = {f"{name}-attn": all_attention_twin(spec) for name, spec in LFM2_PRESETS.items()}

#: Every named architecture: the LFM2 models first, then their all-attention twins.
presets: dict[str, ArchSpec] = {**LFM2_PRESETS, **ATTENTION_TWINS}


def get_preset(name: str) -> ArchSpec:
    try:
        return presets[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(presets)}") from None


def preset_name(spec: ArchSpec) -> str | None:
    """The preset name of `spec`, or None when it is not one of the presets."""
    for name, candidate in presets.items():
        if candidate == spec:
            return name
    return None


__all__ = ["presets", "LFM2_PRESETS", "ATTENTION_TWINS", "PUBLISHED_PARAMETERS", "all_attention_twin", "get_preset", "preset_name"]
