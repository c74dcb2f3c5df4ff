"""Pareto plots of a leaderboard table: quality against latency and against FLOPs (PNG and SVG).

A row is on the Pareto front when no other row is at least as good in quality at no more cost and
strictly better in one of the two — the trade-off view model-efficiency leaderboards (LLM-Perf's
score-vs-latency scatter, measurement.md §1.6) use to show what a smaller or faster student costs in
quality. Points carry the 95% bootstrap intervals of the table as error bars; the teacher is drawn as a
reference marker. Only rows with both numbers can be drawn; the rest are named under the plot. Past a
dozen rows only the references and the rows on the front are labelled (every label overlapping every
other says nothing); the table and the HTML page have every row.

matplotlib is imported here and nowhere on the CLI's start-up path; figures are built on the Agg canvas
without pyplot (no global state, no display). Output is deterministic: the SVG's date is dropped and its
ids are salted with a constant (``svg.hashsalt``), so rebuilding a leaderboard leaves the files unchanged.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import matplotlib

if TYPE_CHECKING:
    from bench.table import Table

matplotlib.use("Agg", force=False)

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

#: Every point is labelled up to this many rows; beyond, only the references and the Pareto front.
LABEL_ALL_UP_TO = 12
#: The two plots: x column, axis label.
KINDS = {
    "latency": ("latency_ms", "median latency at batch 1 (ms, log scale)"),
    "flops": ("gflops", "GFLOPs per sample (log scale)"),
}


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates (lower or equal cost, better or equal quality, one
    strictly), ordered by cost; quality is better when higher unless ``higher_is_better`` is false (FID)."""
    if not higher_is_better:
        points = [(x, -q) for x, q in points]
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def render_table(table: Table) -> dict[str, dict[str, bytes]]:
    """{kind: {"png": bytes, "svg": bytes}} for each plot that has at least one drawable row."""
    out = {}
    for kind, (xkey, xlabel) in KINDS.items():
        fig = _figure(table, xkey, xlabel, kind)
        if fig is None:
            continue
        files = {}
        for fmt in ("png", "svg"):
            buf = io.BytesIO()
            with matplotlib.rc_context({"svg.hashsalt": "bench", "svg.fonttype": "none"}):
                meta: dict[str, Any] = {"Date": None} if fmt == "svg" else {"Software": None}
                fig.savefig(buf, format=fmt, dpi=100, metadata=meta)
            files[fmt] = buf.getvalue()
        out[kind] = files
    return out


def _figure(table: Table, xkey: str, xlabel: str, kind: str) -> Figure | None:
    agg = table.aggregate
    groups: dict[str, list[tuple[Any, float, float]]] = {}
    pts, missing = [], []
    for row in table.rows:
        q, x = row.values[agg.key], row.values[xkey]
        if q.mean is None or x.mean is None or x.mean <= 0:
            missing.append(row.label)
            continue
        group = (
            "teacher"
            if row.role == "teacher"
            else ("unverified" if not row.verified else ("student" if row.role == "student" else "method"))
        )
        groups.setdefault(group, []).append((row, x.mean, q.mean))
        if not q.partial:  # a row missing subtasks is drawn, but its aggregate is not comparable
            pts.append((x.mean, q.mean))
    if not groups:
        return None
    # Fixed margins instead of tight_layout: measuring every text extent dominated the build time of
    # large leaderboards (the 10,000-record benchmark).
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.92, bottom=0.16 if missing else 0.12)
    ax = fig.add_subplot(1, 1, 1)
    front = pareto_front(pts, agg.higher_is_better is not False)
    on_front = {pts[i] for i in front}
    # Past a dozen rows, labels of every point overlap into noise: label the references and the front.
    many = sum(len(v) for v in groups.values()) > LABEL_ALL_UP_TO
    style = {
        "teacher": ("s", "0.45", "teacher (reference)"),
        "student": ("o", "C1", "student (labels only)"),
        "method": ("o", "C0", "distillation methods"),
        "unverified": ("o", "C3", "unverified hardware"),
    }
    for group, items in groups.items():
        marker, color, label = style[group]
        xs, ys = [i[1] for i in items], [i[2] for i in items]
        # max(0, ...): a bootstrap bound equal to the mean can differ from it in the last bit (the two are
        # summed in different orders), and matplotlib refuses negative error bars.
        yerr = [
            [max(0.0, y - (r.values[agg.key].ci or (y, y))[0]) for r, _, y in items],
            [max(0.0, (r.values[agg.key].ci or (y, y))[1] - y) for r, _, y in items],
        ]
        xerr = None
        if xkey == "latency_ms":
            xerr = [
                [max(0.0, x - (r.values[xkey].ci or (x, x))[0]) for r, x, _ in items],
                [max(0.0, (r.values[xkey].ci or (x, x))[1] - x) for r, x, _ in items],
            ]
        ax.errorbar(
            xs, ys, yerr=yerr, xerr=xerr, fmt=marker, color=color, capsize=2, ms=5, lw=0.7, label=label
        )
        for r, x, y in items:
            if many and group != "teacher" and r.role != "student" and (x, y) not in on_front:
                continue
            q = r.values[agg.key]
            ax.text(
                x, y, "  " + r.label + (f" ({q.partial})" if q.partial else ""), fontsize=6.5, va="bottom"
            )
    if front:  # rings on the non-dominated rows, joined by the frontier's steps
        ax.plot(
            [pts[i][0] for i in front],
            [pts[i][1] for i in front],
            drawstyle="steps-post",
            color="C2",
            lw=1,
            alpha=0.8,
            marker="o",
            mfc="none",
            ms=11,
            label="Pareto front",
        )
    ax.legend(loc="lower right", fontsize=6.5, frameon=False)
    xs = [x for items in groups.values() for _, x, _ in items]
    if max(xs) / min(xs) > 3:
        ax.set_xscale("log")
        # plain tick labels: the default log formatter typesets mathtext ($10^{0}$), whose parser was the
        # largest single cost of the 10,000-record benchmark's plots
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        xlabel = xlabel.replace(", log scale", "").replace(" (log scale)", "")
    ax.set_xlabel(xlabel, fontsize=8)
    unit = "x100" if agg.scale == 100 else "as is" if agg.scale == 1 else f"x{agg.scale:g}"
    better = "" if agg.higher_is_better is not False else ", lower is better"
    ax.set_ylabel(f"{agg.label} ({unit}{better}): mean, 95% bootstrap CI", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(
        f"{table.task}: {agg.label} vs {'latency' if kind == 'latency' else 'FLOPs'} — tier {table.tier}, "
        f"profile {table.profile}",
        fontsize=8.5,
    )
    ax.grid(True, lw=0.3, alpha=0.5)
    ax.margins(x=0.15, y=0.08)  # room for the labels right of the points
    if missing:
        text = ", ".join(missing)
        fig.text(
            0.01,
            0.01,
            "not plotted (no value): " + (text if len(text) < 150 else text[:147] + "..."),
            fontsize=6,
            color="0.35",
        )
    return fig
