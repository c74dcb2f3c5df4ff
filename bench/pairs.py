"""Teacher noise -> image pairs (and optionally whole trajectories) on disk, built once and shared.

Several diffusion distillation methods regress on the teacher's deterministic sampler: DMD's regression
loss on noise -> image pairs (Yin et al. 2024), SlimFlow's reflow pairs (Zhu et al. 2024), trajectory
consistency on stored teacher states (TBCM, Tang et al. 2025). In a matrix of methods x seeds every one
of them needs the *same* pairs; the teacher's sampler is the expensive part (tens of network calls per
image). Like the lm task's top-k store (`bench.teacher_cache`), the pairs are computed once per key and
read by every cell:

    key = hash(teacher's cache key, the teacher's sampler, the conditions, the noise seed, n, trajectory,
               the training data's fingerprint, this module's format version)

Noise of pair ``i`` is drawn from a generator seeded by ``seed + i // chunk`` (a fixed function of the
index), so the store is the same however it is built. Files are written under a temporary name and
renamed (a killed build leaves nothing half-written); concurrent builders wait for one lock
(`bench.locks`), so the store is built once. The cell
that builds the store reports its network evaluations (``passes``) and pairs (``examples``); cells that
read it report 0 and say the store was used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from bench.diffusion import Generator

FORMAT_VERSION = 1
CHUNK = 250


class PairStore:
    """``n`` pairs (noise, condition, teacher image[, trajectory]) of ``teacher``'s own sampler."""

    def __init__(self, *, root: Path, teacher: Generator, teacher_key: str, conds: torch.Tensor,
                 shape: tuple[int, ...], seed: int, trajectory: bool = False, data_fingerprint: str = "") -> None:
        self.root = Path(root)
        self.teacher = teacher
        self.conds = conds
        self.n = int(len(conds))
        self.shape = tuple(int(v) for v in shape)  # one sample: (channels, height, width)
        self.seed = seed
        self.trajectory = trajectory
        ident = {"format": FORMAT_VERSION, "teacher": teacher_key, "sampler": teacher.sampler.describe(),
                 "conds": hashlib.sha256(conds.numpy().tobytes()).hexdigest(), "seed": seed, "n": self.n,
                 "shape": list(self.shape), "trajectory": trajectory, "data": data_fingerprint}
        self.identity = ident
        self.key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        self.path = self.root / f"pairs-{self.key}.pt"
        self._data: dict[str, torch.Tensor] | None = None
        self.built_here = False
        self.build_s: float | None = None

    def __len__(self) -> int:
        return self.n

    def noise(self, start: int, stop: int) -> torch.Tensor:
        import torch

        g = torch.Generator().manual_seed(self.seed + start // CHUNK)
        return torch.randn(stop - start, *self.shape, generator=g)

    def _build(self) -> tuple[dict[str, torch.Tensor], int]:
        import torch

        from bench import progress

        sp = self.teacher.sampler
        grid = sp.grid(self.teacher.schedule.t_max())
        device = next(self.teacher.parameters()).device
        noises, images, trajs = [], [], []
        t0 = time.perf_counter()
        with progress.bar(f"Teacher pairs ({self.n}, {sp.steps} steps)", self.n) as update, torch.inference_mode():
            for start in range(0, self.n, CHUNK):
                stop = min(self.n, start + CHUNK)
                z = self.noise(start, stop)
                cond = self.conds[start:stop].to(device)
                x = z.to(device)
                states = [x.cpu()]
                for i, t in enumerate(grid[:-1]):
                    tt = torch.full((x.shape[0],), t, device=device)
                    x = self.teacher.ddim_step(x, tt, torch.full_like(tt, grid[i + 1]), cond, sp.guidance,
                                               sp.guidance_input)
                    if self.trajectory:
                        states.append(x.cpu())
                noises.append(z)
                images.append(x.cpu())
                if self.trajectory:
                    trajs.append(torch.stack(states, 1))
                update(stop)
        self.build_s = time.perf_counter() - t0
        data = {"noise": torch.cat(noises), "image": torch.cat(images), "cond": self.conds.clone(),
                "grid": torch.tensor(grid)}
        if self.trajectory:
            data["trajectory"] = torch.cat(trajs)
        return data, self.n * sp.nfe

    def load(self) -> tuple[dict[str, torch.Tensor], int]:
        """The stored tensors, and the network evaluations this call ran (0 when read from disk)."""
        import torch

        if self._data is not None:
            return self._data, 0
        from bench.locks import read_or_compute

        def build() -> tuple[dict[str, torch.Tensor], int]:
            data, passes = self._build()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
            torch.save(data, tmp)
            os.replace(tmp, self.path)
            (self.path.with_suffix(".json")).write_text(json.dumps({**self.identity, "build_s": self.build_s}, indent=2))
            self.built_here = True
            return data, passes

        def read() -> tuple[dict[str, torch.Tensor], int] | None:
            data = self._read()
            return None if data is None else (data, 0)

        # Concurrent cells (Ray workers) build the store once: the others wait for the lock, then read it.
        self._data, passes = read_or_compute(
            self.path.parent / "locks" / f"{self.path.name}.lock",
            f"another process is building the teacher pairs {self.path.name}; waiting for it", read, build)
        return self._data, passes

    def _read(self) -> dict[str, torch.Tensor] | None:
        import torch

        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable store is rebuilt
            from bench import progress

            progress.log(f"teacher pairs at {self.path} are unreadable ({exc}); rebuilding them")
            return None

    def get(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], int, int]:
        """Pairs at ``indices`` and the (network evaluations, pairs) this call computed."""
        import torch

        data, passes = self.load()
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = {k: v[idx] for k, v in data.items() if k != "grid"}
        out["grid"] = data["grid"]
        return out, passes, (self.n if passes else 0)

    def info(self) -> dict[str, Any]:
        return {"used": True, "kind": "teacher noise -> image pairs on disk (bench.pairs)", "key": self.key,
                "n": self.n, "trajectory": self.trajectory, "path": str(self.path),
                "sampler": self.teacher.sampler.describe(), "built_by_this_cell": self.built_here,
                "build_s": None if self.build_s is None else round(self.build_s, 2)}
