"""The report page's stylesheet (a module, not a file, so that it ships in any install)."""

REPORT_CSS = """
:root { --conv: #4c78a8; --attn: #f58518; --swa: #54a24b; --line: #d8dde3; --muted: #5f6b7a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; padding: 16px 24px 48px; max-width: 1680px; color: #1d2630; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 0 0 8px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
.muted { color: var(--muted); }
.chips { display: flex; flex-wrap: wrap; gap: 8px; } .chip { border: 1px solid var(--line); border-radius: 12px; padding: 2px 10px; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px; vertical-align: baseline; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 12px; }
.plot { min-height: 260px; border: 1px solid var(--line); border-radius: 6px; }
.table-wrap { overflow-x: auto; }
table.sortable { border-collapse: collapse; font-size: 13px; white-space: nowrap; }
table.sortable caption { caption-side: top; text-align: left; color: var(--muted); padding: 4px 0 8px; white-space: normal; }
table.sortable th, table.sortable td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: right; }
table.sortable td[data-key="reason"], table.sortable td[data-key="layout"], table.sortable td[data-key="preset"] { text-align: left; }
table.sortable td[data-key="reason"] { white-space: normal; min-width: 280px; }
table.sortable th { position: sticky; top: 0; background: #f3f5f8; cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; } table.sortable th[aria-sort="descending"]::after { content: " ▼"; }
table.sortable tbody tr:hover { background: #f7f9fc; } tr.preset td[data-key="preset"] { font-weight: 600; }
.strip { display: inline-flex; gap: 2px; vertical-align: middle; padding: 2px; }
.blk { display: inline-block; width: 14px; height: 26px; border-radius: 2px; background: #999; }
.strip.small .blk { width: 7px; height: 14px; border-radius: 1px; gap: 1px; }
.blk.conv { background: var(--conv); } .blk.attn { background: var(--attn); } .blk.swa { background: var(--swa); }
.legend { display: flex; gap: 18px; flex-wrap: wrap; } .legend-item { display: inline-flex; align-items: center; gap: 4px; }
.arch-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 12px; }
.arch { border: 1px solid var(--line); border-radius: 6px; padding: 12px; }
.arch dl { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 4px 12px; margin: 8px 0; }
.arch dt { color: var(--muted); font-size: 12px; } .arch dd { margin: 0; font-variant-numeric: tabular-nums; }
.tag { font-size: 11px; font-weight: 500; color: #fff; background: #555; border-radius: 8px; padding: 1px 8px; margin-left: 6px; vertical-align: middle; }
.tag.pareto { background: #111; } .tag.preset { background: #8a5a00; }
table.points, table.facts { border-collapse: collapse; font-size: 12px; }
table.points td, table.points th { border-bottom: 1px solid var(--line); padding: 2px 8px; text-align: right; }
table.facts th { text-align: left; vertical-align: top; color: var(--muted); font-weight: 500; padding: 2px 10px 2px 0; }
table.facts td { padding: 2px 0; }
.facts-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 16px; }
.facts-grid section { border: 1px solid var(--line); border-radius: 6px; padding: 10px; overflow-x: auto; }
pre { font-size: 12px; background: #f6f8fa; padding: 8px; overflow-x: auto; }
#status.stale { color: #b00020; }
"""
