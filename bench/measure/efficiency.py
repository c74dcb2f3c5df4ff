"""The efficiency block of a run record: parameters, FLOPs, latency and peak memory of the evaluated model.

Every probe runs on the task's declared inputs (``Task.example_inputs``) through the task's own
``forward`` adapter, so the timed artifact is exactly the evaluated one (MLPerf's TEST01 idea,
measurement.md §2.2). A probe that fails leaves its value ``None`` and its reason under ``errors``;
no column is ever dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from bench.api import Task

#: Timing protocol per tier: smoke cells are seconds long, so their timings are quick and marked so.
TIMING = {
    "smoke": {"min_run_time": 0.1, "min_count": 5, "warmup": 2},
    "default": {"min_run_time": 1.0, "min_count": 10, "warmup": 10},
}


def efficiency(model: nn.Module, task: Task, profile: dict[str, Any], *, measure_runtime: bool = True) -> dict[str, Any]:
    from bench.measure.flops import model_flops_per_sample
    from bench.measure.latency import measure_model_latency
    from bench.measure.memory import measure_peak_memory

    model.eval()
    device = profile.get("device", "cpu")
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "input": task.input_description(),
        "flops_per_sample": None, "macs_per_sample": None, "flops_uncounted": [],
        "latency": {}, "memory": {}, "errors": {},
    }
    try:
        one = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in task.example_inputs(1).items()}
        fc = model_flops_per_sample(model, task.forward, one, batch_size=1)
        out.update(flops_per_sample=fc.flops, macs_per_sample=fc.macs, flops_uncounted=list(fc.uncounted))
    except Exception as exc:  # noqa: BLE001 - a failed probe is recorded, never fatal
        out["errors"]["flops"] = f"{type(exc).__name__}: {exc}"
    if not measure_runtime:
        out["errors"]["latency"] = out["errors"]["memory"] = "not measured (runtime.measure=false)"
        return out
    timing = TIMING["smoke" if task.env.tier == "smoke" else "default"]
    out["timing_protocol"] = timing
    sizes = list(dict.fromkeys([*profile.get("latency_batch_sizes", [1]), profile.get("throughput_batch_size", 32)]))
    # The measuring server imports these once; children forked from it then load the model without
    # paying for imports (the model's own module, e.g. transformers' modeling_bert, takes seconds).
    preload = ("torch", type(model).__module__, type(task).__module__)
    for bs in sizes:
        key = f"batch_{bs}"
        inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in task.example_inputs(bs).items()}
        try:
            lat = measure_model_latency(model, task.forward, inputs, threads=profile.get("threads", 1),
                                        batch_size=bs, device=device, **timing)
            if len(lat.get("times_ms", [])) > 200:  # keep records small; the statistics stay
                lat.pop("times_ms")
            out["latency"][key] = lat
        except Exception as exc:  # noqa: BLE001
            out["latency"][key] = None
            out["errors"][f"latency_{key}"] = f"{type(exc).__name__}: {exc}"
        try:
            out["memory"][key] = measure_peak_memory(model, task.forward, inputs, device=device, preload=preload,
                                                     threads=profile.get("threads"))
        except Exception as exc:  # noqa: BLE001
            out["memory"][key] = None
            out["errors"][f"memory_{key}"] = f"{type(exc).__name__}: {exc}"
    return out
