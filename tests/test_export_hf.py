"""`nas.export`: a study's winners -> Hugging Face folders that `transformers` loads, with the
exact weights we initialise, plus families, refusals and the artifact targets' checks."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from testkit.export_study import BUDGET, build_study, small_study, tiny_spec

from lfm2 import ArchSpec, build_model
from lfm2.errors import UserError
from lfm2.hf_io import load_hf_folder, read_spec
from nas.export import export_from_study, pareto_members, pick_family

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    url, name = small_study(tmp_path_factory.mktemp("study"))
    return url, name, optuna.load_study(study_name=name, storage=url)


def quiet(*_):
    pass


def first_pareto_trial(study) -> optuna.trial.FrozenTrial:
    return min(study.best_trials, key=lambda t: t.number)


def test_exported_trial_loads_in_transformers_with_our_logits(study, tmp_path):
    url, name, s = study
    trial = first_pareto_trial(s)
    result = export_from_study(name, tmp_path, storage=url, trial=trial.number, target="hf", log=quiet)
    (folder,) = result.folders
    spec = ArchSpec.from_dict(trial.user_attrs["spec"])
    assert folder.name == f"trial-{trial.number}-{spec.layout}-{spec.key}"
    for name_ in ("config.json", "model.safetensors", "generation_config.json", "ARCH.md", "lfm2_nas.json"):
        assert (folder / name_).is_file(), name_
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.model_type == "lfm2" and config.architectures == ["Lfm2ForCausalLM"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(theirs).__name__ == "Lfm2ForCausalLM"
    ours = build_model(spec, seed=0).eval()  # the documented initialisation, seed 0
    tokens = torch.randint(0, spec.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens)).abs().max() < 1e-4
        assert torch.equal(theirs.lm_head.weight, theirs.model.embed_tokens.weight)  # tied, as saved
        back = load_hf_folder(folder).eval()
        assert torch.equal(back(tokens), ours(tokens))
    assert read_spec(folder).key == spec.key
    # ARCH.md carries the measured figures and their provenance.
    arch = (folder / "ARCH.md").read_text()
    meta = s.user_attrs["lfm2_nas"]
    for expected in (f"Trial {trial.number} of study `{name}`", f"{trial.user_attrs['decode_ms']:.3f} ms", f"{trial.user_attrs['prefill_ms']:.3f} ms", meta["device"]["cpu_model"], "init_weights", spec.layout):
        assert expected in arch, expected
    record = json.loads((folder / "lfm2_nas.json").read_text())
    assert record["trial"]["number"] == trial.number and record["study"]["name"] == name
    assert record["measured"]["footprint_bytes"] == trial.user_attrs["footprint_bytes"]
    assert record["protocol"] and record["device"] and record["init"] == {"function": "lfm2.model.init_weights", "seed": 0}


def test_pareto_exports_each_feasible_winner_once(study, tmp_path):
    url, name, s = study
    result = export_from_study(name, tmp_path, storage=url, pareto=True, target="hf", log=quiet)
    expected = {t.user_attrs["spec_key"] for t in s.best_trials}
    assert {json.loads((f / "lfm2_nas.json").read_text())["spec_key"] for f in result.folders} == expected
    assert all(json.loads((f / "lfm2_nas.json").read_text())["measured"]["footprint_bytes"] <= BUDGET for f in result.folders)
    with pytest.raises(UserError, match="already exists"):
        export_from_study(name, tmp_path, storage=url, pareto=True, target="hf", log=quiet)
    export_from_study(name, tmp_path, storage=url, pareto=True, target="hf", overwrite=True, log=quiet)


@pytest.mark.parametrize("tier_by, attr", [("memory", "footprint_bytes"), ("latency", "decode_ms")])
def test_family_spreads_over_the_range(study, tmp_path, tier_by, attr):
    url, name, s = study
    members = pareto_members(s)
    k = min(3, len(members))
    result = export_from_study(name, tmp_path, storage=url, pareto=True, family=k, tier_by=tier_by, family_name="tiny", target="hf", log=quiet)
    index = json.loads(result.family_index.read_text())
    assert index["family"] == "tiny" and index["tier_by"] == tier_by and len(index["members"]) == k
    values = [m[attr] for m in index["members"]]
    assert values == sorted(values)
    all_values = sorted(m.trial.user_attrs[attr] for m in members)
    assert values[0] == all_values[0] and values[-1] == all_values[-1]  # the ends of the range
    assert [f.name for f in result.folders] == [f"tiny-t{i}" for i in range(1, k + 1)]
    assert (tmp_path / "FAMILY.md").is_file()
    assert "Member 1 of" in (result.folders[0] / "ARCH.md").read_text()


def test_pick_family_prefers_quality_at_equal_distance(study):
    _, _, s = study
    members = pareto_members(s)
    (only,) = pick_family(members, 1)
    assert only.trial.user_attrs["quality"] == max(m.trial.user_attrs["quality"] for m in members)
    with pytest.raises(UserError, match="--family"):
        pick_family(members, 0)


def test_unrepresentable_specs_are_refused_by_name(tmp_path):
    url = f"sqlite:///{tmp_path / 'swa.db'}"
    swa = tiny_spec("CSCA", swa_window=16)
    s = build_study(url, name="swa", measured=[("CCAC", 64, 0.3, 10.0, 1.0, 8)], extra=[(swa, 0.9, 12.0, 1.1, 9)])
    swa_trial = next(t for t in s.trials if t.user_attrs.get("spec_key") == swa.key)
    assert swa_trial.number in {t.number for t in s.best_trials}
    for selection in ({"trial": swa_trial.number}, {"pareto": True}):
        with pytest.raises(UserError) as error:
            export_from_study("swa", tmp_path / "out", storage=url, target="hf", log=quiet, **selection)
        message = str(error.value)
        assert f"trial {swa_trial.number}" in message and "sliding-window" in message and "--to executorch" in message
        assert "--to lfm2" in message and "lfm2-nas train" in message  # the way on to training
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    # --skip-unsupported exports the others and says which it skipped.
    result = export_from_study("swa", tmp_path / "out", storage=url, pareto=True, target="hf", skip_unsupported=True, log=quiet)
    assert len(result.folders) == 1 and "CCAC" in result.folders[0].name
    assert result.skipped and f"trial {swa_trial.number}" in result.skipped[0]


def test_lfm2_target_exports_any_architecture_and_reloads_exactly(tmp_path):
    """`--to lfm2` writes every Pareto member, sliding-window layers included: a Hugging Face
    folder where Lfm2 can express the spec (the same files as `--to hf`), else an lfm2-nas
    folder without config.json that `load_model_folder` rebuilds to the exported weights."""
    from lfm2.hf_io import is_transformers_loadable, load_model_folder, read_provenance

    url = f"sqlite:///{tmp_path / 'swa.db'}"
    swa = tiny_spec("CSCA", swa_window=16)
    build_study(url, name="swa", measured=[("CCAC", 64, 0.3, 10.0, 1.0, 8)], extra=[(swa, 0.9, 12.0, 1.1, 9)])
    result = export_from_study("swa", tmp_path / "lfm2", storage=url, pareto=True, target="lfm2", log=quiet)
    assert len(result.folders) == 2 and not result.skipped
    by_layout = {folder.name.split("-")[2]: folder for folder in result.folders}
    native, plain = by_layout["CSCA"], by_layout["CCAC"]

    # The sliding-window winner: no config.json, the full spec and the reason in lfm2_nas.json.
    assert not is_transformers_loadable(native) and not (native / "config.json").exists()
    record = read_provenance(native)
    assert record["spec"] == swa.to_dict() and record["transformers"]["loadable"] is False
    assert "sliding-window" in record["transformers"]["reason"] and record["export_target"] == "lfm2"
    assert record["init"] == {"function": "lfm2.model.init_weights", "seed": 0}
    arch = (native / "ARCH.md").read_text()
    assert "lfm2-nas folder" in arch and "load_model_folder" in arch and "lfm2-nas train" in arch
    with pytest.raises((OSError, ValueError), match="config.json"):
        transformers.AutoConfig.from_pretrained(native)  # nothing there for transformers to misread
    back, ours = load_model_folder(native).eval(), build_model(swa, seed=0).eval()
    assert back.spec == swa and back.lm_head.weight is back.embed_tokens.weight
    tokens = torch.randint(0, swa.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))  # longer than the window
    with torch.no_grad():
        assert torch.equal(back(tokens), ours(tokens))

    # The representable winner: byte for byte the --to hf folder.
    hf = export_from_study("swa", tmp_path / "hf", storage=url, pareto=True, target="hf", skip_unsupported=True, log=quiet).folders[0]
    assert hf.name == plain.name and is_transformers_loadable(plain)
    for name_ in ("config.json", "model.safetensors", "generation_config.json"):
        assert (plain / name_).read_bytes() == (hf / name_).read_bytes(), name_
    assert read_provenance(plain)["transformers"] == {"loadable": True}


def test_bad_selections_and_artifact_targets_say_what_to_do(study, tmp_path):
    url, name, s = study
    trial = first_pareto_trial(s)
    with pytest.raises(UserError, match="--trial N, or --pareto"):
        export_from_study(name, tmp_path, storage=url, target="hf", log=quiet)
    with pytest.raises(UserError, match="no trial 999"):
        export_from_study(name, tmp_path, storage=url, trial=999, target="hf", log=quiet)
    with pytest.raises(UserError, match="no study named 'nope'"):
        export_from_study("nope", tmp_path, storage=url, trial=0, target="hf", log=quiet)
    with pytest.raises(UserError, match="--to must be one of"):
        export_from_study(name, tmp_path, storage=url, trial=trial.number, target="tflite", log=quiet)
    measured_with = trial.user_attrs["artifact"]["backend"]
    other = "onnx" if measured_with == "executorch" else "executorch"
    with pytest.raises(UserError, match=f"measured with backend {measured_with}.*--to {measured_with}"):
        export_from_study(name, tmp_path, storage=url, trial=trial.number, target=other, log=quiet)
    failed = next(t for t in s.trials if t.state == optuna.trial.TrialState.FAIL)
    with pytest.raises(UserError, match="no measured artifact"):
        export_from_study(name, tmp_path, storage=url, trial=failed.number, target=measured_with, log=quiet)


def test_preset_export_refuses_bad_requests(tmp_path):
    from nas.export import export_preset

    with pytest.raises(UserError, match="lfm2-nas presets"):
        export_preset("LFM2-9B", tmp_path, log=quiet)


@pytest.mark.slow
def test_lfm2_350m_preset_exports_with_its_published_size(tmp_path):
    from safetensors import safe_open

    from lfm2 import PUBLISHED_PARAMETERS
    from nas.export import export_preset

    (folder,) = export_preset("LFM2-350M", tmp_path, log=quiet).folders
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in reference.parameters()) == PUBLISHED_PARAMETERS["LFM2-350M"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        stored = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    assert stored == PUBLISHED_PARAMETERS["LFM2-350M"]  # the tied head is stored once
    assert "not measured" in (folder / "ARCH.md").read_text()
