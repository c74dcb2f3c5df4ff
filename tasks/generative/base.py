"""What the two generative tasks (``coco_fid``, ``geneval``) share: data as conditioned images, a teacher
trained by flow matching and cached, same-size students, evaluation by generation, the on-disk store of
teacher noise -> image pairs, and the efficiency probes' inputs.

**Models** are `bench.diffusion.Generator` modules (network + schedule + parameterisation + sampler).
Below the full tier the teacher is a pixel-space `CondUNet` trained by the task with the conditional
flow-matching loss of rectified flow (Liu et al., ICLR 2023; Lipman et al., ICLR 2023):
``x_t = (1 - t) x0 + t eps``, ``t ~ U(0, 1)``, the network regresses the velocity ``eps - x0``, and the
condition is dropped (replaced by the null condition) with probability ``cond_dropout`` = 0.1 so that
classifier-free guidance works (Ho & Salimans 2022 use 0.1-0.2). A flow-matching teacher is what
SlimFlow (rectified flow) and SANA-Sprint (a flow teacher converted to TrigFlow) need; methods written
for epsilon/x0/v teachers get those through the adapter's conversions. Its reference sampler is Euler
(= DDIM under this schedule) over ``teacher_sampler_steps`` uniform steps with guidance ``guidance``.

**Rows.** The ``teacher`` row samples with that reference sampler (its NFE is in the row). The ``student``
row is the teacher's architecture, freshly initialised and trained by the same flow-matching loss on the
same data under the cell's budget, sampled with Euler at the step counts every distilled row is evaluated
at (``nfe``), without guidance (one network call per step, like the distilled students). A method's row
samples with the sampler its student declares (`Generator.sampler`), at its own step count and at every
other count of ``nfe`` its sampler offers.

**Evaluation** generates ``eval_images`` images per step count from fixed noise (seeded by image index,
the same for every row) and the task's fixed list of evaluation conditions, then scores them
(`GenerativeTask.score_images`, per task). Metrics: the task's quality metrics at the row's own step
count (``fid``/``kid``, or GenEval's scores), ``nfe`` and ``steps`` of that sampler, and the primary metric
at every requested count as ``<metric>@<steps>`` (NaN where the row's sampler does not offer it).

**Teacher pairs** (`teacher_pairs`): noise -> image pairs of the reference sampler, built once per
(teacher, sampler, conditions, seed, n) on disk and read by every method and seed that uses them
(`bench.pairs`); the building cell reports the teacher's network evaluations, readers report none.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from bench import BenchError
from bench.api import Metric, OptimConfig, Outputs, Params, Task, TeacherCandidate, TrainConfig
from bench.teachers import TeacherPool

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from bench.diffusion import Generator

#: Optimiser of the flow-matching teacher and of every cell (the harness applies one recipe to all rows).
#: Adam 1e-4..2e-4 with no weight decay is the common diffusion recipe (DDPM 2e-4 on CIFAR-10; EDM Adam
#: 1e-3 at batch 512; SlimFlow 2e-4); tiny CPU-budget models take 1e-3 with warm-up.
TEACHER_OPTIM = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.02, schedule="cosine", grad_clip=1.0,
                            no_decay=("bias", "norm"),
                            source="diffusion recipe (Adam, no weight decay, DDPM/SlimFlow 2e-4) at a CPU "
                                   "budget: 1e-3 with 2% warm-up and cosine decay, clip 1")
DISTILL_OPTIM = OptimConfig(lr=1e-4, weight_decay=0.0, warmup_ratio=0.0, schedule="constant", grad_clip=10.0,
                            no_decay=("bias", "norm"),
                            source="distillation from a trained teacher: constant lr 1e-4 (LCM's diffusers "
                                   "default), no weight decay (SiD, SlimFlow), clip 10 (DMD2)")


class GenerativeParams(Params):
    """Parameters every generative task has (tasks add their own)."""

    nfe: list[int] = Field(default_factory=lambda: [1, 4], min_length=1,
                           description="sampler step counts every row is evaluated at, where its sampler "
                                       "offers them (each >= 1); the first is the label-only student's own")
    eval_images: int | None = Field(None, ge=8, le=100_000, description="images generated per step count "
                                                                        "(default per tier; the same for every row)")
    guidance: float = Field(2.0, ge=1.0, le=20.0, description="classifier-free guidance scale of the teacher's "
                                                              "reference sampler and of the teacher score that "
                                                              "methods distil (1 = none)")
    teacher_sampler_steps: int | None = Field(None, ge=1, le=1000, description="Euler steps of the teacher's "
                                                                               "reference sampler (default per tier)")
    teacher_steps: int | None = Field(None, gt=0, description="training steps of the task-trained teacher "
                                                              "(default per tier)")
    cond_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="probability of the null condition in the "
                                                                 "flow-matching loss (classifier-free guidance "
                                                                 "training, Ho & Salimans 2022)")
    teacher_pairs: int | None = Field(None, ge=16, le=1_000_000, description="noise -> image pairs of the "
                                                                             "teacher kept on disk for methods "
                                                                             "that regress on them (default "
                                                                             "per tier)")

    teacher_folder: str | None = Field(None, description="full tier: a local diffusers text-to-image pipeline "
                                                         "folder (e.g. Stable Diffusion 1.5), the teacher")
    coco_root: str | None = Field(None, description="full tier: a local COCO root (val2014/ for coco_fid's FID; "
                                                    "annotations/captions_train2014.json + train2014/: the "
                                                    "distillation pairs)")

    @field_validator("teacher_folder")
    @classmethod
    def _pipeline_folder(cls, v: str | None) -> str | None:
        if v is not None:
            from .pipeline import check_folder

            check_folder(v)  # an unknown teacher folder stops the run here, before anything is written
        return v

    @field_validator("nfe")
    @classmethod
    def _step_counts(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"every sampler step count must be >= 1 (a sampler needs a network call), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"step counts must be distinct, got {v}")
        return v


class ConditionedImages:
    """Training split: uint8 images [N, H, W, 3] with one condition each (a label, or prompt token ids)."""

    def __init__(self, images: np.ndarray, conds: torch.Tensor, fingerprint: str) -> None:
        self.images = images
        self.conds = conds
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        idx = np.asarray(list(indices), dtype=np.int64)
        x0 = torch.from_numpy(np.ascontiguousarray(self.images[idx])).permute(0, 3, 1, 2).float()
        return {"x0": x0.div_(127.5).sub_(1.0), "cond": self.conds[torch.as_tensor(idx)],
                "index": torch.as_tensor(idx)}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, 3, H, W] -> uint8 [B, H, W, 3] (the rounding every FID tool applies to PNGs)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(dtype=__import__("torch").uint8).permute(0, 2, 3, 1).cpu().numpy()


class GenerativeTask(TeacherPool, Task):
    """Shared machinery of the generative tasks (see the module docstring). Subclasses implement the data
    (`load_train`, `eval_conditions`), the scoring (`quality_metrics`, `score_images`) and the tier sizes
    (`tier_defaults`)."""

    domain = "diffusion"
    Params = GenerativeParams
    aggregate_name = "score"
    aggregate_rule = "the subtask's primary metric"
    #: noise seed of the evaluation images (image i always gets the same noise, in every row)
    EVAL_SEED = 20_240_611

    def __init__(self, params: Params, env) -> None:
        super().__init__(params, env)
        if env.subtask not in self.subtasks:
            raise BenchError(f"unknown subtask {self.name}/{env.subtask}; valid: {', '.join(self.subtasks)}")
        self._teachers: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._pair_stores: dict[Any, Any] = {}

    # --- what subclasses provide ----------------------------------------------------------------------
    def tier_defaults(self) -> dict[str, Any]:
        """Sizes per tier: image_size, channels, student_channels, compact_channels, eval_images,
        teacher_steps, teacher_sampler_steps, steps, batch_size, teacher_pairs."""
        raise NotImplementedError

    def load_train(self) -> tuple[np.ndarray, torch.Tensor, str]:
        """(uint8 images [N, H, W, 3], conditions [N] or [N, L], fingerprint) of the training data."""
        raise NotImplementedError

    def eval_conditions(self, n: int) -> torch.Tensor:
        """The fixed conditions of the ``n`` evaluation images (the same for every row)."""
        raise NotImplementedError

    def net_condition(self) -> dict[str, Any]:
        """CondUNet's conditioning arguments (``num_classes``, or ``vocab_size`` and ``max_len``)."""
        raise NotImplementedError

    def quality_metrics(self) -> list[Metric]:
        """The task's quality metrics; exactly one is primary."""
        raise NotImplementedError

    def score_images(self, images: np.ndarray, conds: torch.Tensor) -> dict[str, float]:
        """Quality of ``images`` (uint8 [N, H, W, 3]) generated for ``conds``."""
        raise NotImplementedError

    # --- sizes ---------------------------------------------------------------------------------------
    @property
    def tier(self) -> str:
        return self.env.tier

    def _d(self, key: str) -> Any:
        own = getattr(self.params, key, None)
        return own if own is not None else self.tier_defaults()[key]

    @property
    def image_size(self) -> int:
        return int(self.tier_defaults()["image_size"])

    @property
    def eval_images(self) -> int:
        return int(self._d("eval_images"))

    # --- metrics -------------------------------------------------------------------------------------
    def metrics(self) -> list[Metric]:
        quality = self.quality_metrics()
        primary = next(m for m in quality if m.primary)
        out = list(quality)
        out.append(Metric("nfe", higher_is_better=False, description="network evaluations per image of the "
                                                                     "row's sampler (a guided step counts 2)",
                          column=True, scale=1.0))
        out.append(Metric("steps", higher_is_better=False, description="sampler steps of the row's own sampler"))
        for n in self.params.nfe:
            out.append(Metric(f"{primary.name}@{n}", higher_is_better=primary.higher_is_better,
                              description=f"{primary.name} at {n} sampler step(s) (NaN: the row's sampler does "
                                          f"not offer {n})", column=True, scale=primary.scale))
        return out

    # --- data ----------------------------------------------------------------------------------------
    @cached_property
    def _train(self) -> ConditionedImages:
        images, conds, fp = self.load_train()
        return ConditionedImages(images, conds, fp)

    def train_data(self) -> ConditionedImages:
        return self._train

    def eval_data(self) -> ConditionedImages:
        return self._train

    def teacher_outputs_cacheable(self) -> bool:
        return False  # a denoiser's output depends on the noise and time drawn at each visit

    # --- models --------------------------------------------------------------------------------------
    def net_config(self, role: str) -> dict[str, Any]:
        d = self.tier_defaults()
        channels = {"teacher": d["channels"], "student": d.get("student_channels", d["channels"]),
                    "compact": d["compact_channels"]}[role]
        return {"size": self.image_size, "channels": list(channels), "layers_per_block": 1,
                "norm_groups": min(8, channels[0]), **self.net_condition()}

    def make_generator(self, net: nn.Module, *, steps: int, guidance: float, description: str) -> Generator:
        from bench.diffusion import Generator, Sampler, Schedule

        if self.tier == "full":
            from .pipeline import schedule_and_prediction

            schedule, prediction = schedule_and_prediction(self.pipeline.scheduler_config)
        else:
            schedule, prediction = Schedule("flow"), "flow"
        return Generator(net, schedule=schedule, prediction=prediction,
                         sampler=Sampler("ode", steps=steps, guidance=guidance), description=description)

    @cached_property
    def pipeline(self):
        """Full tier: the local diffusers text-to-image pipeline named by ``teacher_folder``."""
        from .pipeline import Pipeline

        folder = getattr(self.params, "teacher_folder", None)
        if not folder:
            raise BenchError(f"the {self.name} full tier needs {self.name}.teacher_folder (a local diffusers "
                             f"text-to-image pipeline folder, e.g. Stable Diffusion 1.5)")
        return Pipeline(folder, self.env.device)

    def _build(self, role: str, seed: int, **extra: Any) -> Generator:
        import torch

        from . import nets

        if self.tier == "full":
            if role == "compact" or extra:
                raise BenchError(f"the {self.name} full tier builds students only as the teacher pipeline's UNet; "
                                 f"a narrower or modified student network ({role}, {sorted(extra)}) is not available")
            net = self.pipeline.network(fresh=role != "teacher", seed=seed)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                net = nets.build({**self.net_config(role), **extra})
        if role == "teacher":
            return self.make_generator(net, steps=self._d("teacher_sampler_steps"), guidance=self.params.guidance,
                                       description="flow-matching teacher, Euler reference sampler")
        return self.make_generator(net, steps=self.params.nfe[0], guidance=1.0,
                                   description=f"{role} network, Euler sampler without guidance")

    def student(self, seed: int) -> Generator:
        return self._build("student", seed)

    def compact_student(self, seed: int, **extra: Any) -> Generator:
        """A narrower network than the teacher's (SlimFlow distils into a smaller student)."""
        return self._build("compact", seed, **extra)

    def student_params(self) -> int:
        from . import nets

        return nets.count_params(self.student(0))

    def teacher_pool(self) -> list[TeacherCandidate]:
        return [TeacherCandidate("flow_unet", self._teacher_param_count(), "pixel-space conditional UNet trained "
                                                                          "by the task with flow matching")]

    def _teacher_param_count(self) -> int:
        if "flow_unet" in self._teachers:
            return sum(p.numel() for p in self._teachers["flow_unet"][0].parameters())
        return sum(p.numel() for p in self._build("teacher", 0).parameters())

    def _teacher_specs(self) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(name="flow_unet")]

    def teacher_training(self) -> TrainConfig:
        return TrainConfig(steps=int(self._d("teacher_steps")), batch_size=int(self.tier_defaults()["batch_size"]),
                           eval_batch_size=256, optim=TEACHER_OPTIM)

    def training(self) -> TrainConfig:
        d = self.tier_defaults()
        return TrainConfig(steps=int(d["steps"]), batch_size=int(d["batch_size"]), eval_batch_size=256,
                           optim=DISTILL_OPTIM)

    def _trained_teacher(self, spec: Any) -> tuple[nn.Module, dict[str, Any]]:
        import torch

        from bench.teachers import cached_teacher, checkpoint_identity, identity_key

        if self.tier == "full":
            folder = str(self.pipeline.folder)
            ident = {"pipeline": checkpoint_identity(folder), "scheduler": self.pipeline.scheduler_config}
            model = self._build("teacher", 0)
            return model, {"name": spec.name, "trained_by": "provided", "weights": folder,
                           "cache_key": identity_key(ident), "n_params": sum(p.numel() for p in model.parameters()),
                           "generator": model.describe()}

        cfg = self.teacher_training()
        ident = {"task": self.name, "task_version": self.version, "tier": self.tier, "subtask": self.env.subtask,
                 "net": self.net_config("teacher"), "objective": "flow matching, uniform t",
                 "cond_dropout": self.params.cond_dropout,
                 "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "optim": cfg.optim.__dict__},
                 "data": self._train.fingerprint, "seed": 0}

        def save(model: Generator, folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(model.net.state_dict(), folder / "net.pt")
            (folder / "net.json").write_text(json.dumps(self.net_config("teacher")))

        def load(folder: Path) -> Generator:
            model = self._build("teacher", 0)
            model.net.load_state_dict(torch.load(folder / "net.pt", map_location="cpu", weights_only=True))
            return model

        return cached_teacher(self, name=spec.name, label=f"{self.tier}-{self.env.subtask}-{spec.name}",
                              identity=ident, build=lambda: self._build("teacher", 0), save=save, load=load,
                              description=f"Training teacher {spec.name} on {self.name}/{self.tier}",
                              extra_meta=lambda m: {"generator": m.describe(), "eval_spec": self._eval_spec()})

    def teacher_key(self, teacher: nn.Module) -> str:
        entry = self._teacher_entry(teacher)
        if entry is None:
            raise BenchError(f"{self.name}: teacher pairs need one of this task's own teachers")
        return str(entry[1].get("cache_key") or entry[1].get("path"))

    # --- training-time adapter -----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> Outputs:
        """Generation batches (``noise``) -> sampled images; training batches (``x0``) -> the flow-matching
        prediction at a fresh (t, eps) with condition dropout, and its loss in ``Outputs.loss``."""
        import torch

        if "noise" in batch:
            return Outputs(features=model(batch["noise"], batch["cond"]))
        x0, cond = batch["x0"], batch["cond"]
        t = torch.rand(x0.shape[0], device=x0.device)
        eps = torch.randn_like(x0)
        if self.params.cond_dropout > 0:
            drop = torch.rand(x0.shape[0], device=x0.device) < self.params.cond_dropout
            null = model.net.null_condition(cond)
            cond = torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), null, cond)
        x_t = model.add_noise(x0, eps, t)
        pred = model.predict(x_t, t, cond)
        loss = (pred.float() - model.target(x0, eps, t).float()).pow(2).mean()
        return Outputs(features=pred, loss=loss)

    def label_loss(self, outputs: Outputs, batch: dict) -> torch.Tensor:
        if outputs.loss is None:
            raise BenchError(f"{self.name}: the label loss needs a training batch (x0), not a generation batch")
        return outputs.loss

    # --- evaluation by generation --------------------------------------------------------------------
    def score_protocol(self) -> dict[str, Any]:
        """What the scoring does to generated images beyond the task's defaults (part of the evaluation spec)."""
        return {}

    def _eval_spec(self) -> dict[str, Any]:
        return {"nfe": list(self.params.nfe), "eval_images": self.eval_images, "seed": self.EVAL_SEED,
                "teacher_sampler_steps": self._d("teacher_sampler_steps"), "guidance": self.params.guidance,
                **self.score_protocol()}

    def generate(self, model: Generator, steps: int, n: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """``n`` (default ``eval_images``) uint8 images of ``model`` at ``steps`` steps, from the fixed noise and
        conditions every row gets; returns (images, conditions)."""
        import numpy as np
        import torch

        from bench import progress

        n = n or self.eval_images
        sampler = model.sampler_at(steps)
        device = next(model.parameters()).device
        bs = 250 if self.tier != "full" else 16
        chunks, cond_chunks = [], []
        with progress.bar(f"Sampling {n} images at {steps} step(s)", n) as update, torch.inference_mode():
            for start in range(0, n, bs):
                stop = min(n, start + bs)
                conds = self.eval_conditions_slice(start, stop, n)
                g = torch.Generator().manual_seed(self.EVAL_SEED + start)
                noise = torch.randn(stop - start, *self.sample_shape(), generator=g)
                x = model.sample(noise.to(device), conds.to(device), sampler, generator=g)
                chunks.append(to_uint8(self.decode(x)))
                cond_chunks.append(conds if self.tier != "full" else conds[:, :1, :1])  # full: embeddings are large
                update(stop)
        return np.concatenate(chunks), torch.cat(cond_chunks)

    def eval_conditions_slice(self, start: int, stop: int, n: int) -> torch.Tensor:
        """Conditions of evaluation images ``start:stop`` of ``n`` (the full tier encodes them chunk by chunk)."""
        return self.eval_conditions(n)[start:stop]

    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one sample the generator denoises: pixels below the full tier, VAE latents at it."""
        if self.tier == "full":
            side = self.image_size // self.pipeline.vae_scale
            return (self.pipeline.latent_channels, side, side)
        return (3, self.image_size, self.image_size)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [-1, 1] (the VAE decoder at the full tier)."""
        return self.pipeline.decode(x) if self.tier == "full" else x

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        entry = self._teacher_entry(model)
        if entry is not None and entry[1].get("eval_spec") == self._eval_spec() and entry[1].get("eval_metrics"):
            # The teacher row evaluates the cached teacher: its metrics were computed by this code on this
            # evaluation spec when the teacher was trained (sampling is deterministic), so they are reused.
            return dict(entry[1]["eval_metrics"])
        model.eval()
        primary = next(m for m in self.quality_metrics() if m.primary).name
        own = model.sampler.steps
        out: dict[str, float] = {}
        per_steps: dict[int, dict[str, float]] = {}
        for n_steps in dict.fromkeys([own, *self.params.nfe]):
            if not model.supports_steps(n_steps):
                continue
            images, conds = self.generate(model, n_steps)
            per_steps[n_steps] = self.score_images(images, conds)
        out.update(per_steps[own])
        out["nfe"] = float(model.sampler.nfe)
        out["steps"] = float(own)
        for n_steps in self.params.nfe:
            out[f"{primary}@{n_steps}"] = float(per_steps[n_steps][primary]) if n_steps in per_steps else float("nan")
        return out

    # --- teacher pairs -------------------------------------------------------------------------------
    def teacher_pairs(self, teacher: Generator, n: int | None = None, trajectory: bool = False):
        """The on-disk store of ``n`` noise -> image pairs of ``teacher``'s reference sampler (`bench.pairs`)."""
        from bench.pairs import PairStore

        n = int(n or self._d("teacher_pairs"))
        key = (id(teacher), n, trajectory)
        if key not in self._pair_stores:
            conds = self.pair_conditions(n)
            self._pair_stores[key] = PairStore(
                root=Path(self.env.cache_dir) / self.name / "pairs", teacher=teacher, teacher_key=self.teacher_key(teacher),
                conds=conds, shape=self.sample_shape(), seed=self.EVAL_SEED + 1, trajectory=trajectory,
                data_fingerprint=self._train.fingerprint)
        return self._pair_stores[key]

    def pair_conditions(self, n: int) -> torch.Tensor:
        """Conditions of the teacher pairs: the training data's, cycled in a fixed order."""
        import torch

        g = torch.Generator().manual_seed(self.EVAL_SEED + 2)
        idx = torch.randint(0, len(self._train), (n,), generator=g)
        if hasattr(self._train, "conditions"):  # the full tier encodes captions on demand
            return self._train.conditions(idx.tolist())
        return self._train.conds[idx]

    # --- efficiency probes ---------------------------------------------------------------------------
    def example_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A generation batch: noise for ``batch_size`` images and their conditions (one image = the whole
        sampler, so FLOPs, latency and memory are per image)."""
        import torch

        g = torch.Generator().manual_seed(0)
        return {"noise": torch.randn(batch_size, *self.sample_shape(), generator=g),
                "cond": self.eval_conditions_slice(0, batch_size, max(batch_size, 1))}

    def example_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A training batch (the training-step memory probe back-propagates the flow-matching loss)."""
        reps = -(-batch_size // len(self._train))
        idx = (list(range(len(self._train))) * reps)[:batch_size]
        return self._train.batch(idx)

    def input_description(self) -> str:
        s = self.image_size
        if self.tier == "full":
            c, h, w = self.sample_shape()
            return (f"one {s}x{s} image: {c}x{h}x{w} latent noise + text embedding through the whole sampler "
                    f"(the text encoder and the VAE decoder are not counted)")
        return f"one 3x{s}x{s} image (noise + condition through the whole sampler)"

    # --- provenance ----------------------------------------------------------------------------------
    def teacher_quality_note(self) -> str | None:
        """The teacher's quality at its reference sampler, for the table (None before it exists)."""
        if "flow_unet" not in self._teachers:
            return None
        info = self._teachers["flow_unet"][1]
        m = info.get("eval_metrics") or {}
        primary = next(x for x in self.quality_metrics() if x.primary).name
        if primary not in m or info.get("eval_spec") != self._eval_spec():
            # measured under another evaluation spec when the teacher was cached: the teacher row has its own
            return (f"teacher: {info.get('n_params', 0) / 1e6:.2f}M-parameter flow-matching UNet trained by the task "
                    f"for {info.get('steps')} steps ({info.get('train_wall_s')} s); its quality is the teacher row's")
        return (f"teacher: {info.get('n_params', 0) / 1e6:.2f}M-parameter flow-matching UNet trained by the task "
                f"for {info.get('steps')} steps ({info.get('train_wall_s')} s); {primary} {m[primary]:.4g} at its "
                f"reference sampler ({int(m.get('steps', 0))} Euler steps, guidance {self.params.guidance:g}, "
                f"{int(m.get('nfe', 0))} NFE)")

