"""A multi-device study read by the reports: each device's own front is the one Optuna
finds for that device alone, the candidates on every front are their intersection, and
the report, `study show` and `pick` read it (a study written the way the search writes
one: docs/study-schema.md, "Several devices in one search")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from lfm2.presets import presets
from nas.study_schema import StudyMetadata, check_trial_attrs
from reports.devices import device_names, device_view, on_every_front
from reports.html import report_payload
from reports.study_data import read_study

REPO = Path(__file__).resolve().parents[1]
DEVICES = ["pixel8", "rpi5"]
BUDGETS = {"pixel8": 500 * 2**20, "rpi5": 900 * 2**20}
NAMES = ["quality", "prefill_ms@pixel8", "decode_ms@pixel8", "prefill_ms@rpi5", "decode_ms@rpi5"]
DIRECTIONS = ["maximize", "minimize", "minimize", "minimize", "minimize"]


def _record(rng, footprint: int, device: str, status: str | None = None) -> dict:
    prefill, decode = float(rng.uniform(50, 400)), float(rng.uniform(5, 60))
    over = float(footprint - BUDGETS[device])
    status = status or ("ok" if over <= 0 else "infeasible")
    return {"status": status, "budget_bytes": BUDGETS[device], "prefill_ms": prefill, "decode_ms": decode, "footprint_bytes": footprint,
            "over_budget_bytes": over, "prefill_stats": {"median_ms": prefill, "samples_ms": [prefill]}, "decode_stats": {"median_ms": decode, "samples_ms": [decode]}}


def write_study(url: str) -> optuna.Study:
    """16 trials on two devices: measured on both (some over one budget), one lost on
    rpi5 but measured on pixel8, one kept off pixel8 by the pre-filter, one compile error."""
    rng = np.random.default_rng(7)
    study = optuna.create_study(study_name="two-devices", storage=url, directions=DIRECTIONS)
    study.set_metric_names(NAMES)
    StudyMetadata(devices={d: {"name": d, "emulated": True} for d in DEVICES}, budgets_bytes=BUDGETS, budget_bytes=None,
                  context=512, backend="onnx", quant="int8", quality="mad").write(study)
    spec = presets["LFM2-350M"]
    base = {"spec": spec.to_dict(), "spec_key": spec.key, "layout": spec.layout, "params": 354_483_968}
    for number in range(16):
        footprint = int(rng.uniform(300, 1000) * 2**20)
        quality = float(rng.uniform(0.2, 0.6))
        if number == 12:  # rpi5's agent lost: FAIL, pixel8's figures kept
            records = {"pixel8": _record(rng, 300 * 2**20, "pixel8"), "rpi5": {"status": "lost", "reason": "agent rpi5 is unreachable", "budget_bytes": BUDGETS["rpi5"]}}
            attrs = base | {"status": "lost", "reason": "rpi5: agent rpi5 is unreachable (measured on pixel8)", "quality": quality, "devices": records}
            study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=check_trial_attrs(attrs), constraints={"memory_over_budget_bytes@pixel8": records["pixel8"]["over_budget_bytes"]}))
            continue
        if number == 13:  # certainly over pixel8's budget: measured on rpi5 only
            records = {"pixel8": {"status": "prefiltered", "reason": "needs at least 600 MiB", "budget_bytes": BUDGETS["pixel8"]}, "rpi5": _record(rng, 700 * 2**20, "rpi5")}
            attrs = base | {"status": "prefiltered", "reason": "pixel8: needs at least 600 MiB (measured on rpi5)", "quality": quality, "devices": records}
            study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs=check_trial_attrs(attrs), constraints={"memory_over_budget_bytes@pixel8": 100.0 * 2**20, "memory_over_budget_bytes@rpi5": records["rpi5"]["over_budget_bytes"]}))
            continue
        if number == 14:
            records = {d: {"status": "compile_error", "reason": "compile failed: boom", "budget_bytes": BUDGETS[d]} for d in DEVICES}
            study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=check_trial_attrs(base | {"status": "compile_error", "reason": "compile failed: boom", "devices": records})))
            continue
        records = {d: _record(rng, footprint + int(rng.uniform(0, 4)) * 2**20, d) for d in DEVICES}
        over = [d for d in DEVICES if records[d]["status"] == "infeasible"]
        attrs = base | {"status": "infeasible" if over else "ok", "quality": quality, "devices": records}
        values = [quality, *(records[d][k] for d in DEVICES for k in ("prefill_ms", "decode_ms"))]
        constraints = {f"memory_over_budget_bytes@{d}": records[d]["over_budget_bytes"] for d in DEVICES}
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=values, user_attrs=check_trial_attrs(attrs), constraints=constraints))
    return study


def optuna_front_on(study: optuna.Study, device: str) -> list[int]:
    """The reference: Optuna's own `best_trials` of a one-device study holding each trial's
    figures on `device` (quality, its latencies, its constraint), same numbering."""
    alone = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for trial in study.trials:
        record = trial.user_attrs.get("devices", {}).get(device, {})
        quality = trial.user_attrs.get("quality")
        if record.get("status") in ("ok", "infeasible") and quality is not None:
            alone.add_trial(create_trial(state=TrialState.COMPLETE, values=[quality, record["prefill_ms"], record["decode_ms"]], constraints={"memory": record["over_budget_bytes"]}))
        else:
            alone.add_trial(create_trial(state=TrialState.FAIL))
    return sorted(t.number for t in alone.best_trials)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("devices")
    url = f"sqlite:///{folder / 'study.db'}"
    return write_study(url), url


def test_each_device_front_is_optunas_front_on_that_device(study):
    study, _url = study
    data = read_study(study)
    assert device_names(data) == DEVICES
    views = {d: device_view(data, d) for d in DEVICES}
    for device, view in views.items():
        assert view.pareto_numbers == optuna_front_on(study, device), device
        assert view.metric_names == ["quality", "prefill_ms", "decode_ms"] and view.budget_bytes == BUDGETS[device]
        assert view.facts["device"]["name"] == device
    # the joint Pareto set is Optuna's, over all five objectives and both constraints
    assert data.pareto_numbers == sorted(t.number for t in study.best_trials)
    assert on_every_front(views) == sorted(set(views["pixel8"].pareto_numbers) & set(views["rpi5"].pareto_numbers))
    # the trial lost on rpi5 is a measured point on pixel8 and a failure on rpi5; the one
    # the pre-filter kept off pixel8 is prefiltered there and measured on rpi5
    pixel8, rpi5 = ({t.number: t for t in views[d].trials} for d in DEVICES)
    assert pixel8[12].measured and pixel8[12].outcome == "feasible" and rpi5[12].outcome == "failed" and not rpi5[12].measured
    assert pixel8[13].outcome == "prefiltered" and rpi5[13].measured
    assert pixel8[14].outcome == rpi5[14].outcome == "failed"
    # headline figures of the joint rows: the slowest device's, only where both measured
    joint = {t.number: t for t in data.trials}
    both = joint[0].devices
    assert joint[0].decode_ms == max(both[d]["decode_ms"] for d in DEVICES)
    assert joint[12].decode_ms is None


def _rows(html: str, table_id: str) -> list[int]:
    table = re.search(rf'<table class="sortable" id="{table_id}">(.*?)</table>', html, re.S)
    assert table, table_id
    return sorted(int(n) for n in re.findall(r'<tr data-trial="(\d+)"', table.group(1)))


def test_the_report_has_a_front_per_device_and_the_candidates_on_every_front(study):
    study, _url = study
    data = read_study(study)
    payload = report_payload(data)
    assert list(payload["figures"]) == ["fig-pixel8-quality-prefill", "fig-pixel8-quality-decode", "fig-pixel8-memory",
                                        "fig-rpi5-quality-prefill", "fig-rpi5-quality-decode", "fig-rpi5-memory", "fig-hypervolume", "fig-outcomes"]
    pareto_html = payload["sections"]["pareto"]
    for device in DEVICES:
        front = optuna_front_on(study, device)
        assert payload["devices"][device]["pareto_numbers"] == front
        assert _rows(pareto_html, f"pareto-table-{device}") == front
        # the figure's Pareto trace holds exactly this device's front
        traces = {t["name"]: t for t in payload["figures"][f"fig-{device}-quality-decode"]["data"]}
        assert sorted(traces[f"Pareto set on {device}"]["customdata"]) == front
    everywhere = on_every_front({d: device_view(data, d) for d in DEVICES})
    assert payload["on_every_front"] == everywhere
    if everywhere:
        assert _rows(pareto_html, "everywhere-table") == everywhere
    assert _rows(pareto_html, "pareto-table") == sorted(t.number for t in study.best_trials)
    assert "Device pixel8" in payload["sections"]["facts"] and "Device rpi5" in payload["sections"]["facts"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_study_show_and_pick_read_a_multi_device_study(study):
    study, url = study
    shown = _cli("study", "show", "--study", "two-devices", "--storage", url, "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {row["number"]: row for row in json.loads(shown.stdout)["trials"]}
    assert rows[12]["devices"]["rpi5"]["status"] == "lost" and rows[12]["devices"]["pixel8"]["decode_ms"] > 0
    table = _cli("study", "show", "--study", "two-devices", "--storage", url)
    assert table.returncode == 0 and "decode_ms@rpi5" in table.stdout, table.stderr
    picked = _cli("pick", "--study", "two-devices", "--storage", url, "--json")
    assert picked.returncode == 0, picked.stderr
    choice = json.loads(picked.stdout)
    # the best quality among the trials feasible on both devices
    feasible = [t for t in study.trials if t.state == TrialState.COMPLETE and t.user_attrs["status"] == "ok"]
    assert choice["trial"] == max(feasible, key=lambda t: t.values[0]).number
    assert choice["decode_ms"] == max(study.trials[choice["trial"]].user_attrs["devices"][d]["decode_ms"] for d in DEVICES)
