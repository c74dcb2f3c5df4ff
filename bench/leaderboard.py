"""Run records -> leaderboard tables: markdown, CSV, JSON, one static HTML page, Pareto plots.

One table per (task family, tier, hardware profile): tiers and profiles are never mixed in a table,
because a smoke-tier number and a small-tier number, or a latency on two machines, are not comparable
(timm keeps one CSV per precision and device for the same reason, measurement.md §3.3). A row per method
(the teacher and label-only student references first), a column per subtask holding that subtask's
score (the family's rule, e.g. GLUE's mean of F1 and accuracy for MRPC), the family's aggregate score,
and the evaluated model's efficiency: parameters, GFLOPs per sample, batch-1 latency and peak memory.

Aggregation over seeds (lm-evaluation-harness reports a standard error per number; with the few seeds a
distillation run has we use a bootstrap instead, `bench.stats`):

* every cell shows the mean over seeds, its 95% percentile-bootstrap interval (2,000 resamples, fixed
  seed, so a rebuilt table is identical) and ``n``; one seed shows no interval;
* the aggregate (e.g. the GLUE score) is computed per seed over the subtasks the row has, then
  aggregated the same way; a row missing subtasks shows how many it has (``7/8``) and never competes;
* **best** marks the best student row of a quality column (and of latency) only where its interval
  is disjoint from every other student row's; one seed, or an overlapping interval, means no mark.
  The teacher is a reference, not a competitor.

Failed and skipped cells are shown as such with their reasons under the table; rows measured on
hardware that did not match the declared profile are separate rows marked *unverified*. Nothing is
dropped. The columns and their units, the aggregate rule, the hardware profile and the tier are stated
under every table.

Tasks whose quality is several numbers (the lm task: perplexity and one score per GLUE-style prompt set)
mark those metrics ``column=True`` in their declared metrics; each becomes a column of its own after the
aggregate (mean over the row's records, the metric's ``scale`` applied, its own direction). Records of
generative students carry FLOPs per token and generation speed; their tables add those efficiency columns
(MFLOPs/token, tokens/s, time to first token). Tables without either are unchanged.

``bench run`` prints and writes the tables of its own records through `build_tables`, `to_markdown` and
`write` (`bench.table`); ``bench leaderboard build`` goes through `build_leaderboards`, which adds the JSON, the HTML page
(`bench.html`) and the Pareto plots (`bench.plots`).

Records are reduced to a small `_Rec` each and grouped in plain Python, with the intervals of every
cell of every table computed in one vectorised numpy pass (`bench.stats.bootstrap_cis`), rather than
through a pandas frame as DESIGN.md sketches: importing pandas alone costs about half a second of the
10,000-record benchmark's 5 s, and `Table.frame` still hands a table to pandas for whoever wants one.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.api import weak_teacher
from bench.efficiency_cells import (
    COMPONENT_PREFIX,
    EFFICIENCY,
    GENERATION_EFFICIENCY,
    component_column_specs,
    efficiency_columns,
    first_batch,
)
from bench.table import Column, Row, Table, Value, to_csv, to_dict, to_markdown

ROLE_ORDER = {"teacher": 0, "student": 1}
#: What a tier's numbers are good for, stated under every table (DESIGN.md "Tiers").
TIER_NOTES = {
    "smoke": (
        "smoke tier: generated data and tiny random-initialised models; these rows check that the harness "
        "works end to end and say nothing about how the methods compare on real data"
    ),
    "small": "small tier: real data from the data root, real pretrained teachers, CPU-sized budgets",
    "full": "full tier: paper-scale datasets and the checkpoints named in the run's configuration",
}
CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------------
# Records -> compact cells
# --------------------------------------------------------------------------------------------------


@dataclass
class _Rec:
    """What the tables need of one record (records are large; this keeps 10,000 of them cheap)."""

    task: str
    tier: str
    profile: str
    method: str
    subtask: str
    seed: int
    status: str
    verified: bool
    score: float | None
    eff: dict[str, float | None]
    reason: str
    notes: tuple[str, ...]
    aggregate: tuple[str, str] | None
    input: str | None
    profile_info: dict[str, Any]
    hardware: str
    latency_noisy: bool
    cell_id: str
    created: str
    #: metrics the task shows as columns: name -> (value, higher_is_better, scale, description)
    metric_cols: dict[str, tuple[float | None, bool, float, str]] = field(default_factory=dict)
    #: (higher_is_better, display scale) of the score, from the task's primary metric (x100 and higher is
    #: better for accuracies; FID is shown as is and lower is better)
    score_spec: tuple[bool, float] = (True, 100.0)
    #: floors (`bench.api.weak_teacher`) this record's metrics do not beat; judged for teacher rows
    below_floor: tuple[dict[str, Any], ...] = ()


def _metric_columns(rec: dict[str, Any]) -> dict[str, tuple[float | None, bool, float, str]]:
    metrics = rec.get("metrics") or {}
    out = {}
    for spec in rec.get("metric_specs") or []:
        if not spec.get("column"):
            continue
        name = spec.get("name")
        v = metrics.get(name)
        value = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
        out[name] = (value, bool(spec.get("higher_is_better", True)), float(spec.get("scale", 100.0)),
                     str(spec.get("description") or ""))
    return out


def _score_spec(rec: dict[str, Any]) -> tuple[bool, float]:
    for spec in rec.get("metric_specs") or []:
        if spec.get("primary"):
            return bool(spec.get("higher_is_better", True)), float(spec.get("scale", 100.0))
    return True, 100.0


def _scale_text(scale: float) -> str:
    return "x100" if scale == 100 else "as is" if scale == 1 else f"x{scale:g}"


def _compact(rec: dict[str, Any]) -> _Rec:
    c = rec["cell"]
    prof = rec.get("profile") or {}
    hw = rec.get("hardware") or {}
    if hw.get("gpus"):
        hardware = ", ".join(sorted({g.get("name", "?") for g in hw["gpus"]}))
    else:
        cpus = hw.get("affinity_cpu_count") or hw.get("logical_cores") or "?"
        hardware = f"{hw.get('cpu_model') or 'unknown CPU'} ({cpus} CPUs)"
    agg = rec.get("aggregate")
    eff = rec.get("efficiency") or {}
    score = rec.get("score")
    if score is not None and (not isinstance(score, (int, float)) or math.isnan(score)):
        score = None
    status = rec.get("status") or "unknown"
    return _Rec(
        task=c["task"],
        tier=c["tier"],
        profile=c["profile"],
        method=c["method"],
        subtask=c["subtask"],
        seed=int(c["seed"]),
        status=status,
        verified=prof.get("verified") is not False,
        score=score if status == "ok" else None,
        eff=efficiency_columns(rec) if status == "ok" else {},
        reason=str(rec.get("reason") or ""),
        notes=tuple(rec.get("notes") or ()),
        aggregate=(agg["name"], agg["rule"]) if agg else None,
        input=eff.get("input"),
        profile_info={k: prof.get(k) for k in ("id", "kind", "description", "device", "dtype", "threads")},
        hardware=hardware,
        latency_noisy=bool((first_batch(eff.get("latency"))[1] or {}).get("noisy")),
        cell_id=rec.get("cell_id") or json.dumps(c, sort_keys=True),
        created=str(rec.get("created") or ""),
        metric_cols=_metric_columns(rec) if status == "ok" else {},
        score_spec=_score_spec(rec),
        below_floor=tuple(weak_teacher(rec.get("metrics") or {}, rec.get("metric_specs") or []))
        if status == "ok" and c["method"] == "teacher" else (),
    )


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _subtask_order(task: str, seen: list[str]) -> list[str]:
    """The family's declared subtask order (GLUE: cola, sst2, ...) where the registry knows the task."""
    try:
        from bench import registry

        declared = registry.tasks.describe(task).get("subtasks") or []
    except Exception:  # noqa: BLE001 - an unregistered task (a plugin not installed here) keeps record order
        declared = []
    rank = {s: i for i, s in enumerate(declared)}
    return sorted(seen, key=lambda s: (rank.get(s, len(rank)), seen.index(s)))


def build_tables(records: Iterable[dict[str, Any]], method_order: list[str] | None = None) -> list[Table]:
    """One `Table` per (task, tier, profile) of ``records`` (full run records as `bench.store` reads them)."""
    return _tables(_dedupe([_compact(r) for r in records])[0], method_order)


def _dedupe(recs: list[_Rec]) -> tuple[list[_Rec], list[str]]:
    """One record per cell id (the newest by ``created`` when several folders hold the same cell)."""
    by_id: dict[str, _Rec] = {}
    dupes: list[str] = []
    for rec in recs:
        old = by_id.get(rec.cell_id)
        if old is not None:
            dupes.append(rec.cell_id)
            if rec.created < old.created:
                continue
        by_id[rec.cell_id] = rec
    return list(by_id.values()), dupes


def _tables(recs: list[_Rec], method_order: list[str] | None) -> list[Table]:
    groups: dict[tuple[str, str, str], list[_Rec]] = defaultdict(list)
    for r in recs:
        groups[(r.task, r.tier, r.profile)].append(r)
    tables = [_table(key, group, method_order or []) for key, group in sorted(groups.items())]
    _fill_intervals(tables)
    for t in tables:
        _mark_best(t)
    return tables


def _table(key: tuple[str, str, str], recs: list[_Rec], order: list[str]) -> Table:
    task, tier, profile = key
    seen = list(dict.fromkeys(r.subtask for r in recs))
    subtasks = _subtask_order(task, seen)
    agg_name, agg_rule = "score", "unweighted mean of the per-subtask scores"
    notes: dict[str, tuple[str, ...]] = {}
    inputs: set[str] = set()
    rows_recs: dict[tuple[str, bool], list[_Rec]] = defaultdict(list)
    for r in recs:
        rows_recs[(r.method, r.verified)].append(r)
        if r.aggregate:
            agg_name, agg_rule = r.aggregate
        if r.notes and r.subtask not in notes:
            notes[r.subtask] = r.notes
        if r.input:
            inputs.add(r.input)
    marks = {s: "†" * (i + 1) for i, s in enumerate(s for s in subtasks if s in notes)}
    if agg_name in subtasks or agg_name in {k for k, *_ in EFFICIENCY}:
        agg_name = f"{agg_name} (aggregate)"
    hib, scale = next((r.score_spec for r in recs if r.status == "ok"), (True, 100.0))
    columns = [Column(s, f"{s}{marks.get(s, '')}", "subtask", f"subtask score {_scale_text(scale)}", hib, scale)
               for s in subtasks]
    columns.append(Column(agg_name, agg_name, "aggregate", _scale_text(scale), hib, scale))
    metric_specs: dict[str, tuple[bool, float, str]] = {}
    for r in recs:
        for name, (_, hib, scale, desc) in r.metric_cols.items():
            metric_specs.setdefault(name, (hib, scale, desc))
    taken = {c.key for c in columns} | {k for k, *_ in EFFICIENCY + GENERATION_EFFICIENCY}
    columns += [Column(name if name not in taken else f"metric:{name}", name, "metric",
                       f"{desc} ({_scale_text(scale)}"
                       f", {'higher' if hib else 'lower'} is better)", hib, scale)
                for name, (hib, scale, desc) in metric_specs.items()]
    columns += [Column(k, label, "efficiency", unit, False) for k, label, unit, _ in EFFICIENCY]
    columns += [Column(k, label, "efficiency", unit, hib) for k, label, unit, hib in GENERATION_EFFICIENCY
                if any(k in r.eff for r in recs)]
    columns += [Column(k, label, "efficiency", unit, False)
                for k, label, unit in component_column_specs(k for r in recs for k in r.eff)]

    def sort_key(item: tuple[str, bool]) -> tuple:
        method, verified = item
        return (
            ROLE_ORDER.get(method, 2),
            order.index(method) if method in order else len(order),
            method,
            not verified,
        )

    # The aggregate covers the subtasks some row has a score for: a subtask no row could run (QQP offline
    # at the small tier) would otherwise make every row partial and leave the table unranked.
    scored = [
        s for s in subtasks if any(r.subtask == s and r.status == "ok" and r.score is not None for r in recs)
    ]
    rows, problems = [], []
    for method, verified in sorted(rows_recs, key=sort_key):
        cells = rows_recs[(method, verified)]
        row = _row(method, verified, cells, subtasks, scored, agg_name,
                   [c for c in columns if c.kind in ("metric", "efficiency")], scale)
        rows.append(row)
        for r in sorted(cells, key=lambda r: (subtasks.index(r.subtask), r.seed)):
            if r.status != "ok":
                problems.append(
                    f"{row.label} on {r.subtask}, seed {r.seed}: {r.status}"
                    + (f" — {r.reason}" if r.reason else "")
                )
    table = Table(task, tier, profile, columns, rows, problems=problems, n_records=len(recs))
    table.footnotes = _footnotes(table, recs, subtasks, scored, agg_name, agg_rule, notes, marks, inputs)
    return table


def _row(
    method: str, verified: bool, cells: list[_Rec], subtasks: list[str], scored: list[str], agg_name: str,
    extra: list[Column] | None = None, scale: float = 100.0,
) -> Row:
    values: dict[str, Value] = {}
    samples: dict[str, list[float]] = {}
    by_sub: dict[str, list[_Rec]] = defaultdict(list)
    for r in cells:
        by_sub[r.subtask].append(r)
    scores_by_seed: dict[str, dict[int, float]] = {}
    for sub in subtasks:
        cs = by_sub.get(sub, [])
        ok = sorted((r for r in cs if r.status == "ok" and r.score is not None), key=lambda r: r.seed)
        v = Value(
            failed=sum(r.status not in ("ok", "skipped") for r in cs)
            + sum(r.status == "ok" and r.score is None for r in cs),
            skipped=sum(r.status == "skipped" for r in cs),
        )
        if ok:
            scores_by_seed[sub] = {r.seed: scale * r.score for r in ok}
        values[sub] = v
    # The aggregate per seed, over the subtasks this row has a score for, on seeds that have all of them.
    have = [s for s in scored if s in scores_by_seed]
    agg = Value()
    if have:
        seeds = set.intersection(*(set(scores_by_seed[s]) for s in have))
        samples[agg_name] = [sum(scores_by_seed[s][seed] for s in have) / len(have) for seed in sorted(seeds)]
        if len(have) < len(scored):
            agg.partial = f"{len(have)}/{len(scored)}"
    values[agg_name] = agg
    for sub, per_seed in scores_by_seed.items():
        samples[sub] = [per_seed[s] for s in sorted(per_seed)]
    ok_cells = sorted((r for r in cells if r.status == "ok"), key=lambda r: (r.subtask, r.seed))
    for key, *_ in EFFICIENCY:
        values[key] = Value()
        samples[key] = [r.eff[key] for r in ok_cells if r.eff.get(key) is not None]
    for col in extra or []:
        if col.kind == "metric":
            name = col.label
            values[col.key] = Value()
            samples[col.key] = [r.metric_cols[name][0] * col.scale for r in ok_cells
                                if r.metric_cols.get(name, (None,))[0] is not None]
        elif col.key not in values:
            values[col.key] = Value()
            samples[col.key] = [r.eff[col.key] for r in ok_cells if r.eff.get(col.key) is not None]
    values["latency_ms"].noisy = sum(r.latency_noisy for r in ok_cells if r.eff.get("latency_ms") is not None)
    counts = defaultdict(int)
    for r in cells:
        counts[r.status] += 1
    status = (
        "ok"
        if set(counts) == {"ok"}
        else ", ".join(
            f"{counts[s]} {s}"
            for s in sorted(
                counts,
                key=lambda s: ("ok", "failed", "skipped").index(s) if s in ("ok", "failed", "skipped") else 3,
            )
        )
    )
    label = method if verified else f"{method} (unverified)"
    role = method if method in ROLE_ORDER else "method"
    seeds = len({r.seed for r in cells if r.status == "ok"})
    return Row(method, label, role, verified, values, status, seeds, samples)


def _fill_intervals(tables: list[Table]) -> None:
    """Means, n and bootstrap intervals of every cell of every table, in one vectorised pass."""
    from bench.stats import bootstrap_cis

    cells: list[Value] = []
    samples: list[list[float]] = []
    for t in tables:
        for row in t.rows:
            for key, v in row.values.items():
                s = row.samples.get(key) or []
                v.n = len(s)
                v.mean = sum(s) / len(s) if s else None
                if s:
                    cells.append(v)
                    samples.append(s)
            row.samples = {}
    for v, ci in zip(cells, bootstrap_cis(samples, CONFIDENCE)):
        v.ci = ci


def _mark_best(table: Table) -> None:
    """Mark a column's best student row only where its interval is disjoint from every other's."""
    for col in table.columns:
        if col.kind == "efficiency" and col.key not in ("latency_ms", "tokens_per_s", "ttft_ms"):
            continue  # params, FLOPs and memory are properties of the architecture, not contests
        cands = [
            r
            for r in table.rows
            if r.role != "teacher"
            and r.values[col.key].mean is not None
            and not r.values[col.key].partial
            and (r.verified or col.kind != "efficiency")
        ]
        if len(cands) < 2:
            continue
        sign = 1 if col.higher_is_better else -1
        top = max(cands, key=lambda r: sign * r.values[col.key].mean)
        tv = top.values[col.key]
        if tv.ci is None:
            continue
        separated = True
        for other in cands:
            if other is top:
                continue
            ov = other.values[col.key]
            if ov.ci is None or not (tv.ci[0] > ov.ci[1] if sign > 0 else tv.ci[1] < ov.ci[0]):
                separated = False
                break
        tv.best = separated


def _weak_teacher_notes(recs: list[_Rec], subtasks: list[str]) -> list[str]:
    """One line per subtask whose teacher row does not beat a no-model floor (means over its seeds)."""
    out = []
    for s in subtasks:
        found: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for r in recs:
            if r.subtask == s:
                for b in r.below_floor:
                    found[(b["metric"], b["floor"])].append((b["value"], b["floor_value"]))
        if not found:
            continue
        parts = [f"{m} {sum(v for v, _ in xs) / len(xs):.3f} against {f} {sum(x for _, x in xs) / len(xs):.3f}"
                 for (m, f), xs in found.items()]
        out.append(f"WEAK TEACHER on {s}: the teacher row does not beat the no-model floor ({'; '.join(parts)}). "
                   f"Its students' rows show what each method transfers from this teacher, not what the method "
                   f"would reach with a good one; do not read them as a ranking of the methods.")
    return out


def _footnotes(
    table: Table,
    recs: list[_Rec],
    subtasks: list[str],
    scored: list[str],
    agg_name: str,
    agg_rule: str,
    notes: dict[str, tuple[str, ...]],
    marks: dict[str, str],
    inputs: set[str],
) -> list[str]:
    from bench.stats import BOOTSTRAP_RESAMPLES

    unscored = [s for s in subtasks if s not in scored]
    out = [
        f"{agg_name}: {agg_rule}. Here over {len(scored)} subtask(s) ({', '.join(scored) or 'none'})"
        + (f"; {', '.join(unscored)} has no score in any row and is left out" if unscored else "")
        + ". Computed per seed over the subtasks a row has, then aggregated over seeds; a row with "
        f"fewer than these shows how many (k/{len(scored)}) and is not ranked."
    ]
    out += _weak_teacher_notes(recs, subtasks)
    for s in subtasks:
        if s in notes:
            out.append(f"{marks[s]} {s}: {' '.join(n if n.rstrip()[-1:] in '.!?)' else n + '.' for n in notes[s])}")
    shape = f" (declared input: {', '.join(sorted(inputs))})" if inputs else ""
    metric_cols = [c for c in table.columns if c.kind == "metric"]
    gen_cols = [c for c in table.columns if c.kind == "efficiency" and (
        c.key in {k for k, *_ in GENERATION_EFFICIENCY} or c.key.startswith(COMPONENT_PREFIX))]
    out.append(
        f"Columns and units: subtask columns and the aggregate are the subtask's score {_scale_text(table.aggregate.scale)}"
        f"{'' if table.aggregate.higher_is_better else ' (lower is better)'}. "
        + "".join(f"{c.label}: {c.unit}; " for c in metric_cols)
        + "; ".join(f"{label}: {unit}" for _, label, unit, _ in EFFICIENCY)
        + "".join(f"; {c.label}: {c.unit}" for c in gen_cols)
        + shape
        + ". Efficiency columns are of the evaluated model (the student, or the teacher in the teacher row), "
        "averaged over the row's subtasks and seeds."
    )
    out.append(
        f"Each cell: mean over seeds [{CONFIDENCE:.0%} percentile-bootstrap interval, "
        f"{BOOTSTRAP_RESAMPLES:,} resamples, fixed seed]; 'n' is the number of seeds (shown in a "
        "cell when it "
        "is fewer than the row's); one seed has no interval, and with few seeds the interval is too narrow "
        "rather than too wide. Best (bold here, a star on the HTML page): the best student row of the "
        "column, its interval disjoint from every other student row's (never on one seed; the teacher is a "
        "reference and is not ranked)."
    )
    infos = {}
    hardware = set()
    unverified = 0
    for r in recs:
        infos.setdefault(r.profile, r.profile_info)
        hardware.add(r.hardware)
        unverified += not r.verified
    info = infos[table.profile]
    desc = info.get("description") or (
        f"derived from the machine ({info.get('kind')})" if info.get("kind") == "auto" else ""
    )
    out.append(
        f"Hardware profile: {table.profile}"
        + (f" — {desc}" if desc else "")
        + f"; device {info.get('device')}, {info.get('threads')} threads, {info.get('dtype')}; measured on "
        + "; ".join(sorted(hardware))
        + "."
    )
    noisy = sum(r.latency_noisy for r in recs if r.status == "ok")
    if noisy:
        out.append(
            f"Latency: {noisy} of {sum(r.status == 'ok' for r in recs)} records were measured noisy "
            "(IQR/median "
            "above 10%, torch.utils.benchmark's threshold: a busy or throttled machine); their cells say how "
            "many ('k/n noisy'). Compare such latencies with care, or remeasure on a quiet machine."
        )
    if unverified:
        out.append(
            f"(unverified): {unverified} records were measured on hardware that does not match the declared "
            "profile (run with --allow-mismatch); their efficiency numbers do not belong to that profile."
        )
    out.append(f"Tier: {TIER_NOTES.get(table.tier, table.tier)}.")
    return out


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# bench leaderboard build
# --------------------------------------------------------------------------------------------------


def record_files(roots: Sequence[Path]) -> list[str]:
    """Record JSON files under each root: a run folder (its ``records/``), a records folder, or a file."""
    files: list[str] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            files.append(str(root))
        elif (root / "records").is_dir():
            files.extend(_walk(root / "records"))
        elif root.is_dir():
            files.extend(_walk(root))
        else:
            raise BenchError(
                f"--from {root}: no such file or folder (give a run folder such as runs/, its records/ "
                "folder, or a record JSON file)"
            )
    return files


def _walk(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.endswith(".json") and not f.startswith(".")
        )
    return out


def load_records(roots: Sequence[Path], compact: bool = False) -> tuple[list[Any], list[str]]:
    """Every run record under ``roots`` and the JSON files that were skipped as not records (with why).

    With ``compact``, each record is reduced to what the tables need as soon as it is parsed: 10,000 full
    records are about half a gigabyte of Python objects, and the garbage collector's passes over them,
    not the parsing, dominated the build time. The collector is paused while records are read (JSON has
    no reference cycles to collect)."""
    import gc

    try:  # orjson parses records faster than the standard library
        from orjson import loads as fast_loads
    except ImportError:
        fast_loads = json.loads
    records, skipped = [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for path in record_files(roots):
            try:
                with open(path, "rb") as fh:
                    blob = fh.read()
                try:
                    data = fast_loads(blob)
                except ValueError:  # e.g. NaN, which Python's json writes and orjson refuses
                    data = json.loads(blob)
            except (OSError, ValueError) as exc:
                skipped.append(f"{path}: not readable JSON ({type(exc).__name__})")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("cell"), dict) or "status" not in data:
                skipped.append(f"{path}: not a bench run record")
                continue
            try:
                records.append(_compact(data) if compact else data)
            except (KeyError, TypeError, ValueError) as exc:
                skipped.append(f"{path}: malformed record ({type(exc).__name__}: {exc})")
    finally:
        if enabled:
            gc.enable()
    return records, skipped


@dataclass
class BuildResult:
    tables: list[Table]
    files: list[Path]
    skipped: list[str]
    duplicates: list[str]


def select(
    records: list[_Rec],
    roots: Sequence[Path],
    tasks: list[str] | None,
    profiles: list[str] | None,
    tiers: list[str] | None,
) -> list[_Rec]:
    """Apply the --task/--profile/--tier filters; an unknown value is a BenchError naming the valid ones."""
    where = ", ".join(str(r) for r in roots)
    if not records:
        raise BenchError(
            f"no run records under {where} (bench run writes them to <out>/records/<task>/<subtask>/"
            "*.json; give --from a run folder, its records/ folder or record files)"
        )
    for name, wanted, get in (
        ("--task", tasks, lambda r: r.task),
        ("--profile", profiles, lambda r: r.profile),
        ("--tier", tiers, lambda r: r.tier),
    ):
        if not wanted:
            continue
        present = sorted({get(r) for r in records})
        unknown = [w for w in wanted if w not in present]
        if unknown:
            import difflib

            hints = [
                f"{u!r}"
                + (
                    f" (did you mean {', '.join(close)}?)"
                    if (close := difflib.get_close_matches(u, present, n=2, cutoff=0.5))
                    else ""
                )
                for u in unknown
            ]
            raise BenchError(
                f"{name} {', '.join(hints)}: no records with that value under {where}. "
                f"Values present: {', '.join(present)}"
            )
        records = [r for r in records if get(r) in wanted]
        if not records:  # the filters together exclude everything
            raise BenchError(f"no records under {where} match the filters given")
    return records


def build_leaderboards(
    roots: Sequence[Path],
    out: Path,
    *,
    tasks: list[str] | None = None,
    profiles: list[str] | None = None,
    tiers: list[str] | None = None,
    command: str | None = None,
    plots: bool = True,
) -> BuildResult:
    """Read records, build every table, and write markdown/JSON per family, CSV per table, plots and HTML.

    Everything is computed (and every filter checked) before the first file is written, so bad input
    writes nothing."""
    from bench.store import atomic_write_bytes

    recs, skipped = load_records(roots, compact=True)
    unique, dupes = _dedupe(select(recs, roots, tasks, profiles, tiers))
    tables = _tables(unique, None)
    written: list[Path] = []
    plot_files: dict[str, dict[str, dict[str, bytes]]] = {}
    if plots:
        try:
            from bench import plots as lplots
        except ImportError as exc:  # matplotlib is in the report extra
            note = (
                f"Pareto plots not drawn: {exc.name or 'matplotlib'} is not installed "
                "(pip install 'bench[report]')."
            )
            for t in tables:
                t.plot_note = note
        else:
            for t in tables:
                rendered = lplots.render_table(t)
                plot_files[t.slug] = rendered
                t.plots = {
                    kind: {fmt: f"plots/{t.slug}-{kind}.{fmt}" for fmt in files}
                    for kind, files in rendered.items()
                }
                if not rendered:
                    t.plot_note = (
                        "No Pareto plot: no row has both a quality score and the efficiency numbers."
                    )
    by_task: dict[str, list[Table]] = defaultdict(list)
    for t in tables:
        by_task[t.task].append(t)
    header = _header(command)
    outputs: list[tuple[Path, str | bytes]] = []
    for task, ts in by_task.items():
        n = sum(t.n_records for t in ts)
        tiers = sorted(
            {t.tier for t in ts}, key=lambda x: list(TIER_NOTES).index(x) if x in TIER_NOTES else 9
        )
        intro = (
            f"{len(ts)} table(s) from {n} run records: one per tier and hardware profile. Data: "
            f"[{task}.json]({task}.json); CSV per table; all tables on one page: [index.html](index.html)."
        )
        if tiers == ["smoke"]:
            intro += (
                "\n\n**Smoke tier only**: generated data and tiny random-initialised models. These "
                "tables show "
                "that the harness runs end to end and what it reports; they say nothing about how "
                "the methods "
                "compare on real data."
            )
        md = [header, f"# {task} leaderboard", "", intro, ""]
        for t in ts:
            md.append(f"CSV: [{t.slug}.csv]({t.slug}.csv)\n")
            md.append(to_markdown(t, heading="##"))
        outputs.append((out / f"{task}.md", "\n".join(md)))
        outputs.append(
            (
                out / f"{task}.json",
                json.dumps(
                    {
                        "schema_version": 1,
                        "generated_by": command,
                        "task": task,
                        "tables": [to_dict(t) for t in ts],
                    },
                    indent=1,
                    allow_nan=False,
                    default=str,
                )
                + "\n",
            )
        )
        for t in ts:
            outputs.append((out / f"{t.slug}.csv", to_csv(t)))
    for slug, kinds in plot_files.items():
        for kind, files in kinds.items():
            for fmt, data in files.items():
                outputs.append((out / "plots" / f"{slug}-{kind}.{fmt}", data))
    from bench import html

    outputs.append((out / "index.html", html.page(tables, plot_files, command)))
    for path, content in outputs:
        atomic_write_bytes(path, content if isinstance(content, bytes) else content.encode("utf-8"))
        written.append(path)
    return BuildResult(tables, written, skipped, dupes)


def _header(command: str | None) -> str:
    cmd = command or "bench leaderboard build"
    return (
        "<!-- Generated by bench from run records. Do not edit by hand: regenerate with the command "
        "below. -->\n"
        f"Regenerate with: `{cmd}`\n"
    )


