"""The study schema's one module (`nas.study_schema`): its keys, its status enum, its storage
rule, and `lfm2-nas study export`, the trials table a user gets from the CLI."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from devices.protocol import MEASUREMENT_STATUSES
from lfm2.errors import UserError
from nas.study_schema import (
    METADATA_KEY,
    StudyMetadata,
    TrialRecord,
    TrialStatus,
    DeviceRecord,
    check_trial_attrs,
    load_study,
    open_storage,
    read_trials,
    trials_table,
    worst_over_devices,
)

REPO = Path(__file__).resolve().parents[1]
REAL_STUDY = REPO / "tests" / "data" / "search_small.db"
PACKAGES = ("lfm2", "search_space", "devices", "nas", "reports")


@pytest.fixture
def real_study(tmp_path):
    """(URL, name) of a private copy of the committed study a real `lfm2-nas search` wrote."""
    copy = tmp_path / "search_small.db"
    shutil.copyfile(REAL_STUDY, copy)
    return f"sqlite:///{copy}", "small"


def test_one_status_enum_covers_measurements_and_compile_errors():
    assert set(MEASUREMENT_STATUSES) <= {s.value for s in TrialStatus}
    assert TrialStatus("compile_error") is TrialStatus.COMPILE_ERROR and TrialStatus.COMPILE_ERROR == "compile_error"
    assert TrialStatus.OK.state == TrialStatus.INFEASIBLE.state == TrialState.COMPLETE
    assert TrialStatus.PREFILTERED.state == TrialState.PRUNED
    assert {TrialStatus(s).state for s in ("compile_error", "oom", "error", "timeout", "lost")} == {TrialState.FAIL}


def test_writers_cannot_drift_from_the_schema():
    assert check_trial_attrs({"status": TrialStatus.OOM, "reason": "x" * 5000, "params": 3, "quality": None}) == {"status": "oom", "reason": "x" * 2000, "params": 3}
    with pytest.raises(ValueError, match="'footprint' is not in the study schema"):
        check_trial_attrs({"footprint": 1})
    with pytest.raises(ValueError, match="'params' holds str"):
        check_trial_attrs({"params": "3"})
    with pytest.raises(ValueError, match="'cached' holds int"):
        check_trial_attrs({"cached": 1})
    with pytest.raises(ValueError):
        check_trial_attrs({"status": "exploded"})


def _literal_calls(path: Path, method: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == method and n.args and isinstance(n.args[0], ast.Constant)]


def test_the_schema_module_is_the_only_writer_of_trial_attrs():
    """Every trial attr is written through `nas.study_schema` (`write_trial_attrs`, which
    checks keys, types and statuses): no other module of the packages calls
    `set_user_attr` or `set_trial_user_attr`, nor hands Optuna raw `user_attrs`."""
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path == REPO / "nas" / "study_schema.py":
                continue
            for method in ("set_user_attr", "set_trial_user_attr"):
                assert not _literal_calls(path, method), f"{path} calls {method}: write through nas.study_schema"


def test_device_records_are_checked_and_read_back():
    record = DeviceRecord(status=TrialStatus.INFEASIBLE, budget_bytes=10, prefill_ms=2.0, decode_ms=1.0, footprint_bytes=12, over_budget_bytes=2.0, reason="over")
    stored = check_trial_attrs({"devices": {"a": record, "b": {"status": "lost", "reason": "gone"}}})["devices"]
    assert stored["a"] == {"status": "infeasible", "budget_bytes": 10, "prefill_ms": 2.0, "decode_ms": 1.0, "footprint_bytes": 12, "over_budget_bytes": 2.0, "reason": "over"}
    assert DeviceRecord.from_attrs(stored["a"]) == record
    with pytest.raises(ValueError, match="not a device record"):
        check_trial_attrs({"devices": {"a": {"status": "ok", "footprint": 1}}})
    with pytest.raises(ValueError):
        check_trial_attrs({"devices": {"a": {"status": "exploded"}}})
    # the headline of a multi-device trial is the worst device's, only when every device measured it
    ok = DeviceRecord(status=TrialStatus.OK, prefill_ms=5.0, decode_ms=0.5, footprint_bytes=20)
    assert worst_over_devices({"a": record, "c": ok}) == {"prefill_ms": 5.0, "decode_ms": 1.0, "footprint_bytes": 20}
    assert worst_over_devices({"a": record, "b": DeviceRecord.from_attrs(stored["b"])}) == {}


def test_metadata_key_and_storage_rule_have_one_home():
    """No other module spells the metadata key or opens Optuna storage by itself."""
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path == REPO / "nas" / "study_schema.py":
                continue
            text = path.read_text()
            assert '"lfm2_nas"' not in text, f"{path} spells the metadata key: import METADATA_KEY from nas.study_schema"
            assert "RDBStorage(" not in text and "JournalFileBackend(" not in text, f"{path} opens storage itself: use nas.study_schema.open_storage"


def test_metadata_round_trip_keeps_unknown_keys(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/m.db", create=True), study_name="m")
    StudyMetadata.from_attrs({"backend": "onnx", "budget_bytes": 5, "device": "not a dict", "added_later": [1]}).write(study)
    meta = StudyMetadata.read(optuna.load_study(study_name="m", storage=f"sqlite:///{tmp_path}/m.db"))
    assert meta.written and meta.backend == "onnx" and meta.budget_bytes == 5 and meta.device == {} and meta.extra == {"added_later": [1]}
    assert study.user_attrs[METADATA_KEY]["added_later"] == [1]
    assert not StudyMetadata.read(optuna.create_study()).written


def test_storage_rule_only_the_search_creates(tmp_path):
    for url in (f"sqlite:///{tmp_path}/typo.db", f"{tmp_path}/typo.log", f"journal:{tmp_path}/typo"):
        with pytest.raises(UserError, match="does not exist"):
            open_storage(url)
    assert list(tmp_path.iterdir()) == []  # reading created nothing
    with pytest.raises(UserError, match="folder .* does not exist"):
        open_storage(f"sqlite:///{tmp_path}/no/such/folder/s.db", create=True)
    open_storage(f"sqlite:///{tmp_path}/new.db", create=True)
    assert (tmp_path / "new.db").is_file()
    open_storage(str(tmp_path / "new.db"))  # a bare path to an existing SQLite file is accepted
    with pytest.raises(UserError, match="no study named 'x': no database file"):
        load_study("x", f"sqlite:///{tmp_path}/missing.db")


def test_records_read_the_real_study(real_study):
    url, name = real_study
    records = read_trials(load_study(name, url))
    assert records and all(isinstance(r, TrialRecord) and isinstance(r.status, TrialStatus) for r in records)
    measured = [r for r in records if r.measured]
    assert measured and all(r.prefill_ms and r.decode_ms and r.footprint_bytes and r.spec for r in measured)
    assert all((r.constraint <= 0) == (r.status is TrialStatus.OK) for r in measured)


def test_trials_table_is_a_dataframe_of_records(real_study):
    url, name = real_study
    study = load_study(name, url)
    table = trials_table(study)
    records = read_trials(study)
    assert list(table.index) == [r.number for r in records]
    assert {"status", "layout", "quality", "prefill_ms", "decode_ms", "footprint_bytes", "reason"} <= set(table.columns)
    for record in records:
        row = table.loc[record.number]
        assert row["status"] == record.status.value and row["layout"] == record.layout
        if record.measured:
            assert row["decode_ms"] == pytest.approx(record.decode_ms) and row["footprint_bytes"] == record.footprint_bytes
    empty = trials_table(optuna.create_study())
    assert empty.empty and "status" in empty.columns


def test_study_export_csv_json_parquet(lfm2_nas, real_study, tmp_path):
    import pandas

    url, name = real_study
    expected = trials_table(load_study(name, url))
    csv = lfm2_nas("study", "export", "--study", name, "--storage", url, cwd=tmp_path, timeout=300)
    assert csv.returncode == 0, csv.stderr
    (tmp_path / "t.csv").write_text(csv.stdout)
    from_csv = pandas.read_csv(tmp_path / "t.csv", index_col="number")
    assert list(from_csv.index) == list(expected.index) and list(from_csv.columns) == list(expected.columns)
    assert from_csv["decode_ms"].tolist() == pytest.approx(expected["decode_ms"].tolist(), nan_ok=True)

    out = tmp_path / "t.json"
    as_json = lfm2_nas("study", "export", "--study", name, "--storage", url, "--format", "json", "--out", out, cwd=tmp_path, timeout=300)
    assert as_json.returncode == 0 and f"wrote {len(expected)} trials" in as_json.stderr, as_json.stderr
    rows = json.loads(out.read_text())
    assert [row["number"] for row in rows] == list(expected.index) and rows[0]["status"] == expected.iloc[0]["status"]

    parquet = lfm2_nas("study", "export", "--study", name, "--storage", url, "--format", "parquet", "--out", tmp_path / "t.parquet", cwd=tmp_path, timeout=300)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert parquet.returncode == 2 and 'pip install -e ".[parquet]"' in parquet.stderr
    else:
        assert parquet.returncode == 0, parquet.stderr
        assert pandas.read_parquet(tmp_path / "t.parquet")["status"].tolist() == expected["status"].tolist()


def test_study_export_refuses_before_reading(lfm2_nas, real_study, tmp_path, monkeypatch, capsys):
    url, name = real_study
    bad = lfm2_nas("study", "export", "--study", name, "--storage", url, "--format", "xlsx", cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "csv, parquet, json" in bad.stderr
    nowhere = lfm2_nas("study", "export", "--study", name, "--storage", url, "--out", tmp_path / "no" / "t.csv", cwd=tmp_path, timeout=300)
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr
    # Without pyarrow, parquet is refused with the fix (in this process: pyarrow made unimportable).
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    from nas.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["study", "export", "--study", name, "--storage", url, "--format", "parquet", "--out", str(tmp_path / "t.parquet")])
    assert exited.value.code == 2 and 'pip install -e ".[parquet]"' in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "t.parquet").exists()
