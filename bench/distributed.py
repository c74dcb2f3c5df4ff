"""Data-parallel cells: ``bench run --nproc-per-node N`` trains each cell in N processes (issue 14, DESIGN "Scale").

The loop is `bench.train.train`, unchanged in what it decides: the same step budget, the same global batch
(``batch_indices`` of the single-process run at every step) and the same optimisers and schedules. Each rank
takes its contiguous 1/N slice of that global batch (the global batch must be divisible by N), computes the
method's losses on it, and the gradients of the student are averaged over the ranks (one all-reduce per step)
before gradient clipping and the optimiser step. Every loss the methods return is a mean over the batch, so
with equal slices the averaged gradient is the single-process gradient of the global batch's mean loss; the
logged losses are the ranks' means averaged the same way.

Launch: `torch.multiprocessing.spawn` (https://pytorch.org/docs/stable/multiprocessing.html) from within the
harness, for one cell at a time; the ranks meet through a file store in a temporary folder
(``init_method=file://``, no ports), CPU ranks with the ``gloo`` backend, CUDA ranks with ``nccl``, one GPU per
rank (``cuda:rank``). The launching process keeps its role of rank 0's host: it builds the teacher (trained and
cached once, before any rank starts), gets back rank 0's trained model and costs, and evaluates, measures and
writes the record as for a single-process cell. Rank 0 alone writes the cell's checkpoints; the other ranks
write nothing. A resumed cell loads the checkpoint in every rank.

Deviations (stated in every record under ``training.distributed``):
- Gradients are averaged by an explicit all-reduce of the student's gradients after backward, which is the
  arithmetic of PyTorch's DistributedDataParallel (mean over ranks) without its module wrapper: tasks and
  methods call the student's attributes and submodules directly (``ctx.student.<...>``), which a DDP wrapper
  would either hide or, worse, bypass without synchronising. The student's parameters and buffers are
  broadcast from rank 0 before training, as DDP does at construction. No bucketing overlap with backward.
- Results depend on the device count only through float rounding: reductions over a slice then over ranks
  add in a different order than over the whole batch. BatchNorm in train mode normalises with the rank's
  slice statistics (no SyncBatchNorm), and dropout draws per rank, so stochastic students differ more.
- Teacher-output caches are per rank (each rank's examples); their counts are summed over ranks. Checkpoints
  hold rank 0's RNG state, which every rank restores on resume.
- Supported: methods whose only trainable module is the student, in one generation, on classification
  tasks (per-example mean losses). Anything else is refused before the run starts (exit 2): methods with
  extra trainable modules or update ratios, with generations, tasks of other domains (token-mean losses,
  shared on-disk teacher stores, generative pairs), and ``--executor ray``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError

if TYPE_CHECKING:
    import torch

#: Task domains whose losses are per-example means (the equal-slice identity above holds).
SUPPORTED_DOMAINS = frozenset({"classification"})
DETERMINISM = ("results depend on the device count through float rounding only: gradients and losses are "
               "reduced over each rank's slice and then over ranks, in a different order than over the whole "
               "batch in one process; equal to the single-process run within float tolerance for students "
               "without dropout or BatchNorm (measured: tests/integration/test_ddp.py)")


def unsupported(method_cls: type, task_cls: type, executor: str = "local") -> str | None:
    """Why ``--nproc-per-node N > 1`` cannot run ``method_cls`` on ``task_cls`` yet (None: it can). Imports
    nothing heavy: looks at the classes only."""
    from bench.api import Method

    name = getattr(method_cls, "name", method_cls.__name__)
    if executor != "local":
        return f"--nproc-per-node with --executor {executor} is not supported yet; use the local executor"
    if getattr(task_cls, "domain", None) not in SUPPORTED_DOMAINS:
        return (f"--nproc-per-node: task {task_cls.name} ({task_cls.domain}) is not supported yet; data-parallel "
                f"cells run on {', '.join(sorted(SUPPORTED_DOMAINS))} tasks only")
    if method_cls.extra_modules is not Method.extra_modules or method_cls.update_every:
        return (f"--nproc-per-node: method {name} trains modules besides the student (extra_modules / update "
                f"ratios); data-parallel training of those is not supported yet")
    if method_cls.generations is not Method.generations:
        return (f"--nproc-per-node: method {name} trains in generations; data-parallel training of those is not "
                f"supported yet")
    return None


def check(nproc: int, executor: str, method_classes: list[type], task_classes: list[type]) -> None:
    """Refuse (`bench.BenchError`, exit 2) an invalid ``--nproc-per-node`` or an unsupported combination."""
    if nproc < 1:
        raise BenchError(f"--nproc-per-node {nproc}: expected a positive number of processes per cell")
    if nproc == 1:
        return
    for m in method_classes:
        if getattr(m, "role", "distill") == "teacher":  # nothing is trained
            continue
        for t in task_classes:
            reason = unsupported(m, t, executor)
            if reason:
                raise BenchError(reason)


def check_batch(global_batch: int, world_size: int) -> None:
    if global_batch % world_size:
        raise BenchError(f"the global batch of {global_batch} examples is not divisible by --nproc-per-node "
                         f"{world_size}; each rank takes an equal contiguous slice (set train.batch_size to a "
                         f"multiple of {world_size})")


# --------------------------------------------------------------------------------------------------
# In a rank
# --------------------------------------------------------------------------------------------------


@dataclass
class World:
    """This process's place in the process group; `bench.train.train` calls it at each synchronisation point."""

    rank: int
    size: int
    backend: str
    examples: int = 0  # examples this rank trained on (measured, for the record)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous slice of the global batch ``indices``."""
        check_batch(len(indices), self.size)
        per = len(indices) // self.size
        return indices[self.rank * per:(self.rank + 1) * per]

    def _device(self) -> str:
        return "cuda" if self.backend == "nccl" else "cpu"

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers in every rank (as DDP does at construction)."""
        import torch.distributed as dist

        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Replace each gradient with its mean over the ranks (one all-reduce of all of them). A parameter without
        a gradient on every rank keeps none (the optimiser skips it, as in one process)."""
        import torch
        import torch.distributed as dist

        if not params:
            return
        ref = params[0]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params] + [torch.tensor([float(p.grad is not None) for p in params],
                                                            device=ref.device)])
        dist.all_reduce(flat)
        flags = flat[-len(params):]
        offset = 0
        for p, flag in zip(params, flags.tolist()):
            n = p.numel()
            if flag > 0:
                g = (flat[offset:offset + n] / self.size).view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            offset += n

    def mean_scalars(self, values: dict[str, float]) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        if not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return {k: float(v) / self.size for k, v in zip(keys, t.tolist())}

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """``values`` of every rank, in rank order."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long, device=self._device())
        out = [torch.zeros_like(t) for _ in range(self.size)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]


def _rank_main(rank: int, size: int, backend: str, store_dir: str, threads: int) -> None:
    """One rank: load the cell from ``store_dir``, join the group, train, and (rank 0) leave the trained model and
    costs there."""
    import datetime

    import torch
    import torch.distributed as dist

    from bench import train as train_mod

    if backend == "nccl":
        torch.cuda.set_device(rank)  # "cuda" below is this rank's GPU
    torch.set_num_threads(threads)
    # Every rank unpickles its own copy of the models: tensors passed as spawn arguments would be one shared-memory
    # storage, and every rank's optimiser would step the same weights.
    kwargs = torch.load(Path(store_dir) / "cell.pt", map_location="cpu", weights_only=False)
    dist.init_process_group(backend, init_method=f"file://{Path(store_dir) / 'rendezvous'}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(minutes=30))
    try:
        world = World(rank, size, backend)
        final, result = train_mod.train(world=world, **kwargs)
        if world.writer:
            train_mod._save_checkpoint(Path(store_dir) / "result.pt", {"model": final.cpu(), "result": result})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(method: Any, task: Any, student: Any, teacher: Any, cfg: Any, *, nproc: int, seed: int,
          device: str = "cpu", checkpoint_path: Path | None = None, checkpoint_every: int | None = None,
          checkpoint_seconds: float = 120.0, threads: int | None = None) -> tuple[Any, Any]:
    """`bench.train.train` in ``nproc`` spawned ranks; returns rank 0's (model, TrainResult), the result with
    ``distributed`` (world size, backend, batches, examples per rank, determinism) filled in."""
    import torch
    import torch.multiprocessing as mp

    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise BenchError(f"--nproc-per-node {nproc} runs one rank per GPU; this machine has "
                         f"{torch.cuda.device_count()} GPU(s)")
    per_rank_threads = max(1, int(threads or torch.get_num_threads()) // nproc) if backend == "gloo" else 1
    if teacher is not None:  # pickled to the ranks from the CPU; each rank places its own copy
        teacher = [t.cpu() for t in teacher] if isinstance(teacher, (list, tuple)) else teacher.cpu()
    kwargs = {"method": method, "task": task, "student": student.cpu(), "teacher": teacher, "cfg": cfg,
              "seed": seed, "device": "cuda" if backend == "nccl" else device, "checkpoint_path": checkpoint_path,
              "checkpoint_every": checkpoint_every, "checkpoint_seconds": checkpoint_seconds}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        torch.save(kwargs, Path(tmp) / "cell.pt")
        mp.spawn(_rank_main, args=(nproc, backend, tmp, per_rank_threads), nprocs=nproc, join=True)
        out = torch.load(Path(tmp) / "result.pt", map_location="cpu", weights_only=False)
    return out["model"].to(device), out["result"]

