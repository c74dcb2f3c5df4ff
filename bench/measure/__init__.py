"""Measurement: the only place in `bench` where anything is timed or measured.

Four probes, each in its own module, each following the research note
``docs/reference/measurement.md`` (section numbers below refer to it):

- `bench.measure.flops`    — FLOPs/MACs from ``torch.utils.flop_counter.FlopCounterMode`` with the CPU
  SDPA kernel registered (§4, §7.5).
- `bench.measure.latency`  — blocked wall-clock timing with warm-up, minimum time *and* minimum count,
  median/p90/IQR and a noise flag (§1.2, §5.1, §7.3).
- `bench.measure.memory`   — peak memory of one call, measured in an isolated child process (§1.3, §6).
- `bench.measure.hardware` — the hardware fingerprint recorded on every row (§1.5, §7.1).

Importing this package does not import torch (DESIGN.md, style rule 4): the public names are resolved
lazily by the module-level ``__getattr__`` below, so ``bench --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bench.measure._errors import MeasurementError, UncountedOpsError

if TYPE_CHECKING:  # for type checkers and IDEs only; never executed at run time
    from bench.measure.flops import FlopCount, count_flops, model_flops_per_sample
    from bench.measure.hardware import fingerprint, fingerprint_id
    from bench.measure.latency import latency_stats, measure_latency, measure_model_latency
    from bench.measure.memory import measure_peak_memory, run_isolated

# public name -> submodule that defines it
_LAZY = {
    "FlopCount": "flops",
    "count_flops": "flops",
    "model_flops_per_sample": "flops",
    "measure_latency": "latency",
    "measure_model_latency": "latency",
    "latency_stats": "latency",
    "measure_peak_memory": "memory",
    "run_isolated": "memory",
    "fingerprint": "hardware",
    "fingerprint_id": "hardware",
}

__all__ = [
    "FlopCount",
    "MeasurementError",
    "UncountedOpsError",
    "count_flops",
    "fingerprint",
    "fingerprint_id",
    "latency_stats",
    "measure_latency",
    "measure_model_latency",
    "measure_peak_memory",
    "model_flops_per_sample",
    "run_isolated",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bench.measure' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bench.measure.{module}"), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
