"""Synthetic run records for the leaderboard and gate tests and the 10,000-record benchmark.

`make_record` copies a real record that ``bench run`` wrote (committed under leaderboards/records/) and
replaces the fields a test is about, so tests and the benchmark parse what a real records folder holds,
at its real size. The tests at the bottom pin that: a synthetic record has every key a real smoke record
has, and reads back through `bench.store.read_record`.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GLUE_RULE = (
    "unweighted mean over the subtasks run of each subtask's score; a subtask with two metrics scores "
    "their mean (GLUE, Wang et al. 2019)"
)


#: A real record written by ``bench run`` (committed with the published leaderboard): every synthetic
#: record is a copy of it with the fields under test replaced, so it has a real record's structure and size.
TEMPLATE = (
    Path(__file__).resolve().parents[2]
    / "leaderboards"
    / "records"
    / "glue"
    / "sst2"
    / "kd__smoke__cpu-2core__s0.json"
)

#: Keys of a record that only a finished cell has (results); a failed or skipped record has none of them.
RESULT_KEYS = ("data", "notes", "teacher", "training", "method_info", "efficiency", "metrics", "metric_specs",
               "score", "aggregate", "wall_s")


@functools.lru_cache(maxsize=1)
def _template() -> str:
    return TEMPLATE.read_text(encoding="utf-8")


def make_record(
    task: str = "glue",
    subtask: str = "sst2",
    method: str = "kd",
    seed: int = 0,
    *,
    tier: str = "smoke",
    profile: str = "cpu-2core",
    status: str = "ok",
    score: float = 0.8,
    metrics: dict[str, float] | None = None,
    params: int = 96_066,
    flops: int = 4_727_040,
    latency_ms: float = 2.0,
    times_ms: list[float] | None = None,
    peak_bytes: int = 40_620_032,
    verified: bool = True,
    reason: str | None = None,
    aggregate: tuple[str, str] = ("GLUE", GLUE_RULE),
    notes: list[str] | None = None,
    created: str = "2025-01-01T00:00:00+00:00",
) -> dict[str, Any]:
    """One record as `bench.runner` writes it (status ok, failed or skipped), from the real template."""
    rec = json.loads(_template())
    cell = {
        "task": task,
        "subtask": subtask,
        "method": method,
        "tier": tier,
        "profile": profile,
        "seed": seed,
    }
    cell_id = f"{task}.{subtask}--{method}--{tier}--{profile}--s{seed}"
    rec.update(
        cell_id=cell_id,
        cell=cell,
        status=status,
        reason=reason,
        created=created,
        config_hash=f"{zlib.crc32(cell_id.encode()):016x}",
        traceback="Traceback (most recent call last):\n  ...\nRuntimeError: boom"
        if status == "failed"
        else None,
    )
    rec["config"].update(task=task, subtask=subtask, tier=tier, seed=seed, method=method, profile=profile)
    rec["profile"].update(
        id=profile,
        verified=verified,
        description="2 logical CPUs, fp32, 2 threads",
        mismatches=[] if verified else ["logical CPUs: profile declares 2, this process may use 4"],
    )
    if status != "ok":  # as runner.run_one writes them: no results, only identity and provenance
        for key in RESULT_KEYS:
            rec.pop(key, None)
        if status == "skipped":
            rec["config"] = rec["config_hash"] = None
        return rec
    rng = random.Random(zlib.crc32(cell_id.encode()))
    times = (
        times_ms if times_ms is not None else [latency_ms * (1 + 0.03 * rng.gauss(0, 1)) for _ in range(10)]
    )
    eff = rec["efficiency"]
    eff.update(
        params=params,
        flops_per_sample=flops,
        macs_per_sample=flops // 2,
        flops_per_step=flops,
        training_flops_per_sample=3 * flops,
    )
    for key, scale in (("batch_1", 1), ("batch_32", 8)):
        ts = [scale * t for t in times]
        eff["latency"][key].update(
            median_ms=sorted(ts)[len(ts) // 2],
            times_ms=ts,
            n_blocks=len(ts),
            mean_ms=sum(ts) / len(ts),
            p90_ms=max(ts),
        )
    eff["memory"]["batch_1"]["peak_bytes"] = peak_bytes
    eff["memory"]["batch_32"]["peak_bytes"] = peak_bytes + 4_000_000
    eff["training_memory"]["peak_bytes"] = 2 * peak_bytes
    metrics = metrics if metrics is not None else {"accuracy": score}
    rec.update(
        metrics=metrics,
        score=score,
        notes=notes or [],
        metric_specs=[
            {"name": k, "higher_is_better": True, "primary": i == 0, "description": ""}
            for i, k in enumerate(metrics)
        ],
        aggregate={"name": aggregate[0], "rule": aggregate[1]},
    )
    return rec


def write_records(root: Path, records: list[dict[str, Any]]) -> Path:
    """Lay records out as ``bench run`` does:
    <root>/records/<task>/<subtask>/<method>__<tier>__<profile>__s<seed>.json."""
    for rec in records:
        c = rec["cell"]
        path = (
            root
            / "records"
            / c["task"]
            / c["subtask"]
            / f"{c['method']}__{c['tier']}__{c['profile']}__s{c['seed']}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2))
    return root


def synthetic_records(
    n_tasks: int = 4,
    n_profiles: int = 2,
    n_subtasks: int = 10,
    n_methods: int = 25,
    n_seeds: int = 5,
    failed_every: int = 97,
) -> Iterator[dict[str, Any]]:
    """A large leaderboard: 4 x 2 x 10 x 25 x 5 = 10,000 records by default, a few failed and skipped."""
    rng = random.Random(0)
    i = 0
    for t in range(n_tasks):
        for p in range(n_profiles):
            for s in range(n_subtasks):
                for m in range(n_methods):
                    method = ("teacher", "student")[m] if m < 2 else f"method{m:02d}"
                    skill = 0.55 + 0.35 * rng.random()
                    for seed in range(n_seeds):
                        i += 1
                        status = (
                            "failed"
                            if i % failed_every == 0
                            else ("skipped" if i % (failed_every * 3 + 1) == 0 else "ok")
                        )
                        yield make_record(
                            f"family{t}",
                            f"sub{s}",
                            method,
                            seed,
                            profile=f"profile{p}",
                            status=status,
                            score=min(1.0, skill + 0.02 * rng.gauss(0, 1)),
                            params=1_000_000 * (1 + m),
                            flops=10_000_000 * (1 + m),
                            latency_ms=0.5 + 0.1 * m,
                            reason="RuntimeError: NaN loss"
                            if status == "failed"
                            else ("unsupported" if status == "skipped" else None),
                        )


# --------------------------------------------------------------------------------------------------
# The factory matches real records
# --------------------------------------------------------------------------------------------------

#: Top-level keys of a real ok smoke record (bench run --methods kd --task glue/rte, bench 0.1.0).
REAL_OK_KEYS = {
    "schema_version",
    "cell_id",
    "cell",
    "status",
    "reason",
    "traceback",
    "config",
    "config_hash",
    "created",
    "profile",
    "versions",
    "git",
    "environment",
    "hardware",
} | set(RESULT_KEYS)


def test_synthetic_record_has_the_real_structure(tmp_path):
    from bench.store import read_record

    rec = make_record()
    assert set(rec) == REAL_OK_KEYS
    assert set(rec["efficiency"]["latency"]["batch_1"]) >= {"median_ms", "times_ms", "n_blocks"}
    root = write_records(tmp_path, [rec, make_record(status="failed", reason="boom", seed=1)])
    paths = sorted((root / "records").rglob("*.json"))
    assert [read_record(p)["status"] for p in paths] == ["ok", "failed"]
    assert abs(paths[0].stat().st_size - TEMPLATE.stat().st_size) < 1_500  # a real record's size (~12 kB)


def test_synthetic_matrix_size():
    recs = list(synthetic_records(n_tasks=1, n_profiles=1, n_subtasks=2, n_methods=3, n_seeds=2))
    assert len(recs) == 12
    assert len({r["cell_id"] for r in recs}) == 12
