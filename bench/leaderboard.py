"""Run records -> leaderboard tables (markdown, CSV).

One table per (task family, tier, profile): a row per method, a column per subtask holding that
subtask's score (the family's rule, e.g. GLUE's mean of F1 and accuracy for MRPC), the family's
aggregate score, and the student's efficiency: parameters, GFLOPs per sample, latency and peak memory.
Seeds are averaged. A failed or skipped cell shows as such; nothing is dropped silently.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROLE_ORDER = {"teacher": 0, "student": 1}


@dataclass
class Table:
    task: str
    tier: str
    profile: str
    columns: list[str]
    rows: list[dict[str, Any]]
    footnotes: list[str] = field(default_factory=list)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _get(d: dict | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def efficiency_columns(rec: dict[str, Any]) -> dict[str, float | None]:
    eff = rec.get("efficiency") or {}
    lat = eff.get("latency") or {}
    mem = eff.get("memory") or {}
    first_lat = next(iter(lat.values()), None) if lat else None
    first_mem = next(iter(mem.values()), None) if mem else None
    params = eff.get("params")
    flops = eff.get("flops_per_sample")
    return {
        "params_M": params / 1e6 if params is not None else None,
        "gflops": flops / 1e9 if flops is not None else None,
        "latency_ms": _get(first_lat, "median_ms"),
        "peak_mem_MB": (_get(first_mem, "peak_bytes") / 2**20) if _get(first_mem, "peak_bytes") is not None else None,
    }


def build_tables(records: Iterable[dict[str, Any]], method_order: list[str] | None = None) -> list[Table]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        c = rec["cell"]
        groups[(c["task"], c["tier"], c["profile"])].append(rec)
    return [_table(key, recs, method_order) for key, recs in sorted(groups.items())]


def _table(key: tuple[str, str, str], recs: list[dict[str, Any]], method_order: list[str] | None) -> Table:
    task, tier, profile = key
    subtasks = list(OrderedDict.fromkeys(r["cell"]["subtask"] for r in recs))
    agg_name, agg_rule = "score", ""
    noted: dict[str, list[str]] = {}
    by_method: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        by_method[r["cell"]["method"]][r["cell"]["subtask"]].append(r)
        if r.get("aggregate"):
            agg_name, agg_rule = r["aggregate"]["name"], r["aggregate"]["rule"]
        if r.get("notes"):
            noted.setdefault(r["cell"]["subtask"], list(r["notes"]))
    marks = {s: "†" * (i + 1) for i, s in enumerate(noted)}
    sub_cols = [f"{s}{marks.get(s, '')}" for s in subtasks]
    columns = ["method", *sub_cols, agg_name, "seeds", "params_M", "gflops", "latency_ms", "peak_mem_MB"]
    order = method_order or []

    def sort_key(m: str) -> tuple[int, int, str]:
        role = ROLE_ORDER.get(m, 2)
        return (role, order.index(m) if m in order else len(order), m)

    rows = []
    ran_everywhere = []
    for method in sorted(by_method, key=sort_key):
        row: dict[str, Any] = {"method": method}
        unverified = any((r.get("profile") or {}).get("verified") is False
                         for cells in by_method[method].values() for r in cells)
        if unverified:
            row["method"] = f"{method} (unverified)"
        scores, effs, seeds = [], [], set()
        for sub, col in zip(subtasks, sub_cols):
            cells = by_method[method].get(sub, [])
            ok = [r for r in cells if r["status"] == "ok"]
            if ok:
                row[col] = _mean(r["score"] for r in ok)
                scores.append(row[col])
                effs.extend(efficiency_columns(r) for r in ok)
                seeds.update(r["cell"]["seed"] for r in ok)
            elif cells:
                row[col] = cells[0]["status"]
            else:
                row[col] = "—"
        row[agg_name] = _mean(scores)
        if scores and len(scores) < len(subtasks):
            row[agg_name + "_partial"] = f"{len(scores)}/{len(subtasks)}"
        row["seeds"] = len(seeds)
        for k in ("params_M", "gflops", "latency_ms", "peak_mem_MB"):
            row[k] = _mean(e[k] for e in effs)
        rows.append(row)
        if len(scores) == len(subtasks):
            ran_everywhere.append(method)
    footnotes = []
    if agg_rule:
        footnotes.append(f"{agg_name}: {agg_rule}. Subtasks in this table: {', '.join(subtasks)}.")
    for s, notes in noted.items():
        footnotes.append(f"{marks[s]} {s}: {' '.join(notes)}")
    footnotes.append("Subtask columns and the aggregate are x100. Efficiency columns are of the evaluated model "
                     "(the student, or the teacher in the teacher row), averaged over subtasks: parameters in millions, "
                     "GFLOPs per sample at the task's declared input shape (2 FLOPs per multiply-accumulate), "
                     "median latency at batch 1 in ms, peak inference memory at batch 1 in MiB.")
    footnotes.append(f"Tier: {tier}. Hardware profile: {profile}. Values are means over seeds; 'seeds' counts them.")
    if any("(unverified)" in r["method"] for r in rows):
        footnotes.append("(unverified): measured on hardware that does not match the declared profile "
                         "(run with --allow-mismatch); its efficiency numbers do not belong to that profile.")
    return Table(task, tier, profile, columns, rows, footnotes)


def _fmt(col: str, value: Any, agg: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if col in ("seeds",):
        return str(value)
    if col in ("params_M", "latency_ms", "peak_mem_MB"):
        return f"{value:.2f}"
    if col == "gflops":
        return f"{value:.4f}" if value < 1 else f"{value:.2f}"
    return f"{100 * value:.1f}"


def to_markdown(table: Table) -> str:
    agg = table.columns[table.columns.index("seeds") - 1]
    head = "| " + " | ".join(table.columns) + " |"
    sep = "|" + "|".join("---" if c == "method" else "---:" for c in table.columns) + "|"
    lines = [f"### {table.task} — tier {table.tier}, profile {table.profile}", "", head, sep]
    for row in table.rows:
        cells = []
        for c in table.columns:
            text = _fmt(c, row.get(c), agg)
            if c == agg and row.get(agg + "_partial"):
                text += f" ({row[agg + '_partial']})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {f}" for f in table.footnotes)
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "tier", "profile", *table.columns])
    for row in table.rows:
        writer.writerow([table.task, table.tier, table.profile,
                         *("" if row.get(c) is None else row.get(c) for c in table.columns)])
    return buf.getvalue()


def write(table: Table, out: Path) -> tuple[Path, Path]:
    from bench.store import atomic_write_text

    stem = f"leaderboard-{table.task}-{table.tier}-{table.profile}"
    md, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
    atomic_write_text(md, to_markdown(table))
    atomic_write_text(csv_path, to_csv(table))
    return md, csv_path
