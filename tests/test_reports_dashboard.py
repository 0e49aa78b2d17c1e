"""`lfm2-nas dashboard` follows a study as trials arrive; `optuna-dashboard` opens it as is."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from lfm2 import presets
from lfm2.errors import UserError
from reports.dashboard import make_server
from testkit import REPO
from testkit.reports import add_measured_trial, launch_chromium, study_under_test

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        return json.load(response)


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line the process prints, or a failure with what it said on stderr."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if not line:
        process.kill()
        pytest.fail(f"the server printed nothing within {timeout} s; stderr: {process.stderr.read()}")
    return line


def _stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def _faster_than_every_trial(study: optuna.Study) -> dict:
    """Figures for a new trial that put it on the front: lower latencies than any trial."""
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "prefill_ms": min(t.user_attrs["prefill_ms"] for t in completed) / 2,
        "decode_ms": min(t.user_attrs["decode_ms"] for t in completed) / 2,
        "footprint_bytes": min(t.user_attrs["footprint_bytes"] for t in completed),
    }


def test_dashboard_answers_and_updates_when_a_trial_is_added(tmp_path):
    url, name = study_under_test(tmp_path)
    study = optuna.load_study(study_name=name, storage=url)
    n_before = len(study.trials)
    process = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "dashboard", "--study", name, "--storage", url, "--port", "0", "--refresh", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = _first_line(process, timeout=240)
        assert line.startswith(f"dashboard of study {name!r} at http://127.0.0.1:"), line
        base = line.split(" at ", 1)[1].split()[0]
        health = _get_json(base + "api/health")
        assert health == {"ok": True, "study": name, "n_trials": n_before, "revision": health["revision"]}
        first = _get_json(base + "api/report.json")
        assert first["n_trials"] == n_before and first["pareto_numbers"] == sorted(t.number for t in study.best_trials)
        assert _get_json(base + f"api/report.json?revision={first['revision']}") == {"unchanged": True, "revision": first["revision"], "n_trials": n_before}

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(base)
            page.wait_for_function(f"document.body.dataset.trials === '{n_before}' && document.querySelectorAll('.plot .main-svg').length > 0")
            assert page.title() == f"{name} · lfm2-nas live dashboard"
            page.locator('#pareto-table th[data-key="decode_ms"]').click()  # a sort the update must keep

            # A trial completes: the search would `tell` it; here Optuna's API adds it.
            spec = presets["LFM2-350M"].replace(d_model=384, n_heads=6, n_kv_heads=2, head_dim=64, ffn_dim=1536, layers=("conv", "conv", "attn", "conv", "conv", "conv"))
            added = add_measured_trial(study, spec, seed=99, with_params=False, **_faster_than_every_trial(study))
            assert added.number in [t.number for t in study.best_trials]

            page.wait_for_function(f"document.body.dataset.trials === '{n_before + 1}'", timeout=30_000)
            rows = page.eval_on_selector_all("#pareto-table tbody tr", "rows => rows.map(r => Number(r.dataset.trial))")
            assert sorted(rows) == sorted(t.number for t in study.best_trials)
            assert rows[0] == added.number, "the kept sort (decode ascending) puts the new fastest trial first"
            assert page.locator(f'#trials-table tr[data-trial="{added.number}"]').count() == 1
            assert page.locator(f"article.arch#arch-{added.number}").count() == 1
            assert "live:" in page.inner_text("#status")
            assert problems == []
            browser.close()

        second = _get_json(base + f"api/report.json?revision={first['revision']}")
        assert second["n_trials"] == n_before + 1 and second["revision"] != first["revision"]
        assert second["pareto_numbers"] == sorted(t.number for t in study.best_trials)
        with urllib.request.urlopen(base + "static/plotly.min.js", timeout=30) as response:
            assert response.read(40).startswith(b"/**\n* plotly.js")
    finally:
        returncode = _stop(process)
    assert returncode == 0, process.stderr.read()


def test_dashboard_refuses_a_missing_study_or_a_busy_port(tmp_path):
    url, name = study_under_test(tmp_path)
    with pytest.raises(UserError, match=rf"no study named 'nope' in {url} \(studies there: {name}\); check --study and --storage"):
        make_server("nope", url, port=0)
    server = make_server(name, url, port=0)
    try:
        port = server.server_address[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port} .*pass another --port"):
            make_server(name, url, port=port)
    finally:
        server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a third-party server's start-up; CI runs it with the slow tests
def test_optuna_dashboard_opens_the_study(tmp_path):
    """The documented command, `optuna-dashboard sqlite:///FILE.db`, lists the study and
    serves its trials as they are stored."""
    url, name = study_under_test(tmp_path)
    study = optuna.load_study(study_name=name, storage=url)
    port = _free_port()
    executable = Path(sys.executable).parent / "optuna-dashboard"
    process = subprocess.Popen([str(executable), url, "--host", "127.0.0.1", "--port", str(port), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                studies = _get_json(f"http://127.0.0.1:{port}/api/studies", timeout=5)["study_summaries"]
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not answer; stderr: {process.stderr.read() if process.poll() is not None else ''}")
                time.sleep(0.5)
        summary = next(s for s in studies if s["study_name"] == name)
        assert summary["directions"] == [d.name.lower() for d in study.directions]
        assert {a["key"] for a in summary["user_attrs"]} == set(study.user_attrs) >= {"lfm2_nas"}
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        assert detail["objective_names"] == study.metric_names
        assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
        assert [t["state"] for t in detail["trials"]] == [t.state.name.capitalize() for t in study.trials]
        for served, trial in zip(detail["trials"], study.trials):
            if trial.values:
                assert served["values"] == trial.values
            # optuna-dashboard 0.21 shows only the old list form of constraints, not Optuna 5's
            # named `set_constraint` values; feasibility shows through the `status` user attr.
            assert served["constraints"] == trial.system_attrs.get("constraints", [])
            assert {a["key"] for a in served["user_attrs"]} == set(trial.user_attrs)
            if "status" in trial.user_attrs:
                assert {"key": "status", "value": trial.user_attrs["status"]} in served["user_attrs"]
        # optuna-dashboard's "best trials" ignore constraints, unlike study.best_trials: each
        # feasible Pareto trial is there unless an infeasible one beats it.
        assert {t["number"] for t in detail["best_trials"]} & {t.number for t in study.best_trials}
    finally:
        process.terminate()
        process.wait(timeout=30)
