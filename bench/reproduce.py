"""``bench reproduce RUN``: re-run the cell a record describes and compare every number.

The record's resolved configuration (task and method parameters, the training budget and optimiser,
tier, seed) becomes a one-cell suite run into a fresh output folder. Quality metrics are compared
exactly (the same seed on the same kind of machine gives identical numbers on CPU); parameters and
FLOPs must match exactly too; latency and memory are shown as ratios, since they are measurements.
Differences in code (git commit), data fingerprints or hardware are reported beside the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import BenchError
from bench.config import Suite


def suite_from_record(rec: dict[str, Any], out: Path) -> Suite:
    if rec.get("status") != "ok" or not rec.get("config"):
        raise BenchError(f"record {rec.get('cell_id')} has status {rec.get('status')!r}; only finished (ok) "
                         f"records carry the configuration needed to reproduce them")
    cfg = rec["config"]
    train = cfg.get("train") or {}
    optim = train.get("optim") or {}
    prof = rec.get("profile") or {}
    return Suite.model_validate({
        "name": f"reproduce-{rec['cell_id']}",
        "tier": cfg["tier"],
        "tasks": [f"{cfg['task']}/{cfg['subtask']}"],
        "methods": [{"name": cfg["method"], "params": cfg.get("method_params") or {}}],
        "seeds": [cfg["seed"]],
        "references": False,
        "task_params": {cfg["task"]: cfg.get("task_params") or {}},
        "train": {"steps": train.get("steps"), "batch_size": train.get("batch_size"), "lr": optim.get("lr"),
                  "weight_decay": optim.get("weight_decay"), "warmup_ratio": optim.get("warmup_ratio"),
                  "grad_clip": optim.get("grad_clip")},
        "out": str(out),
        "profile": prof.get("id") if prof.get("kind") == "declared" else None,
    })


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[tuple[str, Any, Any, str]], bool]:
    """Rows (name, original, reproduced, difference) and whether every exact quantity matched."""
    rows = []
    exact = True
    for k in sorted(set(old.get("metrics") or {}) | set(new.get("metrics") or {})):
        a, b = (old.get("metrics") or {}).get(k), (new.get("metrics") or {}).get(k)
        same = a == b
        exact &= same
        rows.append((k, a, b, "identical" if same else (f"{b - a:+.6g}" if a is not None and b is not None else "missing")))
    oe, ne = old.get("efficiency") or {}, new.get("efficiency") or {}
    for k in ("params", "flops_per_sample"):
        same = oe.get(k) == ne.get(k)
        exact &= same
        rows.append((k, oe.get(k), ne.get(k), "identical" if same else "differs"))
    for group in ("latency", "memory"):
        for key, m in (oe.get(group) or {}).items():
            field = "median_ms" if group == "latency" else "peak_bytes"
            a, b = (m or {}).get(field), ((ne.get(group) or {}).get(key) or {}).get(field)
            ratio = f"x{b / a:.3f}" if a and b else "n/a"
            rows.append((f"{group} {key} {field}", a, b, ratio + " (measured)"))
    return rows, exact


def provenance_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    notes = []
    og, ng = old.get("git") or {}, new.get("git") or {}
    if og.get("commit") != ng.get("commit"):
        notes.append(f"code differs: recorded at commit {og.get('commit')}, reproduced at {ng.get('commit')}")
    if og.get("dirty") or ng.get("dirty"):
        notes.append("a working tree was dirty (uncommitted changes) when recorded or reproduced")
    if old.get("config_hash") != new.get("config_hash"):
        notes.append(f"resolved configuration differs (hash {old.get('config_hash')} vs {new.get('config_hash')}): "
                     "the task's or method's defaults changed since the record was made")
    od, nd = old.get("data") or {}, new.get("data") or {}
    for part in ("train", "eval"):
        if od.get(part) != nd.get(part):
            notes.append(f"data differ ({part} fingerprint)")
    ov, nv = old.get("versions") or {}, new.get("versions") or {}
    changed = [f"{k} {ov.get(k)} -> {nv.get(k)}" for k in sorted(set(ov) | set(nv)) if ov.get(k) != nv.get(k)]
    if changed:
        notes.append("package versions differ: " + ", ".join(changed))
    oh, nh = (old.get("profile") or {}).get("id"), (new.get("profile") or {}).get("id")
    if oh != nh:
        notes.append(f"hardware profile differs: {oh} vs {nh} (measured numbers are not comparable)")
    return notes
