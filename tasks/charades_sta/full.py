"""The full tier of ``charades_sta``: the real Charades-STA test queries over the real Charades videos, an
open_clip CLIP teacher from local weights (or an open_clip pretrained tag, fetched from the hub: allowed at this
tier only), students built from open_clip configs.

* Videos: ``charades_sta.videos_dir`` holds ``<video id>.mp4`` (Charades v1 480p or original), decoded with PyAV.
  Frames are taken at ``k / 3`` s for ``k / 3 < duration`` (`protocol.sample_times`), each the decoded frame whose
  display interval's midpoint is nearest (`protocol.nearest_frames`), resized bicubic to 224 on the short side and
  centre-cropped (zs-video-eval's preprocessing), CLIP-normalised. The duration is the decoded one (frames / average
  rate), as the official code takes it, not the annotation CSV's.
* Queries: ``<annotations>/charades_sta_test.txt`` (3,720) and ``_train.txt``; ``annotations_dir`` defaults to
  ``<data root>/charades_sta``. A query whose video file is missing is a bad input naming its line.
* Teacher: ``open_clip.create_model(clip_model, pretrained=clip_weights)`` with QuickGELU for OpenAI weights
  (``quick_gelu``; OpenAI's CLIPs use it, and open_clip's plain ``ViT-B-32`` config does not), loaded with
  ``weights_only=True``. Default ViT-B/32 (the scripts' default), ``ViT-L-14`` an option.
* Students: ``kd`` / ``student`` rows get a ViT from ``student_model``'s open_clip vision config (ViT-S/32
  default) projecting to the teacher's embedding width, with the teacher's text encoder (frozen); ResidualViT and
  frame skipping reuse the teacher's ViT (their ``init_student``).
* Distillation clips: ResidualViT trains on WebVid-2.5M, which no local folder here is assumed to hold; this tier
  trains on clips of the *Charades-STA train* queries over the same videos folder (4 frames 1 s apart inside each
  moment, the task's clip rule) — a deviation stated in the notes.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench import BenchError

from . import protocol
from .tiers import CLIP_FRAMES, CLIP_SPACING, DATA_DIR, FPS

if TYPE_CHECKING:
    from torch import nn

def _read_frames(path: Path, times: np.ndarray | None = None) -> tuple[list[Any], float]:
    """(PIL frames at ``times`` (all decoded frames when None), decoded duration: frames / average rate)."""
    from .data import read_video

    frames, _, rate = read_video(path)
    duration = len(frames) / rate
    if times is None:
        return frames, duration
    idx = protocol.nearest_frames(times, protocol.frame_midpoints(len(frames), rate))
    return [frames[i] for i in idx], duration


def preprocess(images: list[Any], size: int) -> np.ndarray:
    """Bicubic short-side resize to ``size`` and centre crop: (n, size, size, 3) float32 in [0, 1]."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), np.float32)
    for i, im in enumerate(images):
        w, h = im.size
        s = size / min(w, h)
        im = im.convert("RGB").resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        x, y = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(im.crop((x, y, x + size, y + size)), dtype=np.float32) / 255.0
    return out


class FullTier:
    def __init__(self, task: Any) -> None:
        self.task = task
        self.params = task.params

    # --- inputs ------------------------------------------------------------------------------------------
    @property
    def annotations_dir(self) -> Path | None:
        p = self.params
        if p.annotations_dir:
            return Path(p.annotations_dir).expanduser()
        return Path(self.task.env.data_root, DATA_DIR) if self.task.env.data_root else None

    def unavailable(self) -> str | None:
        p = self.params
        if not p.videos_dir:
            return ("the charades_sta full tier needs charades_sta.videos_dir (a folder of Charades <id>.mp4 videos) "
                    "and charades_sta.clip_weights (an open_clip checkpoint file, or a pretrained tag such as "
                    "'openai')")
        if not p.clip_weights:
            return "the charades_sta full tier needs charades_sta.clip_weights (an open_clip checkpoint file or tag)"
        ann = self.annotations_dir
        if ann is None or not (ann / "charades_sta_test.txt").is_file():
            return (f"the charades_sta full tier needs charades_sta_test.txt under charades_sta.annotations_dir or "
                    f"<data root>/{DATA_DIR} (looked in {ann})")
        return None

    def check_inputs(self) -> None:
        """Refuse a bad input before any cell runs: missing folders, a missing video of a query (its line)."""
        p = self.params
        videos = Path(p.videos_dir).expanduser()
        if not videos.is_dir():
            raise BenchError(f"charades_sta.videos_dir: {videos} is not a folder (expected Charades <id>.mp4 files)")
        w = p.clip_weights
        if ("/" in w or w.endswith((".pt", ".bin", ".safetensors"))) and not Path(w).expanduser().is_file():
            raise BenchError(f"charades_sta.clip_weights: {w!r} is not a file (give an open_clip checkpoint file, "
                             f"or a pretrained tag such as 'openai')")
        self._queries  # noqa: B018 - parses both files and checks every query's video

    def _video_path(self, vid: str) -> Path:
        return Path(self.params.videos_dir).expanduser() / f"{vid}.mp4"

    def queries(self, split: str) -> list[Any]:
        return self._queries[split]

    @cached_property
    def _queries(self) -> dict[str, list[Any]]:
        from .annotations import read_queries

        out = {}
        for split in ("test", "train"):
            path = self.annotations_dir / f"charades_sta_{split}.txt"
            if split == "train" and not path.is_file():
                out[split] = []
                continue
            qs = read_queries(path, allow_inverted=split == "train")
            for q in qs:
                if not self._video_path(q.video).is_file():
                    raise BenchError(f"{path}, line {q.line}: video {q.video!r} is not in charades_sta.videos_dir "
                                     f"({self._video_path(q.video)} does not exist)")
            out[split] = [q for q in qs if q.start <= q.end]
        return out

    # --- models ------------------------------------------------------------------------------------------
    def teacher(self) -> nn.Module:
        import open_clip

        from .model import VideoCLIP

        p = self.params
        try:
            clip = open_clip.create_model(p.clip_model, pretrained=p.clip_weights, force_quick_gelu=p.quick_gelu,
                                          weights_only=True)
        except RuntimeError as exc:
            raise BenchError(f"charades_sta.clip_weights {p.clip_weights!r} does not load into {p.clip_model} "
                             f"({str(exc)[:300]}); give the checkpoint of that architecture") from exc
        return VideoCLIP(clip, int(clip.context_length))

    def student(self, seed: int, teacher: nn.Module) -> nn.Module:
        import open_clip
        import torch

        from .model import VideoCLIP, share_text

        cfg = open_clip.get_model_config(self.params.student_model)
        if cfg is None:
            raise BenchError(f"charades_sta.student_model {self.params.student_model!r} is not an open_clip config")
        t = teacher.clip
        text_cfg = open_clip.get_model_config(self.params.clip_model)["text_cfg"]
        torch.manual_seed(seed)
        clip = open_clip.CLIP(embed_dim=int(t.text_projection.shape[1]), vision_cfg=cfg["vision_cfg"],
                              text_cfg=text_cfg, quick_gelu=self.params.quick_gelu)
        model = VideoCLIP(clip, int(t.context_length))
        share_text(model, teacher)
        return model

    @property
    def image_size(self) -> int:
        import open_clip

        size = open_clip.get_model_config(self.params.clip_model)["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def patch_size(self) -> int:
        import open_clip

        return int(open_clip.get_model_config(self.params.clip_model)["vision_cfg"]["patch_size"])

    # --- data --------------------------------------------------------------------------------------------
    def video(self, vid: str) -> tuple[np.ndarray, float]:
        """(frames at 3 fps, preprocessed, (T, S, S, 3)), decoded duration."""
        frames, duration = _read_frames(self._video_path(vid))
        times = protocol.sample_times(duration, FPS)
        idx = protocol.nearest_frames(times, protocol.frame_midpoints(len(frames), len(frames) / duration))
        return preprocess([frames[i] for i in idx], self.image_size), duration

    def train_example(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        from .data import motion

        qs = self.queries("train")
        if not qs:
            raise BenchError(f"charades_sta full tier: no charades_sta_train.txt under {self.annotations_dir}; "
                             f"the distillation clips come from the train queries")
        q = qs[i % len(qs)]
        rng = np.random.default_rng([21, i])
        dt = min(CLIP_SPACING, max(q.end - q.start, 0.0) / (CLIP_FRAMES - 1))
        t0 = float(rng.uniform(q.start, max(q.start, q.end - (CLIP_FRAMES - 1) * dt - 1e-3)))
        times = t0 + dt * np.arange(-1, CLIP_FRAMES)
        images, _ = _read_frames(self._video_path(q.video), np.maximum(times, 0.0))
        frames = preprocess(images, self.image_size)
        return frames[1:], motion(frames[1:], self.patch_size, previous=frames[0]), q.sentence

    def eval_items(self) -> list[Any]:
        qs = self.queries("test")
        n = self.params.eval_queries
        return qs[:n] if n else qs

    def fingerprint(self) -> dict[str, Any]:
        from .data import file_sha256

        ann = self.annotations_dir
        return {"source": f"Charades videos from {self.params.videos_dir}; Charades-STA annotations from {ann}",
                "clip_model": self.params.clip_model, "clip_weights": self.params.clip_weights,
                "test_sha256": file_sha256(ann / "charades_sta_test.txt"),
                "n_queries": len(self.eval_items())}

    def notes(self) -> list[str]:
        return [f"full tier: Charades-STA test queries over the Charades videos, teacher {self.params.clip_model} "
                f"({self.params.clip_weights}); durations decoded from the videos; distillation clips from the "
                f"Charades-STA train queries (ResidualViT: WebVid-2.5M); motion from frame differences, not codec "
                f"motion vectors"]
