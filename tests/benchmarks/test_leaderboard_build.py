"""Benchmark (pytest-benchmark): ``bench leaderboard build`` over 10,000 synthetic records, end to end.

Run with ``python -m pytest tests/benchmarks/test_leaderboard_build.py --benchmark-only -s``. Target: under
5 s per build. What is timed is the command a user runs, in a fresh process, into an empty folder:
interpreter start and imports; reading and parsing 10,000 record files (12 kB each: copies of a real
record with the cell, scores and efficiency numbers replaced; 126 MB in all); building the 8 tables (4 task
families x 2 hardware profiles, each 10 subtasks x 25 methods x 5 seeds, with a bootstrap interval for
every cell); writing the markdown, JSON, CSV, the HTML page and 32 plot files (PNG and SVG, quality
against latency and against FLOPs, per table). The records are written once, before timing. The wall
time, the CPU time of each build and the machine's load average are printed and kept in extra_info.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_leaderboard_records import synthetic_records, write_records

RECORDS = 10_000
TARGET_S = 5.0


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory) -> Path:
    recs = list(synthetic_records())
    assert len(recs) == RECORDS
    return write_records(tmp_path_factory.mktemp("lb10k") / "runs", recs)


def test_build_10k_records_under_5_s(benchmark, records_dir, tmp_path):
    bench_exe = str(Path(sys.executable).parent / "bench")
    out = tmp_path / "out"

    cpu: list[float] = []

    def build() -> subprocess.CompletedProcess:
        shutil.rmtree(out, ignore_errors=True)  # every round is a cold build into an empty folder
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            [bench_exe, "leaderboard", "build", "--from", str(records_dir), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        return proc

    proc = benchmark.pedantic(build, rounds=3, iterations=1, warmup_rounds=1)
    assert proc.returncode == 0, proc.stderr
    assert "25 rows from 1250 records" in proc.stderr
    assert len(list((out / "plots").glob("*.png"))) == 16 and len(list((out / "plots").glob("*.svg"))) == 16
    assert sum(1 for _ in out.glob("*.csv")) == 8 and (out / "index.html").stat().st_size > 100_000
    median = benchmark.stats.stats.median
    load = os.getloadavg()[0]
    benchmark.extra_info.update(
        records=RECORDS,
        tables=8,
        median_s=round(median, 3),
        target_s=TARGET_S,
        cpu_s=[round(c, 2) for c in cpu],
        load_average_1min=load,
    )
    print(
        f"\nbench leaderboard build, {RECORDS:,} records: median {median:.2f} s wall over 3 rounds "
        f"(min {benchmark.stats.stats.min:.2f} s, max {benchmark.stats.stats.max:.2f} s); CPU time per build "
        f"{', '.join(f'{c:.2f}' for c in cpu)} s; 1-minute load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    assert median < TARGET_S, f"building from {RECORDS:,} records took {median:.2f} s (target < {TARGET_S} s)"
