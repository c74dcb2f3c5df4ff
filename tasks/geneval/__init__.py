"""GenEval (Ghosh et al., "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment",
NeurIPS 2023; djghosh13/geneval): compositional text-to-image prompts of six categories (single object, two
objects, counting, colours, position, colour attribution), 4 images per prompt, scored by detecting the
objects and applying GenEval's rules; a category's score is its fraction of correct images and ``overall``
is the unweighted mean of the six (`rules.summarize`).

* **smoke and small** (the GenEval-like task of diffusion.md §5): GenEval's templates, generators, rules,
  thresholds (0.3; 0.9 for counting; at most 16 objects; the position rule; the colour rule) and aggregation
  unchanged, with the 80 COCO classes replaced by six rendered shapes (`prompts.SHAPES`) in GenEval's ten
  colour names on #999 grey at 32 x 32, and GenEval's Mask2Former + CLIP replaced by a programmatic detector
  (`detect.py`) validated on ground-truth renders, noise, blank images, swapped colours and mirrored layouts
  (tests/unit/test_geneval_detect.py). Training data are rendered scenes of random prompts of the six kinds
  (`prompts.train_prompts`); evaluation prompts are GenEval's suite over the shapes
  (`prompts.shape_prompts`, seed 43 as create_prompts.py). The teacher is a pixel-space flow-matching UNet
  conditioned on the prompt's tokens, trained by the task and cached (`tasks.generative`). These scores
  measure compositional alignment of shape scenes: they are **not** GenEval scores and never comparable with
  published ones (SD1.5 0.43, SANA-Sprint 0.74);
* **full**: the official prompts (``<data root>/geneval/evaluation_metadata.jsonl``, 553, or ``prompts``)
  and a diffusers text-to-image teacher from a local folder (``teacher_folder``, `tasks.generative.pipeline`;
  distillation data: COCO train2014 image-caption pairs of ``coco_root``, as coco_fid's full tier). The
  official evaluator's detector stack (mmdet 2.x Mask2Former, CLIP ViT-L/14, CUDA) is not installed by
  bench: the row's images are written in the layout the official ``evaluate_images.py`` reads
  (`official.write_official_layout`), the command the user names (``evaluator_command``, with ``{images}``
  and ``{outfile}``) runs it, and its results file is read back (`official.read_official_results`) and
  summarised with GenEval's rules (`rules.summarize`, as ``summary_scores.py``). ``python -m
  bench.tasks.geneval.official`` is a stand-in command with the shape detector (for tests; not GenEval).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from bench import BenchError
from bench.api import Metric

from ..generative.base import GenerativeParams, GenerativeTask
from . import prompts as P

if TYPE_CHECKING:
    import numpy as np
    import torch

IMAGES_PER_PROMPT = 4  # GenEval's generation/diffusers_generate.py default (--n_samples 4)

TIERS: dict[str, dict[str, Any]] = {
    "smoke": {"image_size": 32, "channels": (16, 32), "compact_channels": (8, 16), "train_size": 1024,
              "n_per_task": 4, "teacher_steps": 150, "teacher_sampler_steps": 8, "steps": 20, "batch_size": 16,
              "teacher_pairs": 64},
    "small": {"image_size": 32, "channels": (32, 64, 64), "compact_channels": (16, 32, 32), "train_size": 30_000,
              "n_per_task": P.N_PER_TASK, "teacher_steps": 3000, "teacher_sampler_steps": 25, "steps": 300,
              "batch_size": 64, "teacher_pairs": 2048},
}


class Tokenizer:
    """Word-level tokens of the shape prompts (a closed vocabulary: articles, numbers, colours, shapes and
    their plurals, relations). Id 0 pads; the network's null token is ``len(vocab)`` (classifier-free guidance)."""

    def __init__(self, words: list[str], max_len: int) -> None:
        self.vocab = ["<pad>", *sorted(set(words))]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    @classmethod
    def for_shapes(cls, shapes: tuple[str, ...]) -> "Tokenizer":
        words = ["a", "an", "photo", "of", "and", "left", "right", "above", "below", *P.NUMBERS, *P.COLORS]
        for s in shapes:
            words += [s, P.plural(s)]
        # the longest template, color_attr: "a photo of a(n) <c> <obj> and a(n) <c> <obj>" (10 words)
        return cls(words, max_len=10)

    def encode(self, prompt: str) -> list[int]:
        words = prompt.split()
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise BenchError(f"prompt {prompt!r} has words outside the task's vocabulary: {unknown}")
        if len(words) > self.max_len:
            raise BenchError(f"prompt {prompt!r} has {len(words)} words; at most {self.max_len}")
        return [self.index[w] for w in words] + [0] * (self.max_len - len(words))

    def batch(self, prompts: list[str]) -> torch.Tensor:
        import torch

        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long)


class GenEval(GenerativeTask):
    """GenEval's rules and aggregation over rendered shapes (smoke, small); the official prompts and
    evaluator (full)."""

    name = "geneval"
    version = "1"
    subtasks = ("val",)
    aggregate_name = "overall"
    aggregate_rule = ("GenEval overall: the unweighted mean of the six categories' image accuracies (4 images "
                      "per prompt); smoke and small tiers: the GenEval-like shape task, not comparable with GenEval")

    class Params(GenerativeParams):
        prompts: str | None = Field(None, description="full tier: GenEval evaluation_metadata.jsonl (default "
                                                      "<data root>/geneval/evaluation_metadata.jsonl)")
        evaluator_command: str | None = Field(None, description="full tier: the command that runs GenEval's "
                                                                "official evaluate_images.py, with {images} (the "
                                                                "generation folder) and {outfile} (results JSONL)")

        @field_validator("prompts")
        @classmethod
        def _prompts_parse(cls, v: str | None) -> str | None:
            if v is not None:
                P.load_metadata(v)  # a file in the wrong format stops the run here, before anything is written
            return v

    def __init__(self, params: GenerativeParams, env) -> None:
        super().__init__(params, env)
        self.tokenizer = Tokenizer.for_shapes(P.SHAPES)

    def tier_defaults(self) -> dict[str, Any]:
        if self.tier == "full":
            # GenEval's generation/diffusers_generate.py: 50 steps; the image side is the pipeline's own
            d = {"image_size": int(self.pipeline.unet.config.sample_size) * self.pipeline.vae_scale,
                 "teacher_sampler_steps": 50, "steps": 2000, "batch_size": 16, "teacher_pairs": 1000}
        else:
            d = dict(TIERS[self.tier])
        d["eval_images"] = IMAGES_PER_PROMPT * len(self._eval_prompts)
        return d

    def net_condition(self) -> dict[str, Any]:
        return {"vocab_size": len(self.tokenizer.vocab), "max_len": self.tokenizer.max_len}

    def prompt_path(self) -> str | None:
        from pathlib import Path

        if self.params.prompts:
            return self.params.prompts
        default = Path(self.env.data_root or ".") / "geneval" / "evaluation_metadata.jsonl"
        return str(default) if self.env.data_root and default.is_file() else None

    def unavailable(self) -> str | None:
        if self.tier != "full":
            return None
        p = self.params
        missing = [what for what, ok in (
            ("geneval.teacher_folder (a local diffusers text-to-image pipeline)", p.teacher_folder),
            ("geneval.evaluator_command (the official evaluate_images.py as a command with {images} and {outfile})",
             p.evaluator_command),
            ("geneval.coco_root (COCO train2014 image-caption pairs to distil on)", p.coco_root),
            ("the prompt file (geneval.prompts, or <data root>/geneval/evaluation_metadata.jsonl)", self.prompt_path()),
        ) if not ok]
        return f"the geneval full tier needs {'; '.join(missing)}" if missing else None

    # --- prompts and data ----------------------------------------------------------------------------
    @cached_property
    def _eval_prompts(self) -> list[dict]:
        if self.tier == "full":
            path = self.prompt_path()
            if path is None:
                raise BenchError("the geneval full tier needs geneval.prompts or <data root>/geneval/"
                                 "evaluation_metadata.jsonl")
            return P.load_metadata(path)
        return P.shape_prompts(P.SHAPES, seed=P.SEED, n_per_task=TIERS[self.tier]["n_per_task"])

    @cached_property
    def _train(self):
        if self.tier == "full":
            from pathlib import Path

            from ..coco_fid.full import CocoTrain

            if not self.params.coco_root:
                raise BenchError("the geneval full tier needs geneval.coco_root (COCO train2014 pairs to distil on)")
            return CocoTrain(Path(self.params.coco_root).expanduser(), self.pipeline, self.image_size)
        from ..generative.base import ConditionedImages

        return ConditionedImages(*self.load_train())

    def _slot_prompts(self) -> list[str]:
        return [m["prompt"] for m in self._eval_prompts for _ in range(IMAGES_PER_PROMPT)]

    def eval_conditions_slice(self, start: int, stop: int, n: int) -> torch.Tensor:
        if self.tier == "full":
            prompts = self._slot_prompts()
            return self.pipeline.encode_prompts([prompts[i % len(prompts)] for i in range(start, stop)])
        return super().eval_conditions_slice(start, stop, n)

    def load_train(self) -> tuple[np.ndarray, torch.Tensor, str]:
        import hashlib

        from . import render

        rng, metas = self._train_draw()
        images = render.render_batch(metas, rng, self.image_size)
        conds = self.tokenizer.batch([m["prompt"] for m in metas])
        h = hashlib.sha256(images.tobytes())
        h.update(conds.numpy().tobytes())
        return images, conds, h.hexdigest()

    def _train_draw(self) -> tuple[np.random.Generator, list[dict]]:
        import numpy as np

        rng = np.random.default_rng(2023)
        return rng, P.train_prompts(rng, TIERS[self.tier]["train_size"], P.SHAPES)

    def train_metadata(self) -> list[dict]:
        """GenEval metadata of the training prompts (smoke, small), in the order of the training split: what a
        method's reward (GenEval's rules on the task's detector) judges a sample of example i against."""
        return self._train_draw()[1]

    def eval_conditions(self, n: int) -> torch.Tensor:
        """Each evaluation prompt ``IMAGES_PER_PROMPT`` times, in order (cycled if more are asked for)."""
        prompts = self._slot_prompts()
        reps = -(-n // len(prompts))
        return self.tokenizer.batch((prompts * reps)[:n])

    # --- quality -------------------------------------------------------------------------------------
    def quality_metrics(self) -> list[Metric]:
        cats = {"single_object": "single object", "two_object": "two objects", "counting": "counting",
                "colors": "colours", "position": "position", "color_attr": "colour attribution"}
        out = [Metric("overall", primary=True, description="mean of the six categories' image accuracies")]
        out += [Metric(k, column=True, description=f"{v}: fraction of correct images") for k, v in cats.items()]
        out += [Metric("correct_images", description="fraction of all images that are correct"),
                Metric("correct_prompts", description="fraction of prompts with at least one correct image")]
        return out

    def score_images(self, images: np.ndarray, conds: torch.Tensor) -> dict[str, float]:
        from bench import progress

        from . import detect, rules

        metas = [m for m in self._eval_prompts for _ in range(IMAGES_PER_PROMPT)]
        if len(images) != len(metas):
            raise BenchError(f"geneval: {len(images)} images for {len(metas)} prompt slots "
                             f"({len(self._eval_prompts)} prompts x {IMAGES_PER_PROMPT})")
        if self.tier == "full":
            summary = rules.summarize(self._official_results(images))
            return {k: float(summary.get(k, float("nan"))) for k in ("overall", *P.CATEGORIES, "correct_images",
                                                                     "correct_prompts")}
        results = []
        with progress.bar("GenEval-like detection", len(images)) as update:
            for i, (image, meta) in enumerate(zip(images, metas)):
                results.append(rules.evaluate_detections(meta, detect.detect(image, P.SHAPES)))
                update(i + 1)
        summary = rules.summarize(results)
        return {k: float(summary[k]) for k in ("overall", *P.CATEGORIES, "correct_images", "correct_prompts")}

    def _official_results(self, images: np.ndarray) -> list[dict]:
        """Write the images in the official layout, run the user's evaluator command, read its results."""
        import hashlib
        import shlex
        import shutil
        import subprocess

        from bench import progress

        from .official import read_official_results, write_official_layout

        k = IMAGES_PER_PROMPT
        digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
        work = self.env.cache_dir / self.name / "official" / digest
        shutil.rmtree(work, ignore_errors=True)
        folder = write_official_layout(work / "images", self._eval_prompts,
                                       [list(images[i * k:(i + 1) * k]) for i in range(len(self._eval_prompts))])
        outfile = work / "results.jsonl"
        cmd = self.params.evaluator_command.format(images=shlex.quote(str(folder)), outfile=shlex.quote(str(outfile)))
        progress.log(f"running the GenEval evaluator: {cmd}")
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"the GenEval evaluator command failed (exit {proc.returncode}): {cmd}\n"
                             f"{(proc.stderr or proc.stdout)[-2000:]}")
        results = read_official_results(outfile)
        shutil.rmtree(folder, ignore_errors=True)  # the results file stays beside it, for provenance
        return results

    def notes(self) -> list[str]:
        if self.tier == "full":
            return [f"GenEval: {len(self._eval_prompts)} prompts x {IMAGES_PER_PROMPT} images from "
                    f"{self.prompt_path()}, scored by the evaluator command {self.params.evaluator_command!r} on "
                    f"the official generation layout and summarised with GenEval's rules. Distillation data: "
                    f"COCO train2014 image-caption pairs."]
        out = [f"GenEval-like shape task ({len(self._eval_prompts)} prompts over {len(P.SHAPES)} shapes x "
               f"{IMAGES_PER_PROMPT} images, 32 x 32, programmatic detector): GenEval's templates, rules and "
               f"aggregation, not GenEval's classes or detector — never compare with published GenEval scores."]
        note = self.teacher_quality_note()
        if note:
            out.append(note)
        return out

    def data_fingerprint(self) -> dict[str, Any]:
        import hashlib
        import json

        blob = json.dumps(self._eval_prompts, sort_keys=True).encode()
        if self.tier == "full":
            return {"source": f"prompts {self.prompt_path()}; distillation pairs from COCO root {self.params.coco_root}",
                    "train": {"n": len(self._train), "sha256": self._train.fingerprint},
                    "eval": {"prompts": {"n": len(self._eval_prompts), "sha256": hashlib.sha256(blob).hexdigest(),
                                         "images_per_prompt": IMAGES_PER_PROMPT}}}
        return {"source": "rendered shape scenes (tasks/geneval/render.py) of random GenEval-template prompts",
                "image_size": self.image_size,
                "train": {"n": len(self._train), "sha256": self._train.fingerprint},
                "eval": {"prompts": {"n": len(self._eval_prompts), "sha256": hashlib.sha256(blob).hexdigest(),
                                     "images_per_prompt": IMAGES_PER_PROMPT}}}
