"""The HTML report of a study, written by `lfm2-nas report`, rendered in headless Chromium.

Debian's `chromium` (installed by `.ci/run`) is driven by the `playwright` package with
`executable_path`; no browser is downloaded. The page must render with the network cut
off (plotly.js is inlined), log no console error, draw non-blank plots, and show the
study's Pareto set exactly; its tables sort on a click.
"""

from __future__ import annotations

import base64
import math
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from testkit import REPO
from testkit.reports import launch_chromium, study_under_test

# Pixel statistics of a PNG, decoded by the browser itself (no imaging library needed).
PIXEL_STATS_JS = """async (b64) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], {type: 'image/png'}));
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(bitmap, 0, 0);
  const d = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  let n = 0, sum = 0, sumSq = 0, saturated = 0;
  for (let i = 0; i < d.length; i += 4) {
    const lum = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
    sum += lum; sumSq += lum * lum; n++;
    if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) saturated++;
  }
  const mean = sum / n;
  return {width: bitmap.width, height: bitmap.height, std: Math.sqrt(sumSq / n - mean * mean), saturated: saturated};
}"""


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def study_and_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reports-html")
    url, name = study_under_test(folder)
    out = folder / "out" / "report.html"
    out.parent.mkdir()  # `report --out` writes into a folder that exists; it creates none
    result = run_cli("report", "--study", name, "--storage", url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    return optuna.load_study(study_name=name, storage=url), out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def loaded(browser, study_and_report):
    """The report open in a page with every network request refused and recorded."""
    study, report = study_and_report
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    network: list[str] = []
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}") if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def refuse(route):
        network.append(route.request.url)
        route.abort()

    page.route("http*://**", refuse)  # the report must need no network at all
    page.goto(report.as_uri())
    page.wait_for_function("document.querySelectorAll('.plot .main-svg').length >= document.querySelectorAll('.plot').length && document.querySelectorAll('.plot').length > 0")
    yield study, page, problems, network
    page.close()


def test_report_renders_offline_without_console_errors(loaded):
    study, page, problems, network = loaded
    assert network == []
    assert problems == []
    assert page.title() == f"{study.study_name} · lfm2-nas report"
    ids = page.eval_on_selector_all(".plot", "els => els.map(e => e.id)")
    expected = ["fig-quality-prefill", "fig-quality-decode"] if len(study.directions) == 3 else ["fig-decode-prefill"]
    assert ids == [*expected, "fig-memory", "fig-hypervolume", "fig-outcomes"]


def test_plots_are_drawn_and_not_blank(browser, loaded):
    _study, page, problems, _network = loaded
    decoder = browser.new_page()
    try:
        for plot_id in page.eval_on_selector_all(".plot", "els => els.map(e => e.id)"):
            # The plotting area only (inside the axes): titles and legends do not count.
            area = page.locator(f"#{plot_id} .draglayer .nsewdrag").first
            box = area.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 50, plot_id
            png = area.screenshot()  # scrolls it into view; the pixels of that rectangle
            stats = decoder.evaluate(PIXEL_STATS_JS, base64.b64encode(png).decode())
            # Pixel variance above the bare axes' (the control below: std ~3), and coloured
            # pixels (markers, lines, bars): one marker alone gives std ~6 and ~100 of them.
            assert stats["std"] > 5, (plot_id, stats)
            assert stats["saturated"] >= 40, (plot_id, stats)
            assert len(page.eval_on_selector_all(f"#{plot_id} .scatterlayer .point, #{plot_id} .barlayer .point", "els => els")) > 0, plot_id
    finally:
        decoder.close()
    # Negative control: the same figure with its data removed (axes, grid and title left)
    # fails both measures, so they do tell a drawn plot from a blank one.
    from reports.html import plotly_js

    empty = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        empty.set_content("<div id='e' style='width:660px;height:460px'></div>")
        empty.add_script_tag(content=plotly_js())
        layout = page.evaluate("() => JSON.parse(JSON.stringify(document.getElementById('fig-quality-decode') ? document.getElementById('fig-quality-decode').layout : document.getElementById('fig-decode-prefill').layout))")
        empty.evaluate("layout => Plotly.newPlot('e', [], layout)", layout)
        png = empty.locator("#e .draglayer .nsewdrag").first.screenshot()
        stats = empty.evaluate(PIXEL_STATS_JS, base64.b64encode(png).decode())
        assert stats["saturated"] == 0 and stats["std"] <= 5, stats
    finally:
        empty.close()
    assert problems == []


def _table_rows(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#pareto-table tbody tr",
        "rows => rows.map(r => Object.fromEntries([['trial', r.dataset.trial], ...Array.from(r.cells).map(c => [c.dataset.key, c.dataset.value])]))",
    )


def test_pareto_table_is_the_studys_pareto_set(loaded):
    study, page, _problems, _network = loaded
    names = study.metric_names
    best = {t.number: t for t in study.best_trials}
    rows = _table_rows(page)
    assert sorted(int(r["trial"]) for r in rows) == sorted(best)
    for row in rows:
        trial = best[int(row["trial"])]
        for name, value in zip(names, trial.values):
            assert float(row[name]) == value, (trial.number, name)  # repr() keeps every digit
        stats = trial.user_attrs["decode_stats"]
        assert float(row["decode_p10_ms"]) == stats["p10_ms"] and float(row["decode_p90_ms"]) == stats["p90_ms"]
        assert float(row["decode_cv"]) == stats["cv"]
        assert float(row["prefill_cv"]) == trial.user_attrs["prefill_stats"]["cv"]
        assert int(row["footprint_bytes"]) == trial.user_attrs["footprint_bytes"]
        assert row["layout"] == trial.user_attrs["layout"]


def _column(page, table: str, key: str) -> list[str]:
    return page.eval_on_selector_all(f'#{table} tbody td[data-key="{key}"]', "cells => cells.map(c => c.dataset.value)")


def test_tables_sort_on_a_click(loaded):
    _study, page, problems, _network = loaded
    for table in ("pareto-table", "trials-table"):
        header = page.locator(f'#{table} th[data-key="decode_ms"]')
        header.click()
        values = _column(page, table, "decode_ms")
        measured = [float(v) for v in values if v != ""]
        assert measured == sorted(measured) and values[len(measured):] == [""] * (len(values) - len(measured)), "unmeasured rows go last"
        assert header.get_attribute("aria-sort") == "ascending"
        header.click()
        descending = [float(v) for v in _column(page, table, "decode_ms") if v != ""]
        assert descending == sorted(measured, reverse=True)
        assert header.get_attribute("aria-sort") == "descending"
    assert len(_column(page, "trials-table", "decode_ms")) > 2
    # Text columns sort too, and every row keeps its cells.
    page.locator('#trials-table th[data-key="outcome"]').click()
    outcomes = _column(page, "trials-table", "outcome")
    assert outcomes == sorted(outcomes)
    page.locator('#trials-table th[data-key="trial"]').click()
    rows = page.eval_on_selector_all("#trials-table tbody tr", "rows => rows.map(r => [Number(r.dataset.trial), r.cells[0].dataset.value])")
    assert [n for n, _ in rows] == sorted(n for n, _ in rows) and all(str(n) == v for n, v in rows)
    assert problems == []


def test_layout_strips_presets_and_facts(loaded):
    study, page, _problems, _network = loaded
    trials = {t.number: t for t in study.trials}
    cards = page.eval_on_selector_all(
        "article.arch",
        "cards => cards.map(c => ({trial: c.dataset.trial, blocks: Array.from(c.querySelectorAll('.strip > .blk')).map(b => b.classList[1])}))",
    )
    shown = {int(c["trial"]) for c in cards}
    presets = {t.number for t in study.trials if t.user_attrs.get("preset")}
    assert shown == {t.number for t in study.best_trials} | presets
    letters = {"conv": "C", "attn": "A", "swa": "S"}
    for card in cards:
        layout = trials[int(card["trial"])].user_attrs["layout"]
        assert "".join(letters[b] for b in card["blocks"]) == layout
    # The presets that were measured are starred, by name, on the fronts.
    # (Stars on the fronts for measured presets: test_reports_data checks them on a study
    # that has some; the real test search's small space holds no preset.)
    measured_presets = sorted(t.user_attrs["preset"] for t in study.trials if t.user_attrs.get("preset") and t.state == TrialState.COMPLETE)
    first_front = page.eval_on_selector_all(".plot", "els => els[0].id")
    starred = page.evaluate(f"() => document.getElementById('{first_front}').data.filter(t => t.name === 'LFM2 preset').flatMap(t => t.text)")
    assert sorted(starred) == measured_presets
    facts_text = page.inner_text("#facts")
    meta = study.user_attrs["lfm2_nas"]
    assert str(meta["device"]["name"]) in facts_text and str(meta["context"]) in facts_text and f"{meta['budget_bytes']:,} bytes" in facts_text
    assert "prompt_lengths" in facts_text and "decode_depths" in facts_text
    # Every trial is listed with its outcome, the prefiltered and failed ones included.
    listed = page.eval_on_selector_all("#trials-table tbody tr", "rows => rows.map(r => Number(r.dataset.trial))")
    assert sorted(listed) == sorted(trials)
    summary = page.inner_text("#summary")
    hv = [float(x) for x in [page.evaluate("() => document.getElementById('fig-hypervolume').data[0].y.slice(-1)[0]")]]
    assert math.isfinite(hv[0]) and 0 < hv[0] <= 1
    assert "Hypervolume" in summary and "reference point" in summary
