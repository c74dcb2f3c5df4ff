"""SNOOPI — Supercharged One-step Diffusion Distillation with Proper Guidance (Viet Nguyen, Anh Nguyen, Trung Dao,
Khoi Nguyen, Cuong Pham, Toan Tran, Anh Tran; VinAI Research / Qualcomm AI Research; arXiv 2412.02687, 2024;
v3 of Sep 2025 retitled "Supercharged One-step Text-to-Image Diffusion Models with Negative Prompts").

Official code: no official SNOOPI code was found (no VinAIResearch/SNOOPI snapshot or index entry). Read instead:
the paper (v3 text: Eq. 4-9, §5.2-5.3, §6.1 implementation details; v1's tables through a review page: Table 2,
ablation of random CFG in the teacher / LoRA teacher, Table 6, the PG-SB hyper-parameters, Table 8, the NASA
scales) and the code of the method it modifies, SwiftBrush (Nguyen & Tran, CVPR 2024): VinAIResearch/SwiftBrush
@ 05f9202 — ``train_swiftbrush.py`` (one-step student, VSD loss, LoRA-teacher loss, optimisers, update order).

What is implemented:

* **Student** (SwiftBrush ``predict_original``): initialised from the teacher (``UNet2DConditionModel.
  from_pretrained`` of the teacher's weights); one step from pure noise z at the last training step 999 of 1000
  (t = 0.999 here), the x0 prediction is the image. The generator set-up (``configure_generator``), and the
  nfe check (``fixed_steps_error``) are DMD2's (`bench.methods.diffusion.dmd2`), reused by import: the same
  one-step consistency sampler at t = 0.999. Image-free: the batch's images are never used, only its conditions.
* **PG-SB, proper-guidance VSD** (SNOOPI Eq. 6 with kappa ~ U(kappa_min, kappa_max) instead of SwiftBrush's
  constant C): every step draws ONE scale kappa ~ U(0.5, 4) (SDv1.5/2.1; PixArt-a: U(0.5, 3); Table 6 and v3
  §6.1, after Flash Diffusion) and guides BOTH the frozen teacher and the LoRA ("fake") teacher at it
  (Eq. 4, eps^kappa = eps(null) + kappa (eps(c) - eps(null)); Table 2: both guided is best). With
  k ~ U{20..980} (SwiftBrush's ``timesteps_range`` [0.02, 0.981] x 1000), t = k / 1000, x_t = alpha_t x + sigma_t
  eps: grad = nan_to_num(sigma_t^2 (eps_teacher^kappa(x_t) - eps_lora^kappa(x_t))) (SwiftBrush's
  ``score_gradient``, w(t) = sigma_t^2), loss = 0.5 mean((x - sg(x - grad))^2) — DMD2's ``dm_loss``, the same
  surrogate (d loss / dx = grad / numel). The eps predictions come from the task's adapter (``x0_eps``) in
  whatever parameterisation the teacher has.
* **LoRA teacher** ("fake" optimiser): trained every step on the detached student samples (SwiftBrush's
  ``loss_lora``): k ~ U{0..999}, t = k / 1000, the whole batch's condition replaced by the null condition with
  probability 0.1 (one draw per batch, as the code's ``random.random() < 0.1``), loss = mean((alpha_t (eps_pred -
  eps))^2). Never guided while trained; guided at kappa only inside the VSD term.
* **Updates**: student and LoRA teacher 1:1 every step (SwiftBrush; SNOOPI Fig. 2 finds DMD2's 5:1 TTUR
  unstable for VSD). The code steps the student, then the LoRA teacher on the samples made before the student's
  update; the harness computes both losses from the same state and steps both: the same update. Gradient-norm
  clip 1.0 (SwiftBrush ``--max_grad_norm`` default) through ``optim_overrides``; Adam(W) betas (0.9, 0.999),
  weight decay 0 (SwiftBrush defaults; the task's distillation optimiser already has them).
* **NASA, Negative-Away Steer Attention** (training-free, NASA-I, Eq. 7-9): in every cross-attention layer,
  Z+ = softmax(Q K+^T / sqrt(d)) V+, Z- = softmax(Q K-^T / sqrt(d)) V- with K-, V- the SAME projections of the
  negative prompt's text features, Z = Z+ - alpha Z-, then the layer's output projection (`nasa_attention`,
  `NASAProcessor`). It is installed on the evaluated student (``finalize_student``) where its network has
  diffusers cross-attention layers and the task can encode a prompt: the full tier's Stable-Diffusion UNet with
  the pipeline's CLIP text encoder. Default negative prompt: the paper's generic quality prompt (v3 §6.2);
  alpha = 0.04 (v1 Table 8, PG-SB + NASA on SDv1.5, the full tier's teacher; v3 §6.1 uses 0.1). The smoke and
  small tiers' `CondUNet`s (``tasks/generative/nets.py``) have NO cross-attention — the class label or the
  prompt tokens are one vector added to the time embedding — so NASA cannot apply there: PG-SB alone is
  trained and evaluated and the record says ``nasa.applied: false`` with the reason. ``nasa_alpha = 0`` turns
  NASA off everywhere.

Deviations:

* Pixel space on the task's small flow-matching UNet instead of SD/PixArt latents; t = k / 1000 on the task's
  continuous schedule stands in for the DDPM step index k, so sigma_t is the task schedule's (flow: t, not SD's
  sqrt(1 - alpha-bar_k)) and the "2%-98.1%" range is of that schedule.
* The LoRA teacher is a full trainable copy of the teacher (as DMD2's fake score), not rank-64 LoRA adapters on
  ``to_q``/``to_v`` (SwiftBrush ``LoraConfig(target_modules=["to_q", "to_v"])``; SNOOPI r = 64, gamma = 128):
  the smoke and small networks have no attention projections to adapt.
* Learning rates, warm-up, batch size and step budget are the harness's, the same for every method of the cell
  (SNOOPI: student 1e-6, LoRA teacher 1e-3, batch 64, 40k-60k iterations; SwiftBrush: 500 warm-up steps).
* SwiftBrush v2's additions that SNOOPI trains with are not implemented: the clamped CLIP loss (weight 0.1,
  margin tau 0.37 — it needs a CLIP model the smoke/small tiers do not have), SBv2's student initialisation
  and its resolution/EMA/weight-merging tricks. PG-SB here is SwiftBrush v1 + random-scale guidance.
* The training prompts are the task's conditions (labels or prompt tokens), not JourneyDB + LAION captions.
* NASA-T (v3 §5.3: negative prompts in the teacher and NASA inside the student during training, alpha ~
  U(0, 1)) is not implemented; NASA is inference-only. With an attention mask, the mask applies to the
  positive branch only (the Stable Diffusion UNets pass none to cross-attention).
* The consistency sampler scales the starting noise by sigma(0.999) = 0.999 at evaluation; training feeds the
  unscaled noise as SwiftBrush does (a 0.1% difference).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from bench.api import Method, Params
from bench.methods.diffusion.dmd2 import (NUM_TRAIN_TIMESTEPS, configure_generator, dm_loss, fixed_steps_error,
                                          generator_steps)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext

#: SNOOPI v3 §6.2: the generic negative prompt of its NASA-I quality results (Table 3)
GENERIC_NEGATIVE_PROMPT = ("worst quality, low quality, ugly, duplicate, out of frame, deformed, blurry, "
                           "bad anatomy, watermark")
NO_CROSS_ATTENTION = ("the task's networks have no cross-attention (the smoke/small CondUNet adds the condition "
                      "to its time embedding), so NASA does not apply; PG-SB alone is evaluated")


# --- PG-SB -------------------------------------------------------------------------------------------------
def draw_guidance(kappa_min: float, kappa_max: float) -> float:
    """One proper-guidance scale kappa ~ U(kappa_min, kappa_max) (torch's generator, so resume is exact)."""
    import torch

    u = float(torch.rand(()).item())
    return kappa_min + (kappa_max - kappa_min) * u


def vsd_gradient(eps_teacher: torch.Tensor, eps_lora: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SwiftBrush's ``score_gradient``: nan_to_num(sigma_t^2 (eps_teacher - eps_lora)), sigma_t per sample."""
    import torch

    s = sigma.reshape(-1, *([1] * (eps_teacher.dim() - 1))).to(eps_teacher.dtype)
    return torch.nan_to_num(s ** 2 * (eps_teacher - eps_lora))


def lora_teacher_loss(score: nn.Module, x: torch.Tensor, cond: Any, null_prob: float) -> torch.Tensor:
    """SwiftBrush's ``loss_lora`` on detached student samples: t = k / 1000, k ~ U{0..999}; the batch's condition
    is the null one with probability ``null_prob``; mean((alpha_t (eps_pred - eps))^2)."""
    import torch

    k = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x.shape[0],), device=x.device)
    t = k.to(x.dtype) / NUM_TRAIN_TIMESTEPS
    eps = torch.randn_like(x)
    if float(torch.rand(()).item()) < null_prob:
        cond = score.net.null_condition(cond)
    eps_pred = score.x0_eps(score.add_noise(x, eps, t), t, cond)[1]
    alpha = score.schedule.alpha_sigma(t)[0].reshape(-1, *([1] * (x.dim() - 1)))
    return (alpha * (eps_pred.float() - eps.float())).pow(2).mean()


# --- NASA --------------------------------------------------------------------------------------------------
def nasa_attention(q: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor, k_neg: torch.Tensor,
                   v_neg: torch.Tensor, alpha: float, scale: float | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """SNOOPI Eq. 7-9 on [B, heads, L, d] tensors: softmax(Q K+^T s) V+ - alpha softmax(Q K-^T s) V-, s = 1/sqrt(d)
    unless ``scale`` is given; ``mask`` (an additive/boolean attention mask) applies to the positive branch."""
    import torch.nn.functional as F

    z_pos = F.scaled_dot_product_attention(q, k_pos, v_pos, attn_mask=mask, scale=scale)
    if alpha == 0.0:
        return z_pos
    z_neg = F.scaled_dot_product_attention(q, k_neg, v_neg, scale=scale)
    return z_pos - alpha * z_neg


class NASAProcessor:
    """A diffusers attention processor: cross-attention steered away from a fixed negative prompt (NASA-I). The
    negative text features [1, L, D] go through the layer's own norm_cross, to_k and to_v; self-attention calls
    (no ``encoder_hidden_states``) are the stock ``AttnProcessor2_0``."""

    def __init__(self, negative: torch.Tensor, alpha: float) -> None:
        self.negative = negative.detach()
        self.alpha = float(alpha)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, None, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        negative = self.negative.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
        negative = negative.expand(batch, *negative.shape[1:])
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            negative = attn.norm_encoder_hidden_states(negative)
        query = attn.to_q(hidden_states)
        heads = attn.heads
        head_dim = query.shape[-1] // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        q = split(query)
        k_pos, v_pos = split(attn.to_k(encoder_hidden_states)), split(attn.to_v(encoder_hidden_states))
        k_neg, v_neg = split(attn.to_k(negative)), split(attn.to_v(negative))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k_pos, k_neg = attn.norm_k(k_pos), attn.norm_k(k_neg)
        z = nasa_attention(q, k_pos, v_pos, k_neg, v_neg, self.alpha, scale=attn.scale, mask=attention_mask)
        z = z.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        z = attn.to_out[1](attn.to_out[0](z))  # output projection, then dropout
        if ndim == 4:
            z = z.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            z = z + residual
        return z / attn.rescale_output_factor


def cross_attention_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The diffusers cross-attention layers of ``net`` (``Attention`` with ``is_cross_attention``), by name."""
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # diffusers missing: no diffusers attention layers either
        return []
    return [(n, m) for n, m in net.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def apply_nasa(net: nn.Module, negative: torch.Tensor, alpha: float) -> list[str]:
    """Install `NASAProcessor` on every cross-attention layer of ``net``; returns the layers' names."""
    layers = cross_attention_layers(net)
    for _, module in layers:
        module.set_processor(NASAProcessor(negative, alpha))
    return [n for n, _ in layers]


class SNOOPI(Method):
    """Nguyen et al. (SNOOPI, arXiv 2024): PG-SB — SwiftBrush's image-free VSD with one random guidance scale per
    step in both teachers — and NASA negative-prompt steering in cross-attention at inference (see the module
    docstring)."""

    name = "snoopi"
    version = "1"
    domains = frozenset({"diffusion"})
    # train_swiftbrush.py: --max_grad_norm 1.0 (default) for the student and the LoRA teacher; Adam betas
    # (0.9, 0.999), weight decay 0 and eps 1e-8 are the task's distillation optimiser already
    optim_overrides = {"grad_clip": 1.0}

    class Params(Params):
        # SNOOPI Table 6 / v3 §6.1: kappa ~ U(0.5, 4) for SDv1.5 and SDv2.1 (PixArt-a: U(0.5, 3))
        kappa_min: float = Field(0.5, ge=0.0, le=20.0, description="lower end of the per-step guidance scale "
                                                                   "kappa ~ U(kappa_min, kappa_max) of both teachers")
        kappa_max: float = Field(4.0, ge=0.0, le=20.0, description="upper end of kappa (kappa_min = kappa_max: "
                                                                   "SwiftBrush's fixed scale)")
        # train_swiftbrush.py: timesteps_range = [0.02, 0.981] * num_train_timesteps, randint (upper exclusive)
        min_step_percent: float = Field(0.02, ge=0.0, lt=1.0, description="lowest VSD step, fraction of 1000")
        max_step_percent: float = Field(0.981, gt=0.0, le=1.0, description="VSD steps are below this fraction "
                                                                           "of 1000 (randint's exclusive end)")
        # train_swiftbrush.py: encoder_hidden_states = prompt_null_embeds if random.random() < 0.1
        lora_null_prob: float = Field(0.1, ge=0.0, lt=1.0, description="probability that a LoRA-teacher batch "
                                                                       "trains on the null condition")
        # v1 Table 8: PG-SB + NASA alpha 0.04 on SDv1.5 (0.30 SDv2.1, 0.80 PixArt-a); v3 §6.1: 0.1 for SDv1.5
        nasa_alpha: float = Field(0.04, ge=0.0, le=2.0, description="NASA scale alpha at inference "
                                                                    "(Z+ - alpha Z-; 0: NASA off)")
        # v3 §6.2: the generic negative prompt of the NASA-I quality results
        negative_prompt: str = Field(GENERIC_NEGATIVE_PROMPT, min_length=1,
                                     description="NASA's negative prompt (needs a network with cross-attention "
                                                 "and a task that encodes prompts: the full tier)")

        @model_validator(mode="after")
        def _ranges(self) -> "SNOOPI.Params":
            if self.kappa_min > self.kappa_max:
                raise ValueError(f"kappa_min ({self.kappa_min}) must not exceed kappa_max ({self.kappa_max})")
            if int(self.min_step_percent * NUM_TRAIN_TIMESTEPS) >= int(self.max_step_percent * NUM_TRAIN_TIMESTEPS):
                raise ValueError(f"min_step_percent ({self.min_step_percent}) must be below max_step_percent "
                                 f"({self.max_step_percent})")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.times = tuple(k / NUM_TRAIN_TIMESTEPS for k in generator_steps(1))  # (0.999,): SwiftBrush's step 999
        self.min_step = int(p.min_step_percent * NUM_TRAIN_TIMESTEPS)
        self.max_step = int(p.max_step_percent * NUM_TRAIN_TIMESTEPS)  # exclusive, as the code's randint
        self.fake: nn.Module | None = None
        self.kappa: float | None = None
        self.nasa: dict[str, Any] = {"applied": False, "reason": "not evaluated yet"}
        self._last: dict[str, float] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        return fixed_steps_error("snoopi", 1, task, task_params)

    # --- models ----------------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        return configure_generator(student, teacher, self.times, "SNOOPI (PG-SB)")

    def create_modules(self, ctx: StepContext) -> None:
        self.fake = copy.deepcopy(ctx.teacher)  # the "LoRA teacher": a trainable copy of the teacher
        self.fake.requires_grad_(True)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"fake": self.fake}

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        """NASA-I on the evaluated student, where its network has cross-attention (see the module docstring)."""
        p = self.params
        if p.nasa_alpha == 0.0:
            self.nasa = {"applied": False, "reason": "nasa_alpha = 0"}
            return student
        if not cross_attention_layers(student.net):
            self.nasa = {"applied": False, "reason": NO_CROSS_ATTENTION}
            return student
        encode = getattr(getattr(ctx.task, "pipeline", None), "encode_prompts", None)
        if encode is None:
            self.nasa = {"applied": False, "reason": "the task cannot encode a negative prompt (no text encoder)"}
            return student
        negative = encode([p.negative_prompt])[:1]
        layers = apply_nasa(student.net, negative, p.nasa_alpha)
        self.nasa = {"applied": True, "alpha": p.nasa_alpha, "negative_prompt": p.negative_prompt,
                     "layers": len(layers)}
        return student

    # --- losses ------------------------------------------------------------------------------------------
    def _vsd_loss(self, x: torch.Tensor, cond: Any, ctx: StepContext) -> torch.Tensor:
        import torch

        fake = self.fake
        kappa = self.kappa = draw_guidance(self.params.kappa_min, self.params.kappa_max)
        with torch.no_grad():
            k = torch.randint(self.min_step, self.max_step, (x.shape[0],), device=x.device)
            t = k.to(x.dtype) / NUM_TRAIN_TIMESTEPS
            x_t = fake.add_noise(x.detach(), torch.randn_like(x), t)
            # both teachers guided at the same drawn kappa (PG-SB)
            eps_real = ctx.run_teacher(lambda g: g.x0_eps(x_t, t, cond, guidance=kappa)[1],
                                       n_examples=x.shape[0] * (2 if kappa != 1.0 else 1))
            eps_fake = fake.x0_eps(x_t, t, cond, guidance=kappa)[1]
            grad = vsd_gradient(eps_real, eps_fake, fake.schedule.alpha_sigma(t)[1])
        return dm_loss(x, grad)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        cond = batch["cond"]
        student = ctx.student
        shape_like = batch["x0"]  # image-free: only the shape and device of the batch's images are used
        noise = torch.randn_like(shape_like)
        x = student.denoise(noise, torch.full((noise.shape[0],), self.times[0], device=noise.device), cond)
        loss_vsd = self._vsd_loss(x, cond, ctx)
        loss_lora = lora_teacher_loss(self.fake, x.detach(), cond, self.params.lora_null_prob)
        self._last = {"loss_vsd": float(loss_vsd.detach()), "loss_lora": float(loss_lora.detach()),
                      "kappa": float(self.kappa)}
        return {"student": loss_vsd, "fake": loss_lora}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"sampler": "consistency", "timesteps": list(self.times), "steps": 1,
                "guidance": f"kappa ~ U({p.kappa_min:g}, {p.kappa_max:g}) per step, both teachers",
                "vsd_steps": [self.min_step, self.max_step - 1], "update_every": {"student": 1, "fake": 1},
                "lora_teacher": "full copy of the teacher (eps-MSE weighted by alpha_t^2, 10% null batches)",
                "nasa": dict(self.nasa)}
