"""The search space: sampling from Optuna trials, presets as points, membership and size."""

import itertools
import random

import optuna
import pytest

import lfm2
from lfm2 import ATTENTION_TWINS, LFM2_PRESETS, ArchSpec
from search_space import NotInSpaceError, SearchSpace, costs
from search_space.space import BUILTIN_SPACES

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module", params=BUILTIN_SPACES)
def space(request):
    return SearchSpace.load(request.param)


def random_specs(space, n, seed):
    """`n` specs drawn by Optuna's RandomSampler through `space.sample` (an in-memory study)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    specs = []
    for _ in range(n):
        trial = study.ask()
        spec = space.sample(trial)
        specs.append((trial.params, spec))
    return specs


def test_same_seed_same_architectures_and_params_decide_the_spec(space):
    first = random_specs(space, 20, seed=7)
    again = random_specs(space, 20, seed=7)
    assert [s.key for _, s in first] == [s.key for _, s in again]
    assert len({s.key for _, s in first}) > 15  # and the draws do differ
    for params, spec in first:
        assert space.spec_from_params(params) == spec
        # a FixedTrial with the same params gives the same spec: sample() is a pure function of them
        assert space.sample(optuna.trial.FixedTrial(params)) == spec


def uniform_params(space, rng):
    """Parameters drawn uniformly from the space's distributions, without a study (fast)."""
    params = {}
    for name, dist in space.distributions().items():
        if isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = rng.randrange(dist.low, dist.high + 1, dist.step)
        else:
            params[name] = rng.choice(dist.choices)
    return params


def test_a_thousand_random_samples_are_valid_points_with_a_fixed_parameter_set(space):
    names = list(space.distributions())
    assert [list(params) for params, _ in random_specs(space, 5, seed=1)] == [names] * 5  # same order, every trial
    rng = random.Random(1)
    for _ in range(1000):
        trial = optuna.trial.FixedTrial(uniform_params(space, rng))
        spec = space.sample(trial)
        assert list(trial.params) == names
        assert isinstance(spec, ArchSpec)
        assert ArchSpec.from_dict(spec.to_dict()) == spec  # validates again from its JSON
        assert space.contains(spec)
        assert space.params_for(spec) is not None
        assert spec.n_heads * spec.head_dim == spec.d_model
        assert spec.ffn_dim % space.definition.ffn_multiple_of == 0
        assert ("swa" in spec.layers) == (spec.swa_window > 0)


def test_every_sampler_the_search_offers_can_drive_the_space():
    space = SearchSpace.load("small")
    samplers = [
        optuna.samplers.NSGAIISampler(seed=0, population_size=4),
        optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=3),
    ]
    for sampler in samplers:
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        for _ in range(8):
            trial = study.ask()
            spec = space.sample(trial)
            study.tell(trial, [costs.parameters(spec), costs.decode_flops(spec, 256)])
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("name", [*LFM2_PRESETS, *ATTENTION_TWINS])
def test_presets_and_twins_round_trip_through_an_enqueued_trial(name):
    space = SearchSpace.load("default")
    spec = lfm2.presets[name]
    assert space.contains(spec)
    params = space.params_for(spec)
    study = optuna.create_study(sampler=optuna.samplers.NSGAIISampler(seed=0))
    study.enqueue_trial(params)
    trial = study.ask()
    assert space.sample(trial) == spec  # exact ArchSpec equality
    assert trial.params == params


def test_layouts_with_swa_round_trip_with_canonical_ignored_parameters():
    space = SearchSpace.load("small")
    spec = ArchSpec(
        vocab_size=8192, d_model=512, layers=("conv", "swa", "conv", "attn"), n_heads=8, n_kv_heads=2,
        head_dim=64, ffn_dim=1536, conv_kernel=4, max_seq_len=4096, swa_window=256,
    )
    params = space.params_for(spec)
    assert params["swa_window"] == 256 and params["ffn_multiplier"] == 3.0
    assert [params[f"layer_{i:02d}"] for i in range(4, 8)] == ["conv"] * 4  # ignored slots: first operator
    assert space.spec_from_params(params) == spec
    no_swa = spec.replace(layers=("conv", "conv", "conv", "attn"), swa_window=0)
    assert space.params_for(no_swa)["swa_window"] == 128  # ignored window: the first one
    assert space.spec_from_params(space.params_for(no_swa)) == no_swa


def test_specs_outside_the_space_are_refused_with_every_reason():
    space = SearchSpace.load("default")
    preset = LFM2_PRESETS["LFM2-350M"]
    outside = [
        (preset.replace(vocab_size=32000), "vocab_size"),
        (preset.replace(ffn_dim=4000), "ffn_dim"),
        (preset.replace(n_kv_heads=16), "n_kv_heads"),
        (preset.replace(layers=preset.layers[:15]), "n_layers"),
        (preset.replace(layers=("conv", "swa") * 8, swa_window=333), "swa_window"),
        (preset.replace(conv_kernel=5), "conv_kernel"),
        (preset.replace(tie_embeddings=False), "tie_embeddings"),
        (preset.replace(max_seq_len=4096), "max_seq_len"),
        (preset.replace(d_model=1280, n_heads=20, n_kv_heads=4, head_dim=64), "d_model"),
    ]
    for spec, key in outside:
        assert not space.contains(spec)
        with pytest.raises(NotInSpaceError, match=key):
            space.params_for(spec)
    with pytest.raises(NotInSpaceError, match="vocab_size.*ffn_dim"):
        space.params_for(preset.replace(vocab_size=32000, ffn_dim=4000))


def test_spec_from_params_refuses_params_of_another_space():
    small, default = SearchSpace.load("small"), SearchSpace.load("default")
    params = small.params_for(random_specs(small, 1, seed=3)[0][1])
    with pytest.raises(lfm2.errors.UserError, match="missing"):
        default.spec_from_params(params)
    with pytest.raises(lfm2.errors.UserError, match="d_model"):
        small.spec_from_params({**params, "d_model": 448})


TOY = """
name = "toy"
vocab_size = 256
max_seq_len = 64
head_dim = 16
ffn_multiple_of = 32
d_model = [32, 64]
n_layers = [1, 2, 3]
ffn_multiplier = [1.0, 1.25, 1.5, 2.0]
n_kv_heads = [1, 2]
conv_kernel = [3, 4]
operators = ["conv", "attn", "swa"]
swa_window = [4, 8]
tie_embeddings = [true, false]
"""


def test_count_equals_the_distinct_specs_of_every_parameter_vector():
    space = SearchSpace.from_text(TOY)
    dists = space.distributions()
    axes = []
    for dist in dists.values():
        if isinstance(dist, optuna.distributions.IntDistribution):
            axes.append(range(dist.low, dist.high + 1, dist.step))
        else:
            axes.append(dist.choices)
    distinct = {space.spec_from_params(dict(zip(dists, values))) for values in itertools.product(*axes)}
    assert space.count() == len(distinct)
    # ffn 1.25 * 32 = 40 rounds to 32, as 1.0 * 32 does: the count must not double count it
    assert space.ffn_widths(32) == {32: 1.0, 64: 1.5}
    for spec in random.Random(0).sample(sorted(distinct, key=lambda s: s.key), 50):
        assert space.spec_from_params(space.params_for(spec)) == spec


def test_describe_reports_size_ranges_and_presets():
    described = SearchSpace.load("default").describe()
    assert set(described["presets_in_space"]) == set(lfm2.presets)
    assert described["architectures"] == SearchSpace.load("default").count() > 10**15
    assert described["parameters_min"] < 354_483_968 < 2_569_272_320 <= described["parameters_max"]
    assert described["ffn_widths"]["2048"][-1] == 12288
    small = SearchSpace.load("small").describe()
    assert 5_000_000 <= small["parameters_min"] and small["parameters_max"] <= 70_000_000
    for spec in (s for _, s in random_specs(SearchSpace.load("small"), 50, seed=5)):
        assert small["parameters_min"] <= costs.parameters(spec) <= small["parameters_max"]


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_every_space_has_a_fixed_anchor_inside_it(name):
    """The anchor an anchored search times beside every candidate: a point of the space, the
    same every time, in LFM2's pattern (attention at layers 2 and 5 where the space has it)."""
    space = SearchSpace.load(name)
    anchor = space.anchor_spec()
    assert space.contains(anchor) and SearchSpace.load(name).anchor_spec() == anchor
    if "attn" in space.values("operators") and "conv" in space.values("operators"):
        assert [i for i, op in enumerate(anchor.layers) if op == "attn"] == [2, 5]
    low, high = space.parameter_range()
    assert low <= costs.parameters(anchor) <= high
    if name == "small":
        assert (anchor.layout, anchor.d_model, anchor.ffn_dim, anchor.n_kv_heads, anchor.conv_kernel) == ("CCACCA", 512, 1792, 2, 3)
