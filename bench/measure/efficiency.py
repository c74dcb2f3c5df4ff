"""The efficiency block of a run record: parameters, FLOPs, latency and peak memory of the evaluated model.

Every probe runs on the task's declared inputs (``Task.example_inputs``) through the task's own
``forward`` adapter, so the timed artifact is exactly the evaluated one (MLPerf's TEST01 idea,
measurement.md §2.2). A probe that fails leaves its value ``None`` and its reason under ``errors``;
no column is ever dropped.

* FLOPs: one FlopCounterMode pass at batch 1 (attention included, CPU SDPA registered); iterative
  students (diffusion samplers) multiply the per-step count by ``Task.inference_steps()``.
* Generators (`bench.diffusion.Generator`, the diffusion domain): the model's forward is its whole sampler,
  so FLOPs, latency and memory are per image; ``nfe`` (network evaluations per image), the sampler and
  ``flops_per_network_call`` are recorded beside them.
* Training FLOPs per sample: forward + backward of the label loss at the training batch shape.
* Latency: the profile's threads and timing protocol (smoke cells use a short protocol, recorded).
* Peak memory: an isolated child per measurement, for inference at every latency/throughput batch
  size and for one training step (forward, backward, AdamW step) at the task's training batch size.
* Utilisation: achieved FLOP/s at the throughput batch over the profile's declared peak for its dtype.
* Components (``Task.components``, segmentation: the image encoder per image, the prompt encoder and mask
  decoder per prompt): parameters, FLOPs and batch-1 latency of each part through the task's
  ``component_forward``, per the component's own unit, under ``components`` beside the whole-model numbers.
* Generative tasks (``Task.generation_inputs`` is not None, the lm domain): FLOPs per token, and time to
  first token and tokens/s at batch 1 through the task's ``generate`` adapter (`bench.measure.generation`),
  under the same threads and timing protocol.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from bench.api import Batch, Task

#: Raw latency samples kept per measurement (enough for the gate's Mann-Whitney test).
MAX_SAMPLES = 200
#: Smoke cells last seconds, so their timings use a short protocol (recorded with the numbers).
SMOKE_TIMING = {"min_run_time": 0.1, "min_count": 5, "warmup": 2}


class TrainLoss:
    """``(model, batch) -> label loss``: the training objective the memory probe back-propagates.

    A class rather than a closure so that it pickles into the measuring child (with the task)."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __call__(self, model: nn.Module, batch: Batch):
        return self.task.label_loss(self.task.forward(model, batch), batch)


class ComponentForward:
    """``(model, batch) -> task.component_forward(model, name, batch)``, picklable like `TrainLoss`."""

    def __init__(self, task: Task, name: str) -> None:
        self.task, self.name = task, name

    def __call__(self, model: nn.Module, batch: Batch):
        return self.task.component_forward(model, self.name, batch)


def _submodule_params(model: nn.Module, paths: str) -> int:
    total = 0
    for path in (p.strip() for p in paths.split(",") if p.strip()):
        total += sum(p.numel() for p in model.get_submodule(path).parameters())
    return total


def component_costs(model: nn.Module, task: Task, device: str, *, threads: int | None = None,
                    timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameters, FLOPs per unit and (with ``timing``) batch-1 latency of each of the task's components.

    A probe that fails leaves its value ``None`` with the reason under the component's ``errors``."""
    from bench.measure.flops import model_flops_per_sample
    from bench.measure.latency import measure_model_latency

    out: dict[str, Any] = {}
    for comp in task.components():
        row: dict[str, Any] = {"per": comp.per, "module": comp.module, "params": None, "flops": None,
                               "macs": None, "latency": None, "errors": {}}
        fwd = ComponentForward(task, comp.name)
        try:
            row["params"] = _submodule_params(model, comp.module)
        except Exception as exc:  # noqa: BLE001 - a failed probe is recorded, never fatal
            row["errors"]["params"] = _err(exc)
        try:
            fc = model_flops_per_sample(model, fwd, _on(task.component_inputs(comp.name, 1), device), batch_size=1)
            row.update(flops=fc.flops, macs=fc.macs, flops_uncounted=list(fc.uncounted))
        except Exception as exc:  # noqa: BLE001
            row["errors"]["flops"] = _err(exc)
        if timing is not None:
            try:
                lat = measure_model_latency(model, fwd, _on(task.component_inputs(comp.name, 1), device),
                                            threads=threads or 1, batch_size=1, device=device, **timing)
                lat.pop("times_ms", None)  # the summary is enough here; the whole model keeps its samples
                row["latency"] = lat
            except Exception as exc:  # noqa: BLE001
                row["errors"]["latency"] = _err(exc)
        out[comp.name] = row
    return out


def _on(batch: Batch, device: str) -> Batch:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def forward_flops(model: nn.Module, task: Task, device: str = "cpu"):
    """FlopCount of one sample at the declared input shape (one sampler step for iterative models)."""
    from bench.measure.flops import model_flops_per_sample

    return model_flops_per_sample(model, task.forward, _on(task.example_inputs(1), device), batch_size=1)


def training_flops_per_sample(model: nn.Module, task: Task, device: str = "cpu") -> int:
    """FLOPs of forward + backward of the label loss for one sample at the declared shape."""
    from bench.measure.flops import count_flops

    work = copy.deepcopy(model).train()
    batch = _on(task.example_batch(2), device)
    fc = count_flops(lambda: TrainLoss(task)(work, batch).backward())
    return fc.flops // 2


def efficiency(model: nn.Module, task: Task, profile: dict[str, Any], *, measure_runtime: bool = True) -> dict[str, Any]:
    from bench.measure.latency import measure_model_latency
    from bench.measure.memory import measure_peak_memory

    model.eval()
    device = profile.get("run_device") or profile.get("device", "cpu")
    steps = task.inference_steps()
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "input": task.input_description(),
        "inference_steps": steps,
        "flops_per_sample": None, "macs_per_sample": None, "flops_per_step": None, "flops_uncounted": [],
        "training_flops_per_sample": None,
        "latency": {}, "memory": {}, "training_memory": None, "utilisation": None, "errors": {},
    }
    sampler = getattr(model, "sampler", None)
    if sampler is not None and hasattr(sampler, "nfe"):
        # A generator (bench.diffusion): one sample is one image through its whole sampler, so every count
        # below is per image; the NFE (network evaluations per image) is recorded beside them.
        out.update(nfe=sampler.nfe, sampler=sampler.describe(), flops_per_network_call=None)
    try:
        fc = forward_flops(model, task, device)
        out.update(flops_per_step=fc.flops, flops_per_sample=fc.flops * steps, macs_per_sample=fc.macs * steps,
                   flops_uncounted=list(fc.uncounted))
        if "nfe" in out:
            out["flops_per_network_call"] = fc.flops // max(1, out["nfe"])
    except Exception as exc:  # noqa: BLE001 - a failed probe is recorded, never fatal
        out["errors"]["flops"] = _err(exc)
    # A model with nothing to train (a training-free method's, e.g. frame_skip) has no training step to count.
    trainable = any(p.requires_grad for p in model.parameters())
    untrained = "not measured: the model has no trainable parameters (a training-free method)"
    if not trainable:
        out["errors"]["training_flops"] = untrained
    else:
        try:
            out["training_flops_per_sample"] = training_flops_per_sample(model, task, device)
        except Exception as exc:  # noqa: BLE001
            out["errors"]["training_flops"] = _err(exc)
    generative = task.generation_inputs(1)
    if generative is not None:
        from bench.measure.generation import flops_per_token

        out["flops_per_token"] = flops_per_token(out["flops_per_sample"], task.example_inputs(1))
        out["generation"] = None
    timing = SMOKE_TIMING if task.env.tier == "smoke" else dict(profile.get("timing") or {})
    threads = profile.get("threads", 1)
    if task.components():
        out["components"] = component_costs(model, task, device, threads=threads,
                                            timing=timing if measure_runtime else None)
    if not measure_runtime:
        out["errors"]["latency"] = out["errors"]["memory"] = "not measured (runtime.measure=false)"
        return out

    out["timing_protocol"] = timing
    # The measuring server imports these once; children forked from it then load the model without
    # paying for imports (the model's own module, e.g. transformers' modeling_bert, takes seconds).
    preload = ("torch", type(model).__module__, type(task).__module__)
    sizes = list(dict.fromkeys([*profile.get("latency_batch_sizes", [1]), profile.get("throughput_batch_size", 32)]))
    for bs in sizes:
        key = f"batch_{bs}"
        inputs = _on(task.example_inputs(bs), device)
        try:
            lat = measure_model_latency(model, task.forward, inputs, threads=threads, batch_size=bs, device=device,
                                        **timing)
            times = lat.get("times_ms") or []
            if len(times) > MAX_SAMPLES:  # records stay small; an even subsample keeps the distribution
                step = len(times) / MAX_SAMPLES
                lat["times_ms"] = [times[int(i * step)] for i in range(MAX_SAMPLES)]
                lat["times_ms_subsampled_from"] = len(times)
            out["latency"][key] = lat
        except Exception as exc:  # noqa: BLE001
            out["latency"][key] = None
            out["errors"][f"latency_{key}"] = _err(exc)
        try:
            out["memory"][key] = measure_peak_memory(model, task.forward, inputs, device=device, preload=preload,
                                                     threads=threads)
        except Exception as exc:  # noqa: BLE001
            out["memory"][key] = None
            out["errors"][f"memory_{key}"] = _err(exc)
    if generative is not None:
        from bench.measure.generation import measure_generation

        prompts, new_tokens = generative
        try:
            out["generation"] = measure_generation(model, task.generate, _on(prompts, device), new_tokens=new_tokens,
                                                   threads=threads, device=device, **timing)
        except Exception as exc:  # noqa: BLE001
            out["errors"]["generation"] = _err(exc)
    train_bs = task.training().batch_size
    if not trainable:
        out["errors"]["training_memory"] = untrained
        out["utilisation"] = utilisation(out, profile, _param_dtype(model))
        return out
    try:
        out["training_memory"] = {"batch_size": train_bs, **measure_peak_memory(
            model, TrainLoss(task), task.example_batch(train_bs), device=device, preload=preload, threads=threads,
            train=True)}
    except Exception as exc:  # noqa: BLE001
        out["errors"]["training_memory"] = _err(exc)
    out["utilisation"] = utilisation(out, profile, _param_dtype(model))
    return out


def _param_dtype(model: nn.Module) -> str:
    """The dtype the model was timed in (its first floating-point parameter's; float32 without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def utilisation(eff: dict[str, Any], profile: dict[str, Any], dtype: str = "float32") -> dict[str, Any] | None:
    """Achieved FLOP/s at the throughput batch, and its fraction of the profile's declared peak for the dtype
    the model actually ran in (``dtype``). The harness trains and times in float32 on every device, so on a GPU
    profile declaring ``dtype: bfloat16`` the float32 peak applies, not the bfloat16 one (which would understate
    the fraction about 15x on an H200); ``profile_dtype`` keeps the declared one."""
    bs = profile.get("throughput_batch_size")
    lat = (eff.get("latency") or {}).get(f"batch_{bs}")
    if not lat or not eff.get("flops_per_sample"):
        return None
    achieved = eff["flops_per_sample"] * lat["samples_per_s"]
    peak = (profile.get("peak_flops") or {}).get(dtype)
    return {"achieved_flops_per_s": achieved, "dtype": dtype, "profile_dtype": profile.get("dtype", "float32"),
            "declared_peak_flops_per_s": peak, "fraction_of_peak": achieved / peak if peak else None,
            "batch_size": bs}
