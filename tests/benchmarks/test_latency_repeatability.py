"""Benchmark: two back-to-back latency measurements of the same model agree within 10% (median).

This is a property of the machine as much as of the protocol, so it lives here, with the other timing
targets, and not in the default test run: on a shared CI runner a neighbour can shift one of the two
medians by more than 10% (seen once: 0.833 vs 0.943 ms), which says nothing about bench. The protocol's
statistics and noise flag are tested exactly, on injected clocks, in tests/unit/test_measure_latency.py.

Run with ``python -m pytest tests/benchmarks/test_latency_repeatability.py --benchmark-only -s``.
"""

from __future__ import annotations


from bench.measure.latency import measure_model_latency

PAIRS = 3


def test_back_to_back_latency_agrees_within_10_percent(benchmark, glue_smoke_student):
    task, model = glue_smoke_student
    inputs = task.example_inputs(1)

    def measure() -> float:
        # the harness's own call, at the smoke profile's settings: batch 1, 2 threads, >= 1 s and >= 20 blocks
        return measure_model_latency(model, task.forward, inputs, threads=2, batch_size=1, min_run_time=1.0,
                                     min_count=20, warmup=10)["median_ms"]

    pairs = [(measure(), measure()) for _ in range(PAIRS)]
    gaps = [abs(a - b) / min(a, b) for a, b in pairs]
    benchmark.extra_info.update({"pairs_median_ms": pairs, "relative_gaps": gaps})
    benchmark.pedantic(measure, rounds=1, iterations=1)
    print("\nback-to-back medians (ms): " + ", ".join(f"{a:.3f}/{b:.3f} ({g:.1%})" for (a, b), g in zip(pairs, gaps)))
    assert max(gaps) <= 0.10, pairs
