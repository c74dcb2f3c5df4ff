"""The one training loop every method runs in.

The harness owns the loop so that rows are comparable: the task declares the optimiser, schedule,
batch size and step budget; seeds and data order are fixed here; methods only turn a batch into losses.

Data order is a pure function of (seed, epoch): epoch ``e`` visits the training split in the order of
``randperm(len, generator=seed_for(seed, e))``, in batches of ``batch_size`` (the last partial batch is
dropped). Step ``s`` therefore always sees the same examples, which makes resume from a checkpoint
exact: a cell killed at any point and restarted produces the same metrics as an uninterrupted one.

Methods that train several models in sequence declare *generations* (`bench.api.Generation`): the
budget is split between them, each gets new optimisers and schedules over its own steps and restarts
the data order above, and a generation with a fresh student freezes the previous one as
``StepContext.previous``. A teacher ensemble is passed as a list of teachers.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bench import BenchError
from bench.api import Batch, Generation, Method, Outputs, Split, StepContext, Task, TrainConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


class TrainingError(RuntimeError):
    """Training cannot continue (NaN loss, method error); the cell is recorded as failed."""


# --------------------------------------------------------------------------------------------------
# Seeds and data order
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels.

    On CPU, identical seeds and thread counts give bit-identical runs. ``warn_only`` keeps ops that
    have no deterministic implementation usable (they are rare on the paths bench uses).
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The visiting order of epoch ``epoch`` (cached: every step of an epoch reads it)."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of optimiser step ``step`` (0-based)."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    return list(order[pos * batch_size:(pos + 1) * batch_size])


def to_device(batch: Batch, device: str) -> Batch:
    if device == "cpu":
        return batch
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def select_rows(batch: Batch, rows: list[int]) -> Batch:
    """The sub-batch of ``rows`` (tensors and lists with a leading batch dimension)."""
    import torch

    size = len(batch["index"])
    out: Batch = {}
    idx = torch.as_tensor(rows, dtype=torch.long)
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size:
            out[k] = v.index_select(0, idx.to(v.device))
        elif isinstance(v, list) and len(v) == size:
            out[k] = [v[r] for r in rows]
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------------
# What a method sees
# --------------------------------------------------------------------------------------------------


class HarnessContext(StepContext):
    """The harness's StepContext: models, budget, and the teacher-output caches of one cell."""

    def __init__(self, *, task: Task, student: nn.Module, teacher: nn.Module | list[nn.Module] | None,
                 total_steps: int, seed: int, device: str, train_split: Split, batch_size: int) -> None:
        self.task = task
        self.student = student
        self.teachers = list(teacher) if isinstance(teacher, (list, tuple)) else ([] if teacher is None else [teacher])
        self.teacher = self.teachers[0] if self.teachers else None
        self.total_steps = total_steps
        self.seed = seed
        self.device = device
        self.step = 0
        self.generation = 0
        self.generation_step = 0
        self.generation_steps = total_steps
        self.previous: nn.Module | None = None
        self.train_split = train_split
        self.batch_size = batch_size
        # Teacher logits by (teacher index, example id). A teacher is frozen and in eval mode, so its output
        # for an example never changes within a cell: each example goes through each teacher once -- unless
        # the task augments training batches at random, in which case nothing is cached.
        self.cacheable = bool(task.teacher_outputs_cacheable())
        self.teacher_cache: dict[Any, torch.Tensor] = {}
        self.previous_cache: dict[int, torch.Tensor] = {}
        self.teacher_forward_passes = 0
        self.teacher_examples = 0
        self.previous_forward_passes = 0
        self.previous_examples = 0
        # Teacher outputs a task keeps itself (``Task.teacher_store``: e.g. top-k logits on disk shared by
        # every cell of a matrix), by teacher index; None where the task keeps none (the dict above is used).
        self.teacher_stores: dict[int, Any] = {}
        self.teacher_store_built = False
        # Update ratios (Method.update_every), set by the loop; and the teacher-pairs store (generative tasks).
        self.update_every: dict[str, int] = {}
        self.pair_store: Any = None
        self.pair_passes = 0
        self.pair_examples = 0

    def problem(self):
        return self.task.problem()

    def student_outputs(self, batch: Batch) -> Outputs:
        return self.task.forward(self.student, batch)

    def label_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor:
        return self.task.label_loss(outputs, batch)

    def _cached_logits(self, model: nn.Module, batch: Batch, cache: dict, key: Callable[[int], Any]) -> tuple[torch.Tensor, int]:
        """Logits of ``model`` for ``batch``, through ``cache``; returns them and how many examples ran."""
        import torch

        if not self.cacheable:
            with torch.no_grad():
                return self.task.forward(model, batch).logits.detach(), len(batch["index"])
        ids = batch["index"].tolist()
        missing = [r for r, i in enumerate(ids) if key(i) not in cache]
        if missing:
            sub = batch if len(missing) == len(ids) else select_rows(batch, missing)
            with torch.no_grad():
                logits = self.task.forward(model, sub).logits.detach()
            for row, r in enumerate(missing):
                cache[key(ids[r])] = logits[row]
        return torch.stack([cache[key(i)] for i in ids]), len(missing)

    def teacher_outputs(self, batch: Batch, index: int = 0) -> Outputs:
        if not self.teachers:
            raise TrainingError("this method asked for teacher outputs but the cell has no teacher")
        if not 0 <= index < len(self.teachers):
            raise TrainingError(f"teacher index {index} asked for; the cell has {len(self.teachers)} teacher(s)")
        store = self._teacher_store(index)
        if store is not None:
            out, passes, examples = store.outputs(batch)
            self.teacher_forward_passes += passes
            self.teacher_examples += examples
            self.teacher_store_built = self.teacher_store_built or bool(getattr(store, "built_here", False))
            return out
        # Index 0 keeps plain example ids as keys (the single-teacher cache layout checkpoints carry).
        logits, ran = self._cached_logits(self.teachers[index], batch, self.teacher_cache,
                                          (lambda i: i) if index == 0 else (lambda i: (index, i)))
        if ran:
            self.teacher_forward_passes += 1
            self.teacher_examples += ran
        return Outputs(logits=logits)

    def _teacher_store(self, index: int) -> Any:
        """The task's store of teacher ``index``'s outputs (asked for once per cell), or None."""
        if index not in self.teacher_stores:
            self.teacher_stores[index] = self.task.teacher_store(self.teachers[index])
        return self.teacher_stores[index]

    def teacher_cache_info(self) -> dict[str, Any]:
        """What the record says about teacher-output caching in this cell (``training.teacher_cache``)."""
        stores = {i: s for i, s in self.teacher_stores.items() if s is not None}
        if self.pair_store is not None:
            info = self.pair_store.info()
            info["built_by_this_cell"] = bool(self.pair_passes)
            info["passes_this_cell"] = self.pair_passes
            return info
        if not stores:
            return {"used": False, "kind": "in memory by example id, within the cell"
                    if self.cacheable else "none: training batches are augmented at random"}
        infos = [{**stores[i].info(), "teacher_index": i} for i in sorted(stores)]
        info = dict(infos[0]) if len(infos) == 1 else {"used": any(x.get("used") for x in infos), "stores": infos}
        if self.teacher_store_built and len(infos) == 1:
            info["built_by_this_cell"] = True
        return info

    def previous_outputs(self, batch: Batch) -> Outputs:
        if self.previous is None:
            raise TrainingError(f"generation {self.generation} asked for the previous generation's outputs; "
                                f"there is none (the first generation has no predecessor)")
        logits, ran = self._cached_logits(self.previous, batch, self.previous_cache, lambda i: i)
        if ran:
            self.previous_forward_passes += 1
            self.previous_examples += ran
        return Outputs(logits=logits)

    def run_teacher(self, fn: Callable[[nn.Module], Any], n_examples: int, index: int = 0) -> Any:
        import torch

        if not 0 <= index < len(self.teachers):
            raise TrainingError(f"teacher index {index} asked for; the cell has {len(self.teachers)} teacher(s)")
        with torch.no_grad():
            out = fn(self.teachers[index])
        self.teacher_forward_passes += 1
        self.teacher_examples += n_examples
        return out

    def updating(self, key: str) -> bool:
        return self.step % max(1, int(self.update_every.get(key, 1))) == 0

    def teacher_pairs(self, batch_size: int, n: int | None = None, trajectory: bool = False) -> Batch:
        if self.teacher is None:
            raise TrainingError("this method asked for teacher pairs but the cell has no teacher")
        if self.pair_store is None:
            self.pair_store = self.task.teacher_pairs(self.teacher, n, trajectory)
        store = self.pair_store
        # Pair order: a pure function of (seed, step), like the training batches (exact resume).
        idx = batch_indices(len(store), min(batch_size, len(store)), self.seed + 7_919, self.step)
        out, passes, examples = store.get(idx)
        if passes:
            self.teacher_forward_passes += passes
            self.teacher_examples += passes
            self.pair_passes += passes
            self.pair_examples += examples
        return to_device(out, self.device)

    def calibration_batches(self, n: int) -> list[Batch]:
        """The first ``n`` batches of a fixed order (independent of the cell's seed)."""
        order = epoch_order(len(self.train_split), seed=0, epoch=10_007)
        bs = self.batch_size
        return [to_device(self.train_split.batch(order[i * bs:(i + 1) * bs]), self.device)
                for i in range(min(n, max(1, len(order) // bs)))]


# --------------------------------------------------------------------------------------------------
# Optimisers and schedules
# --------------------------------------------------------------------------------------------------


def build_optimizer(module: nn.Module, cfg: TrainConfig):
    import torch

    o = cfg.optim
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(name.endswith(nd) or nd in name for nd in o.no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    raise BenchError(f"unknown optimiser {o.name!r}; valid: adamw, sgd")


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_ratio`` of the budget, then linear/cosine decay to 0, or constant."""
    total = cfg.steps
    warm = int(round(cfg.optim.warmup_ratio * total))
    kind = cfg.optim.schedule

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int = 0
    samples: int = 0
    wall_s: float = 0.0
    teacher_forward_passes: int = 0
    teacher_examples: int = 0
    previous_forward_passes: int = 0
    previous_examples: int = 0
    teacher_cache: dict[str, Any] | None = None
    resumed_from_step: int | None = None
    loss_log: list[dict[str, float]] = field(default_factory=list)
    method_log: dict[str, float] = field(default_factory=dict)
    generations: list[dict[str, Any]] = field(default_factory=list)
    #: optimiser steps per optimiser key (differ from ``steps`` under update ratios, TTUR)
    updates: dict[str, int] = field(default_factory=dict)
    #: data-parallel cells (`bench.distributed`): world size, backend, batches, examples per rank; None otherwise
    distributed: dict[str, Any] | None = None


def generation_seed(seed: int, index: int) -> int:
    """Seed of generation ``index``'s fresh student; generation 0 is the cell's own student (its seed)."""
    return seed if index == 0 else seed + 100_003 * index


def generation_plan(method: Method, total_steps: int) -> list[Generation]:
    """The method's generations, checked: at least one, each with at least one step, adding up to the budget."""
    plan = list(method.generations(total_steps))
    if not plan or any(g.steps < 1 for g in plan) or sum(g.steps for g in plan) != total_steps:
        raise TrainingError(f"method {method.name} split the budget of {total_steps} steps into generations "
                            f"{[g.steps for g in plan]}; they must be at least 1 step each and add up to it")
    return plan


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(payload, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint, or None if there is none. A damaged one is reported and ignored (the cell restarts)."""
    import torch

    if not path.exists():
        return None
    try:
        # Written by this harness for this cell: it holds the pickled student module and RNG states.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "start over"
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        print(f"warning: checkpoint {path} is unreadable ({exc}); moved to {bad.name}, restarting the cell")
        return None


def train(method: Method, task: Task, student: nn.Module, teacher: nn.Module | list[nn.Module] | None,
          cfg: TrainConfig, *, seed: int, device: str = "cpu", checkpoint_path: Path | None = None,
          checkpoint_every: int | None = None, checkpoint_seconds: float = 120.0,
          on_step: Callable[[int, int, dict[str, float]], None] | None = None,
          world: Any = None) -> tuple[nn.Module, TrainResult]:
    """Train ``student`` with ``method`` for ``cfg.steps`` optimiser steps; return the model to evaluate
    (``method.finalize_student`` of the last generation's student) and the costs.

    ``teacher`` is one model, a list of models (a teacher ensemble), or None. The budget is split into
    the method's generations (`bench.api.Generation`); each starts with new optimisers and schedules
    over its own steps and restarts the data order, so every generation sees the same examples.

    ``world`` (`bench.distributed.World`, None in one process): this process is one rank of a data-parallel
    cell; it trains on its slice of each global batch, gradients and logged losses are averaged over the
    ranks, and only rank 0 writes checkpoints.
    """
    import torch

    result = TrainResult()
    split = task.train_data()
    n = len(split)
    if n == 0:
        raise TrainingError("the training split is empty")
    bs = min(cfg.batch_size, n)
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else ([] if teacher is None else [teacher])
    for t in teachers:
        t.to(device).eval()
        for p in t.parameters():
            p.requires_grad_(False)
    plan = generation_plan(method, cfg.steps)
    starts = [sum(g.steps for g in plan[:i]) for i in range(len(plan))]
    result.generations = [{"index": i, "steps": g.steps, "fresh_student": g.fresh_student, "name": g.name}
                          for i, g in enumerate(plan)]

    def generation_of(step: int) -> int:
        return max(i for i, s0 in enumerate(starts) if s0 <= step)

    ckpt = load_checkpoint(checkpoint_path) if checkpoint_path else None
    ctx = HarnessContext(task=task, student=student, teacher=teachers or None, total_steps=cfg.steps, seed=seed,
                         device=device, train_split=split, batch_size=bs)
    if ckpt is None:
        seed_everything(seed)
        student = method.init_student(ctx.teacher, student, ctx)
        start = 0
        gen = 0
    else:
        student = ckpt["student"]
        method.load_state_dict(ckpt["method"])
        start = ckpt["step"]
        result.resumed_from_step = start
        # The checkpoint holds the generation of its last completed step; a generation that starts at
        # ``start`` is entered by the loop below, exactly as in an uninterrupted run.
        gen = generation_of(start - 1)
        ctx.previous = ckpt.get("previous")
        if ctx.previous is not None:
            ctx.previous.to(device).eval()
    student.to(device).train()
    ctx.student = student
    if world is not None:
        if len(plan) > 1:
            raise TrainingError(f"method {method.name} trains in generations; not supported data-parallel yet")
        world.broadcast_module(student)
    if type(method).training_free:  # nothing to optimise: evaluate the model init_student built
        result.generations = [{"index": 0, "steps": 0, "fresh_student": False, "name": "training-free"}]
        student.eval()
        final = method.finalize_student(student, ctx)
        final.eval()
        result.teacher_cache = ctx.teacher_cache_info()
        return final, result
    ctx.generation, ctx.generation_steps = gen, plan[gen].steps
    method.create_modules(ctx)
    extras = method.extra_modules()
    for m in extras.values():
        m.to(device).train()
    ratios = {k: int(v) for k, v in type(method).update_every.items()}
    bad = {k: v for k, v in ratios.items() if k not in ("student", *extras) or v < 1}
    if bad:
        raise TrainingError(f"method {method.name} declares update ratios {bad}; keys must be 'student' or its "
                            f"extra modules {sorted(extras)}, each ratio >= 1")
    ctx.update_every = ratios
    if world is not None and (extras or ratios):
        raise TrainingError(f"method {method.name} trains modules besides the student; not supported "
                            f"data-parallel yet")
    updates = {k: 0 for k in ("student", *extras)}
    method.setup(ctx)

    def build(g: int):
        """Optimisers and schedules of generation ``g``: its own warm-up and decay over its own steps."""
        from dataclasses import replace

        cfg_g = replace(cfg, steps=plan[g].steps)
        modules = {"student": ctx.student, **extras}
        optimizers = {k: build_optimizer(m, cfg_g) for k, m in modules.items()}
        schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg_g)) for k, o in optimizers.items()}
        params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in modules.items()}
        return modules, optimizers, schedulers, params

    # A checkpoint taken at the last step of a generation resumes at the next one's first step, where the loop
    # builds that generation's optimisers anyway: the finished generation's optimiser states are not restored
    # (a method may already have changed which parameters train, for the next generation, in on_step_end).
    at_boundary = ckpt is not None and ckpt["step"] in starts[1:]
    if not at_boundary:
        modules, optimizers, schedulers, params = build(gen)
    if ckpt is not None:
        for k, m in extras.items():
            m.load_state_dict(ckpt["extras"][k])
        if not at_boundary:
            for k in optimizers:
                optimizers[k].load_state_dict(ckpt["optimizers"][k])
                schedulers[k].load_state_dict(ckpt["schedulers"][k])
        ctx.teacher_cache = ckpt["teacher_cache"]
        ctx.previous_cache = ckpt.get("previous_cache", {})
        counters = ckpt["counters"]
        ctx.teacher_forward_passes = counters["teacher_forward_passes"]
        ctx.teacher_examples = counters["teacher_examples"]
        ctx.previous_forward_passes = counters.get("previous_forward_passes", 0)
        ctx.previous_examples = counters.get("previous_examples", 0)
        ctx.teacher_store_built = counters.get("teacher_store_built", False)
        ctx.pair_passes = counters.get("pair_passes", 0)
        ctx.pair_examples = counters.get("pair_examples", 0)
        updates.update(counters.get("updates", {}))
        result.loss_log = ckpt["loss_log"]
        prior_wall = counters["wall_s"]
        _set_rng_state(ckpt["rng"])
    else:
        prior_wall = 0.0
        method.on_generation_start(0, ctx)

    log_every = max(1, cfg.steps // 20)
    t0 = time.perf_counter()
    last_ckpt = t0
    for step in range(start, cfg.steps):
        ctx.step = step
        if gen + 1 < len(plan) and step == starts[gen + 1]:
            gen += 1
            if plan[gen].fresh_student:
                finished = ctx.student.eval()
                for p in finished.parameters():
                    p.requires_grad_(False)
                ctx.previous, ctx.previous_cache = finished, {}
                fresh = method.init_student(ctx.teacher, task.student(generation_seed(seed, gen)), ctx)
                fresh.to(device).train()
                ctx.student = student = fresh
            ctx.generation, ctx.generation_steps = gen, plan[gen].steps
            modules, optimizers, schedulers, params = build(gen)
            ctx.generation_step = 0
            method.on_generation_start(gen, ctx)
        ctx.generation_step = step - starts[gen]
        rows = batch_indices(n, bs, seed, step - starts[gen])
        if world is not None:  # this rank's contiguous slice of the global batch
            rows = world.shard(rows)
            world.examples += len(rows)
        batch = to_device(split.batch(rows), device)
        losses = method.training_step(batch, ctx)
        if not losses:
            raise TrainingError(f"method {method.name} returned no loss at step {step}; it must return "
                                f"'student' and/or keys of its extra modules {sorted(extras)}")
        keys = [k for k in modules if k in losses]
        unknown = set(losses) - set(modules)
        if unknown:
            raise TrainingError(f"method {method.name} returned losses for unknown optimisers {sorted(unknown)}; "
                                f"valid: 'student' and its extra modules {sorted(extras)}")
        early = [k for k in keys if not ctx.updating(k)]
        if early:
            raise TrainingError(f"method {method.name} returned losses for {early} at step {step}, where its "
                                f"update ratios {ratios} do not step them")
        for k in keys:
            value = losses[k].detach()
            if not torch.isfinite(value).all():
                raise TrainingError(f"loss '{k}' is {value.item()} at step {step} (method {method.name}); "
                                    f"training stopped — lower the learning rate or check the method's inputs")
        for k in keys:
            optimizers[k].zero_grad(set_to_none=True)
        for i, k in enumerate(keys):
            # Each loss updates only its own optimiser's parameters, even when graphs are shared
            # (e.g. a discriminator loss that flows through the student's outputs).
            torch.autograd.backward(losses[k], inputs=params[k], retain_graph=i < len(keys) - 1)
        if world is not None:  # the mean of the ranks' gradients: the gradient of the global batch's mean loss
            for k in keys:
                world.average_grads(params[k])
        for k in keys:
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params[k], cfg.optim.grad_clip)
            optimizers[k].step()
            updates[k] += 1
        for k in modules:  # schedules run on harness steps, whether or not an optimiser stepped (TTUR)
            schedulers[k].step()
        ctx.step = step
        extra_log = method.on_step_end(ctx)
        result.samples += len(batch["index"])
        scalars = {k: float(losses[k].detach()) for k in keys}
        if world is not None:
            scalars = world.mean_scalars(scalars)
        if step % log_every == 0 or step == cfg.steps - 1:
            entry: dict[str, float] = {"step": step + 1}
            if len(plan) > 1:
                entry["generation"] = gen
            result.loss_log.append({**entry, **scalars, **{k: float(v) for k, v in extra_log.items()}})
        if on_step is not None:
            on_step(step + 1, cfg.steps, scalars)
        now = time.perf_counter()
        due = (checkpoint_every and (step + 1) % checkpoint_every == 0) or (now - last_ckpt >= checkpoint_seconds)
        if checkpoint_path is not None and due and step + 1 < cfg.steps and (world is None or world.writer):
            _save_checkpoint(checkpoint_path, {
                "step": step + 1, "student": ctx.student, "method": method.state_dict(),
                "extras": {k: m.state_dict() for k, m in extras.items()},
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "teacher_cache": ctx.teacher_cache, "loss_log": result.loss_log, "rng": _rng_state(),
                "previous": ctx.previous, "previous_cache": ctx.previous_cache,
                "counters": {"teacher_forward_passes": ctx.teacher_forward_passes,
                             "teacher_examples": ctx.teacher_examples,
                             "previous_forward_passes": ctx.previous_forward_passes,
                             "previous_examples": ctx.previous_examples,
                             "teacher_store_built": ctx.teacher_store_built,
                             "pair_passes": ctx.pair_passes, "pair_examples": ctx.pair_examples,
                             "updates": dict(updates),
                             "wall_s": prior_wall + now - t0},
            })
            last_ckpt = now
    result.steps = cfg.steps
    result.samples = cfg.steps * bs
    result.wall_s = prior_wall + time.perf_counter() - t0
    result.teacher_forward_passes = ctx.teacher_forward_passes
    result.teacher_examples = ctx.teacher_examples
    result.previous_forward_passes = ctx.previous_forward_passes
    result.previous_examples = ctx.previous_examples
    if world is not None:  # costs of every rank: teacher passes summed, examples trained on per rank
        from bench.distributed import DETERMINISM

        per_rank = world.gather_ints([world.examples, ctx.teacher_forward_passes, ctx.teacher_examples])
        result.teacher_forward_passes = sum(r[1] for r in per_rank)
        result.teacher_examples = sum(r[2] for r in per_rank)
        result.distributed = {
            "world_size": world.size, "backend": world.backend, "global_batch": bs, "per_rank_batch": bs // world.size,
            "examples_per_rank": [r[0] for r in per_rank], "launcher": "torch.multiprocessing.spawn",
            "gradient_sync": "all-reduce mean of the student's gradients after backward (DDP's arithmetic)",
            "determinism": DETERMINISM}
    result.teacher_cache = ctx.teacher_cache_info()
    result.updates = dict(updates)
    result.method_log = {k: v for k, v in (result.loss_log[-1] if result.loss_log else {}).items()
                         if k not in ("step", "generation")}
    student = ctx.student
    student.eval()
    final = method.finalize_student(student, ctx)
    final.eval()
    return final, result


class _LabelsOnly(Method):
    """Supervised training on ground truth; tasks use it to fine-tune their teachers."""

    name = "labels-only"
    domains = frozenset({"classification", "lm", "diffusion", "segmentation", "grounding"})

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"student": ctx.label_loss(ctx.student_outputs(batch), batch)}


def supervised(task: Task, model: nn.Module, cfg: TrainConfig, *, seed: int, device: str = "cpu",
               description: str = "Training", checkpoint_path: Path | None = None) -> tuple[nn.Module, TrainResult]:
    """Train ``model`` on the task's labels with the harness loop (used for teachers), with a progress bar."""
    from bench import progress
    from bench.api import Params

    with progress.bar(description, cfg.steps) as update:
        return train(_LabelsOnly(Params()), task, model, None, cfg, seed=seed, device=device,
                     checkpoint_path=checkpoint_path,
                     on_step=lambda s, n, losses: update(s, f"loss {losses.get('student', float('nan')):.4f}"))
