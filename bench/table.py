"""The leaderboard table and its renderings: the `Table` of `Row`s of `Value` cells under `Column`s, and its
markdown, CSV and JSON forms (`to_markdown`, `to_csv`, `to_dict`; `write` puts a run's markdown and CSV in
its folder). `bench.leaderboard` builds tables from records; `bench.html` and `bench.plots` render them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

@dataclass
class Column:
    key: str
    label: str
    kind: str  # "subtask", "aggregate", "metric" or "efficiency"
    unit: str
    higher_is_better: bool | None = True
    scale: float = 100.0  # "metric" columns: display multiplier (100: points, 1: as is)


@dataclass
class Value:
    """One cell: the mean over the row's records, its bootstrap interval, n, and what did not run."""

    mean: float | None = None
    ci: tuple[float, float] | None = None
    n: int = 0
    failed: int = 0
    skipped: int = 0
    best: bool = False
    partial: str | None = None  # "7/8" for an aggregate over some of the table's subtasks
    noisy: int = 0  # latency: records whose measurement was flagged noisy (IQR/median > 10%)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "ci": list(self.ci) if self.ci else None,
            "n": self.n,
            "failed": self.failed,
            "skipped": self.skipped,
            "best": self.best,
            "partial": self.partial,
            "noisy": self.noisy,
        }


@dataclass
class Row:
    method: str
    label: str
    role: str  # "teacher", "student" or "method"
    verified: bool
    values: dict[str, Value]
    status: str
    seeds: int
    #: per-column samples (one per seed, or per record for efficiency) until the intervals are filled
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)


@dataclass
class Table:
    task: str
    tier: str
    profile: str
    columns: list[Column]
    rows: list[Row]
    footnotes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    n_records: int = 0
    #: the distinct command lines that made the table's records (records that carry one), shown above it
    commands: list[str] = field(default_factory=list)
    plots: dict[str, dict[str, str]] = field(default_factory=dict)  # kind -> {"png": path, "svg": path}
    plot_note: str = ""

    @property
    def slug(self) -> str:
        return f"{self.task}-{self.tier}-{self.profile}"

    @property
    def aggregate(self) -> Column:
        return next(c for c in self.columns if c.kind == "aggregate")

    def frame(self):
        """The table's means as a pandas DataFrame (one row per table row, display units)."""
        import pandas as pd

        data = [
            {
                "method": r.label,
                "status": r.status,
                "seeds": r.seeds,
                **{c.key: r.values[c.key].mean for c in self.columns},
            }
            for r in self.rows
        ]
        return pd.DataFrame(data, columns=["method", "status", "seeds", *(c.key for c in self.columns)])


def fmt_number(value: float) -> str:
    """Three significant digits without exponents (0.0961, 22.7, 1234); quality is fixed at 1 decimal."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def fmt_value(col: Column, x: float) -> str:
    if col.kind in ("metric", "subtask", "aggregate") and col.scale != 100:
        return fmt_number(x)  # e.g. a perplexity or an FID: three significant digits
    return f"{x:.1f}" if col.kind != "efficiency" else fmt_number(x)


def shows_interval(col: Column, v: Value) -> bool:
    """Quality and latency cells show their interval; parameters, FLOPs and memory are properties of the
    architecture (they vary only across subtasks' heads), and a zero-width interval says nothing."""
    timed = ("latency_ms", "tokens_per_s", "ttft_ms")
    return v.ci is not None and (col.kind != "efficiency" or col.key in timed) and v.ci[0] != v.ci[1]


def cell_text(col: Column, v: Value, row_seeds: int, markdown: bool = True) -> str:
    """'85.3 [83.1, 87.2]', 'failed', '71.2 [70.1, 72.0] n=2 (1 failed)', '—' (not run)."""
    if v.mean is None:
        if v.failed or v.skipped:
            parts = (["failed" + (f" x{v.failed}" if v.failed > 1 else "")] if v.failed else []) + (
                ["skipped" + (f" x{v.skipped}" if v.skipped > 1 else "")] if v.skipped else []
            )
            return ", ".join(parts)
        return "—"
    text = fmt_value(col, v.mean)
    if markdown and v.best:
        text = f"**{text}**"
    if shows_interval(col, v):
        text += f" [{fmt_value(col, v.ci[0])}, {fmt_value(col, v.ci[1])}]"
    if col.kind != "efficiency" and 0 < v.n < row_seeds:
        text += f" n={v.n}"
    if v.partial:
        text += f" ({v.partial})"
    extra = [f"{v.failed} failed"] if v.failed else []
    extra += [f"{v.skipped} skipped"] if v.skipped else []
    extra += [f"{v.noisy}/{v.n} noisy"] if v.noisy else []
    if extra:
        text += f" ({', '.join(extra)})"
    return text


def _commands_markdown(commands: list[str]) -> list[str]:
    if not commands:
        return []
    return ["Records made with:", "", "```bash", *commands, "```", ""]


def to_markdown(table: Table, heading: str = "###") -> str:
    labels = ["method", *(c.label for c in table.columns), "n", "status"]
    lines = [
        f"{heading} {table.task} — tier {table.tier}, profile {table.profile}",
        "",
        *_commands_markdown(table.commands),
        "| " + " | ".join(labels) + " |",
        "|---|" + "|".join("---:" for _ in table.columns) + "|---:|---|",
    ]
    for row in table.rows:
        cells = [
            row.label,
            *(cell_text(c, row.values[c.key], row.seeds) for c in table.columns),
            str(row.seeds),
            row.status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {f}" for f in table.footnotes)
    if table.problems:
        lines.append(f"- Failed and skipped cells ({len(table.problems)}):")
        shown = table.problems[:20]
        lines.extend(f"  - {p.splitlines()[0][:300]}" for p in shown)
        if len(table.problems) > len(shown):
            lines.append(
                f"  - ... and {len(table.problems) - len(shown)} more (see the JSON table or the records)"
            )
    if table.plots:
        links = []
        for kind, files in table.plots.items():
            title = PLOT_TITLES.get(kind, kind)
            links.append(f"[{title}]({files['svg']}) ([PNG]({files['png']}))")
        lines.append("- Pareto plots: " + ", ".join(links) + ".")
    if table.plot_note:
        lines.append(f"- {table.plot_note}")
    return "\n".join(lines) + "\n"


PLOT_TITLES = {"latency": "quality vs latency", "flops": "quality vs FLOPs"}


def to_csv(table: Table) -> str:
    """One line per row; each column as mean, interval bounds, n and best (display units, see footnotes)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    head = ["task", "tier", "profile", "method", "verified", "status", "seeds"]
    for c in table.columns:
        head += [c.key, f"{c.key}_ci_low", f"{c.key}_ci_high", f"{c.key}_n", f"{c.key}_best"]
    writer.writerow(head)

    def num(x: float | None) -> str:
        return "" if x is None else repr(round(x, 6))

    for row in table.rows:
        line = [table.task, table.tier, table.profile, row.method, row.verified, row.status, row.seeds]
        for c in table.columns:
            v = row.values[c.key]
            if v.mean is None:
                line += [cell_text(c, v, row.seeds, markdown=False), "", "", v.n, False]
            else:
                line += [num(v.mean), num(v.ci[0]) if v.ci else "", num(v.ci[1]) if v.ci else "", v.n, v.best]
        writer.writerow(line)
    return buf.getvalue()


def to_dict(table: Table) -> dict[str, Any]:
    return {
        "task": table.task,
        "tier": table.tier,
        "profile": table.profile,
        "records": table.n_records,
        "columns": [
            {
                "key": c.key,
                "label": c.label,
                "kind": c.kind,
                "unit": c.unit,
                "higher_is_better": c.higher_is_better,
            }
            for c in table.columns
        ],
        "rows": [
            {
                "method": r.method,
                "label": r.label,
                "role": r.role,
                "verified": r.verified,
                "status": r.status,
                "seeds": r.seeds,
                "values": {k: v.as_dict() for k, v in r.values.items()},
            }
            for r in table.rows
        ],
        "footnotes": table.footnotes,
        **({"commands": table.commands} if table.commands else {}),
        "problems": table.problems,
        "plots": table.plots,
    }


def write(table: Table, out: Path) -> tuple[Path, Path]:
    """``bench run``'s outputs: leaderboard-<task>-<tier>-<profile>.md and .csv in the run folder."""
    from bench.store import atomic_write_text

    stem = f"leaderboard-{table.slug}"
    md, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
    atomic_write_text(md, to_markdown(table))
    atomic_write_text(csv_path, to_csv(table))
    return md, csv_path
