"""Training batches of the ``sam`` task: scenes -> model inputs with P prompts per image.

A batch (the spec every segmentation method reads):

* ``image`` (B, 3, S, S) float, SAM-normalised, padded bottom-right (`prompts.sam_input`);
* ``index`` (B,) long, the example ids;
* ``boxes`` (B, P, 4) xyxy and ``points`` (B, P, 1, 2) xy in input-frame pixels, ``point_labels`` (B, P, 1) long
  (ones: foreground);
* ``gt_masks`` (B, P, S, S) float 0/1 in the input frame (padding 0);
* ``valid`` (B, P) bool: False for padded prompt slots of images with fewer than P instances.

Which P instances an example prompts is a pure function of its index (``numpy.random.default_rng([seed,
index])``), so step ``s`` always sees the same prompts and resume is exact. The box is the tight box of the
instance's mask *in the input frame* and the point its centre (the maximum of the distance transform,
`prompts.center_point`), so prompt and target agree pixel for pixel. Crowd regions are never prompted.

Deviation from SAM's training (Kirillov et al. 2023, appendix A): SAM samples boxes with noise (std 10 % of
the side, at most 20 px) and points uniformly inside the mask, and simulates 11 rounds of interactive
correction; here the prompts are the evaluation's own (exact box, centre point), one round. Methods that
want other prompts (TinySAM's hard prompt sampling) build them from ``gt_masks``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from bench import BenchError

from .prompts import center_point, mask_box, resize_pad_mask, sam_input

if TYPE_CHECKING:
    from .data import Scene


def prepare_example(scene: Scene, img_size: int, prompts: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One example as numpy arrays (the batch keys above, without the batch dimension)."""
    image = sam_input(scene.image, img_size)
    masks = []
    for inst in scene.instances:
        if inst.iscrowd:
            continue
        m = inst.mask if inst.mask.shape == (img_size, img_size) else resize_pad_mask(inst.mask, img_size)
        if m.any():  # an object that vanishes at this resolution cannot be prompted
            masks.append(m)
    p = prompts
    boxes = np.zeros((p, 4), np.float32)
    points = np.zeros((p, 1, 2), np.float32)
    gt = np.zeros((p, img_size, img_size), bool)
    valid = np.zeros(p, bool)
    if masks:
        chosen = np.sort(rng.choice(len(masks), size=min(p, len(masks)), replace=False))
        for slot, j in enumerate(chosen):
            gt[slot] = masks[j]
            boxes[slot] = mask_box(masks[j])
            points[slot, 0] = center_point(masks[j])
            valid[slot] = True
    return {"image": image, "boxes": boxes, "points": points, "gt_masks": gt, "valid": valid}


def collate(examples: Sequence[dict[str, np.ndarray]], indices: Sequence[int]):
    """Stack prepared examples into a batch of tensors (see the module docstring)."""
    import torch

    p = examples[0]["boxes"].shape[0]
    return {
        "image": torch.from_numpy(np.stack([e["image"] for e in examples])),
        "index": torch.as_tensor(list(indices), dtype=torch.long),
        "boxes": torch.from_numpy(np.stack([e["boxes"] for e in examples])),
        "points": torch.from_numpy(np.stack([e["points"] for e in examples])),
        "point_labels": torch.ones(len(examples), p, 1, dtype=torch.long),
        "gt_masks": torch.from_numpy(np.stack([e["gt_masks"] for e in examples])).float(),
        "valid": torch.from_numpy(np.stack([e["valid"] for e in examples])),
    }


class SceneSplit:
    """A training split of ``n`` scenes made by ``make_scene(index)`` (generated or read from disk), with
    ``prompts`` prompts per image. Prepared examples are kept in memory up to ``cache_bytes``."""

    def __init__(self, n: int, make_scene: Callable[[int], Scene], *, img_size: int, prompts: int, seed: int,
                 description: str, cache_bytes: int = 256 << 20) -> None:
        if n < 1:
            raise BenchError(f"the sam training split is empty ({description})")
        self.n, self.make_scene, self.img_size, self.prompts, self.seed = n, make_scene, img_size, prompts, seed
        self.description = description
        per = img_size * img_size * (3 * 4 + prompts)  # image float32 + bool masks
        self._cap = max(0, cache_bytes // max(per, 1))
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def example(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(f"example {index} of a split of {self.n}")
        if index in self._cache:
            return self._cache[index]
        ex = prepare_example(self.make_scene(index), self.img_size, self.prompts,
                             np.random.default_rng([self.seed, index]))
        if len(self._cache) < self._cap:
            self._cache[index] = ex
        return ex

    def batch(self, indices: Sequence[int]):
        indices = [int(i) for i in indices]
        return collate([self.example(i) for i in indices], indices)

    def fingerprint(self, probe: int = 8) -> str:
        """sha256 over the split's size, prompt rule and the first ``probe`` prepared examples' bytes."""
        h = hashlib.sha256(f"{self.description}|n={self.n}|S={self.img_size}|P={self.prompts}|seed={self.seed}"
                           .encode())
        for i in range(min(probe, self.n)):
            ex = self.example(i)
            for k in sorted(ex):
                h.update(np.ascontiguousarray(ex[k]).tobytes())
        return h.hexdigest()


class MixedPrompts:
    """The teacher's view of a split: SAM trains with box *and* point prompts (appendix A: a box or a point per
    mask, with equal probability); here by batch, deterministically: a batch whose first example id is
    ``every - 1`` modulo ``every`` carries no ``boxes`` (so ``Task.forward`` prompts it with the centre points),
    the others keep them. ``every=2``: SAM's equal mix."""

    def __init__(self, split: SceneSplit, every: int = 2) -> None:
        self.split, self.every = split, every
        self.description = (split.description + f"; teacher prompts: centre points on batches whose first id is "
                            f"{every - 1} mod {every}, boxes on the others")

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: Sequence[int]):
        batch = self.split.batch(indices)
        if int(indices[0]) % self.every == self.every - 1:
            del batch["boxes"]
        return batch
