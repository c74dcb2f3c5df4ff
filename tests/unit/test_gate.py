"""bench gate on a real test model: an injected accuracy drop, FLOPs increase and 25% latency slowdown each
fail the gate naming the metric and the numbers; ten no-change reruns raise no alarm. Plus the rules
declared in a suite, status changes, memory, profiles, exit codes and bad input.

The test model is a small MLP trained on fixed data. Its parameters and FLOPs are counted by
bench.measure.flops, its accuracy is evaluated, and its latency is measured by bench.measure.latency's
protocol on an injected clock: each call advances the clock by the model's simulated cost times
seeded noise (4% log-normal jitter plus 5% spikes of 1.5-2.5x, a noisy shared CPU), so a 25% slowdown and
ten no-change reruns are tested exactly, without depending on this machine's load. A wall-clock
version is in test_gate_latency.py.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.config import GateRules
from bench.gate import compare, entries, latency_verdict, load_baseline, make_baseline, to_markdown
from bench.measure.flops import model_flops_per_sample
from bench.measure.latency import measure_model_latency

sys.path.insert(0, str(Path(__file__).parent))
from test_leaderboard_records import make_record, write_records

COST_S = 0.002  # simulated cost of one call of the test model


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


class TinyNet(torch.nn.Module):
    """16 -> 32 -> 32 -> 2 MLP; ``repeat=2`` applies the middle layer twice (more FLOPs, same params)."""

    def __init__(self, repeat: int = 1) -> None:
        super().__init__()
        self.inp, self.mid, self.out = (
            torch.nn.Linear(16, 32),
            torch.nn.Linear(32, 32),
            torch.nn.Linear(32, 2),
        )
        self.repeat = repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for _ in range(self.repeat):
            h = torch.relu(self.mid(h))
        return self.out(h)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long()
    return x, y


@pytest.fixture(scope="module")
def models():
    """Two trained test models (seeds 0 and 1): deterministic on one machine."""
    x, y = data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1.7k-parameter model: more threads only wait on each other
    try:
        out = {}
        for seed in (0, 1):
            torch.manual_seed(seed)
            m = TinyNet()
            opt = torch.optim.Adam(m.parameters(), lr=1e-2)
            for _ in range(150):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x[:384]), y[:384]).backward()
                opt.step()
            out[seed] = m.eval()
        yield out
    finally:
        torch.set_num_threads(threads)


class NoisyClock:
    """A clock the test model advances: cost x log-normal jitter, with occasional spikes."""

    def __init__(self, seed: int) -> None:
        self.now, self.rng = 0.0, random.Random(seed)

    def __call__(self) -> float:
        return self.now

    def call(self, cost: float) -> None:
        factor = math.exp(self.rng.gauss(0, 0.04))
        if self.rng.random() < 0.05:
            factor *= self.rng.uniform(1.5, 2.5)
        self.now += cost * factor


def record(model: TinyNet, seed: int, *, noise_seed: int, slowdown: float = 1.0) -> dict:
    """Measure the test model as bench does and return its run record."""
    x, y = data()
    with torch.no_grad():
        accuracy = (model(x[384:]).argmax(1) == y[384:]).float().mean().item()
    params = sum(p.numel() for p in model.parameters())
    flops = model_flops_per_sample(model, lambda m, b: m(b["x"]), {"x": x[:1]}, batch_size=1).flops
    clock = NoisyClock(noise_seed)

    def forward(m, batch):
        out = m(batch["x"])
        clock.call(COST_S * slowdown)
        return out

    lat = measure_model_latency(
        model,
        forward,
        {"x": x[:1]},
        threads=1,
        batch_size=1,
        min_run_time=0.05,
        min_count=30,
        warmup=2,
        clock=clock,
    )
    rec = make_record(
        "toy",
        "binary",
        "kd",
        seed,
        metrics={"accuracy": accuracy},
        score=accuracy,
        params=params,
        flops=flops,
    )
    rec["efficiency"]["latency"] = {"batch_1": lat}
    return rec


def run_folder(root: Path, models: dict, *, noise: int, slowdown: float = 1.0) -> Path:
    return write_records(
        root, [record(m, s, noise_seed=noise * 10 + s, slowdown=slowdown) for s, m in models.items()]
    )


@pytest.fixture(scope="module")
def baseline(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    runs = run_folder(root / "base-runs", models, noise=0)
    path = root / "baseline.json"
    res = invoke("gate", "--baseline", str(path), "--current", str(runs), "--update-baseline")
    assert res.exit_code == 0, res.output
    return path


def gate(baseline: Path, runs: Path, *extra: str):
    res = invoke("gate", "--baseline", str(baseline), "--current", str(runs), *extra)
    report = (
        json.loads((runs / "gate-report.json").read_text()) if (runs / "gate-report.json").exists() else None
    )
    return res, report


# --------------------------------------------------------------------------------------------------
# What it must show
# --------------------------------------------------------------------------------------------------


def test_accuracy_drop_fails_naming_metric_and_numbers(models, baseline, tmp_path):
    broken = {s: TinyNet() for s in models}
    for s, m in models.items():
        broken[s].load_state_dict(m.state_dict())
        with torch.no_grad():
            broken[s].inp.weight[:16] = 0  # the injected fault: half the hidden units dead
    runs = run_folder(tmp_path, {0: broken[0].eval(), 1: models[1]}, noise=1)
    res, report = gate(baseline, runs)
    assert res.exit_code == 1, res.output
    (reg,) = report["regressions"]
    assert (
        reg["metric"] == "quality"
        and reg["item"] == "accuracy"
        and reg["cell"] == "toy.binary--kd--smoke--s0"
    )
    before, after = reg["baseline"], reg["current"]
    assert before - after > 0.05
    assert f"quality accuracy {before:.4f} -> {after:.4f}" in res.output
    assert "maximum drop 0.01" in res.output and "❌ 1 regression" in res.output


def test_flops_increase_fails_naming_metric_and_numbers(models, baseline, tmp_path):
    heavier = TinyNet(repeat=2)
    heavier.load_state_dict(models[0].state_dict())
    runs = run_folder(tmp_path, {0: heavier.eval(), 1: models[1]}, noise=2)
    res, report = gate(baseline, runs)
    assert res.exit_code == 1, res.output
    flops = [r for r in report["regressions"] if r["metric"] == "flops"]
    assert len(flops) == 1
    b, c = flops[0]["baseline"], flops[0]["current"]
    assert c - b == 2 * 32 * 32  # one more 32x32 matmul per sample (2 FLOPs per multiply-accumulate)
    assert f"flops {b:,} -> {c:,} FLOPs/sample" in res.output and "exact rule" in res.output
    # the parameters did not change (weights are shared), and are not blamed
    assert not [r for r in report["regressions"] if r["metric"] == "params"]


def test_25_percent_latency_slowdown_fails_naming_metric_and_numbers(models, baseline, tmp_path):
    runs = run_folder(tmp_path, models, noise=3, slowdown=1.25)
    res, report = gate(baseline, runs)
    assert res.exit_code == 1, res.output
    lat = [r for r in report["regressions"] if r["metric"] == "latency"]
    assert {r["cell"] for r in lat} == {"toy.binary--kd--smoke--s0", "toy.binary--kd--smoke--s1"}
    for r in lat:
        ratio = r["stats"]["ratio"]
        assert 1.15 < ratio < 1.35 and r["stats"]["test"] == "mann-whitney" and r["stats"]["p_value"] < 0.002
        assert r["item"] == "batch_1"
        assert (
            f"latency batch_1 median {r['baseline']:.4g} -> {r['current']:.4g} ms (x{ratio:.3f} > x1.1"
            in res.output
        )
    assert "Mann-Whitney p = " in res.output
    assert not [r for r in report["regressions"] if r["metric"] != "latency"]


def test_ten_no_change_reruns_raise_no_alarm(models, baseline, tmp_path):
    ratios = []
    for i in range(10):
        runs = run_folder(tmp_path / f"rerun{i}", models, noise=100 + i)
        res, report = gate(baseline, runs)
        assert res.exit_code == 0, res.output
        assert report["verdict"] == "pass" and not report["regressions"]
        assert "✅ no regressions" in res.output
        ratios += [c["stats"]["ratio"] for c in report["checks"] if c["metric"] == "latency"]
        # quality, params and FLOPs were re-measured and are identical at fixed seeds
        assert {c["status"] for c in report["checks"] if c["metric"] in ("quality", "params", "flops")} == {
            "ok"
        }
    assert len(ratios) == 20 and max(abs(r - 1) for r in ratios) < 0.1


# --------------------------------------------------------------------------------------------------
# Rules, statuses, reports
# --------------------------------------------------------------------------------------------------


def cells(**kw):
    return entries([make_record(**kw)], "test")


def test_suite_rules_relative_flops_and_quality_tolerance(tmp_path):
    base = make_baseline(
        [make_record(flops=1000, score=0.80, metrics={"accuracy": 0.80})], GateRules(), None, "b"
    )
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "tasks: [glue/sst2]\nmethods: [kd]\nout: runs\ngate:\n  flops: {exact: false, max_increase: 0.10}\n"
        "  quality: {max_drop: 0.05}\n"
    )
    from bench.config import load_suite

    rules = load_suite(suite).gate
    ok = compare(base, cells(flops=1050, metrics={"accuracy": 0.76}), rules)
    assert not ok.regressions
    bad = compare(base, cells(flops=1150, metrics={"accuracy": 0.74}), rules)
    assert sorted(r.metric for r in bad.regressions) == ["flops", "quality"]
    flops = next(r for r in bad.regressions if r.metric == "flops")
    assert "1,000 -> 1,150 FLOPs/sample (+15.00%; maximum increase 10.00%)" in flops.message
    # exact (the default): a decrease is a change too, so the baseline moves in the same reviewed commit
    assert compare(base, cells(flops=900), GateRules()).regressions[0].metric == "flops"


def test_latency_needs_both_ratio_and_significance():
    rule = GateRules().latency
    rng = random.Random(0)
    base = [2.0 * math.exp(rng.gauss(0, 0.03)) for _ in range(30)]
    # significant but small: 5% slower
    v = latency_verdict(base, [1.05 * t for t in base], rule)
    assert v["significant"] and not v["slower"]
    # large ratio but too few, too noisy samples: 5 vs 5 cannot reach p < 0.002, and the 99% median
    # intervals of 5 samples are unbounded, so nothing is claimed
    v = latency_verdict([2.0, 2.1, 1.9, 2.05, 1.95], [2.6, 2.5, 2.7, 2.4, 2.65], rule)
    assert v["test"] == "median-ci" and v["min_reachable_p"] > 0.002 and not v["slower"]
    # 6 vs 6: the smallest reachable p is 2/C(12,6) = 0.0022, and 6 samples have no 99% median interval
    six_b, six_c = [2.0, 2.1, 1.9, 2.05, 1.95, 2.02], [2.6, 2.5, 2.7, 2.4, 2.65, 2.55]
    v = latency_verdict(six_b, six_c, rule)
    assert v["test"] == "median-ci" and not v["slower"]
    # enough samples, clearly slower: both halves hold
    v = latency_verdict(base, [1.25 * t for t in base], rule)
    assert v["test"] == "mann-whitney" and v["p_value"] < 1e-6 and v["slower"]
    # faster is reported as an improvement, not a regression
    assert latency_verdict(base, [0.7 * t for t in base], rule)["faster"]


def test_latency_ci_fallback_detects_a_clear_slowdown_with_enough_samples():
    rule = GateRules().latency.model_copy(update={"p_value": 1e-12})  # unreachable: forces the CI rule
    base = [2.0 + 0.01 * i for i in range(20)]
    v = latency_verdict(base, [1.3 * t for t in base], rule)
    assert v["test"] == "median-ci" and v["significant"] and v["slower"]


def test_latency_and_memory_only_between_matching_verified_profiles():
    base = make_baseline([make_record(latency_ms=2.0)], GateRules(), None, "b")
    rep = compare(base, cells(latency_ms=4.0, profile="other"), GateRules())
    assert not rep.regressions
    assert {c.status for c in rep.checks if c.metric in ("latency", "memory")} == {"not_compared"}
    assert any(
        "hardware profiles differ (baseline cpu-2core, current other)" in c.message for c in rep.checks
    )
    rep = compare(base, cells(latency_ms=4.0, verified=False), GateRules())
    assert not rep.regressions and any("unverified" in c.message for c in rep.checks)


def test_memory_rule():
    base = make_baseline([make_record(peak_bytes=100 * 2**20)], GateRules(), None, "b")
    assert not compare(base, cells(peak_bytes=108 * 2**20), GateRules()).regressions
    rep = compare(base, cells(peak_bytes=125 * 2**20), GateRules())
    mem = [r for r in rep.regressions if r.metric == "memory"]
    assert {r.item for r in mem} == {"batch_1", "batch_32", "training_step"}
    assert "memory batch_1 peak 100.00 -> 125.00 MiB (+25.00%; maximum increase 10%)" in mem[0].message


def test_untestable_latency_without_raw_samples_is_reported_not_failed():
    base = make_baseline([make_record(latency_ms=2.0)], GateRules(), None, "b")
    cur = cells(latency_ms=3.0)
    for lat in next(iter(cur.values()))["latency"].values():
        lat["times_ms"] = None  # records drop raw samples beyond 200 blocks
    rep = compare(base, cur, GateRules())
    assert not rep.regressions
    assert {c.status for c in rep.checks if c.metric == "latency"} == {"untestable"}
    assert "no raw samples in the current run; significance cannot be tested" in to_markdown(rep)


def test_status_changes_missing_and_new_cells():
    recs = [make_record(seed=0), make_record(seed=1), make_record(seed=2, status="failed", reason="x")]
    base = make_baseline(recs, GateRules(), None, "b")
    cur = entries(
        [
            make_record(seed=0, status="failed", reason="RuntimeError: NaN loss"),
            make_record(seed=2),
            make_record(seed=3),
        ],
        "c",
    )
    rep = compare(base, cur, GateRules())
    regs = {(r.cell, r.current) for r in rep.regressions}
    assert regs == {("glue.sst2--kd--smoke--s0", "failed"), ("glue.sst2--kd--smoke--s1", "missing")}
    assert rep.new == ["glue.sst2--kd--smoke--s3"] and rep.missing == ["glue.sst2--kd--smoke--s1"]
    assert any(c.status == "improvement" and c.cell.endswith("s2") for c in rep.checks)
    md = to_markdown(rep)
    assert "NaN loss" in md and "New cells, not in the baseline" in md


def test_only_restricts_gated_metrics(models, baseline, tmp_path):
    runs = run_folder(tmp_path, models, noise=4, slowdown=1.25)
    res, report = gate(baseline, runs, "--only", "quality,params,flops")
    assert res.exit_code == 0, res.output
    assert report["gated"] == ["quality", "params", "flops"]
    assert report["not_gated"]["latency"] == "not selected (--only)"
    assert "Not gated: latency (not selected (--only)); memory" in res.output


# --------------------------------------------------------------------------------------------------
# Baseline files and bad input
# --------------------------------------------------------------------------------------------------


def test_update_baseline_round_trip_and_rules_from_suite(tmp_path):
    runs = write_records(tmp_path / "runs", [make_record(seed=0), make_record(seed=1)])
    suite = tmp_path / "s.yaml"
    suite.write_text(
        f"name: ci\ntasks: [glue/sst2]\nmethods: [kd]\nout: {runs}\ngate:\n  latency: {{max_ratio: 1.5}}\n"
    )
    path = tmp_path / "b" / "baseline.json"
    res = invoke("gate", "--baseline", str(path), "--suite", str(suite), "--update-baseline")
    assert res.exit_code == 0, res.output
    data = load_baseline(path)
    assert data["rules"]["latency"]["max_ratio"] == 1.5 and data["suite"] == {
        "name": "ci",
        "file": str(suite),
    }
    assert sorted(data["cells"]) == ["glue.sst2--kd--smoke--s0", "glue.sst2--kd--smoke--s1"]
    assert data["cells"]["glue.sst2--kd--smoke--s0"]["latency"]["batch_1"]["times_ms"]
    assert "--update-baseline" in data["generated_by"]
    res = invoke("gate", "--baseline", str(path), "--current", str(runs))
    assert res.exit_code == 0, res.output
    assert (runs / "gate-summary.md").read_text().startswith("<!-- bench-gate -->")


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "not found. Create it from a run with"),
        ("{not json", "corrupt baseline (not valid JSON"),
        ('{"cells": {}}', "not a bench gate baseline"),
        (
            '{"kind": "bench-gate-baseline", "schema_version": 9, "cells": {}}',
            "schema_version 9 is not supported",
        ),
        (
            (
                '{"kind": "bench-gate-baseline", "schema_version": 1, "cells": {}, '
                '"rules": {"latency": {"max_ratio": 0.5}}}'
            ),
            "corrupt baseline rules",
        ),
    ],
)
def test_bad_baseline_exits_2_and_writes_nothing(tmp_path, content, needle):
    runs = write_records(tmp_path / "runs", [make_record()])
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    res = invoke("gate", "--baseline", str(path), "--current", str(runs))
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not (runs / "gate-summary.md").exists() and not (runs / "gate-report.json").exists()


def test_no_records_and_bad_only_exit_2(tmp_path, baseline):
    (tmp_path / "empty").mkdir()
    res = invoke("gate", "--baseline", str(baseline), "--current", str(tmp_path / "empty"))
    assert res.exit_code == 2 and "no run records under" in res.output
    assert not list((tmp_path / "empty").iterdir())
    res = invoke("gate", "--baseline", str(baseline), "--current", str(tmp_path / "empty"), "--only", "speed")
    assert res.exit_code == 2 and "valid: quality, params, flops, latency, memory" in res.output
    res = invoke(
        "gate",
        "--baseline",
        str(tmp_path / "nope.json"),
        "--current",
        str(tmp_path / "empty"),
        "--update-baseline",
    )
    assert res.exit_code == 2 and not (tmp_path / "nope.json").exists()


def test_two_profiles_of_one_cell_are_ambiguous(tmp_path, baseline):
    runs = write_records(tmp_path / "runs", [make_record(), make_record(profile="other")])
    res = invoke("gate", "--baseline", str(baseline), "--current", str(runs))
    assert res.exit_code == 2 and "two records of cell glue.sst2--kd--smoke--s0" in res.output


def test_a_large_ratio_on_too_few_samples_is_untestable_not_ok():
    base = make_baseline([make_record(times_ms=[2.0, 2.1, 1.9, 2.05, 1.95])], GateRules(), None, "b")
    rep = compare(base, cells(times_ms=[2.6, 2.5, 2.7, 2.4, 2.65]), GateRules())
    (check,) = [c for c in rep.checks if c.metric == "latency" and c.item == "batch_1"]
    assert check.status == "untestable" and not rep.regressions
    assert "p < 0.002 unreachable with n = 5 vs 5" in check.message and "too few samples" in check.message
