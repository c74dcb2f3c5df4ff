"""Wall-clock latency of one call, timed in blocks.

The protocol (measurement.md §7.3, built from §1.2 optimum-benchmark and §5.1 torch.utils.benchmark):

1. **Warm-up**: ``warmup`` untimed calls with the measured inputs (optimum-benchmark #188: warm-up must
   use the measured shapes). The first of them is timed on its own and reported as ``first_call_ms``
   (cold start is a separate number, never mixed into the statistics, §1.2).
2. **Calibration** (torch.utils.benchmark ``blocked_autorange``, §5.1): the number of calls per block
   grows ×10 from 1 until a block lasts at least ``max(min_run_time / 1000, 1e4 × timer overhead)``, so the
   timer's own cost is ≤ 1e-4 of a block. For model inference (≥ 1 ms a call) this stays at 1 call per
   block, so every sample is one call. Calibration blocks are discarded (they double as warm-up).
3. **Timed blocks** until *both* ``min_run_time`` seconds of timed blocks *and* ``min_count`` blocks are
   collected — both are minimums, as in optimum-benchmark's ``while elapsed < duration or count <
   iterations`` (§1.2).
4. **Statistics** over the per-call time of each block: median (the headline number, as in
   torch.utils.benchmark's ``Measurement``), p90, mean, IQR and ``spread = IQR / median``; ``noisy`` is
   ``spread > 0.10``, torch.utils.benchmark's threshold for "system fluctuation" (§5.1). The raw samples
   are kept (§7.2).

Threads: torch.utils.benchmark's ``Timer`` defaults to ``num_threads=1`` "so that comparisons are
apples-to-apples", a trap for CPU inference latency (§5.1); we set exactly the profile's ``threads`` for
the duration of the measurement and restore the previous value afterwards.

Clocks: on CPU ``time.perf_counter`` with no device sync. On CUDA a ``torch.cuda.Event`` pair around each
block and **one** ``synchronize()`` at the end of the block (not per call, §1.2, §5.2). On MPS,
``perf_counter`` with ``torch.mps.synchronize()`` at both ends of a block. The timer is injectable
(``clock=`` or ``timer=``) so tests are deterministic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "NOISY_SPREAD",
    "CudaEventTimer",
    "PerfCounterTimer",
    "SyncedClockTimer",
    "latency_stats",
    "measure_latency",
    "measure_model_latency",
    "quantile",
]

#: IQR/median above which a measurement is flagged noisy: torch.utils.benchmark warns at 10% (§5.1).
NOISY_SPREAD = 0.10
#: Timer overhead must be at most this fraction of a block (torch.utils.benchmark blocked_autorange).
_OVERHEAD_FRACTION = 1e-4
#: Calls per block never grow beyond this (a no-op fn on a fake clock must not loop forever).
_MAX_CALLS_PER_BLOCK = 10**7


# --------------------------------------------------------------------------------------------------
# Timers: start() returns a token, stop(token) returns elapsed seconds.
# --------------------------------------------------------------------------------------------------


class BlockTimer(Protocol):
    method: str

    def start(self) -> Any: ...

    def stop(self, token: Any) -> float: ...


class PerfCounterTimer:
    """Host clock, no device synchronisation (CPU)."""

    method = "perf_counter"

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def start(self) -> float:
        return self.clock()

    def stop(self, token: float) -> float:
        return self.clock() - token


class SyncedClockTimer:
    """Host clock with a device synchronisation at both ends of a block (MPS, or any queue device)."""

    def __init__(self, synchronize: Callable[[], None], clock: Callable[[], float] = time.perf_counter,
                 name: str = "device") -> None:
        self.clock = clock
        self.synchronize = synchronize
        self.method = f"perf_counter with {name} synchronize at both ends of each block"

    def start(self) -> float:
        self.synchronize()
        return self.clock()

    def stop(self, token: float) -> float:
        self.synchronize()
        return self.clock() - token


class CudaEventTimer:
    """A CUDA event pair around each block and one synchronize at its end (optimum-benchmark, §1.2).

    ``event_factory`` and ``synchronize`` default to ``torch.cuda.Event(enable_timing=True)`` and
    ``torch.cuda.synchronize``; tests inject fakes. Events are recorded on the current stream, so they
    bracket the GPU work of the block; ``elapsed_time`` is in milliseconds.
    """

    method = "cuda events around each block, one synchronize per block"

    def __init__(self, event_factory: Callable[[], Any] | None = None,
                 synchronize: Callable[[], None] | None = None) -> None:
        if event_factory is None or synchronize is None:
            import torch

            event_factory = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
            synchronize = synchronize or torch.cuda.synchronize
        self.event_factory = event_factory
        self.synchronize = synchronize

    def start(self) -> Any:
        event = self.event_factory()
        event.record()
        return event

    def stop(self, token: Any) -> float:
        end = self.event_factory()
        end.record()
        self.synchronize()  # the only sync of the block: results are read once the GPU is done
        return token.elapsed_time(end) / 1e3


def _default_timer(device: str, clock: Callable[[], float] | None = None) -> BlockTimer:
    """CUDA events on CUDA; a synchronised host clock on MPS; ``perf_counter`` on CPU. A given ``clock``
    replaces the host clock (on CUDA it replaces the events by a host clock with synchronize)."""
    if device.startswith(("cuda", "mps")):
        import torch

        if device.startswith("mps"):
            return SyncedClockTimer(torch.mps.synchronize, clock or time.perf_counter, name="mps")
        if clock is not None:
            return SyncedClockTimer(torch.cuda.synchronize, clock, name="cuda")
        return CudaEventTimer()
    return PerfCounterTimer(clock or time.perf_counter)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Quantile by linear interpolation between closest ranks (numpy's default, ``method="linear"``)."""
    if not sorted_values:
        raise ValueError("quantile of an empty sequence")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(times_ms: Sequence[float]) -> dict[str, Any]:
    """median/p90/mean/IQR/spread/noisy of per-call times in milliseconds."""
    ordered = sorted(times_ms)
    median = quantile(ordered, 0.5)
    iqr = quantile(ordered, 0.75) - quantile(ordered, 0.25)
    spread = iqr / median if median > 0 else math.inf
    return {
        "median_ms": median,
        "p90_ms": quantile(ordered, 0.9),
        "mean_ms": sum(ordered) / len(ordered),
        "iqr_ms": iqr,
        "spread": spread,
        "noisy": spread > NOISY_SPREAD,
    }


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def _run_block(fn: Callable[[], Any], calls: int, timer: BlockTimer) -> float:
    token = timer.start()
    for _ in range(calls):
        fn()
    return timer.stop(token)


def _timer_overhead(timer: BlockTimer, repeats: int = 10) -> float:
    """Median duration of an empty block: what the timer itself costs."""
    samples = sorted(_run_block(lambda: None, 0, timer) for _ in range(repeats))
    return samples[len(samples) // 2]


def measure_latency(
    fn: Callable[[], Any],
    *,
    threads: int,
    batch_size: int,
    min_run_time: float,
    min_count: int,
    warmup: int,
    device: str = "cpu",
    clock: Callable[[], float] | None = None,
    timer: BlockTimer | None = None,
) -> dict[str, Any]:
    """Time ``fn()`` following the protocol in the module docstring; return a JSON-able dict.

    ``fn`` should run one inference call on a fixed batch of ``batch_size`` samples (it is the caller's
    job to close over the model and inputs, e.g. `measure_model_latency`). ``clock`` replaces the host
    clock ``time.perf_counter``; ``timer`` replaces the whole block timer (any device; see
    `CudaEventTimer` for injecting fake events).

    Keys: ``median_ms``, ``p90_ms``, ``mean_ms``, ``iqr_ms``, ``spread``, ``noisy``, ``n_blocks``,
    ``calls_per_block``, ``batch_size``, ``threads``, ``samples_per_s`` (batch_size / median),
    ``device``, ``method``, ``times_ms`` (per-call time of each timed block), ``first_call_ms``,
    ``warmup``, ``min_run_time_s``, ``min_count``, ``total_time_s``.
    """
    import torch

    if threads < 1 or batch_size < 1 or min_count < 1 or warmup < 0 or min_run_time < 0:
        raise ValueError(
            "measure_latency needs threads >= 1, batch_size >= 1, min_count >= 1, warmup >= 0 and "
            f"min_run_time >= 0; got threads={threads}, batch_size={batch_size}, min_count={min_count}, "
            f"warmup={warmup}, min_run_time={min_run_time}"
        )
    if timer is None:
        timer = _default_timer(device, clock)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 1. warm-up; the first call alone is the cold-start number
        first_call_ms = None
        if warmup > 0:
            first_call_ms = _run_block(fn, 1, timer) * 1e3
            for _ in range(warmup - 1):
                fn()
            _run_block(lambda: None, 0, timer)  # drain queued device work before calibrating

        # 2. calibration: grow calls per block x10 until the timer overhead is negligible
        overhead = _timer_overhead(timer)
        target = max(min_run_time / 1000.0, overhead / _OVERHEAD_FRACTION)
        calls = 1
        while calls < _MAX_CALLS_PER_BLOCK and _run_block(fn, calls, timer) < target:
            calls *= 10

        # 3. timed blocks until both minimums are met
        times_ms: list[float] = []
        total = 0.0
        while total < min_run_time or len(times_ms) < min_count:
            elapsed = _run_block(fn, calls, timer)
            total += elapsed
            times_ms.append(elapsed / calls * 1e3)
        effective_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)

    stats = latency_stats(times_ms)
    median_s = stats["median_ms"] / 1e3
    return {
        **stats,
        "n_blocks": len(times_ms),
        "calls_per_block": calls,
        "batch_size": batch_size,
        "threads": effective_threads,
        "samples_per_s": batch_size / median_s if median_s > 0 else math.inf,
        "device": device,
        "method": (
            f"{timer.method}; {warmup} warm-up calls; blocks of {calls} call(s) (calibrated so timer "
            f"overhead <= {_OVERHEAD_FRACTION:g} of a block); >= {min_run_time:g} s and >= {min_count} "
            "blocks; statistics over per-call block means"
        ),
        "times_ms": times_ms,
        "first_call_ms": first_call_ms,
        "warmup": warmup,
        "min_run_time_s": min_run_time,
        "min_count": min_count,
        "total_time_s": total,
    }


def measure_model_latency(
    model: nn.Module,
    forward: Callable[[nn.Module, dict], Any],
    inputs: dict,
    *,
    threads: int,
    batch_size: int,
    min_run_time: float = 1.0,
    min_count: int = 10,
    warmup: int = 10,
    device: str = "cpu",
    **kwargs: Any,
) -> dict[str, Any]:
    """`measure_latency` of ``forward(model, inputs)`` in eval mode under ``torch.inference_mode``.

    Defaults follow optimum-benchmark's inference scenario (``iterations=10``, ``warmup_runs=10``, §1.2)
    with a 1 s minimum instead of its 10 s so a CPU cell stays short; profiles override them. The model's
    train/eval flag is restored afterwards. ``model`` and ``inputs`` must already be on ``device``.
    """
    import torch

    was_training = model.training
    model.eval()

    def call() -> None:
        with torch.inference_mode():
            forward(model, inputs)

    try:
        return measure_latency(call, threads=threads, batch_size=batch_size, min_run_time=min_run_time,
                               min_count=min_count, warmup=warmup, device=device, **kwargs)
    finally:
        model.train(was_training)
