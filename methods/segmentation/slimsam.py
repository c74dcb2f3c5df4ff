"""SlimSAM — Chen, Fang, Ma & Wang, "SlimSAM: 0.1% Data Makes Segment Anything Slim" (NeurIPS 2024, arXiv
2312.05284). Official code read: czg1225/SlimSAM @ b612c1b (``prune_distill_step1.py``,
``prune_distill_step2.py``, ``prune_funcs.py``, the bundled ``torch_pruning``, ``segment_anything_kd``).

What is implemented — alternate slimming of the teacher's own image encoder, in two generations:

* **Base = teacher.** SlimSAM prunes SAM-B and distils from SAM-B: the student is a copy of the teacher
  (``init_student``); its prompt encoder and mask decoder are kept frozen, only ``image_encoder`` is pruned and
  trained (the code optimises ``model.image_encoder.parameters()`` only). The teacher must have
  segment_anything's ``ImageEncoderViT``: ``select_teacher`` takes the pool's ViT-B entry, else its first
  entry named "...vit..." (not TinyViT); a pool without one makes the cell skipped (``unsupported``), e.g. the
  small tier's EfficientNet-Lite0 teacher.
* **Disturbed Taylor importance** (`_vit_pruning.disturbed_taylor_backward`): gradients of
  MSE(E(x), E_ref(x) + N(0, sigma^2)), sigma = 0.01 (``torch.normal(mean=0, std=0.01)``), accumulated over
  ``grad_images`` images; score = sum |w dL/dw| per channel, group mean. E_ref is the unpruned model (SAM-B in
  step 1, the step-1 model in step 2), equal to the student at that moment, so without the noise the
  gradient would be 0.
* **Step 1, embedding pruning + bottleneck aligning** (generation 0): local pruning of the embedding width
  by ``ratio`` (``--norm_type mean``, ``round_to = num_heads``), then distillation with
  ``(1 - a) MSE(emb) + a [MSE(qkv of window blocks) + MSE(qkv of global blocks) + MSE(MLP hidden)]``,
  a = 0.5, for the first 10 of 20 epochs, then ``MSE(emb)``; the qkv outputs and MLP hidden keep the
  teacher's width in this step, so they compare element-wise with the teacher's.
* **Step 2, bottleneck pruning + embedding aligning** (generation 1): the qkv channels (positions of the
  head dimension, the same in every head: SlimSAM keeps all heads) and then the MLP hidden units, each
  ranked globally over the blocks with the ``gaussian`` normaliser (``--global_way True``); then
  ``(1 - alpha) MSE(emb, SAM) + alpha [MSE(block features, step-1 model) + MSE(emb, step-1 model)]`` with
  ``alpha = (11 - epoch - 1) / 11`` for epochs < 11, else 0. Block features: the patch embedding and,
  per block, the residual after attention and the block output (the code's ``block_emb``).
* Adam, lr 1e-4 (``lr = 1e-4``, ``torch.optim.Adam``): ``optim_overrides`` (AdamW with weight decay 0 is Adam).

Mappings (the harness owns the budget):

* The cell's steps split ``step1_fraction`` : rest between the steps (0.5: both scripts default to
  ``--epochs 20``). Within a step of S harness steps, harness step k is in virtual epoch
  ``e = floor(k * epochs / S)`` of ``epochs`` = 20; the code's epoch rules are applied to e: step 1's
  feature terms while e < ``feature_epochs`` = 10 (the first half of the step), step 2's alpha from e.
* ``grad_images`` defaults to 10 % of the task's training images (the code: ``--gradsize 1000`` of
  ``--trainsize 10000``), at least one batch, at most 1000; the images are the first of
  ``ctx.calibration_batches`` (a fixed order; the code: the first 1000 files, unshuffled).
* Harness wiring: pruning happens in ``init_student``, which the harness calls before it builds a
  generation's optimisers (at the cell's start, and at a generation with ``fresh_student=True``), so the
  optimisers hold the pruned parameters. Step 2 is therefore declared ``fresh_student=True``: the harness
  freezes the step-1 student as ``ctx.previous`` (it is the step-2 reference and is checkpointed with the
  cell) and ``init_student`` returns a pruned *copy of it* instead of the task's fresh student; the
  training continues from step 1, nothing is re-initialised. With a one-step budget both prunings happen at
  the start and the step trains on MSE(emb) alone.

Decisions and deviations:

* The code's step-1 loss compares the global blocks' qkv of the student *with itself*
  (``loss_fn(student_qkv_emb2, student_qkv_emb2)``), a term that is identically 0, while the teacher's
  ``teacher_qkv_emb2`` is computed and never used. We read it as a slip for the teacher term, as bottleneck
  aligning is described (align the bottleneck features with the teacher's): ``align_global_qkv=True``
  compares them with the teacher's; ``False`` reproduces the code's loss exactly. (Only the paper's abstract
  and the code were available offline: this follows the code's evident intent, not a checked equation.)
* The code re-creates the relative-position tables as zeros (and ``scale = new_head_dim ** -0.5``) after each
  pruning (see `_vit_pruning`); here they keep their kept columns and the scale, so pruning starts from the
  exact function of the kept channels. ``reset_rel_pos=True`` reproduces the code.
* No SA-1B: the task's training images (10k SA-1B images in the paper); no validation-based
  ``ReduceLROnPlateau`` (factor 0.5, patience 3 / 4) or best-epoch checkpoint selection: the harness's
  constant lr and last step; batch 1 x 4 accumulation there, the task's batch size here.
* If a kept count would be 0 at a tiny width, ``round_to`` channels are kept (the code then prunes nothing).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from bench import BenchError
from bench.api import Generation, Method, Params, TeacherCandidate
from bench.methods.segmentation.mobilesam import embedding_mse

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task

FEATURES_STEP1 = {"qkv_window", "qkv_global", "mid"}


def is_vit_candidate(candidate: TeacherCandidate) -> bool:
    """A pool entry with a plain ViT encoder: its name contains "vit" (TinyViT, a hierarchical encoder with
    no single embedding width, does not count)."""
    name = candidate.name.lower().replace("tinyvit", "").replace("tiny_vit", "").replace("tiny-vit", "")
    return "vit" in name


def vit_pool(task: Task) -> tuple[list[TeacherCandidate], list[TeacherCandidate]]:
    """(the task's teacher pool, its plain-ViT entries); a task without a pool gives two empty lists."""
    try:
        pool = task.teacher_pool()
    except NotImplementedError:
        pool = []
    return pool, [c for c in pool if is_vit_candidate(c)]


def virtual_epoch(step: int, steps: int, epochs: int) -> int:
    """Harness step ``step`` of ``steps`` mapped onto ``epochs`` equal epochs: floor(step * epochs / steps)."""
    return min(epochs - 1, step * epochs // max(1, steps))


def step2_alpha(epoch: int, alpha_epochs: int) -> float:
    """prune_distill_step2.py: ``a_weight = (11 - epoch - 1) / 11`` for epoch < 11, else 0."""
    return (alpha_epochs - epoch - 1) / alpha_epochs if epoch < alpha_epochs else 0.0


class SlimSAM(Method):
    """Chen et al. 2024: prune the teacher's ViT encoder (embedding, then qkv/MLP bottleneck) by disturbed Taylor importance, distilling after each step."""

    name = "slimsam"
    version = "1"
    domains = frozenset({"segmentation"})
    # prune_distill_step1/2.py: torch.optim.Adam(image_encoder.parameters(), lr=1e-4), no weight decay, no
    # clipping; their ReduceLROnPlateau on validation mIoU has no harness counterpart (constant here).
    optim_overrides: ClassVar[dict[str, Any]] = {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0,
                                                 "betas": (0.9, 0.999), "eps": 1e-8, "schedule": "constant",
                                                 "warmup_ratio": 0.0, "grad_clip": None}

    class Params(Params):
        # --prune_ratio (default 0.5 = SlimSAM-50; the paper's SlimSAM-77 uses 0.77), the same in both steps.
        ratio: float = Field(0.5, gt=0, lt=1, description="pruning ratio of each structure")
        # --gradsize 1000 of --trainsize 10000: None = 10 % of the task's training images (<= 1000).
        grad_images: int | None = Field(None, ge=1, description="images for the importance gradients")
        # torch.normal(mean=0, std=0.01, ...) added to the reference embedding.
        noise_std: float = Field(0.01, ge=0, description="sigma of the disturbance")
        # --epochs 20 in both scripts: the virtual epochs a step's harness steps are mapped onto.
        epochs: int = Field(20, ge=1, description="epochs per step the schedules are written in")
        step1_fraction: float = Field(0.5, gt=0, lt=1, description="share of the steps for step 1")
        # step 1: `if epoch < 10` the feature terms, `a_weight = 0.5`.
        feature_epochs: int = Field(10, ge=0, description="step-1 epochs with the bottleneck feature terms")
        feature_weight: float = Field(0.5, ge=0, le=1, description="a: weight of the step-1 feature terms")
        # step 2: `a_weight = (11 - epoch - 1) / 11` for epoch < 11.
        alpha_epochs: int = Field(11, ge=1, description="step-2 epochs over which alpha decays to 0")
        align_global_qkv: bool = Field(True, description="paper: align the global blocks' qkv too (the code's "
                                                         "term is identically 0)")
        # Torch-Pruning's channel_groups reach the embedding group (see _vit_pruning): "heads" as the code.
        embed_groups: Literal["heads", "none"] = Field("heads", description="embedding kept in num_heads "
                                                                            "chunks with the same positions")
        # --global_way True; "local" = the released "uniform" models (prune_sam_step2_local).
        step2_ranking: Literal["global", "local"] = Field("global", description="step 2: rank heads' dims and "
                                                                               "MLP units across blocks (global)")
        # --norm_type gaussian (step 2; step 1's "mean" changes no local ranking).
        step2_normaliser: Literal["gaussian", "mean", "none"] = Field("gaussian", description="step 2: "
                                                                      "importance normaliser before ranking")
        reset_rel_pos: bool = Field(False, description="re-zero the rel-pos tables after pruning, as the code")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}
        self.single = False
        self._last: dict[str, float] = {}
        self.previous_passes = 0

    # --- which cells ---------------------------------------------------------------------------------
    def unsupported(self, task: Task) -> str | None:
        pool, vits = vit_pool(task)
        if vits:
            return None
        return (f"slimsam prunes a plain ViT image encoder (segment_anything ImageEncoderViT; SAM-B in the paper) "
                f"and task {task.name}'s teacher pool {[c.name for c in pool]} offers none (its encoders, e.g. "
                f"EfficientNet-Lite0 or TinyViT, have no embedding width / heads to prune this way)")

    def select_teacher(self, pool: list[TeacherCandidate], student_params: int) -> str | None:
        vits = [c for c in pool if is_vit_candidate(c)]
        if not vits:
            return None
        # The paper prunes and distils from SAM-B: a ViT-B entry first, else the first ViT of the pool.
        base = [c for c in vits if any(t in c.name.lower() for t in ("vit_b", "vit-b", "vitb"))]
        chosen = (base or vits)[0]
        self.info["teacher"] = {"chosen": chosen.name, "pool": [c.name for c in pool],
                                "rule": "the pool's ViT-B entry, else its first entry whose name contains 'vit' "
                                        "(SlimSAM prunes the teacher's own encoder and distils from it; SAM-B)"}
        return chosen.name

    def generations(self, total_steps: int) -> list[Generation]:
        self.single = total_steps < 2
        if self.single:
            return [Generation(total_steps, fresh_student=False, name="steps 1 and 2 pruned at once (1-step budget)")]
        s1 = min(total_steps - 1, max(1, round(self.params.step1_fraction * total_steps)))
        self.info["steps"] = {"step1": s1, "step2": total_steps - s1}
        return [Generation(s1, fresh_student=False, name="step 1: embedding pruning + bottleneck aligning"),
                Generation(total_steps - s1, fresh_student=True,
                           name="step 2: bottleneck pruning + embedding aligning (continues the step-1 student)")]

    # --- pruning ---------------------------------------------------------------------------------------
    def _grad_images(self, ctx: StepContext) -> list[torch.Tensor]:
        n = self.params.grad_images
        if n is None:
            n = min(1000, max(1, round(0.1 * len(ctx.task.train_data()))))
        first = ctx.calibration_batches(1)
        bs = int(first[0]["image"].shape[0])
        batches = ctx.calibration_batches(math.ceil(n / bs))
        images, left = [], n
        for b in batches:
            if left <= 0:
                break
            images.append(b["image"][:left])
            left -= int(images[-1].shape[0])
        return images

    def _importance(self, enc: nn.Module, ctx: StepContext, tag: int) -> int:
        from bench.methods.segmentation import _vit_pruning as vp

        for p in enc.parameters():
            p.requires_grad_(True)
        return vp.disturbed_taylor_backward(enc, self._grad_images(ctx), self.params.noise_std,
                                            seed=1_000_003 * int(ctx.seed) + tag)

    def _step1(self, enc: nn.Module, ctx: StepContext) -> None:
        from bench.methods.segmentation import _vit_pruning as vp

        d0 = vp.encoder_dims(enc)
        n = self._importance(enc, ctx, tag=1)
        heads = enc.blocks[0].attn.num_heads
        groups = heads if self.params.embed_groups == "heads" else 1
        if d0["embed"] % groups:
            groups = 1
        keep = vp.prune_embedding_step(enc, self.params.ratio, heads, groups)
        if self.params.reset_rel_pos:
            vp.reset_rel_pos_(enc)
        d1 = vp.encoder_dims(enc)
        self.info["step1_pruning"] = {"grad_images": n, "embed_before": d0["embed"], "embed_after": d1["embed"],
                                      "embed_groups": groups, "round_to": heads, "kept_embed": keep.tolist()}
        self.info["params"] = {"teacher_encoder": d0["params"], "after_step1": d1["params"]}

    def _step2(self, enc: nn.Module, ctx: StepContext) -> None:
        from bench.methods.segmentation import _vit_pruning as vp

        d1 = vp.encoder_dims(enc)
        n = self._importance(enc, ctx, tag=2)
        kept = vp.prune_bottleneck_step(enc, self.params.ratio, enc.blocks[0].attn.num_heads,
                                        self.params.step2_ranking == "global", self.params.step2_normaliser)
        if self.params.reset_rel_pos:
            vp.reset_rel_pos_(enc)
        d2 = vp.encoder_dims(enc)
        self.info["step2_pruning"] = {
            "grad_images": n, "ranking": self.params.step2_ranking, "normaliser": self.params.step2_normaliser,
            "head_channels_before": [b["head_channels"] for b in d1["blocks"]],
            "head_channels_after": [b["head_channels"] for b in d2["blocks"]],
            "heads": [b["heads"] for b in d2["blocks"]],
            "mlp_before": [b["mlp"] for b in d1["blocks"]], "mlp_after": [b["mlp"] for b in d2["blocks"]],
            "kept_head_positions": [k.tolist() for k in kept["qkv"]]}
        self.info.setdefault("params", {})["after_step2"] = d2["params"]
        if "teacher_encoder" in self.info["params"]:
            self.info["params"]["kept_fraction"] = d2["params"] / self.info["params"]["teacher_encoder"]

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.methods.segmentation import _vit_pruning as vp

        if ctx.previous is None:  # the cell's start: a copy of the teacher, embedding pruned (step 1)
            if teacher is None or not vp.is_vit_encoder(getattr(teacher, "image_encoder", None)):
                kind = type(getattr(teacher, "image_encoder", teacher)).__name__
                raise BenchError(f"slimsam: the teacher's image encoder is {kind}, not segment_anything's "
                                 f"ImageEncoderViT; slimsam prunes a ViT teacher (pick a 'vit' entry of the "
                                 f"task's teacher pool)")
            model = copy.deepcopy(teacher)
            source = "step1"
        else:  # step 2: the harness froze the step-1 student as ctx.previous; continue from a copy of it
            model = copy.deepcopy(ctx.previous)
            source = "step2"
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        enc = model.image_encoder
        if source == "step1":
            self._step1(enc, ctx)
            if self.single:
                self._step2(enc, ctx)
        else:
            self._step2(enc, ctx)
        for p in enc.parameters():
            p.requires_grad_(True)
        self.info["trained"] = "image_encoder only; prompt_encoder and mask_decoder copied from the teacher, frozen"
        return model

    # --- losses ----------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        from bench.methods.segmentation import _vit_pruning as vp

        x = batch["image"]
        b = int(x.shape[0])
        p = self.params
        epoch = virtual_epoch(ctx.generation_step, ctx.generation_steps, p.epochs)
        student = ctx.student
        if self.single:
            s_emb = student.embed(x)
            loss = embedding_mse(s_emb, ctx.run_teacher(lambda t: t.embed(x), n_examples=b))
            self._last = {"emb_mse": float(loss.detach())}
            return {"student": loss}
        if ctx.generation == 0:  # step 1: bottleneck aligning
            kinds = set(FEATURES_STEP1) if epoch < p.feature_epochs else set()
            if not p.align_global_qkv:
                kinds.discard("qkv_global")
            with vp.features(student.image_encoder, kinds) as fs:
                s_emb = student.embed(x)

            def run(t: nn.Module) -> tuple[torch.Tensor, dict[str, list]]:
                with vp.features(t.image_encoder, kinds) as ft:
                    emb = t.embed(x)
                return emb, ft

            t_emb, ft = ctx.run_teacher(run, n_examples=b)
            emb_loss = embedding_mse(s_emb, t_emb)
            self._last = {"emb_mse": float(emb_loss.detach()), "epoch": float(epoch)}
            if not kinds:
                return {"student": emb_loss}
            a = p.feature_weight
            loss = (1 - a) * emb_loss
            for k in sorted(kinds):
                if fs[k]:  # an encoder without window (or global) blocks has no such term
                    term = vp.cat_mse(fs[k], ft[k])
                    loss = loss + a * term
                    self._last[f"{k}_mse"] = float(term.detach())
            return {"student": loss}
        # step 2: embedding aligning, teacher (SAM) and the frozen step-1 model
        alpha = step2_alpha(epoch, p.alpha_epochs)
        kinds = {"block"} if alpha > 0 else set()
        with vp.features(student.image_encoder, kinds) as fs:
            s_emb = student.embed(x)
        emb_loss = embedding_mse(s_emb, ctx.run_teacher(lambda t: t.embed(x), n_examples=b))
        loss = (1 - alpha) * emb_loss
        self._last = {"emb_mse": float(emb_loss.detach()), "alpha": alpha, "epoch": float(epoch)}
        if alpha > 0:
            import torch

            prev = ctx.previous
            with torch.no_grad(), vp.features(prev.image_encoder, kinds) as fp:
                p_emb = prev.embed(x)
            self.previous_passes += 1
            block = vp.cat_mse(fs["block"], fp["block"])
            prev_emb = embedding_mse(s_emb, p_emb)
            loss = loss + alpha * (block + prev_emb)
            self._last.update(block_mse=float(block.detach()), step1_emb_mse=float(prev_emb.detach()))
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"info": self.info, "previous_passes": self.previous_passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])
        self.previous_passes = int(state.get("previous_passes", 0))

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "ratio": p.ratio, "noise_std": p.noise_std,
                "step1_model_forward_passes": self.previous_passes,
                "schedule": (f"harness step k of a step's S steps = epoch floor(k*{p.epochs}/S); step 1 feature terms "
                             f"(weight {p.feature_weight}) for epochs < {p.feature_epochs}; step 2 alpha = "
                             f"({p.alpha_epochs}-e-1)/{p.alpha_epochs} for e < {p.alpha_epochs}, else 0")}
