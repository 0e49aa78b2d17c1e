"""`lfm2-nas space show` and `lfm2-nas space sample` as a user runs them: the installed script."""

import json

import optuna

from lfm2 import ArchSpec
from search_space import SearchSpace, costs


def test_space_show_lists_ranges_size_and_presets(lfm2_nas):
    result = lfm2_nas("space", "show")
    assert result.returncode == 0, result.stderr
    assert "ffn_multiplier" in result.stdout and "LFM2-2.6B" in result.stdout
    assert f"{SearchSpace.load('default').count():,}" in result.stdout



def run_in_process(capsys, *args):
    """The same entry point as the script, in this process (the script costs seconds to start)."""
    from nas.cli import main

    try:
        main(list(args))
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_space_show_json_in_process(capsys):
    status, out, _ = run_in_process(capsys, "space", "show", "--space", "small", "--json")
    described = json.loads(out)
    assert status == 0 and described["name"] == "small" and described["architectures"] == SearchSpace.load("small").count()


def test_space_sample_prints_reproducible_json_lines_with_costs(lfm2_nas):
    first = lfm2_nas("space", "sample", "--n", "3", "--seed", "4", "--space", "small", "--context", "256", "--quant", "8da4w")
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(rows) == 3
    space = SearchSpace.load("small")
    # the same seed in-process draws the same architectures: the output is reproducible
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    expected = [space.sample(study.ask()) for _ in range(3)]
    for row, expected_spec in zip(rows, expected):
        spec = ArchSpec.from_dict(row["spec"])
        assert spec == expected_spec and row["key"] == spec.key
        assert space.spec_from_params(row["params"]) == spec
        assert row["costs"] == costs.describe(spec, 256, "executorch", "8da4w")


def test_space_commands_turn_bad_input_into_exit_status_2(lfm2_nas, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "b"\nvocab_size = 100\nmax_seq_len = 64\nd_model = 100\n')
    result = lfm2_nas("space", "show", "--space", str(broken))
    assert result.returncode == 2 and "'n_layers' is required" in result.stderr and "Traceback" not in result.stderr


def test_bad_sample_options_exit_2_with_the_fix(capsys):
    status, _, err = run_in_process(capsys, "space", "sample", "--space", "small", "--backend", "onnx", "--quant", "8da4w")
    assert status == 2 and "fp32, int8" in err
    status, _, err = run_in_process(capsys, "space", "sample", "--space", "small", "--context", "100000")
    assert status == 2 and "max_seq_len (4096)" in err
    status, _, err = run_in_process(capsys, "space", "sample", "--n", "0")
    assert status == 2 and "--n" in err
