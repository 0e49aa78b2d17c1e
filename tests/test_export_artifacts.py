"""`lfm2-nas export --to onnx|executorch`: the measured artifact is copied with its manifest,
verified before and after, and refused when it was replaced, tampered with or is of
another backend. Compiles one real (tiny) ONNX artifact, hence slow."""

from __future__ import annotations

import json

import pytest
from testkit.export_study import build_study

from devices.artifact import Artifact
from lfm2.errors import UserError
from nas.export import export_from_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_study(tmp_path_factory):
    from devices.compile import compile as compile_spec

    root = tmp_path_factory.mktemp("artifacts")

    def artifact_for(spec):
        artifact = compile_spec(spec, "onnx", "fp32", max_context=64, prompt_lengths=(16,), cache_dir=root)
        return {"key": artifact.key, "path": str(artifact.path), "bytes": artifact.size_bytes, "stages_s": artifact.manifest.get("stages_s"), "backend": "onnx", "quant": "fp32"}

    url = f"sqlite:///{root / 'onnx.db'}"
    study = build_study(url, name="onnx", measured=[("CCAC", 64, 0.3, 10.0, 1.0, 8)], artifact_for=artifact_for, backend="onnx")
    return url, study


def test_measured_onnx_artifact_is_copied_and_verified(onnx_study, tmp_path):
    url, study = onnx_study
    (trial,) = study.best_trials
    result = export_from_study("onnx", tmp_path, storage=url, trial=trial.number, target="onnx", log=lambda *_: None)
    (folder,) = result.folders
    copied = Artifact.load(folder)  # every file and its sha256
    source = Artifact.load(trial.user_attrs["artifact"]["path"])
    assert copied.key == source.key and copied.files == source.files and copied.backend == "onnx"
    assert "Trial" in (folder / "ARCH.md").read_text()
    assert json.loads((folder / "lfm2_nas.json").read_text())["artifact"]["key"] == source.key
    with pytest.raises(UserError, match="measured with backend onnx.*--to onnx"):
        export_from_study("onnx", tmp_path / "et", storage=url, trial=trial.number, target="executorch", log=lambda *_: None)


def test_a_tampered_artifact_is_refused(onnx_study, tmp_path):
    url, study = onnx_study
    (trial,) = study.best_trials
    source = Artifact.load(trial.user_attrs["artifact"]["path"])
    name = next(iter(source.files))
    original = source.file(name).read_bytes()
    try:
        source.file(name).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(UserError, match="sha256"):
            export_from_study("onnx", tmp_path, storage=url, trial=trial.number, target="onnx", log=lambda *_: None)
    finally:
        source.file(name).write_bytes(original)
