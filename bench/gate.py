"""``bench gate``: compare the current run records with a committed baseline and fail on a regression.

The rules are declared per metric in the suite's ``gate`` section (`bench.config.GateRules`) and follow
measurement.md §5.8: deterministic signals tight, wall clock only with statistics.

* **quality** — every quality metric of a cell (same task, subtask, method, tier and seed: at fixed
  seeds the smoke tier is deterministic on one machine) may drop by at most ``max_drop`` in its natural
  units; for a metric where lower is better, rise by at most as much.
* **params**, **FLOPs per sample** — exact by default: any change fails, a decrease too, so the new
  numbers reach the baseline in the same reviewed change; or, with ``exact: false``, a maximum relative
  increase (pytest-benchmark's ``--benchmark-compare-fail`` percentage, §5.3).
* **latency** — asv's rule (``asv compare``/``continuous``, §5.4): a slowdown is a regression only if the
  ratio of medians exceeds ``max_ratio`` (1.10) **and** the raw samples (``efficiency.latency.batch_N.
  times_ms``) differ: a two-sided Mann–Whitney U test at p < ``p_value`` (0.002) where the sample sizes
  can reach that p-value at all (``bench.stats.min_two_sided_p``), otherwise non-overlapping ``ci`` (99%)
  distribution-free intervals of the two medians. Without raw samples the significance half cannot be
  tested and the latency is reported as untestable, never failed on the ratio alone (the failure mode
  of github-action-benchmark's bare 200% ratio against one previous point, §5.5). Latency and memory are
  compared only between records of the same hardware profile, both verified.
* **memory** — peak bytes per batch size (and of the training step) may grow by at most ``max_increase``.

A cell that was ok in the baseline and failed, was skipped, or is missing now is a regression too; a new
cell is reported, not gated (``--update-baseline`` adds it). ``--only`` restricts the metrics gated (this
repository's own CI gates params, FLOPs and quality only: wall time on shared CI machines is too noisy,
§5.6, §5.8).

The baseline is a JSON file written by ``bench gate --update-baseline`` from run records: per cell the
status, the quality metrics, params, FLOPs, the latency medians with their raw samples, and peak memory,
plus a copy of the rules, so ``bench gate --baseline FILE`` works without the suite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.config import GateRules

BASELINE_KIND = "bench-gate-baseline"
BASELINE_SCHEMA = 1
METRICS = ("quality", "params", "flops", "latency", "memory")


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def cell_key(cell: dict[str, Any]) -> str:
    """A cell's identity without its profile: a baseline measured on one machine gates another's
    deterministic numbers; latency and memory check the profile separately."""
    return f"{cell['task']}.{cell['subtask']}--{cell['method']}--{cell['tier']}--s{cell['seed']}"


def entry(rec: dict[str, Any]) -> dict[str, Any]:
    """What the gate keeps of one record."""
    c = rec["cell"]
    out: dict[str, Any] = {
        "task": c["task"],
        "subtask": c["subtask"],
        "method": c["method"],
        "tier": c["tier"],
        "seed": c["seed"],
        "profile": c["profile"],
        "verified": (rec.get("profile") or {}).get("verified") is not False,
        "status": rec.get("status"),
        "reason": rec.get("reason"),
        "config_hash": rec.get("config_hash"),
    }
    if rec.get("status") != "ok":
        return out
    hib = {m.get("name"): bool(m.get("higher_is_better", True)) for m in rec.get("metric_specs") or []}
    out["quality"] = {
        k: {
            "value": v if isinstance(v, (int, float)) and math.isfinite(v) else None,
            "higher_is_better": hib.get(k, True),
        }
        for k, v in (rec.get("metrics") or {}).items()
    }
    eff = rec.get("efficiency") or {}
    out["params"] = eff.get("params")
    out["flops"] = eff.get("flops_per_sample")
    out["latency"] = {
        k: {"median_ms": v.get("median_ms"), "times_ms": v.get("times_ms"), "n": v.get("n_blocks")}
        for k, v in sorted((eff.get("latency") or {}).items())
        if isinstance(v, dict)
    }
    mem = {
        k: v.get("peak_bytes") for k, v in sorted((eff.get("memory") or {}).items()) if isinstance(v, dict)
    }
    if isinstance(eff.get("training_memory"), dict):
        mem["training_step"] = eff["training_memory"].get("peak_bytes")
    out["memory"] = mem
    return out


def entries(records: Sequence[dict[str, Any]], where: str) -> dict[str, dict[str, Any]]:
    """Records keyed by `cell_key`; two records of one cell (e.g. two profiles) are ambiguous input."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        key = cell_key(rec["cell"])
        if key in out:
            raise BenchError(
                f"{where}: two records of cell {key} (profiles {out[key]['profile']} and "
                f"{rec['cell']['profile']}); point --current at the records of one run"
            )
        out[key] = entry(rec)
    return dict(sorted(out.items()))


def make_baseline(
    records: Sequence[dict[str, Any]],
    rules: GateRules,
    suite: dict[str, Any] | None,
    where: str,
    command: str | None = None,
) -> dict[str, Any]:
    cells = entries(records, where)
    commits = sorted({(r.get("git") or {}).get("commit") or "unknown" for r in records})
    return {
        "kind": BASELINE_KIND,
        "schema_version": BASELINE_SCHEMA,
        "generated_by": command,
        "suite": suite,
        "rules": rules.model_dump(mode="json"),
        "source": {
            "records": len(records),
            "git_commits": commits,
            "profiles": sorted({c["profile"] for c in cells.values()}),
        },
        "cells": cells,
    }


def load_baseline(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BenchError(
            f"baseline {path} not found. Create it from a run with: bench gate --baseline {path} "
            "--current RUNS --update-baseline"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BenchError(
            f"{path}: corrupt baseline (not valid JSON: {exc}); regenerate it with --update-baseline"
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("kind") != BASELINE_KIND
        or not isinstance(data.get("cells"), dict)
    ):
        raise BenchError(
            f"{path}: not a bench gate baseline (expected a JSON object with kind "
            f"{BASELINE_KIND!r}, schema_version, rules and cells, as --update-baseline writes)"
        )
    if data.get("schema_version") != BASELINE_SCHEMA:
        raise BenchError(
            f"{path}: baseline schema_version {data.get('schema_version')!r} is not supported "
            f"(this bench reads {BASELINE_SCHEMA}); regenerate it with --update-baseline"
        )
    for key, cell in data["cells"].items():
        if not isinstance(cell, dict) or "status" not in cell:
            raise BenchError(f"{path}: corrupt baseline: cells.{key} has no status")
    return data


def baseline_rules(data: dict[str, Any], path: Path) -> GateRules:
    from pydantic import ValidationError

    from bench.config import format_validation_error

    try:
        return GateRules.model_validate(data.get("rules") or {})
    except ValidationError as exc:
        raise BenchError(
            f"{path}: corrupt baseline rules\n" + format_validation_error(exc, "rules", GateRules)
        ) from None


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


@dataclass
class Check:
    cell: str
    metric: str  # quality, params, flops, latency, memory or status
    item: str  # the metric name, batch key, ... ("" for params/flops/status)
    status: str  # ok, regression, improvement, not_compared or untestable
    baseline: Any = None
    current: Any = None
    change: str = ""
    rule: str = ""
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    checks: list[Check]
    gated: list[str]
    not_gated: dict[str, str]
    missing: list[str]
    new: list[str]
    baseline_path: str
    current: str
    baseline_info: dict[str, Any]
    n_current: int
    rules: GateRules

    @property
    def regressions(self) -> list[Check]:
        return [c for c in self.checks if c.status == "regression"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "verdict": "regression" if self.regressions else "pass",
            "baseline": {"path": self.baseline_path, **self.baseline_info},
            "current": {"path": self.current, "records": self.n_current},
            "rules": self.rules.model_dump(mode="json"),
            "gated": self.gated,
            "not_gated": self.not_gated,
            "counts": _counts(self.checks),
            "regressions": [asdict(c) for c in self.regressions],
            "missing": self.missing,
            "new": self.new,
            "checks": [asdict(c) for c in self.checks],
        }


def json_safe(obj: Any) -> Any:
    """Strict JSON: infinite or NaN floats (an unbounded interval, a zero baseline) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _counts(checks: list[Check]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in checks:
        out[c.status] = out.get(c.status, 0) + 1
    return dict(sorted(out.items()))


def _pct(x: float) -> str:
    return f"{x:+.2%}"


def compare(
    base: dict[str, Any],
    current: dict[str, dict[str, Any]],
    rules: GateRules,
    only: Sequence[str] | None = None,
    baseline_path: str = "",
    current_path: str = "",
) -> Report:
    """Every check of every baseline cell against the current entries (`entries`)."""
    gated, not_gated = [], {}
    for m in METRICS:
        if only is not None and m not in only:
            not_gated[m] = "not selected (--only)"
        elif not getattr(rules, m).enabled:
            not_gated[m] = "disabled in the suite's gate rules"
        else:
            gated.append(m)
    checks: list[Check] = []
    missing, new = [], [k for k in current if k not in base["cells"]]
    for key, b in base["cells"].items():
        cur = current.get(key)
        if cur is None:
            missing.append(key)
            if b.get("status") == "ok":
                checks.append(
                    Check(
                        key,
                        "status",
                        "",
                        "regression",
                        "ok",
                        "missing",
                        rule="every baseline cell runs",
                        message=f"{key}: ok in the baseline, no current record",
                    )
                )
            continue
        if b.get("status") != "ok" or cur.get("status") != "ok":
            checks.append(_status_check(key, b, cur))
            continue
        if "quality" in gated:
            checks.extend(_quality(key, b, cur, rules))
        for m in ("params", "flops"):
            if m in gated:
                checks.append(_count(key, m, b.get(m), cur.get(m), getattr(rules, m)))
        if "latency" in gated:
            checks.extend(_latency(key, b, cur, rules))
        if "memory" in gated:
            checks.extend(_memory(key, b, cur, rules))
    info = {k: base.get(k) for k in ("suite", "generated_by", "source")}
    return Report(
        checks, gated, not_gated, missing, new, baseline_path, current_path, info, len(current), rules
    )


def _status_check(key: str, b: dict[str, Any], cur: dict[str, Any]) -> Check:
    bs, cs = b.get("status"), cur.get("status")
    if bs == "ok":
        return Check(
            key,
            "status",
            "",
            "regression",
            bs,
            cs,
            rule="a baseline cell that was ok stays ok",
            message=f"{key}: ok in the baseline, {cs} now"
            + (f" — {cur.get('reason')}" if cur.get("reason") else ""),
        )
    if cs == "ok":
        return Check(
            key,
            "status",
            "",
            "improvement",
            bs,
            cs,
            message=f"{key}: {bs} in the baseline, ok now (update the baseline to gate it)",
        )
    return Check(key, "status", "", "not_compared", bs, cs, message=f"{key}: {bs} in the baseline, {cs} now")


def _quality(key: str, b: dict[str, Any], cur: dict[str, Any], rules: GateRules) -> list[Check]:
    rule = rules.quality
    names = rule.metrics if rule.metrics is not None else list(b.get("quality") or {})
    out = []
    for name in names:
        bq, cq = (b.get("quality") or {}).get(name), (cur.get("quality") or {}).get(name)
        desc = f"drop <= {rule.max_drop:g}"
        if bq is None:
            out.append(
                Check(
                    key,
                    "quality",
                    name,
                    "not_compared",
                    None,
                    cq and cq["value"],
                    rule=desc,
                    message=f"{key}: quality {name} is not in the baseline",
                )
            )
            continue
        if cq is None:
            out.append(
                Check(
                    key,
                    "quality",
                    name,
                    "regression",
                    bq["value"],
                    None,
                    rule=desc,
                    message=f"{key}: quality {name} is no longer reported",
                )
            )
            continue
        if bq["value"] is None or cq["value"] is None:
            status = "regression" if bq["value"] is not None else "not_compared"
            out.append(
                Check(
                    key,
                    "quality",
                    name,
                    status,
                    bq["value"],
                    cq["value"],
                    rule=desc,
                    message=f"{key}: quality {name} {bq['value']} -> {cq['value']} (not a number)",
                )
            )
            continue
        bv, cv = float(bq["value"]), float(cq["value"])
        drop = (bv - cv) if bq.get("higher_is_better", True) else (cv - bv)
        status = "regression" if drop > rule.max_drop + 1e-12 else ("improvement" if drop < 0 else "ok")
        word = "drop" if drop > 0 else "change"
        out.append(
            Check(
                key,
                "quality",
                name,
                status,
                bv,
                cv,
                change=f"{cv - bv:+.4f}",
                rule=desc,
                message=f"{key}: quality {name} {bv:.4f} -> {cv:.4f} ({word} {abs(drop):.4f}; "
                f"maximum drop {rule.max_drop:g})",
            )
        )
    return out


def _count(key: str, metric: str, bv: Any, cv: Any, rule) -> Check:
    unit = "parameters" if metric == "params" else "FLOPs/sample"
    desc = "exact" if rule.exact else f"increase <= {rule.max_increase:.2%}"
    if bv is None or cv is None:
        return Check(
            key,
            metric,
            "",
            "not_compared",
            bv,
            cv,
            rule=desc,
            message=f"{key}: {metric} not measured in the {'baseline' if bv is None else 'current run'}",
        )
    rel = (cv / bv - 1) if bv else (math.inf if cv else 0.0)
    change = _pct(rel) if math.isfinite(rel) else f"{cv - bv:+,}"
    if rule.exact:
        status = "ok" if cv == bv else "regression"
        limit = "exact rule: must not change; commit a new baseline if intended"
    else:
        status = "regression" if rel > rule.max_increase + 1e-12 else ("improvement" if cv < bv else "ok")
        limit = f"maximum increase {rule.max_increase:.2%}"
    return Check(
        key,
        metric,
        "",
        status,
        bv,
        cv,
        change=change,
        rule=desc,
        message=f"{key}: {metric} {bv:,} -> {cv:,} {unit} ({change}; {limit})",
    )


def _comparable(b: dict[str, Any], cur: dict[str, Any]) -> str | None:
    """Why latency/memory of these two entries cannot be compared (None: they can)."""
    if b.get("profile") != cur.get("profile"):
        return f"hardware profiles differ (baseline {b.get('profile')}, current {cur.get('profile')})"
    if not b.get("verified", True) or not cur.get("verified", True):
        return "measured on hardware that did not match the declared profile (unverified)"
    return None


def latency_verdict(base_ms: Sequence[float], cur_ms: Sequence[float], rule) -> dict[str, Any]:
    """asv's two-part test of one pair of timing samples: ratio of medians, then significance."""
    from bench.stats import median, median_ci, min_two_sided_p, rank_test

    mb, mc = median(base_ms), median(cur_ms)
    ratio = mc / mb if mb > 0 else math.inf
    n1, n2 = len(base_ms), len(cur_ms)
    reachable = min_two_sided_p(n1, n2)
    out: dict[str, Any] = {
        "median_baseline_ms": mb,
        "median_current_ms": mc,
        "ratio": ratio,
        "n_baseline": n1,
        "n_current": n2,
        "min_reachable_p": reachable,
    }
    if reachable < rule.p_value:
        p, how = rank_test(base_ms, cur_ms)
        out.update(test="mann-whitney", p_value=p, implementation=how, significant=p < rule.p_value)
    else:
        lo_b, hi_b = median_ci(base_ms, rule.ci)
        lo_c, hi_c = median_ci(cur_ms, rule.ci)
        out.update(
            test="median-ci",
            ci_baseline=[lo_b, hi_b],
            ci_current=[lo_c, hi_c],
            significant=lo_c > hi_b or hi_c < lo_b,
        )
    out["slower"] = ratio > rule.max_ratio and out["significant"] and mc > mb
    out["faster"] = ratio < 1 / rule.max_ratio and out["significant"] and mc < mb
    return out


def _latency(key: str, b: dict[str, Any], cur: dict[str, Any], rules: GateRules) -> list[Check]:
    rule = rules.latency
    desc = (
        f"ratio > x{rule.max_ratio:g} and (Mann-Whitney p < {rule.p_value:g}, or disjoint {rule.ci:.0%} CIs)"
    )
    out = []
    why = _comparable(b, cur)
    for batch, bl in (b.get("latency") or {}).items():
        cl = (cur.get("latency") or {}).get(batch)
        if why or cl is None:
            out.append(
                Check(
                    key,
                    "latency",
                    batch,
                    "not_compared",
                    bl.get("median_ms"),
                    (cl or {}).get("median_ms"),
                    rule=desc,
                    message=f"{key}: latency {batch} not compared: "
                    + (why or "not measured in the current run"),
                )
            )
            continue
        bt, ct = bl.get("times_ms"), cl.get("times_ms")
        if not bt or not ct:
            ratio = (
                (cl["median_ms"] / bl["median_ms"]) if bl.get("median_ms") and cl.get("median_ms") else None
            )
            out.append(
                Check(
                    key,
                    "latency",
                    batch,
                    "untestable",
                    bl.get("median_ms"),
                    cl.get("median_ms"),
                    change=f"x{ratio:.3f}" if ratio else "",
                    rule=desc,
                    message=f"{key}: latency {batch} has no raw samples in the "
                    f"{'baseline' if not bt else 'current run'}; significance cannot be tested, so "
                    "it is not gated",
                )
            )
            continue
        v = latency_verdict(bt, ct, rule)
        if v["test"] == "mann-whitney":
            sig = f"Mann-Whitney p = {v['p_value']:.2g} {'<' if v['significant'] else '>='} {rule.p_value:g}"
        else:
            sig = (
                f"p < {rule.p_value:g} unreachable with n = {v['n_baseline']} vs {v['n_current']}; "
                f"{rule.ci:.0%} "
                f"CIs of the medians [{v['ci_baseline'][0]:.3g}, {v['ci_baseline'][1]:.3g}] and "
                f"[{v['ci_current'][0]:.3g}, {v['ci_current'][1]:.3g}] ms "
                f"{'do not overlap' if v['significant'] else 'overlap'}"
            )
        status = "regression" if v["slower"] else ("improvement" if v["faster"] else "ok")
        if (
            status == "ok"
            and v["ratio"] > rule.max_ratio
            and v["test"] == "median-ci"
            and math.inf in (abs(x) for x in v["ci_baseline"] + v["ci_current"])
        ):
            # slower beyond the ratio, but too few samples for any interval at this confidence: say so
            status = "untestable"
            sig += " (too few samples for a verdict: time more blocks)"
        cmp = ">" if v["ratio"] > rule.max_ratio else "<="
        out.append(
            Check(
                key,
                "latency",
                batch,
                status,
                v["median_baseline_ms"],
                v["median_current_ms"],
                change=f"x{v['ratio']:.3f}",
                rule=desc,
                stats=v,
                message=f"{key}: latency {batch} median {v['median_baseline_ms']:.4g} -> "
                f"{v['median_current_ms']:.4g} ms (x{v['ratio']:.3f} {cmp} x{rule.max_ratio:g}; {sig}; "
                f"n = {v['n_baseline']} vs {v['n_current']})",
            )
        )
    return out


def _memory(key: str, b: dict[str, Any], cur: dict[str, Any], rules: GateRules) -> list[Check]:
    rule = rules.memory
    desc = f"increase <= {rule.max_increase:.0%}"
    out = []
    why = _comparable(b, cur)
    for item, bv in (b.get("memory") or {}).items():
        cv = (cur.get("memory") or {}).get(item)
        if why or bv is None or cv is None:
            out.append(
                Check(
                    key,
                    "memory",
                    item,
                    "not_compared",
                    bv,
                    cv,
                    rule=desc,
                    message=f"{key}: memory {item} not compared: " + (why or "not measured"),
                )
            )
            continue
        rel = cv / bv - 1 if bv else 0.0
        status = (
            "regression"
            if rel > rule.max_increase + 1e-12
            else ("improvement" if rel < -rule.max_increase else "ok")
        )
        out.append(
            Check(
                key,
                "memory",
                item,
                status,
                bv,
                cv,
                change=_pct(rel),
                rule=desc,
                message=f"{key}: memory {item} peak {bv / 2**20:.2f} -> {cv / 2**20:.2f} MiB ({_pct(rel)}; "
                f"maximum increase {rule.max_increase:.0%})",
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# The pull-request summary
# --------------------------------------------------------------------------------------------------


def _value(metric: str, item: str, v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if metric == "quality":
        return f"{v:.4f}"
    if metric in ("params", "flops"):
        return f"{v:,}"
    if metric == "latency":
        return f"{v:.4g} ms"
    if metric == "memory":
        return f"{v / 2**20:.2f} MiB"
    return str(v)


#: Rows per table of the summary: GitHub comments are limited to 65,536 characters.
MAX_ROWS = 250


def to_markdown(report: Report) -> str:
    regs = report.regressions
    counts = _counts(report.checks)
    head = (
        f"## bench gate: ❌ {len(regs)} regression{'s' if len(regs) != 1 else ''}"
        if regs
        else "## bench gate: ✅ no regressions"
    )
    suite = (
        (report.baseline_info.get("suite") or {}).get("name") if report.baseline_info.get("suite") else None
    )
    lines = [
        "<!-- bench-gate -->",
        head,
        "",
        f"Baseline `{report.baseline_path}`"
        + (f" (suite {suite})" if suite else "")
        + f" against {report.n_current} current records in `{report.current}`. "
        + "Checks: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + ".",
        "",
        "Gated: "
        + (", ".join(report.gated) or "nothing")
        + "."
        + (
            " Not gated: " + "; ".join(f"{m} ({why})" for m, why in report.not_gated.items()) + "."
            if report.not_gated
            else ""
        ),
        "",
    ]

    def table(checks: list[Check]) -> list[str]:
        rows = [
            "| | metric | cell | baseline | current | change | rule |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        icon = {"regression": "❌", "improvement": "⬆️", "ok": "✅", "not_compared": "➖", "untestable": "⚠️"}
        for c in checks:
            metric = c.metric + (f" {c.item}" if c.item else "")
            change = c.change
            if c.metric == "latency" and c.stats.get("test") == "mann-whitney":
                change += f", p={c.stats['p_value']:.2g}"
            rows.append(
                f"| {icon.get(c.status, '')} | {metric} | `{c.cell}` | "
                f"{_value(c.metric, c.item, c.baseline)} "
                f"| {_value(c.metric, c.item, c.current)} | {change} | {c.rule} |"
            )
        return rows

    if regs:
        lines += ["### Regressions", ""] + table(regs[:MAX_ROWS]) + [""]
        lines += [f"- {c.message}" for c in regs[:MAX_ROWS]] + [""]
    notes = [c for c in report.checks if c.status in ("improvement", "untestable")]
    if notes:
        lines += ["### Improvements and untestable checks", ""] + table(notes[:MAX_ROWS]) + [""]
        lines += [f"- {c.message}" for c in notes if c.status == "untestable"][:20] + [""]
    if report.new:
        lines += [
            "New cells, not in the baseline (run `bench gate --update-baseline` to gate them): "
            + ", ".join(f"`{k}`" for k in report.new),
            "",
        ]
    shown = report.checks[:MAX_ROWS]
    more = (
        ["", f"... and {len(report.checks) - len(shown)} more in the JSON report."]
        if len(report.checks) > len(shown)
        else []
    )
    lines += (
        [f"<details><summary>All {len(report.checks)} checks</summary>", ""]
        + table(shown)
        + more
        + ["", "</details>", ""]
    )
    lines.append(
        "Rules: quality may drop by at most the declared amount at fixed seeds; params and FLOPs exact or a "
        "maximum relative increase; latency needs both a median ratio above the threshold and a significant "
        "difference of the raw samples (asv: Mann-Whitney U, p < 0.002, or disjoint 99% CIs when that p is "
        "out of reach); memory a maximum relative increase."
    )
    return "\n".join(lines) + "\n"
