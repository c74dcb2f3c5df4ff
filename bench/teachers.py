"""Teachers trained by a task, cached on disk by content hash (one code path for every task family).

Below the full tier a task trains its own teacher (GLUE fine-tunes MiniLM per subtask, the imagenet task
trains CIFAR ResNets, the lm task trains a small Llama). Every distillation cell of a matrix needs that
teacher, so it is trained once and kept under ``<cache dir>/<task>/teachers/<label>-<key>/``, where
``key`` hashes everything that decides its weights (``identity``: task and version, tier, architecture,
training budget and optimiser, the training data's fingerprint, the seed). A changed identity gives a
new folder; an entry is never overwritten. The folder is written under a temporary name and renamed, so
a killed run leaves nothing half-written. Concurrent cells needing the same teacher (Ray workers, two
`bench run` on one cache) train it once: training holds an exclusive lock on
``<cache dir>/<task>/locks/teacher-<label>-<key>.lock`` (``flock``; none where the platform lacks it), and a
process that waited for the lock finds the teacher in the cache. An unreadable entry (a corrupt file) is
reported and retrained.

``meta.json`` beside the weights (and the cell record's ``teacher`` field) says how the teacher was made:
its identity, steps, wall times, final training loss, the task's evaluation of it and its parameter count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError
from bench.locks import read_or_compute

if TYPE_CHECKING:
    from torch import nn

    from bench.api import Task


@functools.lru_cache(maxsize=32)
def checkpoint_identity(checkpoint: str | None) -> Any:
    """What a teacher's starting checkpoint contributes to its identity: its *content*, not where it lies.

    A local folder (e.g. a registry package's weights inside site-packages) is named by the sha256 of each
    file in it, so the same weights installed in another virtual environment hit the same cache entry and
    changed weights at the same path miss it. A hub id stays as given (its revision is the hub's business).
    ``None`` (a model built from a config) stays ``None``."""
    if checkpoint is None or not os.path.isdir(checkpoint):
        return checkpoint
    root = Path(checkpoint)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        files[path.relative_to(root).as_posix()] = h.hexdigest()
    return {"folder_sha256": files}


def identity_key(identity: dict[str, Any]) -> str:
    """Content hash of a teacher's identity (16 hex digits)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_teacher(
    task: Task,
    *,
    name: str,
    label: str,
    identity: dict[str, Any],
    build: Callable[[], nn.Module],
    save: Callable[[nn.Module, Path], None],
    load: Callable[[Path], nn.Module],
    description: str,
    extra_meta: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The task's teacher ``name`` (its folder: ``label``-key) trained with ``task.teacher_training()``, from the cache or trained now.

    ``build`` makes the untrained model (seed 0), ``save``/``load`` write and read a folder, ``extra_meta``
    adds task-specific facts (e.g. the timm data config). Returns the model and the record's teacher info
    (``cache``: ``hit`` or ``trained``; ``path``: the folder)."""
    key = identity_key(identity)
    folder = Path(task.env.cache_dir) / task.name / "teachers" / f"{label}-{key}"
    return read_or_compute(
        Path(task.env.cache_dir) / task.name / "locks" / f"teacher-{label}-{key}.lock",
        f"another process is training the teacher {label} ({key}); waiting for it",
        lambda: _from_cache(folder, load),
        lambda: _train(task, folder, key, name=name, identity=identity, build=build, save=save,
                       description=description, extra_meta=extra_meta))


def _from_cache(folder: Path, load: Callable[[Path], nn.Module]) -> tuple[nn.Module, dict[str, Any]] | None:
    """The cached teacher and its record info, or None when absent or unreadable (then removed)."""
    from bench import progress

    if not (folder / "meta.json").exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        return load(folder), {**meta, "cache": "hit", "path": str(folder)}
    except Exception as exc:  # noqa: BLE001 - any loader's error (pickle, safetensors, HF) means unreadable
        progress.log(f"cached teacher at {folder} is unreadable ({exc}); retraining it")
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _train(task: Task, folder: Path, key: str, *, name: str, identity: dict[str, Any],
           build: Callable[[], nn.Module], save: Callable[[nn.Module, Path], None], description: str,
           extra_meta: Callable[[nn.Module], dict[str, Any]] | None) -> tuple[nn.Module, dict[str, Any]]:
    from bench.train import supervised

    cfg = task.teacher_training()
    model = build()
    t0 = time.perf_counter()
    model, result = supervised(task, model, cfg, seed=0, device=task.env.device, description=description)
    train_s = time.perf_counter() - t0
    metrics = task.evaluate(model)
    meta = {"name": name, "cache_key": key, "identity": identity, "trained_by": "task", "steps": result.steps,
            "train_wall_s": round(train_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
            "final_train_loss": (result.loss_log[-1] if result.loss_log else {}).get("student"),
            "eval_metrics": metrics, "n_params": sum(p.numel() for p in model.parameters()),
            **(extra_meta(model) if extra_meta else {})}
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save(model, tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same teacher first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return model, {**meta, "cache": "trained", "path": str(folder)}


def safetensors_folder(build: Callable[[], nn.Module]) -> tuple[Callable[[nn.Module, Path], None],
                                                                   Callable[[Path], nn.Module]]:
    """(save, load) for `cached_teacher` of a model rebuilt by ``build`` and kept as ``model.safetensors``
    (the whole state dict, loaded strictly)."""

    def save(model: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))

    def load(folder: Path) -> nn.Module:
        from safetensors.torch import load_file

        model = build()
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model

    return save, load


class TeacherPool:
    """Mixin for tasks whose teachers are a declared pool of specs (objects with a ``name``), each built or
    loaded once per task object by ``_trained_teacher(spec)`` -> (model, info): ``teacher(name)`` and
    ``teacher_info(name)`` of the Task contract, the first spec being the default teacher."""

    _teachers: dict[str, tuple[Any, dict[str, Any]]]

    def _teacher_specs(self) -> list[Any]:
        raise NotImplementedError

    def _trained_teacher(self, spec: Any) -> tuple[nn.Module, dict[str, Any]]:
        raise NotImplementedError

    def _teacher_spec(self, name: str | None) -> Any:
        specs = {s.name: s for s in self._teacher_specs()}
        if name and name not in specs:
            raise BenchError(f"unknown {self.name} teacher {name!r}; pool: {', '.join(specs)}")  # type: ignore[attr-defined]
        return specs[name] if name else next(iter(specs.values()))

    def _teacher_entry(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        """(name, info) of ``model`` if it is one of this task's loaded teachers, else None."""
        return next(((n, info) for n, (m, info) in self._teachers.items() if m is model), None)

    def teacher(self, name: str | None = None) -> nn.Module:
        spec = self._teacher_spec(name)
        if spec.name not in self._teachers:
            self._teachers[spec.name] = self._trained_teacher(spec)
        return self._teachers[spec.name][0]

    def teacher_info(self, name: str | None = None) -> dict[str, Any]:
        spec = self._teacher_spec(name)
        self.teacher(spec.name)
        return self._teachers[spec.name][1]
