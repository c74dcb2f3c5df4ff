"""ESP-MedSAM — Xu et al., "ESP-MedSAM: Efficient Self-Prompting SAM for Universal
Domain-Generalized Medical Image Segmentation" (arXiv 2407.14153, 2024; renamed "De-LightSAM" in v5, TCSVT 2025).
Official code: xq141839/ESP-MedSAM @ 9c3ade6 (model, SemiTViT encoder, QDMD decoder, eval.py; no training code)
and its successor xq141839/De-LightSAM @ d2260d7, whose ``train.py`` is the only released training code (the
Modality-Controller KD stage). The recipe follows ``docs/research/esp_medsam.md`` (what the code does, what is
unverified [U]); "E:" / "D:" below name files of those two commits.

What is implemented (`_esp_modules`, `_esp_data`):

* **Teacher** = the "foundation model" F_ViT-SAM: ``select_teacher`` takes the pool's first SAM-ViT entry
  (smoke ``sam_vit_smoke``, small ``sam_vit_small``, full the official SAM ViT); a pool without one makes the cell
  skipped (``unsupported``): the medical teacher is a SAM ViT with prefix tokens per ``Block``.
* **Student** = the task's TinyViT `PromptableSAM` made into **SemiTViT** (`ESPStudent`): every TinyViT attention
  block gets the Modality Controller (MC) — a prefix token per head concatenated to keys and values (one tensor,
  ``deep_QKV_embeddings_med``, U(±0.0875)), a prefix-logit bias ``med_attention_biases`` (0), a parallel MLP expert
  ``med_dah`` (x <- x + MLP(x) + med_dah(x)); the shared TinyViT parameters keep their names and weights.
  ``student.modality`` switches the MC (None = off = exactly the plain TinyViT). ``student.esp`` holds the heads:
  **SPPG** (patch head at grid/2; detached sigmoid > 0.5 prompt, nearest x2, ``dense_prompter``, added to the
  embedding) and **QDMD** (``mask_query`` of num_modalities + 1 tokens, SAM's TwoWayTransformer with the task
  decoder's depth/heads/MLP, SAM's upscaling, one hypernetwork MLP shared by tokens 0..5, read-out ``mcls``; no
  IoU head, no sparse prompts, PE from the prompt encoder's ``get_dense_pe``). ``segment_auto(images)`` gives the
  prompt-free (B,1,S,S) logits. Defaults of the released code: 6 modalities, microscopy = index 4 (E:dataloader.py
  maps DSB to 4).
* **MMDKD as three generations** (the cell's steps in thirds, ``fresh_student=False``; a budget under 3 steps
  keeps the first stages only):
  0. *Common knowledge* (stand-in for the MobileSAM initialisation D:train.py loads, itself a decoupled
     distillation of SAM-H): MobileSAM's decoupled distillation, MSE(student embedding, teacher embedding) on the
     task's training images, MC off; the teacher's prompt encoder and mask decoder copied into the student, frozen
     (`mobilesam.copy_decoder`), so the task's box/point evaluation works on the shared backbone.
  1. *Medical teacher* (extra module ``med_teacher``, its own optimiser): a copy of the teacher (``ctx.teacher`` is
     never modified) whose ViT is frozen, with its own prefix K/V token, prefix-logit bias and parallel MLP per
     ``Block`` and its own SPPG + QDMD, all trainable, on generated microscopy scenes with
     L = L_seg + L_SPPG: L_seg = BinaryMaskLoss(0.8) on sigmoid probabilities, batch sums:
     0.8 (1 - Dice_smooth1) + 0.2 · 0.8 (1 - e^-BCE)^2 BCE; L_SPPG = BCE(sigmoid(patch logits), max_pool(GT)) over
     32 px cells (D:train.py: ``max_pool2d(labels, 32, 32)`` at 1024 px; the patch map is grid/2 at any size).
     The student takes no loss in this generation.
  2. *MC KD* (D:train.py exactly): the medical teacher's SPPG, dense prompter and QDMD copied into ``student.esp``,
     frozen; every student parameter frozen except those whose name contains ``med``; BatchNorm layers in eval
     mode (``fix_bn``); loss = MSE(student embedding with the MC on, medical-teacher embedding) on generated
     microscopy scenes.
* **Microscopy data** (`_esp_data.microscopy_batch`): generated nucleus scenes (grey fluorescence, 20-150 blobby
  nuclei of DSB-like size), a pure function of (seed, step, index) so resume is exact, the task's batch size, input
  side and SAM normalisation (``sam_input``). The real DSB image is never trained on.
* **Evaluation** (E:eval.py), in ``finalize_student``: prompt-free binary segmentation of the real DSB-2018 nuclei
  image (union of its 125 masks; the task's resize, logits upscaled to S, cropped, resized to 512², sigmoid > 0.5),
  Dice and IoU with smooth 1, for the medical teacher, the student with the MC and the student without it (the
  released heads on the shared backbone: the ablation); the same on ``heldout_scenes`` generated scenes (a fresh
  stream); the all-foreground / all-background floor; parameter counts of the shared backbone, the MC, the heads. In ``record_info()["nuclei_prompt_free"]``
  and logged at the end of training. **The task's own box/point metrics of this row are computed by the task on
  the student with the MC off** (the shared backbone + the frozen SAM decoder of generation 0); its parameter
  count includes the MC and the ESP heads, its FLOPs/latency are the task's prompted forward (MC off).

Deviations (stated because they change what is trained or measured):

* Generation 0 is a stand-in: the code loads MobileSAM's weights (SA-1B-scale KD from SAM-H); here the same loss
  runs on the task's training images from the pool's ViT for a third of the budget. The medical teacher is a
  copy of that ViT (architecture and recipe of F_ViT-Med are [U]: not in the code); the loss weights 1:1 and the
  BinaryMaskLoss's focal term 0.2 · 0.8 (1 - e^-BCE)^2 BCE are from the author's sibling repositories (NuSegDG
  weights it 20 instead), unverified. Which ViT parts train in stage 1 is [U]: here the controller and heads.
* Optimisers: the task's (AdamW, its lr, cosine schedule, clipping) for every generation; D:train.py uses Adam
  lr 5e-4, ExponentialLR 0.98 per epoch, batch 4, 200 epochs and keeps the best epoch by validation MSE.
* One modality (microscopy, index 4): the official models hold one MC per checkpoint too, but were trained on six
  modalities; here the other query tokens take part in attention and are never read out (as token 6 in the code).
* The QDMD runs batched rather than per sample (E:model.py loops over the batch; same function). The SPPG's
  ``detach`` is kept, though the hard threshold alone already stops L_seg's gradient (as in the code).
* Prefix tokens are the first key/value column (the column's position in E:student_encoder.py is not pinned by
  the research note); the medical teacher's relative-position terms stay on the image-token columns.
* Data: the official inputs are pre-resized 1024² files normalised with SAM's mean as std (a bug, E:dataloader.py)
  and the flip reaches only the mask; here the task's frame and SAM's mean/std, no augmentation.
* The medical teacher's passes in stage 2 are counted as teacher forward passes; its stage-1 training (forward +
  backward) is not in the estimated training FLOPs. After training, the shared backbone is marked trainable
  again (so the efficiency probe's label-loss backward has parameters to reach).

At the smoke tier (64 px, a 4 x 4 embedding) the DSB nuclei shrink to 1-3.5 px and the patch map is 2 x 2: its
numbers only show that the pipeline runs.

Cannot be reproduced offline: the six modalities and 12 datasets, domain generalisation across centres (e.g.
DSB-2018 -> TNBC), every paper number (none could be read), the per-modality checkpoints, SA-1B common KD at scale,
the MobileSAM weights, a medical teacher trained on real medical data, and the unreleased supervised-stage recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from bench import BenchError
from bench.api import Generation, Method, Params, split_steps
from bench.methods.segmentation.mobilesam import check_embeddings, copy_decoder, embedding_mse
from bench.methods.segmentation.slimsam import is_vit_candidate, vit_pool

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task, TeacherCandidate

STAGES = ("common knowledge KD (MobileSAM stand-in)", "medical teacher (L_seg + L_SPPG)",
          "modality controller KD (MSE, med params only)")
_SEED_HEADS, _SEED_TEACHER = 91_193, 91_199  # separate init streams for the student's and the teacher's heads


def _seed(seed: int, tag: int) -> int:
    return (1_000_003 * int(seed) + tag) % 2**63


def set_student_flags(student: nn.Module, mode: str) -> None:
    """``shared``: the shared TinyViT trains (generation 0); ``med``: only the Modality Controller (generations
    1-2). The prompt encoder, mask decoder and ESP heads never train in the student."""
    from bench.methods.segmentation._esp_modules import is_controller

    for p in student.parameters():
        p.requires_grad_(False)
    for name, p in student.image_encoder.named_parameters():
        p.requires_grad_(is_controller(name) == (mode == "med"))


def fix_bn(model: nn.Module) -> None:
    """D:train.py ``fix_bn``: every BatchNorm layer in eval mode (running statistics frozen)."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class ESPMedSAM(Method):
    """Xu et al. 2024 (ESP-MedSAM / De-LightSAM): SemiTViT student with a Modality Controller, self-patch prompts
    and a query-decoupled decoder; MMDKD = common KD, a medical teacher, MC-only embedding KD."""

    name = "esp_medsam"
    version = "1"
    domains = frozenset({"segmentation"})

    class Params(Params):
        # E:model.py: mask_query = nn.Embedding(7, 256) -> 6 modalities (+ 1 token never read out).
        num_modalities: int = Field(6, ge=1, le=64, description="modalities = QDMD query tokens read out")
        # E:dataloader.py maps the DSB-2018 files to mcls 4.
        modality: int = Field(4, ge=0, description="index of the trained modality (microscopy) = QDMD read-out")
        # D:train.py (commented out): BinaryMaskLoss(0.8).
        mask_weight: float = Field(0.8, ge=0, le=1, description="w of BinaryMaskLoss: w·dice + (1-w)·focal")
        # [U]: the figure names L_seg and L_SPPG; no weights are released.
        sppg_weight: float = Field(1.0, ge=0, description="weight of L_SPPG next to L_seg (stage 1)")
        # E:eval.py: sigmoid > 0.5.
        threshold: float = Field(0.5, gt=0, lt=1, description="probability threshold of the prompt-free masks")
        evaluate_nuclei: bool = Field(True, description="score prompt-free Dice/IoU on the real DSB nuclei image "
                                                        "after training (record_info)")
        # Not in the paper: a sanity check of the in-domain fit next to the real image's numbers.
        heldout_scenes: int = Field(8, ge=0, le=256, description="generated held-out scenes scored the same way")

        @model_validator(mode="after")
        def _modality_in_range(self):
            # Checked when the suite resolves, before any cell runs.
            if self.modality >= self.num_modalities:
                raise ValueError(f"modality {self.modality} must be < num_modalities {self.num_modalities} "
                                 f"(valid: 0..{self.num_modalities - 1})")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}
        self.med_teacher: nn.Module | None = None
        self.n_stages = 3
        self.heads_copied = False
        self._last: dict[str, float] = {}

    # --- which cells, which teacher -------------------------------------------------------------
    def unsupported(self, task: Task) -> str | None:
        pool, vits = vit_pool(task)
        if vits:
            return None
        return (f"esp_medsam's foundation and medical teachers are SAM ViTs (prefix K/V tokens per ViT block) and task "
                f"{task.name}'s teacher pool {[c.name for c in pool]} offers no ViT entry")

    def select_teacher(self, pool: list[TeacherCandidate], student_params: int) -> str | None:
        vits = [c for c in pool if is_vit_candidate(c)]
        if not vits:
            return None
        self.info["teacher"] = {"chosen": vits[0].name, "pool": [c.name for c in pool],
                                "rule": "the pool's first SAM-ViT entry (F_ViT-SAM; the medical teacher is a copy)"}
        return vits[0].name

    def generations(self, total_steps: int) -> list[Generation]:
        steps = split_steps(total_steps, 3)
        self.n_stages = len(steps)
        self.info["stages"] = [{"name": STAGES[i], "steps": s} for i, s in enumerate(steps)]
        return [Generation(s, fresh_student=False, name=STAGES[i]) for i, s in enumerate(steps)]

    # --- models --------------------------------------------------------------------------------
    def _heads(self, cfg: Any, seed: int) -> nn.Module:
        import torch

        from bench.methods.segmentation._esp_modules import ESPHeads

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ESPHeads(cfg.embed_dim, depth=cfg.decoder_depth, heads=cfg.decoder_heads,
                            mlp_dim=cfg.decoder_mlp_dim, num_modalities=self.params.num_modalities,
                            mcls=self.params.modality)

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        import torch

        from bench.methods.segmentation._esp_modules import ESPStudent

        if teacher is None:
            raise BenchError("esp_medsam needs the task's SAM-ViT teacher (the cell has none)")
        c, h, w = check_embeddings(teacher, student, self.name)
        if h % 2 or w % 2:
            raise BenchError(f"esp_medsam: the embedding grid {h}x{w} must be even (the SPPG patch map is half of it)")
        from segment_anything.modeling import ImageEncoderViT

        if not isinstance(getattr(teacher, "image_encoder", None), ImageEncoderViT):
            raise BenchError(f"esp_medsam: the teacher's encoder is {type(teacher.image_encoder).__name__}, not "
                             f"segment_anything's ImageEncoderViT; pick a 'vit' entry of the task's teacher pool")
        copy_decoder(teacher, student, trainable=False, method=self.name)
        heads = self._heads(student.config, _seed(ctx.seed, _SEED_HEADS))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(ctx.seed, _SEED_HEADS + 1))
            model = ESPStudent(student, heads, controller=self.params.modality)
        set_student_flags(model, "shared")
        self.info["architecture"] = {"embedding": [c, h, w], "patch_map": [h // 2, w // 2],
                                     "controller_blocks": model.controller_blocks,
                                     "decoder": "teacher's prompt encoder + mask decoder, frozen (generation 0)"}
        return model

    def create_modules(self, ctx: StepContext) -> None:
        import torch

        from bench.methods.segmentation._esp_modules import MedicalTeacher

        heads = self._heads(ctx.student.config, _seed(ctx.seed, _SEED_TEACHER))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(ctx.seed, _SEED_TEACHER + 1))
            self.med_teacher = MedicalTeacher(ctx.teacher, heads).to(ctx.device)  # a copy; ctx.teacher untouched

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"med_teacher": self.med_teacher} if self.med_teacher is not None else {}

    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        # The student's requires_grad flags travel with it (they are pickled in checkpoints), and the harness
        # builds a generation's optimisers after the previous generation's last on_step_end: no flags to restore.
        if index == 2:
            self._copy_heads(ctx.student)

    def _copy_heads(self, student: nn.Module) -> None:
        """D:train.py: the student's SPPG, dense prompter and QDMD are the medical teacher's, frozen."""
        student.esp.load_state_dict(self.med_teacher.esp.state_dict(), strict=True)
        for p in student.esp.parameters():
            p.requires_grad_(False)
        self.heads_copied = True

    # --- losses --------------------------------------------------------------------------------
    def _microscopy(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        from bench.methods.segmentation._esp_data import microscopy_batch
        from bench.train import to_device

        n = int(batch["image"].shape[0])
        return to_device(microscopy_batch(ctx.seed, ctx.step, n, int(ctx.student.img_size)), ctx.device)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        from bench.methods.segmentation._esp_modules import binary_mask_loss, sppg_loss

        student = ctx.student
        if ctx.generation == 0:  # common knowledge: decoupled embedding KD, MC off
            student.modality = None
            images = batch["image"]
            target = ctx.run_teacher(lambda t: t.embed(images), n_examples=int(images.shape[0]))
            loss = embedding_mse(student.embed(images), target)
            self._last = {"common_kd_mse": float(loss.detach())}
            return {"student": loss}
        data = self._microscopy(batch, ctx)
        images, mask = data["image"], data["mask"]
        if ctx.generation == 1:  # the medical teacher learns microscopy: L_seg + L_SPPG
            logits, patch, _ = self.med_teacher.segment(images)
            seg = binary_mask_loss(torch.sigmoid(logits.float()), mask, self.params.mask_weight)
            sppg = sppg_loss(patch, mask)
            self._last = {"seg_loss": float(seg.detach()), "sppg_loss": float(sppg.detach())}
            return {"med_teacher": seg + self.params.sppg_weight * sppg}
        if not self.heads_copied:
            self._copy_heads(student)
        student.modality = self.params.modality
        fix_bn(student)
        target = ctx.run_teacher(lambda _t: self.med_teacher.embed(images), n_examples=int(images.shape[0]))
        loss = embedding_mse(student.embed(images), target)
        self._last = {"mc_kd_mse": float(loss.detach())}
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        # The next generation's optimisers are built from the flags at its first step: switch at the last step.
        if ctx.generation + 1 < self.n_stages and ctx.generation_step + 1 == ctx.generation_steps:
            set_student_flags(ctx.student, "med")
        return dict(self._last)

    # --- after training ------------------------------------------------------------------------
    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench import progress

        if self.med_teacher is not None and not self.heads_copied:
            self._copy_heads(student)
            self.info["heads"] = "copied from the medical teacher after training (the budget had no MC-KD stage)"
        if self.params.evaluate_nuclei and self.med_teacher is not None:
            self.info["nuclei_prompt_free"] = self._evaluate(student, ctx)
            ev = self.info["nuclei_prompt_free"]
            if "models" in ev:
                progress.log("esp_medsam, DSB nuclei prompt-free Dice/IoU: " + "; ".join(
                    f"{k} {v['dice']:.3f}/{v['iou']:.3f}" for k, v in ev["models"].items()))
        student.modality = None  # the task evaluates the shared backbone with its prompted SAM decoder
        set_student_flags(student, "shared")  # for the efficiency probe's label-loss backward
        return student

    def _evaluate(self, student: nn.Module, ctx: StepContext) -> dict[str, Any]:
        import numpy as np
        import torch

        from bench.methods.segmentation import _esp_data as ed
        from bench.methods.segmentation._esp_modules import is_controller

        s, thr, mt = int(student.img_size), self.params.threshold, self.med_teacher
        was = mt.training
        mt.eval()
        student.eval()
        n_enc = [(is_controller(n), p.numel()) for n, p in student.image_encoder.named_parameters()]
        out: dict[str, Any] = {
            "protocol": "E:eval.py: no prompts; logits upscaled to S, cropped to the resized image, resized to the "
                        "original size, sigmoid > threshold; Dice/IoU with smooth 1 against the union mask",
            "threshold": thr, "modality_index": self.params.modality,
            "params": {"shared_backbone": sum(n for c, n in n_enc if not c),
                       "modality_controller": sum(n for c, n in n_enc if c),
                       "esp_heads": sum(p.numel() for p in student.esp.parameters()),
                       "sam_prompt_decoder": sum(p.numel() for m in (student.prompt_encoder, student.mask_decoder)
                                                 for p in m.parameters()),
                       "medical_teacher": sum(p.numel() for p in mt.parameters()),
                       "medical_teacher_trained": sum(p.numel() for p in mt.parameters() if p.requires_grad)}}

        def run(model: Any, modality: Any = "keep"):
            def f(x):
                if modality != "keep":
                    model.modality = modality
                return model.segment_auto(x.to(ctx.device))
            return f

        models = {"medical_teacher": run(mt), "student_with_controller": run(student, self.params.modality),
                  "student_without_controller": run(student, None)}
        try:
            with torch.no_grad():
                try:
                    x, gt, hw, n = ed.nuclei_target(s)
                    out["image"] = {"name": "stardist img2d.tif (DSB-2018)", "instances": n, "size": list(hw)}
                    out["models"] = {k: ed.score(f, x, gt, hw, s, thr) for k, f in models.items()}
                    # the trivial predictions (every pixel nucleus / background), to read the numbers against
                    out["floor"] = {}
                    for k, fill in (("all_foreground", True), ("all_background", False)):
                        d, i = ed.dice_iou(np.full(gt.shape, fill), gt)
                        out["floor"][k] = {"dice": round(d, 6), "iou": round(i, 6)}
                except BenchError as exc:
                    out["skipped"] = str(exc)
                if self.params.heldout_scenes:
                    data = ed.microscopy_batch(ctx.seed, 0, self.params.heldout_scenes, s, stream=1)
                    held = {}
                    for k, f in models.items():
                        scores = [ed.score(f, data["image"][i:i + 1], data["mask"][i, 0].numpy() > 0.5, (s, s), s, thr)
                                  for i in range(self.params.heldout_scenes)]
                        held[k] = {m: round(float(np.mean([d[m] for d in scores])), 6) for m in ("dice", "iou")}
                    out["generated_heldout"] = {"scenes": self.params.heldout_scenes, "models": held,
                                                "note": "mean over scenes of a stream never trained on"}
        finally:
            student.modality = None
            mt.train(was)
        return out

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info), "heads_copied": self.heads_copied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = {**self.info, **state["info"]}
        self.heads_copied = bool(state["heads_copied"])

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "num_modalities": p.num_modalities, "modality": p.modality,
                "losses": {"stage0": "MSE(student emb, teacher emb), MC off",
                           "stage1": f"BinaryMaskLoss({p.mask_weight}) + {p.sppg_weight}·BCE(patch, maxpool 32 px)",
                           "stage2": "MSE(student emb with MC, medical-teacher emb), med params only, BN eval"}}
