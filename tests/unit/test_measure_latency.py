"""Latency: exact statistics on a fake clock, both stopping minimums, calibration, CUDA event path with
fake events, and a real run that restores the thread count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.measure.latency import CudaEventTimer, latency_stats, measure_latency, measure_model_latency


class FakeClock:
    """A clock that only moves when a fake call says so; durations in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def scripted(clock: FakeClock, durations: list[float], then: float):
    """A fn whose successive calls take ``durations`` seconds, and ``then`` seconds afterwards."""
    queue = list(durations)
    calls = []

    def fn() -> None:
        duration = queue.pop(0) if queue else then
        calls.append(duration)
        clock.advance(duration)

    return fn, calls


def test_stats_exact():
    times = [float(x) for x in range(1, 11)]  # 1..10 ms
    s = latency_stats(times)
    assert s["median_ms"] == 5.5
    assert s["p90_ms"] == pytest.approx(9.1)
    assert s["mean_ms"] == 5.5
    assert s["iqr_ms"] == pytest.approx(7.75 - 3.25)
    assert s["spread"] == pytest.approx(4.5 / 5.5)
    assert s["noisy"] is True
    # same interpolation as numpy's default
    assert s["p90_ms"] == pytest.approx(np.percentile(times, 90))
    assert s["iqr_ms"] == pytest.approx(np.percentile(times, 75) - np.percentile(times, 25))

    quiet = latency_stats([10.0, 10.0, 10.0, 10.0, 11.0])
    assert quiet["median_ms"] == 10.0 and quiet["iqr_ms"] == 0.0 and quiet["spread"] == 0.0
    assert quiet["noisy"] is False


def test_fake_clock_end_to_end_statistics_are_exact():
    clock = FakeClock()
    # 1/64 s and friends are exact in binary floating point, so every sum below is exact
    unit = 1 / 64
    warmup = [0.5, unit, unit]              # cold first call, then two warm ones
    calibration = [unit]                    # one call >= min_run_time/1000: 1 call per block
    timed = [unit * k for k in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    fn, _ = scripted(clock, warmup + calibration + timed, then=unit)
    result = measure_latency(fn, threads=1, batch_size=4, min_run_time=0.5, min_count=10, warmup=3,
                             clock=clock)
    assert result["first_call_ms"] == 500.0
    assert result["calls_per_block"] == 1
    expected_ms = [t * 1e3 for t in timed]
    # 55/64 s of timed blocks >= 0.5 s and 10 blocks: exactly the scripted ten
    assert result["times_ms"] == expected_ms
    assert result["n_blocks"] == 10
    stats = latency_stats(expected_ms)
    for key in ("median_ms", "p90_ms", "mean_ms", "iqr_ms", "spread", "noisy"):
        assert result[key] == stats[key]
    assert result["median_ms"] == 5.5 * unit * 1e3
    assert result["samples_per_s"] == pytest.approx(4 / (5.5 * unit))
    assert result["batch_size"] == 4 and result["threads"] == 1 and result["device"] == "cpu"
    assert "perf_counter" in result["method"]
    json.dumps(result)  # JSON-able


def test_min_run_time_governs_when_calls_are_short():
    clock = FakeClock()
    fn, _ = scripted(clock, [], then=1 / 64)
    result = measure_latency(fn, threads=1, batch_size=1, min_run_time=1.0, min_count=5, warmup=0,
                             clock=clock)
    assert result["first_call_ms"] is None
    assert result["n_blocks"] == 64  # 64 × 1/64 s = 1 s, far more than 5 blocks
    assert result["total_time_s"] == 1.0


def test_min_count_governs_when_calls_are_long():
    clock = FakeClock()
    fn, _ = scripted(clock, [], then=1 / 8)
    result = measure_latency(fn, threads=1, batch_size=1, min_run_time=0.25, min_count=20, warmup=1,
                             clock=clock)
    assert result["n_blocks"] == 20  # 0.25 s is reached after 2 blocks; the count keeps going
    assert result["total_time_s"] == 20 / 8


def test_calibration_grows_blocks_until_timer_overhead_is_negligible():
    clock = FakeClock()
    tiny = 2.0**-20  # ~1 µs a call; target block is min_run_time/1000 = 1 ms
    fn, _ = scripted(clock, [], then=tiny)
    result = measure_latency(fn, threads=1, batch_size=1, min_run_time=1.0, min_count=3, warmup=0,
                             clock=clock)
    assert result["calls_per_block"] == 10_000  # 1000 calls = 0.95 ms < 1 ms, so ×10 once more
    assert all(t == pytest.approx(tiny * 1e3) for t in result["times_ms"])


class FakeEvent:
    def __init__(self, clock: FakeClock, log: list) -> None:
        self.clock, self.log, self.t = clock, log, None
        log.append("event")

    def record(self) -> None:
        self.t = self.clock()

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1e3  # milliseconds, like torch.cuda.Event


def test_cuda_event_path_syncs_once_per_block():
    clock = FakeClock()
    log: list[str] = []
    timer = CudaEventTimer(event_factory=lambda: FakeEvent(clock, log), synchronize=lambda: log.append("sync"))
    fn, _ = scripted(clock, [], then=1 / 32)
    result = measure_latency(fn, threads=1, batch_size=2, min_run_time=0.5, min_count=4, warmup=2,
                             device="cuda", timer=timer)
    assert result["device"] == "cuda" and "cuda events" in result["method"]
    assert result["n_blocks"] == 16 and result["times_ms"] == [1e3 / 32] * 16
    # every block is an event pair followed by exactly one synchronize, and nothing else syncs
    assert log.count("event") == 2 * log.count("sync")
    assert all(log[i:i + 3] == ["event", "event", "sync"] for i in range(0, len(log), 3))


def test_real_tiny_model_and_threads_restored():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model.train()
    inputs = {"x": torch.randn(4, 64)}
    before = torch.get_num_threads()
    target_threads = 1 if before != 1 else 2
    result = measure_model_latency(model, lambda m, b: m(b["x"]), inputs, threads=target_threads,
                                   batch_size=4, min_run_time=0.05, min_count=5, warmup=2)
    assert torch.get_num_threads() == before
    assert model.training
    assert result["threads"] == target_threads
    assert result["median_ms"] > 0 and result["p90_ms"] >= result["median_ms"] > 0
    assert result["samples_per_s"] > 0 and result["n_blocks"] >= 5 and result["total_time_s"] >= 0.05
    assert len(result["times_ms"]) == result["n_blocks"]


def test_threads_restored_when_fn_raises():
    before = torch.get_num_threads()

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(boom, threads=1 if before != 1 else 2, batch_size=1, min_run_time=0.0,
                        min_count=1, warmup=1)
    assert torch.get_num_threads() == before


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="min_count"):
        measure_latency(lambda: None, threads=1, batch_size=1, min_run_time=0.1, min_count=0, warmup=0)
