// lfm2-nas report page: render a payload (figures + HTML sections), sort tables on a
// header click, and on the live dashboard poll for new payloads. No network is needed
// for the static report: its payload and plotly.js are in the page.
(function () {
  "use strict";
  var sortState = {}; // table id -> {key, dir}; re-applied after a live update
  var revision = null;

  function plotConfig() {
    return { responsive: true, displaylogo: false };
  }

  function render(payload) {
    Object.keys(payload.sections).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) el.innerHTML = payload.sections[id];
    });
    var container = document.getElementById("figures");
    Object.keys(payload.figures).forEach(function (id) {
      var el = document.getElementById(id);
      if (!el) {
        el = document.createElement("div");
        el.className = "plot";
        el.id = id;
        container.appendChild(el);
      }
      var fig = payload.figures[id];
      Plotly.react(el, fig.data, fig.layout, plotConfig());
    });
    Object.keys(sortState).forEach(function (tableId) {
      applySort(tableId, sortState[tableId].key, sortState[tableId].dir);
    });
    revision = payload.revision;
    document.body.setAttribute("data-revision", payload.revision);
    document.body.setAttribute("data-trials", String(payload.n_trials));
  }

  function cellValue(row, key) {
    var cell = row.querySelector('td[data-key="' + key + '"]');
    return cell ? cell.getAttribute("data-value") : "";
  }

  function applySort(tableId, key, dir) {
    var table = document.getElementById(tableId);
    if (!table) return;
    var th = table.querySelector('th[data-key="' + key + '"]');
    if (!th) return;
    var numeric = th.getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, key), y = cellValue(b, key);
      // Empty cells (no figure) go last whichever way the column is sorted.
      if (x === "" && y === "") return 0;
      if (x === "") return 1;
      if (y === "") return -1;
      var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return dir === "ascending" ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.querySelectorAll("th[data-key]"), function (other) {
      other.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", dir);
  }

  document.addEventListener("click", function (event) {
    var th = event.target.closest("table.sortable th[data-key]");
    if (!th) return;
    var table = th.closest("table");
    var key = th.getAttribute("data-key");
    var current = sortState[table.id];
    var dir = current && current.key === key && current.dir === "ascending" ? "descending" : "ascending";
    sortState[table.id] = { key: key, dir: dir };
    applySort(table.id, key, dir);
  });

  render(JSON.parse(document.getElementById("report-data").textContent));

  var live = window.LFM2_NAS_LIVE;
  if (!live) return;
  var status = document.getElementById("status");
  function poll() {
    fetch(live.url + "?revision=" + encodeURIComponent(revision), { cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (payload) {
        if (!payload.unchanged) render(payload);
        status.className = "muted";
        status.textContent = "live: " + (payload.n_trials !== undefined ? payload.n_trials + " trials, " : "") +
          "checked " + new Date().toLocaleTimeString() + " (every " + live.interval_s + " s)";
      })
      .catch(function (error) {
        status.className = "stale";
        status.textContent = "cannot reach the dashboard server (" + error.message + "); showing the last data";
      })
      .then(function () { setTimeout(poll, live.interval_s * 1000); });
  }
  setTimeout(poll, live.interval_s * 1000);
})();
