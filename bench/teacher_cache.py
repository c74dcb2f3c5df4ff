"""Teacher outputs on disk: the top-k of a teacher's next-token distribution at every scored position of
every training example, computed once per (teacher, data, k, max length) and read by every method and
seed that distils from that teacher.

Why: in a matrix of methods x seeds every distillation cell needs the same teacher outputs on the same
training examples. Running a billion-parameter teacher once per cell is most of the matrix's cost; keeping
its full distributions ([tokens, vocabulary] floats) is too large. So, as in offline LLM distillation, the
store keeps, per scored position, the ``k`` largest log-probabilities, their token ids and the log of the
probability mass left outside them.

**The approximation** (``dense_log_probs``): the dense distribution is rebuilt with the top-k
probabilities kept exactly and the remaining mass spread uniformly over the other V - k tokens,

    p~(v) = p(v)                        for v in top-k,
    p~(v) = (1 - sum_topk p) / (V - k)  otherwise.

p~ sums to 1 and keeps the teacher's argmax and its confident region; it flattens the tail. Below
k = V the top-k log-probabilities are stored in float16 (see ``values_dtype``). With
``k = V`` nothing is approximated: the stored log-probabilities are the teacher's ``log_softmax``, whose
softmax at any temperature equals the teacher's (a log-softmax differs from the logits by a per-row
constant), so every loss computed from them is the loss computed from the live teacher. The rebuilt
outputs are returned as log-probabilities in ``Outputs.logits``; methods treat them as logits. A tail
whose log-probability underflows is floored at ``TAIL_FLOOR`` (probability 0 in float32) so that no
loss meets ``0 * -inf``.

**Keys** (``cache_key``): a content hash of the teacher's own cache key (trained teachers) or checkpoint
identity, the training data's fingerprint, k, the maximum length, the rows rule of the task and this
module's format version. Any change gives a new entry; entries are never overwritten.

**Counting**: the store is built by one teacher pass over the training split, in index order, the first
time a cell asks for teacher outputs; that cell reports those forward passes and examples, every cell
reading the store reports 0 (`bench.train.HarnessContext.teacher_outputs`). Files are written to a
temporary name and renamed, so a killed build leaves nothing half-written and concurrent builders of the
same key keep one result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.api import Outputs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, Split

FORMAT_VERSION = 1
#: Log-probability given to tail tokens whose share of the remaining mass underflows (exp(-1e4) == 0).
TAIL_FLOOR = -1.0e4
#: Loaded stores kept in memory per process (each holds [tokens, k] values and ids).
_MEMORY_SLOTS = 2
_loaded: OrderedDict[str, dict[str, Any]] = OrderedDict()
_lock = threading.Lock()


def cache_key(*, teacher_key: str, data_fingerprint: str, k: int, max_length: int, rows_rule: str = "",
              extra: dict[str, Any] | None = None) -> str:
    """Content hash of everything that decides the stored numbers."""
    ident = {"format": FORMAT_VERSION, "teacher": teacher_key, "data": data_fingerprint, "k": int(k),
             "max_length": int(max_length), "rows": rows_rule, "extra": extra or {}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def topk_compress(log_probs: torch.Tensor, k: int, dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [R, k], token ids [R, k], log of the mass outside the top k [R]) of log-probabilities [R, V].

    ``dtype`` rounds the stored values (float16 below k = V); the remaining mass is computed from the rounded
    values, so that the rebuilt distribution still sums to 1."""
    import torch

    vocab = log_probs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k needs 1 <= k <= V; got k={k}, V={vocab}")
    values, indices = torch.topk(log_probs.float(), k, dim=-1)
    if dtype is not None:
        values = values.to(dtype)
    if k == vocab:
        log_rest = torch.full(values.shape[:-1], -math.inf)
    else:
        # log(1 - sum exp(values)), stable when the top-k mass is close to 1: log(-expm1(logsumexp)).
        lse = torch.logsumexp(values.double(), dim=-1).clamp(max=0.0)
        log_rest = torch.log(-torch.expm1(lse)).float()
    return values, indices, log_rest


def dense_log_probs(values: torch.Tensor, indices: torch.Tensor, log_rest: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Rebuild [R, V] log-probabilities from the top-k (see the module docstring for the approximation)."""
    import torch

    k = values.shape[-1]
    if k == vocab_size:
        out = torch.empty(values.shape[0], vocab_size, dtype=torch.float32, device=values.device)
        return out.scatter_(1, indices.long(), values.float())
    tail = (log_rest.float() - math.log(vocab_size - k)).clamp(min=TAIL_FLOOR)
    out = tail[:, None].expand(values.shape[0], vocab_size).clone()
    return out.scatter_(1, indices.long(), values.float())


def _index_dtype(vocab_size: int):
    import torch

    return torch.int16 if vocab_size <= 32767 else torch.int32


class TopKTeacherStore:
    """The top-k teacher outputs of one (teacher, training split, k) on disk (see the module docstring).

    ``forward(model, batch) -> Outputs`` is the task's adapter (logits of shape [rows, V], one row per
    scored position); ``rows(batch) -> list[int]`` says how many of those rows belong to each example of
    the batch, in order, so that stored rows can be cut per example and re-assembled for any batch.
    """

    def __init__(self, *, folder: Path, key: str, teacher: nn.Module, forward: Callable[[Any, Batch], Outputs],
                 split: Split, rows: Callable[[Batch], Sequence[int]], k: int, vocab_size: int, batch_size: int,
                 device: str = "cpu", description: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.key = key
        self.teacher = teacher
        self.forward = forward
        self.split = split
        self.rows = rows
        self.k = int(k)
        self.vocab_size = int(vocab_size)
        self.batch_size = int(batch_size)
        self.device = device
        self.description = description or {}
        self.built_here = False
        self.build_stats: dict[str, Any] = {}
        if not 1 <= self.k <= self.vocab_size:
            from bench import BenchError

            raise BenchError(f"teacher cache: k must be between 1 and the vocabulary size {self.vocab_size}, "
                             f"got {self.k}")

    @property
    def values_dtype(self):
        """float32 when k = V (the store is exact); float16 otherwise (already an approximation: a stored
        log-probability near -8 is then rounded by at most 2^-8, under 0.4% of its probability)."""
        import torch

        return torch.float32 if self.k == self.vocab_size else torch.float16

    @property
    def path(self) -> Path:
        return self.folder / f"{self.key}.pt"

    @property
    def meta_path(self) -> Path:
        return self.folder / f"{self.key}.json"

    def exists(self) -> bool:
        return self.path.is_file() and self.meta_path.is_file()

    # --- building ---------------------------------------------------------------------------------
    def build(self) -> tuple[int, int]:
        """One teacher pass over the training split in index order; returns (forward passes, examples)."""
        import torch

        t0 = time.perf_counter()
        n = len(self.split)
        values, indices, rests, counts = [], [], [], []
        passes = 0
        was_training = self.teacher.training
        self.teacher.eval()
        idx_dtype = _index_dtype(self.vocab_size)
        try:
            for start in range(0, n, self.batch_size):
                ids = list(range(start, min(n, start + self.batch_size)))
                batch = self.split.batch(ids)
                on = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in batch.items()}
                with torch.no_grad():
                    logits = self.forward(self.teacher, on).logits
                passes += 1
                per_example = [int(r) for r in self.rows(batch)]
                if sum(per_example) != logits.shape[0] or logits.shape[-1] != self.vocab_size:
                    raise RuntimeError(f"teacher cache: the task's forward gave {tuple(logits.shape)} for a batch "
                                       f"whose rows add up to {sum(per_example)} (vocabulary {self.vocab_size})")
                v, i, r = topk_compress(torch.log_softmax(logits.float(), dim=-1), self.k, self.values_dtype)
                values.append(v.cpu())
                indices.append(i.cpu().to(idx_dtype))
                rests.append(r.cpu())
                counts.extend(per_example)
        finally:
            self.teacher.train(was_training)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
        data = {"values": torch.cat(values), "indices": torch.cat(indices), "log_rest": torch.cat(rests),
                "offsets": offsets}
        wall = time.perf_counter() - t0
        meta = {"format": FORMAT_VERSION, "key": self.key, "k": self.k, "vocab_size": self.vocab_size,
                "exact": self.k == self.vocab_size, "examples": n, "rows": int(offsets[-1]),
                "build_forward_passes": passes, "build_examples": n, "build_wall_s": round(wall, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.description}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        torch.save({**data, "meta": meta}, tmp)
        os.replace(tmp, self.path)  # the data first: a meta file always has its data next to it
        tmp_meta = self.meta_path.with_name(self.meta_path.name + f".tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp_meta, self.meta_path)
        with _lock:
            _remember(str(self.path), {**data, "meta": meta})
        self.built_here = True
        self.build_stats = {"build_forward_passes": passes, "build_examples": n, "build_wall_s": round(wall, 3)}
        return passes, n

    def _data(self) -> dict[str, Any]:
        import torch

        key = str(self.path)
        with _lock:
            if key in _loaded:
                _loaded.move_to_end(key)
                return _loaded[key]
        data = torch.load(self.path, map_location="cpu", weights_only=True)
        meta = data.get("meta") or {}
        if meta.get("k") != self.k or meta.get("vocab_size") != self.vocab_size or len(data["offsets"]) != len(self.split) + 1:
            raise RuntimeError(f"teacher cache {self.path} does not match this split (k {meta.get('k')} vs {self.k}, "
                               f"V {meta.get('vocab_size')} vs {self.vocab_size}, examples "
                               f"{len(data['offsets']) - 1} vs {len(self.split)}); delete it to rebuild")
        with _lock:
            _remember(key, data)
        return data

    # --- reading ----------------------------------------------------------------------------------
    def outputs(self, batch: Batch) -> tuple[Outputs, int, int]:
        import torch

        passes = examples = 0
        if not self.exists():
            passes, examples = self.build()
        data = self._data()
        ids = [int(i) for i in batch["index"].tolist()]
        offsets = data["offsets"]
        want = [int(r) for r in self.rows(batch)]
        have = [int(offsets[i + 1] - offsets[i]) for i in ids]
        if want != have:
            raise RuntimeError(f"teacher cache {self.path}: the batch scores {want} rows per example but the store "
                               f"holds {have} for examples {ids[:8]}; the store belongs to other data")
        sel = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in ids])
        dense = dense_log_probs(data["values"][sel], data["indices"][sel], data["log_rest"][sel], self.vocab_size)
        device = batch["index"].device
        return Outputs(logits=dense.to(device)), passes, examples

    def info(self) -> dict[str, Any]:
        meta = {}
        if self.meta_path.is_file():
            try:
                meta = json.loads(self.meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
        size = self.path.stat().st_size if self.path.is_file() else None
        return {
            "used": True, "kind": "top-k teacher log-probabilities on disk (bench.teacher_cache)",
            "key": self.key, "k": self.k, "vocab_size": self.vocab_size, "exact": self.k == self.vocab_size,
            "path": str(self.path), "size_bytes": size, "built_by_this_cell": self.built_here,
            "build_forward_passes": meta.get("build_forward_passes"), "build_wall_s": meta.get("build_wall_s"),
            "approximation": ("none (k = V)" if self.k == self.vocab_size else
                              "top-k probabilities kept; the remaining mass spread uniformly over the other V - k "
                              "tokens"),
        }


class LiveTeacherOutputs:
    """No cache: the teacher runs on every batch that asks (each call counted as one forward pass)."""

    def __init__(self, teacher: nn.Module, forward: Callable[[Any, Batch], Outputs], reason: str) -> None:
        self.teacher = teacher
        self.forward = forward
        self.reason = reason

    def outputs(self, batch: Batch) -> tuple[Outputs, int, int]:
        import torch

        with torch.no_grad():
            logits = self.forward(self.teacher, batch).logits.detach()
        return Outputs(logits=logits), 1, len(batch["index"])

    def info(self) -> dict[str, Any]:
        return {"used": False, "kind": "none: the teacher runs on every training batch", "reason": self.reason}


def _remember(key: str, data: dict[str, Any]) -> None:
    _loaded[key] = data
    _loaded.move_to_end(key)
    while len(_loaded) > _MEMORY_SLOTS:
        _loaded.popitem(last=False)


def forget_loaded() -> None:
    """Drop the stores held in memory (tests and benchmarks measuring a cold read)."""
    with _lock:
        _loaded.clear()
