"""Space files: the built-in ones, YAML, and broken files whose errors name the key."""

import pytest

from lfm2.errors import UserError
from search_space import SearchSpace, SpaceFileError

GOOD = """
name = "mine"
vocab_size = 4096
max_seq_len = 2048
d_model = [256, 512]
n_layers = { min = 2, max = 6, step = 2 }
ffn_multiplier = [3, 4.0]
n_kv_heads = [1, 2, 4]
operators = ["conv", "attn", "swa"]
swa_window = [64, 128]
"""


def write(tmp_path, text, name="space.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_user_file_loads_with_defaults_and_keeps_its_text(tmp_path):
    path = write(tmp_path, GOOD)
    space = SearchSpace.load(path)
    assert space.name == "mine" and space.source_text == GOOD
    assert space.values("n_layers") == (2, 4, 6) and space.values("conv_kernel") == (3,)
    assert space.values("ffn_multiplier") == (3.0, 4.0)  # ints and floats: one kind of value
    assert space.definition.head_dim == 64 and space.definition.ffn_multiple_of == 256
    assert set(space.distributions()) == {"d_model", "n_layers", "ffn_multiplier", "n_kv_heads", "swa_window", *(f"layer_{i:02d}" for i in range(6))}
    assert SearchSpace.from_text(space.source_text).count() == space.count()  # a study's stored copy


def test_builtin_spaces_are_the_package_files():
    for name in ("default", "small", "lfm2_350m"):
        space = SearchSpace.load(name)
        assert space.name == name and space.source_text.lstrip().startswith("#")


def test_the_350m_space_holds_the_preset_and_only_hf_expressible_layouts():
    import optuna

    from lfm2.hf import to_hf_config
    from lfm2.presets import presets
    from search_space.costs.counts import parameters

    space = SearchSpace.load("lfm2_350m")
    assert space.contains(presets["LFM2-350M"]) and space.contains(presets["LFM2-350M-attn"])
    low, high = space.parameter_range()
    assert 150e6 < low < high < 500e6  # ~185-466M
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):  # every point exports to Hugging Face Lfm2 (no sliding-window layers)
        spec = space.sample(study.ask())
        assert "swa" not in spec.layers and low <= parameters(spec) <= high
        to_hf_config(spec)


def test_yaml_gives_the_same_space(tmp_path):
    yaml_text = """
name: mine
vocab_size: 4096
max_seq_len: 2048
d_model: [256, 512]
n_layers: {min: 2, max: 6, step: 2}
ffn_multiplier: [3, 4.0]
n_kv_heads: [1, 2, 4]
operators: [conv, attn, swa]
swa_window: [64, 128]
"""
    from_yaml = SearchSpace.load(write(tmp_path, yaml_text, "space.yaml"))
    from_toml = SearchSpace.load(write(tmp_path, GOOD))
    assert from_yaml.distributions() == from_toml.distributions()
    assert from_yaml.count() == from_toml.count()


def replace_line(key, new_line):
    lines = [line for line in GOOD.splitlines() if not line.startswith(f"{key} ")]
    return "\n".join(lines + ([new_line] if new_line else [])) + "\n"


BROKEN = [
    (GOOD + "dmodel = 3\n", ["'dmodel'", "allowed keys", "d_model"]),
    (replace_line("vocab_size", None), ["'vocab_size'", "required"]),
    (replace_line("d_model", "d_model = [256, 300]"), ["'d_model'", "300", "multiple of head_dim"]),
    (replace_line("d_model", "d_model = []"), ["'d_model'", "empty"]),
    (replace_line("d_model", 'd_model = "wide"'), ["'d_model'", "'wide'", "integers"]),
    (replace_line("d_model", "d_model = [256, 256]"), ["'d_model'", "repeat"]),
    (replace_line("n_layers", "n_layers = { min = 2, max = 7, step = 2 }"), ["'n_layers'", "multiple of step"]),
    (replace_line("n_layers", "n_layers = { low = 2, high = 6 }"), ["'n_layers'", "'min', 'max'"]),
    (replace_line("n_layers", "n_layers = 0"), ["'n_layers'", "0"]),
    (replace_line("ffn_multiplier", "ffn_multiplier = { min = 1, max = 4 }"), ["'ffn_multiplier'", "range table", "integer keys"]),
    (replace_line("ffn_multiplier", "ffn_multiplier = [0.1, 4]"), ["'ffn_multiplier'", "0.1", "larger multiplier"]),
    (replace_line("n_kv_heads", "n_kv_heads = [1, 3]"), ["'n_kv_heads'", "3", "does not divide"]),
    (replace_line("operators", 'operators = ["conv", "mamba"]'), ["'operators'", "'mamba'", "conv, attn, swa"]),
    (replace_line("swa_window", None), ["'swa_window'", "required when 'swa'"]),
    (replace_line("operators", 'operators = ["conv", "attn"]'), ["'swa_window'", "not in operators"]),
    (replace_line("swa_window", "swa_window = [64, 4096]"), ["'swa_window'", "4096", "max_seq_len"]),
    (GOOD + "head_dim = 63\n", ["'head_dim'", "63", "even"]),
    (GOOD + "tie_embeddings = \"yes\"\n", ["'tie_embeddings'", "'yes'", "true/false"]),
    (GOOD + "rope_theta = -1\n", ["'rope_theta'", "number > 0"]),
    (GOOD + "conv_kernel = [1, 3]\n", ["'conv_kernel'", "1"]),
    ("name = \n", ["not valid TOML"]),
]


@pytest.mark.parametrize("text,expected", BROKEN, ids=[e[0].strip("'") for _, e in BROKEN])
def test_broken_files_name_the_key_and_what_is_allowed(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpaceFileError) as error:
        SearchSpace.load(path)
    assert isinstance(error.value, UserError)
    for fragment in expected:
        assert fragment in str(error.value), str(error.value)
    assert str(path) in str(error.value)  # and which file


def test_missing_or_unreadable_space_names(tmp_path):
    with pytest.raises(SpaceFileError, match="default, small"):
        SearchSpace.load("tiny")
    with pytest.raises(SpaceFileError, match=r"\.toml, \.yaml"):
        SearchSpace.load(write(tmp_path, GOOD, "space.txt"))
    with pytest.raises(SpaceFileError, match="not a file"):
        SearchSpace.load(tmp_path)
    with pytest.raises(SpaceFileError, match="mapping"):
        SearchSpace.load(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
