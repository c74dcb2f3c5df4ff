"""Run records -> leaderboard tables (the table model of `bench.table`, aggregated and annotated).

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
`write` (`bench.table`); ``bench leaderboard build`` goes through `bench.publish.build_leaderboards`, which
reads record folders and adds the JSON, the HTML page (`bench.html`) and the Pareto plots (`bench.plots`).
Imports run one way: publish -> leaderboard, html, plots -> table; this module never imports a renderer.

Records are reduced to a small `_Rec` each and grouped in plain Python, with the intervals of every
cell of every table computed in one vectorised numpy pass (`bench.stats.bootstrap_cis`), rather than
through a pandas frame as DESIGN.md sketches: importing pandas alone costs about half a second of the
10,000-record benchmark's 5 s, and `Table.frame` still hands a table to pandas for whoever wants one.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench.api import weak_teacher
from bench.efficiency_cells import (
    COMPONENT_PREFIX,
    EFFICIENCY,
    GENERATION_EFFICIENCY,
    component_column_specs,
    efficiency_columns,
    first_batch,
)
from bench.table import Column, Row, Table, Value

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
    #: the method's own notes on its row (`bench.api.Method.table_notes`), printed under the table
    method_notes: tuple[str, ...] = ()
    #: the command line that made the record (``invocation``, recorded by the CLI since issue 14); "" if unknown
    invocation: str = ""


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


def compact_record(rec: dict[str, Any]) -> _Rec:
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
        method_notes=tuple(str(n) for n in rec.get("method_notes") or ()),
        invocation=str(rec.get("invocation") or ""),
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
    return tables_of(dedupe([compact_record(r) for r in records])[0], method_order)


def dedupe(recs: list[_Rec]) -> tuple[list[_Rec], list[str]]:
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


def tables_of(recs: list[_Rec], method_order: list[str] | None) -> list[Table]:
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
    # One subtask: its score *is* the aggregate, so the table shows one column (carrying the subtask's mark).
    single = subtasks[0] if len(subtasks) == 1 else None
    columns = [Column(s, f"{s}{marks.get(s, '')}", "subtask", f"subtask score {_scale_text(scale)}", hib, scale)
               for s in subtasks if s != single]
    columns.append(Column(agg_name, f"{agg_name}{marks.get(single, '')}" if single else agg_name, "aggregate",
                          _scale_text(scale), hib, scale))
    metric_specs: dict[str, tuple[bool, float, str]] = {}
    for r in recs:  # (the metric's own direction and scale; `hib` and `scale` stay the score's)
        for name, (_, m_hib, m_scale, desc) in r.metric_cols.items():
            metric_specs.setdefault(name, (m_hib, m_scale, desc))
    taken = {c.key for c in columns} | {k for k, *_ in EFFICIENCY + GENERATION_EFFICIENCY}
    columns += [Column(name if name not in taken else f"metric:{name}", name, "metric",
                       f"{desc} ({_scale_text(m_scale)}"
                       f", {'higher' if m_hib else 'lower'} is better)", m_hib, m_scale)
                for name, (m_hib, m_scale, desc) in metric_specs.items()]
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
        if single:  # the aggregate column stands for the one subtask, its failed and skipped counts included
            sv = row.values.pop(single)
            row.values[agg_name].failed, row.values[agg_name].skipped = sv.failed, sv.skipped
            row.samples.pop(single, None)
        rows.append(row)
        for r in sorted(cells, key=lambda r: (subtasks.index(r.subtask), r.seed)):
            if r.status != "ok":
                problems.append(
                    f"{row.label} on {r.subtask}, seed {r.seed}: {r.status}"
                    + (f" — {r.reason}" if r.reason else "")
                )
    table = Table(task, tier, profile, columns, rows, problems=problems, n_records=len(recs),
                  commands=sorted({r.invocation for r in recs if r.invocation}))
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


def _sentence(text: str) -> str:
    return text if text.rstrip()[-1:] in ".!?)" else text + "."


def _method_notes(table: Table, recs: list[_Rec]) -> list[str]:
    """One line per row whose method left notes in its records (`Method.table_notes`), in row order; a note
    that only some of the row's records carry says on how many it holds."""
    out = []
    for row in table.rows:
        cells = [r for r in recs if r.method == row.method and r.verified == row.verified and r.status == "ok"]
        counts: dict[str, int] = {}
        for r in cells:
            for n in dict.fromkeys(r.method_notes):
                counts[n] = counts.get(n, 0) + 1
        if counts:
            text = " ".join(_sentence(n) if k == len(cells)
                            else f"{n.rstrip().rstrip('.')} (in {k} of its {len(cells)} records)."
                            for n, k in counts.items())
            out.append(f"{row.label}: {text}")
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
    out += _method_notes(table, recs)
    for s in subtasks:
        if s in notes:
            out.append(f"{marks[s]} {s}: {' '.join(_sentence(n) for n in notes[s])}")
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
