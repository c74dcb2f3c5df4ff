"""Flash-DMD — Chen, Huang, Liu, Zhu, Qu, Chen, Cheng & Sun, "Flash-DMD: Towards High-Fidelity Few-Step Image
Generation with Efficient Distillation and Joint Reinforcement Learning" (arXiv 2511.20549, Nov 2025; CVPR 2026).
Authors in the arXiv v1 order: Guanjie Chen, Shirui Huang, Kai Liu, Jianchen Zhu, Xiaoye Qu, Peng Chen, Yu Cheng,
Yifu Sun (Shanghai Jiao Tong University, Tencent, HUST, CUHK).

Official code: **none released** (the paper: "Codes are coming soon"; no GitHub repository found). The paper's
full text was not in the stored corpora: what follows was read in its abstract (arxiv.org/html/2511.20549v1) and
in detailed secondary notes of the CVPR version (papernotes.org "CVPR2026/image_generation/flash-dmd_..." in
English and Chinese, which reproduce its equations and ablation tables). The RL objective is the step-level
preference optimisation of LPO (Zhang et al., "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level
Preference Optimization", arXiv 2502.01051), whose Latent Reward Model Flash-DMD uses; its official code was read:
Kwai-Kolors/LPO @ 9c2e8b8 — ``lpo/train_scripts/train_lpo_sdxl.py`` (the loss), ``lpo/configs/
lpo_sdxl_5ep_cfg75_8k_beta500_multiscale_wocfg_thresh45-6-sigma.py`` and ``basic_config.py`` (beta, eps, k),
``lpo/lpo/custom_diffusers/ddim_with_logprob.py`` (the per-element-mean Gaussian log-probability),
``lpo/lpo/preference_models/compare_funcs.py`` (best/worst of k as the pair). Everything DMD2 here is dmd2.py's,
by import (``dm_gradient``, ``dm_loss``, ``fake_score_loss``, ``generator_steps``, ``configure_generator``,
``backward_simulation``, ``fixed_steps_error``, ``check_step_range``, ``gan_d_loss``, ``gan_g_loss``).

What is implemented:

* **Generator**: DMD2's few-step generator (``configure_generator``): the student starts as the teacher and
  samples with consistency jumps at ``generator_steps(steps)`` / 1000; ``steps`` = 4 (the paper distils SDXL and
  SD3-Medium into 4-step students): t = 0.999, 0.749, 0.499, 0.249.
* **Timestep-aware loss decoupling** (`split_generator_steps`): the generator steps at t >= ``split_time`` are
  high-noise, the others low-noise (default 0.5, SNR = 1 of the flow schedule: {0.999, 0.749} | {0.499, 0.249}).
  Each distillation update draws one **high-noise** step by DMD2's backward simulation restricted to the high-noise
  steps (k ~ U{0..n_high-1}, input x_t from the student's own chain), predicts x = G(x_t, t_k) and applies
  **only the DM loss** there (``dm_gradient``/``dm_loss``: DM noise levels k'/1000, k' ~ U{20..980}; real score =
  the guided teacher, fake score = the fake network). The prediction is carried to a clean image with no gradient,
  x_0 = sg(B(x, 0)) (the rest of the student's chain: re-noise to t_{k+1}, denoise, ..., to the last step), then
  one **low-noise** step t^ ~ U(low steps) is drawn, x^ = add_noise(x_0, eps, t^), and **only the adversarial loss**
  acts on G(x^, t^): ``gen_gan_weight`` * softplus(-D(G(x^, t^))) (the paper's formula; ``gan_g_loss``).
* **Pixel-GAN** (`PixelDiscriminator`): a frozen pretrained encoder with several trainable heads, one per feature
  level (the paper: the frozen SAM image encoder, multi-level features, trainable heads). Here the encoder is a
  frozen copy of the teacher UNet's down blocks and mid block, run on the clean image at t = 0 with the null
  condition (forward hooks), each head conv3x3 -> GroupNorm -> SiLU -> conv1x1 -> spatial mean: one logit per
  level. D loss ``gan_d_loss`` (softplus(D(fake)) + softplus(-D(real)), means over batch and levels) on the batch's
  real images and the detached G(x^, t^); its own optimiser (``disc``).
* **Stabilised score estimator**: the fake score (a copy of the teacher, never guided) is trained only by the
  denoising loss (``fake_score_loss``; no discriminator duty, unlike DMD2's), on the detached x, with TTUR 1 (the
  paper's "TTUR1-1k" run, 2.1% of DMD2's cost: the fake network and the generator step together). After each
  generator update the generator's weights are injected into it: psi <- lambda psi + (1 - lambda) theta
  (`ema_inject`, ``fake_ema``).
* **Joint RL** (stage 2, `stage_plan`, `is_distill_step`): the budget is split 1 : 2 (the ablation's "1k + 2k":
  ``distill_fraction`` = 1/3 distillation only, then joint training); in stage 2 RL and distillation updates
  **alternate**, ``rl_ratio`` = 5 RL updates per distillation update (the paper's best of 1:1, 2:1, 5:1, 10:1),
  the distillation update first in each cycle. An RL update: z_t at a **high-noise** step j (backward simulation
  over the high-noise steps, as the paper samples candidates only there), k = ``rl_candidates`` = 4 candidates
  z^i = alpha_s mu_theta + sigma_s eps_i at the next time s = t_{j+1} (the consistency sampler's Gaussian policy
  N(alpha_s mu_theta(z_t), sigma_s^2 I)), each scored, best/worst as (w, l) (`preference_pairs`), and the
  step-level DPO loss of LPO (`step_dpo_loss`): -log sigmoid(beta (clip(h_w) - clip(h_l))) with
  h = mean_elements[(|z - alpha_s mu_ref|^2 - |z - alpha_s mu_theta|^2) / (2 sigma_s^2)] = log p_theta - log p_ref
  (`gaussian_log_ratio`, per-element mean as LPO's ``ddim_step_with_logprob``), clip to [log(1 - eps),
  log(1 + eps)] (LPO's ratio clamp, eps = 0.1), beta = 500 (LPO's SDXL config), mean over valid pairs. The
  reference policy is the generator frozen at the start of stage 2 (the distilled model).
* **Rewards** (the paper's Latent Reward Model scores noisy latents; none exists here, see deviations): a candidate
  is scored on the clean image the student's own chain makes from it (no gradient). geneval: GenEval's rules on the
  task's programmatic detector (``tasks/geneval/detect.py``, ``rules.py``) via hyper_sd.py's ``geneval_reward``
  and ``geneval_train_metadata``: 1 if correct for the training prompt, else 0; coco_fid (class-conditional): the
  teacher-classifier stand-in p_T(c | x) of hyper_sd.py's ``teacher_class_posterior`` at t = ``classifier_time``.
* **Optimiser**: AdamW weight decay 0.01 (DMD2's, ``optim_overrides``); the task's lr, betas, clip and budget.
* **Sampler**: ``Sampler("consistency", 4, (0.999, 0.749, 0.499, 0.249))``, ``steps_options = (4,)``.

Deviations:

* No paper text or official code was read first-hand; the high/low split time, lambda_ema (0.97), the GAN weights
  and the reward-to-pair margin are not known from the paper: ``split_time`` 0.5 (SNR 1), ``fake_ema`` 0.97 and
  ``gen_gan_weight`` 5e-3 (DMD2's SDXL ``gen_cls_loss_weight``) are this module's choices.
* Reward stand-ins instead of the LRM (a diffusion-model reward on noisy latents at any timestep): the geneval
  detector + GenEval rules, or the teacher diffusion classifier on coco_fid, on the clean image the student's chain
  makes from each candidate. At the full tier there is no reward: ``unsupported`` refuses ``rl`` there. A pair is
  kept when r_w - r_l > ``reward_margin`` (0: ties dropped) instead of LPO's softmax-gap threshold tuned to the LRM.
* The discriminator's frozen backbone is the teacher UNet's encoder, not SAM (no download below the full tier);
  no VAE decode V (pixel space at smoke/small; at the full tier it sees latents).
* Pixel space on the task's small flow-matching UNet instead of SDXL / SD3-Medium latents; full fine-tuning
  (the paper's SD3 run uses LoRA); the harness's lr, warm-up, batch and budget for every optimiser; optimisers and
  schedules restart at stage 2 (a harness generation). TTUR 2 (the paper's 8k and SD3 runs) is not offered: the
  harness reads update ratios from the class. The fake network and discriminator step on distillation updates
  only (stage 2: one harness step in rl_ratio + 1).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field, model_validator

from bench import BenchError
from bench.api import Generation, Method, Params
from bench.methods.diffusion.dmd2 import (NUM_TRAIN_TIMESTEPS, backward_simulation, check_step_range,
                                          configure_generator, dm_gradient, dm_loss, fake_score_loss, fixed_steps_error,
                                          gan_d_loss, gan_g_loss, generator_steps)
from bench.methods.diffusion.hyper_sd import reward_kind, task_reward

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


# --------------------------------------------------------------------------------------------------
# Schedules: which generator steps, which stage, which update
# --------------------------------------------------------------------------------------------------


def split_generator_steps(times: tuple[float, ...], split_time: float) -> tuple[list[int], list[int]]:
    """Indices of the high-noise generator steps (t >= split_time: DM loss) and the low-noise ones (GAN)."""
    high = [i for i, t in enumerate(times) if t >= split_time]
    return high, [i for i in range(len(times)) if i not in high]


def stage_plan(total_steps: int, rl: bool = True, distill_fraction: float = 1 / 3) -> list[tuple[str, int]]:
    """(name, steps) of the stages: distillation on round(total * distill_fraction) steps (at least 1), then
    joint RL + distillation on the rest (none without ``rl`` or budget)."""
    first = total_steps if not rl else min(total_steps, max(1, round(total_steps * distill_fraction)))
    plan = [("distillation", first)]
    if total_steps - first > 0:
        plan.append(("joint RL + distillation", total_steps - first))
    return plan


def is_distill_step(generation: int, generation_step: int, rl_ratio: int) -> bool:
    """Stage 1: every step. Stage 2: cycles of one distillation update, then ``rl_ratio`` RL updates."""
    return generation == 0 or generation_step % (rl_ratio + 1) == 0


# --------------------------------------------------------------------------------------------------
# The RL objective (LPO's step-level DPO on the few-step generator's Gaussian policy)
# --------------------------------------------------------------------------------------------------


def gaussian_log_ratio(z: torch.Tensor, mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, std^2) - log N(z; mean_ref, std^2) per sample, as a mean over elements (LPO's
    ``ddim_step_with_logprob`` reduction): mean[(|z - mean_ref|^2 - |z - mean|^2) / (2 std^2)]."""
    var2 = 2 * std.reshape(-1, *([1] * (z.dim() - 1))) ** 2
    d = ((z - mean_ref).pow(2) - (z - mean).pow(2)) / var2
    return d.flatten(1).mean(1)


def step_dpo_loss(h_win: torch.Tensor, h_lose: torch.Tensor, beta: float, clip: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(beta (clip(h_w) - clip(h_l))), mean over valid pairs; h clipped to [log(1 - clip), log(1 + clip)]
    (LPO clamps the ratio exp(h) to [1 - eps, 1 + eps]); 0 (with a graph) when no pair is valid."""
    import torch.nn.functional as F

    lo, hi = math.log(1 - clip), math.log(1 + clip)
    per = -F.logsigmoid(beta * (h_win.clamp(lo, hi) - h_lose.clamp(lo, hi)))
    if valid is None:
        return per.mean()
    if not bool(valid.any()):
        return per.sum() * 0.0
    w = valid.to(per.dtype)
    return (per * w).sum() / w.sum()


def preference_pairs(rewards: torch.Tensor, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From rewards [k, B] of k candidates per sample: indices of the best (w) and worst (l) candidate and whether the
    pair is kept (r_w - r_l > margin). Ties take the first candidate (``torch.max``/``min`` order)."""
    r_w, i_w = rewards.max(0)
    r_l, i_l = rewards.min(0)
    return i_w, i_l, (r_w - r_l) > margin


def ema_inject(target: nn.Module, source: nn.Module, decay: float) -> None:
    """psi <- decay psi + (1 - decay) theta over matching parameters (the generator's weights into the fake score)."""
    import torch

    src = dict(source.named_parameters())
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name not in src or src[name].shape != p.shape:
                raise BenchError(f"flash_dmd: the fake score's parameter {name!r} has no match in the generator; "
                                 "the EMA injection needs them to share the teacher's architecture")
            p.mul_(decay).add_(src[name].detach(), alpha=1 - decay)


# --------------------------------------------------------------------------------------------------
# Pixel-GAN: a frozen encoder with trainable multi-level heads
# --------------------------------------------------------------------------------------------------


def _head(channels: int):
    from torch import nn

    groups = math.gcd(32, channels)
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
                         nn.Conv2d(channels, 1, 1))


def _module_base():
    from torch import nn

    return nn.Module


class PixelDiscriminator(_module_base()):  # type: ignore[misc]
    """D(x): the frozen encoder (a copy of the teacher's UNet down blocks and mid block, at t = 0 with the null
    condition) gives one feature map per level; a trainable head per level gives one logit. Only the heads are
    parameters of this module; the encoder is kept outside it (recreated from the teacher, never saved)."""

    def __init__(self, encoder: Any, probe: torch.Tensor, probe_cond: Any) -> None:
        import torch
        from torch import nn

        super().__init__()
        unet = getattr(getattr(encoder, "net", None), "unet", None)
        blocks = list(getattr(unet, "down_blocks", []) or []) + [getattr(unet, "mid_block", None)]
        if unet is None or any(b is None for b in blocks):
            raise BenchError("flash_dmd: the Pixel-GAN needs a diffusers UNet at net.unet (down_blocks, mid_block); "
                             "set flash_dmd.gan=false for other networks")
        encoder.requires_grad_(False)
        encoder.eval()
        self._enc = [encoder]  # a list: not a submodule (frozen, not an optimiser's, not in the state dict)
        self._feats: list[torch.Tensor] = []
        for b in blocks:
            b.register_forward_hook(self._keep)
        with torch.no_grad():
            shapes = [f.shape[1] for f in self._features(probe[:1], probe_cond[:1])]
        self.heads = nn.ModuleList(_head(c) for c in shapes)

    def _keep(self, module: Any, inputs: Any, output: Any) -> None:
        self._feats.append(output[0] if isinstance(output, tuple) else output)

    def _features(self, x: torch.Tensor, cond: Any) -> list[torch.Tensor]:
        import torch

        enc = self._enc[0]
        self._feats = []
        enc.predict(x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device), enc.net.null_condition(cond))
        feats, self._feats = self._feats, []
        return feats

    def forward(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        """Logits [B, levels]."""
        import torch

        feats = self._features(x, cond)
        return torch.stack([h(f.float()).mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats)], dim=1)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class FlashDMD(Method):
    """Chen et al. (2025, CVPR 2026) Flash-DMD: timestep-aware DMD (DM loss at high-noise generator steps, a frozen-
    encoder Pixel-GAN at low-noise ones), a fake score trained only by denoising with EMA injection at TTUR 1, then
    LPO-style step-level preference RL alternating with the continuing distillation (see the module docstring)."""

    name = "flash_dmd"
    version = "1"
    domains = frozenset({"diffusion"})
    # TTUR 1 (the paper's 2.1%-cost "TTUR1-1k" run): every optimiser steps on every harness step it has a loss
    update_every: dict[str, int] = {}
    # DMD2's AdamW weight decay 0.01 (train_sd.py), which Flash-DMD builds on
    optim_overrides = {"weight_decay": 0.01}

    class Params(Params):
        # 4-step SDXL / SD3-Medium students in the paper; DMD2's 4-step times 999, 749, 499, 249
        steps: int = Field(4, ge=2, le=100, description="generator steps (times range(999, 0, -1000 // steps) / 1000; "
                                                       "at least one high- and one low-noise step)")
        # not given in the notes read: SNR = 1 of the flow schedule (t = 0.5) halves the 4-step schedule
        split_time: float = Field(0.5, gt=0.0, lt=1.0, description="generator steps at t >= this are high-noise "
                                                                  "(DM loss), the rest low-noise (Pixel-GAN)")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="CFG scale of the real score; None: the "
                                                                          "task's guidance")
        # DMD2's --min_step_percent 0.02 --max_step_percent 0.98 (Flash-DMD keeps DMD2's DM loss)
        min_step_percent: float = Field(0.02, ge=0.0, lt=1.0, description="lowest DM-loss step, fraction of 1000")
        max_step_percent: float = Field(0.98, gt=0.0, le=1.0, description="highest DM-loss step, fraction of 1000")
        dm_loss_weight: float = Field(1.0, ge=0.0, description="weight of the DM loss (DMD2's default 1)")
        gan: bool = Field(True, description="Pixel-GAN at the low-noise steps (generator and discriminator losses)")
        # DMD2's SDXL --gen_cls_loss_weight 5e-3 (Flash-DMD's weight is not known here)
        gen_gan_weight: float = Field(5e-3, ge=0.0, description="weight of the generator's adversarial loss")
        # this module's choice (lambda_ema is not given in the notes read)
        fake_ema: float = Field(0.97, ge=0.0, le=1.0, description="lambda of the EMA that injects the generator's "
                                                                  "weights into the fake score after each update "
                                                                  "(1: off)")
        rl: bool = Field(True, description="stage 2: joint RL alternating with distillation")
        # the ablation's "1k + 2k" (distillation, then joint RL)
        distill_fraction: float = Field(1 / 3, gt=0.0, le=1.0, description="share of the budget for stage 1 "
                                                                          "(distillation only)")
        # the paper's best RL : DM frequency ratio 5 : 1 (of 1:1, 2:1, 5:1, 10:1)
        rl_ratio: int = Field(5, ge=1, le=100, description="RL updates per distillation update in stage 2")
        # LPO's SDXL config: num_sample_each_step 4, beta 500; basic_config eps 0.1
        rl_candidates: int = Field(4, ge=2, le=64, description="candidates z_{t-1} per sample at the high-noise step")
        rl_beta: float = Field(500.0, gt=0.0, description="DPO beta of the step-level preference loss")
        rl_clip: float = Field(0.1, gt=0.0, lt=1.0, description="the policy/reference ratio is clipped to "
                                                                "[1 - clip, 1 + clip] (LPO's eps)")
        reward_margin: float = Field(0.0, ge=0.0, description="a pair is kept when r_win - r_lose exceeds this")
        # hyper_sd.py's teacher-classifier stand-in
        classifier_time: float = Field(0.5, gt=0.0, lt=1.0, description="coco_fid stand-in reward: noise level of "
                                                                        "the teacher diffusion classifier")

        @model_validator(mode="after")
        def _check(self) -> "FlashDMD.Params":
            check_step_range(self)
            times = tuple(k / NUM_TRAIN_TIMESTEPS for k in generator_steps(self.steps))
            high, low = split_generator_steps(times, self.split_time)
            if not high or not low:
                raise ValueError(f"split_time {self.split_time} leaves no {'high' if not high else 'low'}-noise "
                                 f"generator step among t = {list(times)}; Flash-DMD needs both")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.times = tuple(k / NUM_TRAIN_TIMESTEPS for k in generator_steps(p.steps))
        self.high, self.low = split_generator_steps(self.times, p.split_time)
        self.min_step = int(p.min_step_percent * NUM_TRAIN_TIMESTEPS)
        self.max_step = int(p.max_step_percent * NUM_TRAIN_TIMESTEPS)
        self.plan: list[tuple[str, int]] = []
        self.fake: nn.Module | None = None
        self.disc: nn.Module | None = None
        self.ref: nn.Module | None = None  # the RL reference policy (stage 2), method state
        self._pending_ref: dict[str, Any] | None = None
        self.reward_fn: Callable[[torch.Tensor, Batch, StepContext], torch.Tensor] | None = None
        self.reward_kind = "none"
        self.w = 1.0
        self._last: dict[str, float] = {}

    # --- checks --------------------------------------------------------------------------------------
    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        return fixed_steps_error("flash_dmd", params.steps, task, task_params)

    def unsupported(self, task: Task) -> str | None:
        if self.params.rl and reward_kind(task) is None:
            return ("flash_dmd's RL reward exists for the geneval shape task and class-conditional coco_fid (smoke, "
                    "small tiers) only; set flash_dmd.rl=false here")
        return None

    # --- stages and models ---------------------------------------------------------------------------
    def generations(self, total_steps: int) -> list[Generation]:
        p = self.params
        self.plan = stage_plan(total_steps, p.rl, p.distill_fraction)
        return [Generation(n, fresh_student=False, name=name) for name, n in self.plan]

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        return configure_generator(student, teacher, self.times, "Flash-DMD")

    def create_modules(self, ctx: StepContext) -> None:
        self.fake = copy.deepcopy(ctx.teacher)  # the fake score: a copy of the teacher
        self.fake.requires_grad_(True)
        if self.params.gan:
            probe = ctx.calibration_batches(1)[0]
            self.disc = PixelDiscriminator(copy.deepcopy(ctx.teacher), probe["x0"], probe["cond"])
        if self._pending_ref is not None:  # resume inside stage 2
            self._snapshot_ref(ctx.student, self._pending_ref)
            self._pending_ref = None

    def extra_modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"fake": self.fake}
        if self.disc is not None:
            out["disc"] = self.disc
        return out

    def _snapshot_ref(self, student: nn.Module, weights: dict[str, Any] | None = None) -> None:
        from bench.diffusion import Generator

        net = copy.deepcopy(student.net)
        if weights is not None:
            net.load_state_dict(weights)
        net.requires_grad_(False)
        self.ref = Generator(net, schedule=student.schedule, prediction=student.prediction, sampler=student.sampler,
                             description="Flash-DMD RL reference policy (the generator at the start of stage 2)")

    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        if index == 1:
            self._snapshot_ref(ctx.student)

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        task = ctx.task
        self.w = float(p.guidance if p.guidance is not None else getattr(task.params, "guidance", 1.0))
        if not p.rl or self.reward_fn is not None:
            return
        kind = reward_kind(task)
        k = p.rl_candidates
        reward = task_reward(task, p.classifier_time, "flash_dmd")
        self.reward_fn = lambda x, batch, c: reward(x, list(batch["index"]) * k, _rep(batch["cond"], k), c)
        self.reward_kind = kind

    # --- pieces --------------------------------------------------------------------------------------
    def _finish(self, g: Any, x0: torch.Tensor, i: int, cond: Any) -> torch.Tensor:
        """B(x0, 0): from the step-i prediction x0, the rest of the student's chain (no gradient) to a clean image."""
        import torch

        with torch.no_grad():
            for j in range(i + 1, len(self.times)):
                x = g.add_noise(x0, torch.randn_like(x0), self.times[j])
                x0 = g.denoise(x, torch.full((x.shape[0],), self.times[j], device=x.device, dtype=x.dtype), cond)
        return x0

    def _dm(self, x: torch.Tensor, cond: Any, ctx: StepContext) -> torch.Tensor:
        import torch

        w = self.w
        with torch.no_grad():
            k = torch.randint(self.min_step, min(self.max_step + 1, NUM_TRAIN_TIMESTEPS), (x.shape[0],),
                              device=x.device)
            t = k.to(x.dtype) / NUM_TRAIN_TIMESTEPS
            x_t = self.fake.add_noise(x, torch.randn_like(x), t)
            d_fake = self.fake.denoise(x_t, t, cond)  # never guided
            d_real = ctx.run_teacher(lambda T: T.denoise(x_t, t, cond, guidance=w),
                                     n_examples=x.shape[0] * (2 if w != 1.0 else 1))
            grad = dm_gradient(x.detach(), d_real, d_fake)
        return dm_loss(x, grad)

    def _distill(self, batch: Batch, ctx: StepContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        import torch

        p = self.params
        g = ctx.student
        real, cond = batch["x0"], batch["cond"]
        b = real.shape[0]
        # one high-noise step (backward simulation over the high-noise steps only): DM loss alone
        x_in, k = backward_simulation(g, self.times[:len(self.high)], torch.randn_like(real), cond)
        x = g.denoise(x_in, torch.full((b,), self.times[k], device=real.device, dtype=real.dtype), cond)
        loss_dm = self._dm(x, cond, ctx)
        loss = p.dm_loss_weight * loss_dm
        log = {"dm_step": float(self.times[k]), "loss_dm": float(loss_dm.detach())}
        losses: dict[str, torch.Tensor] = {}
        if self.disc is not None:
            # x_0 = sg(B(x, 0)), then one low-noise step: the adversarial loss alone
            clean = self._finish(g, x.detach(), k, cond)
            j = self.low[int(torch.randint(0, len(self.low), (1,)).item())]
            x_hat = g.add_noise(clean, torch.randn_like(clean), self.times[j])
            y = g.denoise(x_hat, torch.full((b,), self.times[j], device=real.device, dtype=real.dtype), cond)
            loss_g = gan_g_loss(self.disc(y, cond))
            loss = loss + p.gen_gan_weight * loss_g
            logits_fake, logits_real = self.disc(torch.cat([y.detach(), real]), _cat(cond, cond)).chunk(2)
            losses["disc"] = gan_d_loss(logits_fake, logits_real)
            log.update(gan_step=float(self.times[j]), loss_gan_g=float(loss_g.detach()),
                       loss_gan_d=float(losses["disc"].detach()))
        losses["student"] = loss
        losses["fake"] = fake_score_loss(self.fake, x.detach(), cond)  # denoising only, no discriminator duty
        log["loss_fake"] = float(losses["fake"].detach())
        return losses, log

    def _rl(self, batch: Batch, ctx: StepContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        import torch

        p = self.params
        g = ctx.student
        real, cond = batch["x0"], batch["cond"]
        b, k = real.shape[0], p.rl_candidates
        z_t, j = backward_simulation(g, self.times[:len(self.high)], torch.randn_like(real), cond)
        t = torch.full((b,), self.times[j], device=real.device, dtype=real.dtype)
        s = self.times[j + 1]  # a high-noise step always has a next step (there is a low-noise one)
        mu = g.denoise(z_t, t, cond)
        a_s, sigma_s = (float(v) for v in g.schedule.alpha_sigma(torch.tensor([s], dtype=torch.float64)))
        with torch.no_grad():
            mu_ref = self.ref.denoise(z_t, t, cond)
            cands = a_s * mu.detach().unsqueeze(0) + sigma_s * torch.randn((k, *mu.shape), device=mu.device,
                                                                             dtype=mu.dtype)
            flat = cands.reshape(k * b, *mu.shape[1:])
            ck = _rep(cond, k)
            x0 = g.denoise(flat, torch.full((k * b,), s, device=mu.device, dtype=mu.dtype), ck)
            images = self._finish(g, x0, j + 1, ck)
            rewards = self.reward_fn(images, batch, ctx).to(mu.dtype).reshape(k, b)
            i_w, i_l, valid = preference_pairs(rewards, p.reward_margin)
            ar = torch.arange(b, device=mu.device)
            z_w, z_l = cands[i_w, ar], cands[i_l, ar]
        std = torch.full((b,), sigma_s, device=mu.device, dtype=mu.dtype)
        h_w = gaussian_log_ratio(z_w, a_s * mu, a_s * mu_ref, std)
        h_l = gaussian_log_ratio(z_l, a_s * mu, a_s * mu_ref, std)
        loss = step_dpo_loss(h_w, h_l, p.rl_beta, p.rl_clip, valid)  # no valid pair: 0 (still a graph)
        log = {"rl_step": float(self.times[j]), "loss_rl": float(loss.detach()), "reward": float(rewards.mean()),
               "rl_pairs": float(valid.sum())}
        return {"student": loss}, log

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        distill = is_distill_step(ctx.generation, ctx.generation_step, self.params.rl_ratio)
        losses, log = self._distill(batch, ctx) if distill else self._rl(batch, ctx)
        self._last = {"stage": float(ctx.generation), "distill_update": float(distill), **log}
        return losses

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        if self.params.fake_ema < 1.0:  # the generator stepped on every harness step: inject it
            ema_inject(self.fake.net, ctx.student.net, self.params.fake_ema)
        return dict(self._last)

    # --- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ref = None if self.ref is None else {k: v.detach().clone() for k, v in self.ref.net.state_dict().items()}
        return {"ref": ref}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_ref = state.get("ref")

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"sampler": "consistency", "timesteps": list(self.times), "steps": len(self.times),
                "high_noise_steps": [self.times[i] for i in self.high],
                "low_noise_steps": [self.times[i] for i in self.low],
                "stages": [{"name": n, "steps": s} for n, s in self.plan], "ttur": 1,
                "rl_ratio": f"{p.rl_ratio}:1 (RL : distillation)" if p.rl else None,
                "reward": self.reward_kind if p.rl else "off", "rl_candidates": p.rl_candidates,
                "rl_beta": p.rl_beta, "rl_clip": p.rl_clip, "fake_ema": p.fake_ema, "real_guidance": self.w,
                "gan": "frozen teacher-UNet encoder + per-level heads" if p.gan else None,
                "gen_gan_weight": p.gen_gan_weight if p.gan else 0.0,
                "dm_steps": [self.min_step, min(self.max_step, NUM_TRAIN_TIMESTEPS - 1)]}


def _rep(cond: Any, k: int) -> Any:
    """``cond`` repeated k times along the batch (candidate-major, as the candidates are laid out)."""
    import torch

    return torch.cat([cond] * k)


def _cat(a: Any, b: Any) -> Any:
    import torch

    return torch.cat([a, b])
