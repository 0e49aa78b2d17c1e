"""A cached measurement is reused only for the runner that took it (nas.cache.measurement_key)."""

from devices.artifact import BACKEND_FORMATS, RUNNER_REVISIONS, measurement_revision
from nas.cache import measurement_key

ARGS = ("spec", "onnx", "int8", "protocol", "device", {"python": "3.12", "onnxruntime": "1.0"})


def test_a_revised_runner_misses_the_old_runners_results():
    old = measurement_key(*ARGS, {"backend_format": BACKEND_FORMATS["onnx"], "runner": RUNNER_REVISIONS["onnx"] - 1})
    assert measurement_key(*ARGS, measurement_revision("onnx")) != old


def test_a_new_artifact_format_misses_the_old_formats_results():
    revision = measurement_revision("onnx")
    assert measurement_key(*ARGS, {**revision, "backend_format": revision["backend_format"] + 1}) != measurement_key(*ARGS, revision)


def test_a_never_revised_backend_keeps_its_keys():
    assert "executorch" not in RUNNER_REVISIONS and measurement_revision("executorch") == {}
    args = ("spec", "executorch", "8da4w", "protocol", "device", {"python": "3.12"})
    assert measurement_key(*args, measurement_revision("executorch")) == measurement_key(*args)

