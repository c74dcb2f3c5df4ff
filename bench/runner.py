"""Runs a resolved suite: one cell per (task, subtask, method, seed), each ending in one record.

A cell is skipped (and recorded as such, with the reason) when the method does not support the
task's domain or subtask, or when the task cannot run at this tier (missing data). A cell that
raises is recorded as failed with the traceback; the other cells still run. A finished cell whose
resolved configuration is unchanged is not run again unless ``force`` is given.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import bench
from bench import BenchError, progress, registry
from bench.api import Method, Task, TaskEnv, TrainConfig, weak_teacher
from bench.config import Resolved, config_hash
from bench.store import RECORD_SCHEMA_VERSION, Cell, Store

ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED", "BENCH_DATA", "BENCH_CACHE")
PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "pydantic", "datasets", "scikit-learn", "scipy",
            "timm", "torchvision", "diffusers", "lm-eval")


@dataclass
class RunOptions:
    out: Path
    cache_dir: Path
    data_root: Path | None
    profile: dict[str, Any]
    force: bool = False
    device: str = "cpu"
    #: keys of the shared trainings (`Task.shared_training`) done in this run: ``--force`` retrains a
    #: shared model once, and the run's other subtasks evaluate that fresh model.
    trained_here: set[str] = field(default_factory=set)
    #: processes per cell (``--nproc-per-node``): above 1, each cell trains data-parallel (`bench.distributed`)
    nproc_per_node: int = 1
    #: the command line that started the run (``bench run ...`` as typed), kept in every record so that a
    #: published table can say how its records were made; None where the runner is called from Python
    invocation: str | None = None


@dataclass
class Outcome:
    cell: Cell
    status: str
    path: Path
    reused: bool = False
    reason: str | None = None


@dataclass
class RunSummary:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "bench": bench.__version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_state(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout bench runs from (None outside a git checkout)."""
    where = path or Path(bench.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment() -> dict[str, str]:
    return {k: os.environ[k] for k in ENV_VARS if k in os.environ}


# --------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------


def train_config(task: Task, resolved: Resolved) -> TrainConfig:
    """The task's declared budget with the suite's ``train`` overrides applied."""
    from dataclasses import replace

    cfg = task.training()
    o = resolved.suite.train
    optim = cfg.optim
    changes = {k: v for k, v in (("lr", o.lr), ("weight_decay", o.weight_decay), ("warmup_ratio", o.warmup_ratio),
                                 ("grad_clip", o.grad_clip)) if v is not None}
    if changes:
        optim = replace(optim, **changes)
    return TrainConfig(steps=o.steps or cfg.steps, batch_size=o.batch_size or cfg.batch_size,
                       eval_batch_size=cfg.eval_batch_size, optim=optim)


def method_train_config(cfg: TrainConfig, method: Method) -> TrainConfig:
    """``cfg`` with the optimiser settings the method's paper prescribes (``Method.optim_overrides``)."""
    from dataclasses import fields, replace

    overrides = dict(type(method).optim_overrides)
    if not overrides:
        return cfg
    valid = {f.name for f in fields(cfg.optim)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise BenchError(f"method {method.name} overrides unknown optimiser fields {unknown}; valid: {sorted(valid)}")
    return replace(cfg, optim=replace(cfg.optim, **overrides))


def cell_config(cell: Cell, task: Task, method: Method, cfg: TrainConfig | None) -> dict[str, Any]:
    """Everything that determines a cell's results; its hash decides whether a record is reusable."""
    return {
        "task": cell.task, "subtask": cell.subtask, "tier": cell.tier, "seed": cell.seed,
        "task_version": type(task).version, "task_params": task.params.model_dump(mode="json"),
        "method": cell.method, "method_version": type(method).version,
        "method_params": method.params.model_dump(mode="json"),
        "train": None if cfg is None else {"steps": cfg.steps, "batch_size": cfg.batch_size,
                                           "eval_batch_size": cfg.eval_batch_size, "optim": cfg.optim.__dict__,
                                           **({"method_optim_overrides": dict(type(method).optim_overrides)}
                                              if type(method).optim_overrides else {})},
        "profile": cell.profile,
    }


def with_world(config: dict[str, Any], opts: RunOptions) -> dict[str, Any]:
    """``config`` with the data-parallel world size when there is one (a single-process cell's is unchanged)."""
    if opts.nproc_per_node > 1:
        return {**config, "distributed": {"world_size": opts.nproc_per_node}}
    return config


def _base_record(cell: Cell, opts: RunOptions, cfg: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema_version": RECORD_SCHEMA_VERSION, "cell_id": cell.id, "cell": cell.as_dict(),
        "status": None, "reason": None, "traceback": None,
        "config": cfg, "config_hash": config_hash(cfg) if cfg is not None else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": {k: v for k, v in opts.profile.items() if k != "hardware"},
    }


def run_cell(cell: Cell, task: Task, method: Method, cfg: TrainConfig, opts: RunOptions, store: Store,
             measure: bool, checkpoint_every: int | None, checkpoint_seconds: float,
             provenance: dict[str, Any]) -> dict[str, Any]:
    """Train (unless the row is the teacher), evaluate, measure; return the complete record."""
    from bench.measure.efficiency import efficiency
    from bench.train import train

    t_start = time.perf_counter()
    config = with_world(cell_config(cell, task, method, cfg), opts)
    rec = _base_record(cell, opts, config)
    rec.update(provenance)
    rec["data"] = task.data_fingerprint()
    rec["notes"] = task.notes()
    teacher_name = None
    if method.role == "distill" and not method.uses_task_teacher:
        teacher = None
        rec["teacher"] = {"name": "self", "note": f"{method.name} {method.own_teacher_note}; "
                                                  f"the task's teacher is not used"}
    elif method.role != "student":
        pool = task.teacher_pool()
        names = method.select_teachers(pool, task.student_params()) if method.role == "distill" else None
        if names:
            # A teacher ensemble: every member is loaded (trained once and cached by the task).
            teacher = [task.teacher(name) for name in names]
            rec["teachers"] = [task.teacher_info(name) for name in names]
            rec["teacher"] = {**rec["teachers"][0], "ensemble": list(names)}
        else:
            teacher_name = method.select_teacher(pool, task.student_params()) if method.role == "distill" else None
            teacher = task.teacher(teacher_name)
            rec["teacher"] = task.teacher_info(teacher_name)
    else:
        teacher = None
    t_teacher = time.perf_counter()
    shared = _shared_training(cell, task, config, rec, store) if method.role != "teacher" else None
    reused = _load_trained(shared, opts) if shared is not None else None
    if method.role == "teacher":
        model = teacher
        rec["training"] = {"steps": 0, "samples": 0, "wall_s": 0.0, "teacher_forward_passes": 0,
                           "note": "the teacher row evaluates the cached teacher; its fine-tuning cost is in 'teacher'"}
    elif reused is not None:
        model = reused["model"].to(opts.device)
        rec["training"] = {**reused["training"], "shared": {**reused["training"]["shared"], "reused": True}}
        progress.log(f"{cell.id}: evaluating the model trained in {reused['trained_in']} "
                     f"({cell.task}'s subtasks share one training)")
    else:
        student = task.student(cell.seed)
        ckpt = store.checkpoint_dir(cell) / "state.pt"
        if opts.nproc_per_node > 1:
            from bench import distributed

            progress.log(f"{cell.id}: training data-parallel in {opts.nproc_per_node} processes")
            model, result = distributed.train(
                method, task, student, teacher, cfg, nproc=opts.nproc_per_node, seed=cell.seed, device=opts.device,
                checkpoint_path=ckpt, checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                threads=opts.profile.get("threads"))
        else:
            with progress.bar(f"{cell.task}/{cell.subtask} {cell.method} seed {cell.seed}", cfg.steps) as update:
                model, result = train(
                    method, task, student, teacher, cfg, seed=cell.seed, device=opts.device, checkpoint_path=ckpt,
                    checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                    on_step=lambda s, n, losses: update(s, " ".join(f"{k} {v:.4f}" for k, v in losses.items())),
                )
        rec["training"] = {
            "steps": result.steps, "samples": result.samples, "wall_s": round(result.wall_s, 3),
            # Forward passes of any teacher: the task's (every member of an ensemble) and, for methods
            # with generations, the previous generation's student (also broken out below).
            "teacher_forward_passes": result.teacher_forward_passes + result.previous_forward_passes,
            "teacher_examples": result.teacher_examples,
            "previous_generation_forward_passes": result.previous_forward_passes,
            "previous_generation_examples": result.previous_examples,
            # Whether teacher outputs came from a store shared across cells (the lm task's top-k cache on
            # disk, `bench.teacher_cache`): a cell that reads it reports 0 teacher passes above.
            "teacher_cache": result.teacher_cache,
            "generations": result.generations,
            # Optimiser steps per optimiser (differ from ``steps`` under a method's update ratios, TTUR).
            "updates": result.updates,
            "resumed_from_step": result.resumed_from_step, "loss_log": result.loss_log,
        }
        if result.distributed is not None:
            rec["training"]["distributed"] = result.distributed
        if shared is not None:
            rec["training"]["shared"] = {"trained_in": cell.id, "key": shared[1], "reused": False,
                                         "note": f"one training serves every subtask of {cell.task}; each of its "
                                                 f"records carries this one training's cost"}
            _save_trained(shared[0], model, rec["training"], method.record_info(), method.table_notes(task), cell.id)
            opts.trained_here.add(shared[1])
    rec["method_info"] = reused["method_info"] if reused is not None else method.record_info()
    rec["method_notes"] = list(reused.get("method_notes") or []) if reused is not None else method.table_notes(task)
    t_trained = time.perf_counter()
    rec["efficiency"] = efficiency(model, task, opts.profile, measure_runtime=measure)
    if method.role != "teacher":
        rec["training"]["estimated_flops"] = _training_flops(rec, teacher, task, opts)
    t_measured = time.perf_counter()
    metrics = task.evaluate(model)
    t_evaluated = time.perf_counter()
    rec["metrics"] = metrics
    rec["metric_specs"] = [m.__dict__ for m in task.metrics()]
    if method.role == "teacher":
        below = weak_teacher(metrics, rec["metric_specs"])
        rec["teacher_quality"] = {"weak": bool(below), "below_floor": below}
    rec["score"] = task.score(metrics)
    rec["aggregate"] = {"name": task.aggregate_name, "rule": task.aggregate_rule}  # a tier may rename it
    rec["status"] = "ok"
    rec["wall_s"] = round(time.perf_counter() - t_start, 3)
    # Where the cell's wall time went (tests/benchmarks/test_smoke_split.py sums these over a matrix):
    # loading or training the teacher (a cold one is trained by the first cell that needs it), training the
    # student, the efficiency measurement (counts, and timing unless runtime.measure is off), evaluation.
    rec["phases_s"] = {"teacher": round(t_teacher - t_start, 3), "training": round(t_trained - t_teacher, 3),
                       "measurement": round(t_measured - t_trained, 3), "evaluation": round(t_evaluated - t_measured, 3)}
    return rec


def _shared_training(cell: Cell, task: Task, config: dict[str, Any], rec: dict[str, Any],
                     store: Store) -> tuple[Path, str] | None:
    """(path, key) of the trained model this cell shares with its task's other subtasks, or None when the task
    trains per subtask. The key hashes everything that determines training: the configuration without the
    subtask, and the training data's fingerprint."""
    if not type(task).shared_training:
        return None
    basis = {k: v for k, v in config.items() if k != "subtask"}
    basis["train_data"] = (rec.get("data") or {}).get("train")
    key = config_hash(basis)
    return store.trained_path(cell, key), key


def _load_trained(shared: tuple[Path, str], opts: RunOptions) -> dict[str, Any] | None:
    """The model another subtask's cell trained with the same configuration (None when there is none, when the
    file is unreadable — `bench.train.load_checkpoint` moves it aside — or with ``--force`` unless this run
    trained it)."""
    from bench.train import load_checkpoint

    if opts.force and shared[1] not in opts.trained_here:
        return None
    saved = load_checkpoint(shared[0])
    if saved is None or saved.get("key") != shared[1]:
        return None
    return saved


def _save_trained(path: Path, model: Any, training: dict[str, Any], method_info: dict[str, Any],
                  method_notes: list[str], cell_id: str) -> None:
    from bench.train import _save_checkpoint

    _save_checkpoint(path, {"model": model, "training": training, "method_info": method_info,
                            "method_notes": method_notes, "trained_in": cell_id, "key": training["shared"]["key"]})


def _training_flops(rec: dict[str, Any], teacher: Any, task: Task, opts: RunOptions) -> dict[str, Any]:
    """Estimated training FLOPs at the declared input shape: the student's forward + backward per sample
    seen, plus one teacher forward per example the teacher actually ran on (so caching shows)."""
    from bench.measure.efficiency import forward_flops

    per_sample = rec["efficiency"].get("training_flops_per_sample")
    samples = rec["training"]["samples"]
    teacher_examples = rec["training"].get("teacher_examples", 0)
    previous_examples = rec["training"].get("previous_generation_examples", 0)
    teacher_fwd = None
    members = teacher if isinstance(teacher, (list, tuple)) else ([] if teacher is None else [teacher])
    if members and teacher_examples:
        try:
            # An ensemble's examples are counted per member; their mean forward cost is the fair price.
            # A generator's forward is its whole sampler; methods count its network evaluations, so the price
            # of one is the sampler's FLOPs over its NFE.
            teacher_fwd = sum(forward_flops(t, task, opts.device).flops // max(1, _nfe(t)) for t in members) // len(members)
        except Exception:  # noqa: BLE001 - an estimate; its absence is recorded as None
            teacher_fwd = None
    previous_fwd = rec["efficiency"].get("flops_per_sample") if previous_examples else None
    total = None
    if per_sample is not None:
        total = per_sample * samples + (teacher_fwd or 0) * teacher_examples + (previous_fwd or 0) * previous_examples
    return {"total": total, "student_flops_per_sample": per_sample, "samples": samples,
            "teacher_forward_flops_per_sample": teacher_fwd, "teacher_examples": teacher_examples,
            "previous_generation_forward_flops_per_sample": previous_fwd,
            "previous_generation_examples": previous_examples,
            "rule": "student forward+backward FLOPs per sample x samples + teacher forward FLOPs per sample x "
                    "examples the teacher ran on (+ the student's forward FLOPs x examples a previous generation "
                    "ran on), at the task's declared input shape (an estimate: real batches are padded to their "
                    "longest example; generative tasks: the student's term is one denoising forward+backward per "
                    "sample and the teacher's is per network evaluation, so methods with several network calls "
                    "per step are underestimated on the student side)"}


def _nfe(model: Any) -> int:
    sampler = getattr(model, "sampler", None)
    return int(getattr(sampler, "nfe", 1) or 1)


def run_provenance(opts: RunOptions) -> dict[str, Any]:
    """What every record of this process says about where it ran: package versions, the checkout's git state,
    the environment variables that matter, the hardware fingerprint of ``opts.profile`` and, from the CLI, the
    command line (``invocation``; the Ray executor's workers get the driver's)."""
    out = {"versions": package_versions(), "git": git_state(), "environment": environment(),
           "hardware": opts.profile.get("hardware", {})}
    if opts.invocation:
        out["invocation"] = opts.invocation
    return out


def set_threads(profile: dict[str, Any]) -> None:
    """Training and measurement both run with the profile's thread count."""
    import torch

    torch.set_num_threads(int(profile.get("threads") or torch.get_num_threads()))


def count_cells(resolved: Resolved) -> int:
    return sum(len(subs) for _, subs in resolved.tasks) * len(resolved.method_params) * len(resolved.suite.seeds)


def make_task(resolved: Resolved, opts: RunOptions, task_name: str, subtask: str) -> Task:
    """The task object of one subtask, as every cell of that subtask sees it."""
    env = TaskEnv(tier=resolved.suite.tier, subtask=subtask, data_root=opts.data_root, cache_dir=opts.cache_dir,
                  device=opts.device)
    return registry.tasks.get(task_name)(resolved.task_params[task_name], env)


def cells(resolved: Resolved, opts: RunOptions) -> Iterator[tuple[Cell, Task]]:
    """Every cell of ``resolved`` in run order (task, subtask, method, seed), with its subtask's task object
    (built once per subtask, when its first cell comes up)."""
    profile_id = opts.profile["id"]
    for task_name, subtasks in resolved.tasks:
        for sub in subtasks:
            task = make_task(resolved, opts, task_name, sub)
            for method_name in resolved.method_params:
                for seed in resolved.suite.seeds:
                    yield Cell(task_name, sub, method_name, resolved.suite.tier, profile_id, seed), task


def execute(resolved: Resolved, opts: RunOptions) -> RunSummary:
    """Run every cell of ``resolved`` one after another in this process (the local executor); records and
    checkpoints go under ``opts.out``. `bench.executors` runs the same cells as Ray tasks."""
    store = Store(opts.out)
    summary = RunSummary()
    provenance = run_provenance(opts)
    set_threads(opts.profile)
    with progress.bar("Cells", count_cells(resolved)) as overall:
        for done, (cell, task) in enumerate(cells(resolved, opts), 1):
            summary.outcomes.append(run_one(cell, task, resolved, opts, store, provenance))
            overall(done, cell.id)
    return summary


@dataclass
class Planned:
    """A cell that has to run: its method object, training budget and resolved configuration."""

    method: Method
    cfg: TrainConfig
    config: dict[str, Any]


def plan_cell(cell: Cell, task: Task, resolved: Resolved, opts: RunOptions, store: Store,
              provenance: dict[str, Any]) -> Outcome | Planned:
    """Decide a cell before running it: skipped (the method does not fit the task, or the task cannot run;
    its record is written), failed to configure (record written), finished earlier with the same resolved
    configuration (reused, unless ``opts.force``), or `Planned` — to run."""
    method_cls = registry.methods.get(cell.method)
    method: Method = method_cls(resolved.method_params[cell.method])
    path = store.record_path(cell)
    reason = None
    if task.domain not in method_cls.domains:
        reason = (f"method {cell.method} supports the {', '.join(sorted(method_cls.domains))} domain(s); "
                  f"task {cell.task} is {task.domain}")
    reason = reason or method.unsupported(task) or task.unavailable()
    if reason:
        rec = _base_record(cell, opts, None)
        rec.update(status="skipped", reason=reason, **provenance)
        store.write(cell, rec)
        progress.log(f"skipped {cell.id}: {reason}")
        return Outcome(cell, "skipped", path, reason=reason)
    config = None
    try:
        cfg = method_train_config(train_config(task, resolved), method)
        config = with_world(cell_config(cell, task, method, cfg), opts)
        if opts.nproc_per_node > 1 and method.role != "teacher":
            from bench.distributed import check_batch

            check_batch(min(cfg.batch_size, len(task.train_data())), opts.nproc_per_node)
        chash = config_hash(config)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one cell is recorded, the run goes on
        return record_failure(cell, opts, store, config, provenance, exc)
    if not opts.force and store.finished(cell, chash):
        return Outcome(cell, "ok", path, reused=True)
    return Planned(method, cfg, config)


def run_one(cell: Cell, task: Task, resolved: Resolved, opts: RunOptions, store: Store,
            provenance: dict[str, Any]) -> Outcome:
    """Decide (`plan_cell`) and, when it has to, run one cell and write its record; remove its checkpoint once
    the record is written. The one function both executors call for a cell."""
    planned = plan_cell(cell, task, resolved, opts, store, provenance)
    if isinstance(planned, Outcome):
        return planned
    try:
        rt = resolved.suite.runtime
        rec = run_cell(cell, task, planned.method, planned.cfg, opts, store, rt.measure, rt.checkpoint_every,
                       rt.checkpoint_seconds, provenance)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one cell is recorded, the run goes on
        return record_failure(cell, opts, store, planned.config, provenance, exc)
    store.write(cell, rec)
    ckpt_dir = store.checkpoint_dir(cell)
    if ckpt_dir.exists():
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return Outcome(cell, "ok", store.record_path(cell))


def record_failure(cell: Cell, opts: RunOptions, store: Store, config: dict[str, Any] | None,
                   provenance: dict[str, Any], exc: BaseException, tb: str | None = None) -> Outcome:
    """Write the failed record of ``cell`` (``exc`` and its traceback) and return its outcome."""
    rec = _base_record(cell, opts, config)
    reason = f"{type(exc).__name__}: {exc}"
    rec.update(status="failed", reason=reason, traceback=tb if tb is not None else traceback.format_exc(),
               **provenance)
    store.write(cell, rec)
    progress.log(f"[red]failed[/red] {cell.id}: {reason}")
    return Outcome(cell, "failed", store.record_path(cell), reason=reason)


def default_cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "bench")


def check_data_root(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise BenchError(f"data root {path!r} is not a directory (use --data-root DIR or BENCH_DATA; "
                         f"the small tier expects e.g. DIR/glue/SST-2/train.tsv)")
    return p.resolve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the bench command")
