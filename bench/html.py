"""One static HTML page with every leaderboard table: sortable, filterable, self-contained.

Everything the page needs is inside the file — styles, the script and the Pareto plots (SVG as data
URIs) — so it works opened from disk, from a CI artifact or offline; the plots are also linked as files
(SVG and PNG) beside the page. Rows are rendered server-side, so the tables read correctly with
scripts disabled; the script only sorts (click a header; again to reverse; empty cells stay last) and
filters (free text over the row, a table selector, a status selector). Failed, skipped and unverified
rows are in the page like any other; filtering them out is the reader's choice, never the default.
"""

from __future__ import annotations

import base64
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.table import Table

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;
  color:#1b1b1b;background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:2rem 0 .4rem}
code{background:#f3f3f3;padding:0 .25rem;border-radius:3px}
.controls{position:sticky;top:0;background:#fff;padding:.5rem 0;border-bottom:1px solid #ddd;z-index:1}
.controls input,.controls select{font:inherit;padding:.2rem .4rem;margin-right:.6rem}
table.lb{border-collapse:collapse;margin:.4rem 0;font-variant-numeric:tabular-nums}
table.lb th,table.lb td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;white-space:nowrap}
table.lb th:first-child,table.lb td:first-child,table.lb td.status{text-align:left}
table.lb th button{all:unset;cursor:pointer;font-weight:600}
table.lb th[aria-sort=ascending] button::after{content:" \\25B2"}
table.lb th[aria-sort=descending] button::after{content:" \\25BC"}
table.lb tr.teacher td{background:#f7f7f7;color:#555}
table.lb tr.bad td.status{color:#a40000;font-weight:600}
table.lb tr.unverified td:first-child{font-style:italic}
td.best{font-weight:700}td.best::before{content:"\\2605 ";color:#b8860b}
td.none{color:#a40000}.ci{color:#666;font-size:.85em}
ul.notes{font-size:.9em;color:#333;max-width:75rem}
figure{display:inline-block;margin:.5rem 1rem .5rem 0}figure img{max-width:36rem;border:1px solid #eee}
figcaption{font-size:.85em}
"""

_SCRIPT = """
(function () {
  function key(td, type) {
    var v = td.getAttribute('data-v');
    if (v === null || v === '') return null;
    return type === 'num' ? parseFloat(v) : v.toLowerCase();
  }
  document.querySelectorAll('table.lb').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, idx) {
      th.querySelector('button').addEventListener('click', function () {
        var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
        Array.prototype.forEach.call(heads, function (h) { h.setAttribute('aria-sort', 'none'); });
        th.setAttribute('aria-sort', dir);
        var body = table.tBodies[0], type = th.getAttribute('data-type');
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[idx], type), y = key(b.cells[idx], type);
          if (x === null || y === null) return (x === null) - (y === null);  // empty cells last
          var c = x < y ? -1 : (x > y ? 1 : 0);
          return dir === 'ascending' ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var q = document.getElementById('q'), which = document.getElementById('which'),
      status = document.getElementById('status'), count = document.getElementById('count');
  function apply() {
    var terms = q.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0, total = 0;
    document.querySelectorAll('section.lb-table').forEach(function (sec) {
      var on = which.value === '' || which.value === sec.getAttribute('data-slug');
      sec.hidden = !on;
      sec.querySelectorAll('tbody tr').forEach(function (tr) {
        total += 1;
        var text = tr.textContent.toLowerCase(), st = tr.getAttribute('data-status');
        var ok = on && terms.every(function (t) { return text.indexOf(t) >= 0; }) &&
          (status.value === '' || (status.value === 'problems' ? st !== 'ok' : (status.value === 'unverified'
            ? tr.classList.contains('unverified') : st === status.value)));
        tr.hidden = !ok;
        shown += ok ? 1 : 0;
      });
    });
    count.textContent = 'showing ' + shown + ' of ' + total + ' rows';
  }
  [q, which, status].forEach(function (el) {
    el.addEventListener('input', apply);
    el.addEventListener('change', apply);
  });
  apply();
})();
"""


def _num(x: float | None) -> str:
    return "" if x is None else repr(round(x, 6))


def _table_html(t: Table, plots: dict[str, dict[str, bytes]]) -> str:
    from bench.table import PLOT_TITLES, cell_text, fmt_value, shows_interval

    heads = ['<th data-type="text" aria-sort="none"><button type="button">method</button></th>']
    for c in t.columns:
        title = escape(f"{c.unit}; {'higher' if c.higher_is_better else 'lower'} is better", quote=True)
        heads.append(
            f'<th data-type="num" aria-sort="none" title="{title}"><button type="button">'
            f"{escape(c.label)}</button></th>"
        )
    heads.append('<th data-type="num" aria-sort="none"><button type="button">n</button></th>')
    heads.append('<th data-type="text" aria-sort="none"><button type="button">status</button></th>')
    body = []
    for r in t.rows:
        st = (
            "ok"
            if r.status == "ok"
            else ("failed" if "failed" in r.status else ("skipped" if "skipped" in r.status else "other"))
        )
        classes = [r.role] + ([] if r.status == "ok" else ["bad"]) + ([] if r.verified else ["unverified"])
        cells = [f'<td data-v="{escape(r.label, quote=True)}">{escape(r.label)}</td>']
        for c in t.columns:
            v = r.values[c.key]
            if v.mean is None:
                cells.append(
                    f'<td class="none" data-v="">{escape(cell_text(c, v, r.seeds, markdown=False))}</td>'
                )
                continue
            inner = escape(fmt_value(c, v.mean))
            if shows_interval(c, v):
                inner += f' <span class="ci">[{escape(fmt_value(c, v.ci[0]))}, {escape(fmt_value(c, v.ci[1]))}]</span>'
            extra = []
            if c.kind != "efficiency" and 0 < v.n < r.seeds:
                extra.append(f"n={v.n}")
            if v.partial:
                extra.append(v.partial)
            if v.failed:
                extra.append(f"{v.failed} failed")
            if v.skipped:
                extra.append(f"{v.skipped} skipped")
            if v.noisy:
                extra.append(f"{v.noisy}/{v.n} noisy")
            if extra:
                inner += f' <span class="ci">({escape(", ".join(extra))})</span>'
            cls = (
                ' class="best" title="best: interval disjoint from every other student row"' if v.best else ""
            )
            cells.append(f'<td{cls} data-v="{_num(v.mean)}">{inner}</td>')
        cells.append(f'<td data-v="{r.seeds}">{r.seeds}</td>')
        cells.append(f'<td class="status" data-v="{escape(r.status, quote=True)}">{escape(r.status)}</td>')
        body.append(f'<tr class="{" ".join(classes)}" data-status="{st}">' + "".join(cells) + "</tr>")
    notes = "".join(
        f"<li>{escape(f.replace('(bold here, a star on the HTML page)', '(a star)'))}</li>"
        for f in t.footnotes
    )
    if t.plot_note:
        notes += f"<li>{escape(t.plot_note)}</li>"
    problems = ""
    if t.problems:
        items = "".join(f"<li>{escape(p.splitlines()[0][:400])}</li>" for p in t.problems[:200])
        more = f"<li>... and {len(t.problems) - 200} more</li>" if len(t.problems) > 200 else ""
        problems = (
            f'<details><summary>Failed and skipped cells ({len(t.problems)})</summary><ul class="notes">'
            f"{items}{more}</ul></details>"
        )
    figs = []
    for kind, files in plots.items():
        title = PLOT_TITLES.get(kind, kind)
        src = "data:image/svg+xml;base64," + base64.b64encode(files["svg"]).decode("ascii")
        rel = t.plots.get(kind, {})
        figs.append(
            f'<figure><img alt="{escape(title)}: {escape(t.slug)}" src="{src}"><figcaption>{escape(title)}: '
            f'<a href="{escape(rel.get("svg", ""))}">SVG</a> · <a href="{escape(rel.get("png", ""))}">PNG</a>'
            "</figcaption></figure>"
        )
    title = f"{escape(t.task)} — tier {escape(t.tier)}, profile {escape(t.profile)}"
    return (
        f'<section class="lb-table" data-slug="{escape(t.slug)}"><h2>{title}</h2>'
        + "".join(f'<p class="cmd">Records made with <code>{escape(c)}</code></p>' for c in t.commands) +
        f'<table class="lb" id="t-{escape(t.slug)}"><thead><tr>{"".join(heads)}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table><ul class="notes">{notes}</ul>{problems}'
        f"{''.join(figs)}</section>"
    )


def page(tables: list[Table], plots: dict[str, dict[str, dict[str, bytes]]], command: str | None) -> str:
    options = "".join(
        f'<option value="{escape(t.slug)}">{escape(t.task)} — {escape(t.tier)}, {escape(t.profile)}</option>'
        for t in tables
    )
    sections = "".join(_table_html(t, plots.get(t.slug, {})) for t in tables)
    cmd = escape(command or "bench leaderboard build")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="bench leaderboard build"><title>bench leaderboards</title>
<style>{_STYLE}</style></head><body>
<h1>bench leaderboards</h1>
<p>Generated by bench from run records with <code>{cmd}</code>. One table per task family, tier and hardware
profile; click a column header to sort, again to reverse.</p>
<div class="controls">
<label>Filter rows <input id="q" type="search" placeholder="method, status, ..."></label>
<label>Table <select id="which"><option value="">all tables</option>{options}</select></label>
<label>Status <select id="status"><option value="">all rows</option><option value="ok">ok</option>
<option value="problems">failed or skipped</option>
<option value="unverified">unverified</option></select></label>
<span id="count"></span></div>
{sections}
<script>{_SCRIPT}</script>
</body></html>
"""
