"""DMD2 — Improved Distribution Matching Distillation for Fast Image Synthesis (Yin, Gharbi, Park, Zhang,
Shechtman, Durand, Freeman; NeurIPS 2024; arXiv 2405.14867).

Official code read: tianweiy/DMD2 @ 8d8fa55 — ``main/sd_guidance.py`` (DM loss, fake-score loss, GAN head and
losses of the Stable Diffusion runs), ``main/sd_unified_model.py`` (the generator input, ``sample_backward``:
backward simulation), ``main/train_sd.py`` (TTUR, update order, AdamW), ``main/edm/edm_guidance.py``,
``main/edm/train_edm.py`` (the ImageNet-64 variant) and ``experiments/{imagenet,sdv1.5,sdxl}/*.sh`` (defaults).

What is implemented:

* **Generator** = the task's student, initialised from the teacher (``--initialie_generator``). One step: it
  denoises pure noise z at the conditioning time 0.999 (SD1.5's ``conditioning_timestep`` 999 of 1000; the
  code feeds the unscaled noise there, and so does this module) and its x0 prediction is the sample.
  ``steps`` > 1 (SDXL's 4-step ``--denoising --backward_simulation`` recipe): the generator is conditioned at
  the times of ``range(999, 0, -1000 // steps)`` / 1000 (4 steps: 0.999, 0.749, 0.499, 0.249) and trained
  with backward simulation: each step draws k ~ U{0..steps-1} (one k for the batch, as the code shares it
  across GPUs), runs the student's own chain from noise for k steps without gradient (x0 prediction, then
  re-noising to the next time with fresh noise), and trains the generator's prediction from that input.
* **Real score**: the frozen teacher with classifier-free guidance at the task's ``guidance`` (the code's
  ``real_guidance_scale``: 1.75 for SD1.5, 8 for SDXL; the ImageNet run has none). **Fake score**: a copy of
  the teacher, never guided (the code asserts ``fake_guidance_scale == 1``), trained every harness step by
  the denoising loss in the teacher's own parameterisation (the code's epsilon-MSE for its epsilon teachers;
  here the flow-velocity MSE ``|v_fake - (eps - x)|^2`` of the flow teacher, mean over elements) on the
  detached generator samples, at t = k / 1000 with k ~ U{0..999} (``compute_loss_fake``).
* **DM loss** (``compute_distribution_matching_loss``): t = k / 1000, k ~ U{min_step..max_step} with
  min_step = int(0.02 * 1000), max_step = int(0.98 * 1000); x_t = add_noise(x, eps, t);
  p_real = x - D_real^w(x_t), p_fake = x - D_fake(x_t); grad = (p_real - p_fake) / mean|p_real| per sample,
  ``nan_to_num``; loss = 0.5 * mean((x - sg(x - grad))^2) over all elements, so d loss / dx = grad / numel.
* **GAN** (``--cls_on_clean_image --gen_cls_loss --diffusion_gan``): a classifier on the fake network's
  bottleneck: the output of the UNet's mid block, taken with a forward hook on ``fake.net.unet.mid_block``
  (the code replaces the UNet's forward to return it). Head as the code's SD1.5/ImageNet branch for an 8 x 8
  bottleneck: conv 4x4/2 -> GroupNorm -> SiLU -> conv (side/2)x(side/2), stride side/2 -> GroupNorm -> SiLU ->
  conv 1x1 -> one logit (GroupNorm with gcd(32, C) groups: the code's 32 for C = 1280 or 768). Inputs are
  diffusion-GAN noised at t = k / 1000, k ~ U{0..diffusion_gan_max_timestep - 1} and the fake network sees
  that t and the condition. D loss softplus(D(fake)) + softplus(-D(real)) (batch means) on the generator
  samples (detached) and the batch's real images x0 with their classes; G loss softplus(-D(fake)).
  Weights: the ImageNet-64 class-conditional run (the closest to this 32 px class-conditional setting),
  ``experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh``:
  ``--gen_cls_loss_weight 3e-3 --cls_loss_weight 1e-2 --diffusion_gan_max_timestep 1000``
  (SD1.5 uses 1e-3 / 1e-2, SDXL 5e-3 / 1e-2).
* **TTUR**: ``update_every = {"student": 5}`` (``--dfake_gen_update_ratio 5`` of the ImageNet and SDXL runs;
  SD1.5 uses 10); the fake network and the GAN head (one optimiser, the code's ``optimizer_guidance``) step
  every harness step. Within a step the code updates the generator first, then the fake network on the
  samples the generator made *before* its update; the harness computes both losses from the same state and
  then steps both optimisers, which is the same update.
* **Optimiser**: AdamW betas (0.9, 0.999) as the task's; weight decay 0.01 (``train_sd.py`` and
  ``train_edm.py``, "pytorch's default") through ``optim_overrides``; grad-norm clip 10 (the task's, and the
  code's ``max_grad_norm``).
* **Sampler**: ``Sampler("consistency", steps, timesteps)``, ``steps_options = (steps,)``: the generator is
  evaluated only at its trained step count (``check_task`` refuses a task whose ``nfe`` lacks it).

Deviations:

* Pixel space on the task's small flow-matching UNet instead of SD/SDXL latents or the EDM ImageNet network;
  the teacher's continuous flow time t stands in for the DDPM step index k / 1000 (the same integers reach
  the network: the teacher's model time is 1000 t), so "2%-98%" is of the flow schedule, not SD's.
* The consistency sampler scales the starting noise by sigma(0.999) = 0.999 at evaluation; training feeds
  the unscaled noise as the code does (a 0.1% difference).
* The GAN head gets the mid block of a full forward of the fake UNet (the code stops after the bottleneck);
  the upper half is wasted compute, the features are the same.
* Learning rate, warm-up, batch size and step budget are the harness's (the code: lr 2e-6 ImageNet, 1e-5
  SD1.5, 500 warm-up steps), the same for every method of the cell. Real images come from the task's
  training batch (the code reads a separate real-image LMDB); the generator's classes are the batch's.
* Only the backward-simulation multi-step recipe is implemented (the SDXL runs without it denoise real or
  ODE-pair latents); no ODE-pair pre-training (``train_sd_ode.py``), no LoRA.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from bench import BenchError
from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext

#: DMD2 draws integer steps of a 1000-step schedule (``num_train_timesteps``); t = k / 1000 on the flow teacher
NUM_TRAIN_TIMESTEPS = 1000


def check_step_range(params: Any) -> Any:
    """Refuse a DM-loss step range whose lowest step (``min_step_percent`` of 1000) exceeds its highest."""
    if int(params.min_step_percent * NUM_TRAIN_TIMESTEPS) > int(params.max_step_percent * NUM_TRAIN_TIMESTEPS):
        raise ValueError(f"min_step_percent ({params.min_step_percent}) must not exceed max_step_percent "
                         f"({params.max_step_percent})")
    return params


def generator_steps(steps: int, total: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The code's ``denoising_step_list`` = range(total - 1, 0, -(total // steps)), first ``steps`` entries
    (1 step: [999]; 4 steps: [999, 749, 499, 249])."""
    return list(range(total - 1, 0, -(total // steps)))[:steps]


def dm_gradient(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised distribution-matching gradient (p_real - p_fake) / mean|p_real| per sample, with
    p = x - D(x_t); NaNs (a zero normaliser) become 0 (``torch.nan_to_num``, as the code)."""
    import torch

    p_real = x - d_real
    p_fake = x - d_fake
    dims = tuple(range(1, x.dim()))
    return torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=dims, keepdim=True))


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - sg(x - grad))^2): its gradient in x is grad / x.numel()."""
    import torch.nn.functional as F

    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")


def gan_d_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """Discriminator (the code's ``guidance_cls_loss``): mean softplus(D(fake)) + mean softplus(-D(real))."""
    import torch.nn.functional as F

    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def gan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (the code's ``gen_cls_loss``): mean softplus(-D(fake))."""
    import torch.nn.functional as F

    return F.softplus(-logits_fake).mean()


def gan_head(channels: int, side: int) -> nn.Module:
    """DMD2's classifier branch for a ``channels`` x ``side`` x ``side`` bottleneck (8 x 8 -> 4 x 4 -> 1 x 1)."""
    from torch import nn

    groups = math.gcd(32, channels)
    layers: list[nn.Module] = []
    if side >= 2:
        half = side // 2  # the 4x4/2 conv with padding 1 halves the side (rounding down)
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, channels, half, stride=half), nn.GroupNorm(groups, channels), nn.SiLU()]
    layers.append(nn.Conv2d(channels, 1, 1))
    return nn.Sequential(*layers)


def configure_generator(student: nn.Module, teacher: nn.Module, times: tuple[float, ...], label: str) -> nn.Module:
    """The generator starts as the teacher (``--initialie_generator``) and samples like DMD2's: x0 jumps at
    ``times`` with fresh re-noising (a consistency sampler), at exactly that many steps."""
    from bench.diffusion import Sampler

    student.net.load_state_dict(teacher.net.state_dict())
    student.sampler = Sampler("consistency", steps=len(times), timesteps=times)
    student.steps_options = (len(times),)
    student.timestep_table = {len(times): times}
    student.description = f"{label} generator at t = {list(times)} (consistency sampler)"
    return student


def backward_simulation(student: nn.Module, times: tuple[float, ...], noise: torch.Tensor,
                        cond: Any) -> tuple[torch.Tensor, int]:
    """``sample_backward``: k ~ U{0..steps-1} steps of the student's own chain from pure noise, no gradient;
    returns the generator's input at time ``times[k]`` and k (k = 0: the noise itself)."""
    import torch

    k = int(torch.randint(0, len(times), (1,)).item()) if len(times) > 1 else 0
    x = noise
    with torch.no_grad():
        for i in range(k):
            x0 = student.denoise(x, torch.full((x.shape[0],), times[i], device=x.device), cond)
            x = student.add_noise(x0, torch.randn_like(x0), times[i + 1])
    return x, k


def fake_score_loss(score: nn.Module, x: torch.Tensor, cond: Any) -> torch.Tensor:
    """The fake score's denoising loss on detached generator samples, in the teacher's parameterisation,
    at t = k / 1000 with k ~ U{0..999} (``compute_loss_fake``)."""
    import torch

    k = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x.shape[0],), device=x.device)
    t = k.to(x.dtype) / NUM_TRAIN_TIMESTEPS
    eps = torch.randn_like(x)
    pred = score.predict(score.add_noise(x, eps, t), t, cond)
    return (pred.float() - score.target(x, eps, t).float()).pow(2).mean()


def fixed_steps_error(method: str, steps: int, task: str, task_params: Any) -> str | None:
    """The resolve-time error of a generator trained at exactly ``steps`` when the task does not evaluate it."""
    nfe = getattr(task_params, "nfe", None)
    if nfe is not None and steps not in nfe:
        return (f"{method} samples at exactly its trained `steps`={steps}; add it to {task}.nfe (now "
                f"{list(nfe)}) or set {method}.steps to one of them")
    return None


def _cat(a: Any, b: Any) -> Any:
    import torch

    return torch.cat([a, b])


class DMD2(Method):
    """Yin et al. (NeurIPS 2024): DM loss with a trained fake score, TTUR, a GAN on the fake network's bottleneck,
    one-step or backward-simulated multi-step generator (see the module docstring)."""

    name = "dmd2"
    version = "1"
    domains = frozenset({"diffusion"})
    # --dfake_gen_update_ratio 5: experiments/imagenet/*.sh and experiments/sdxl/*.sh (SD1.5: 10)
    update_every = {"student": 5}
    # train_sd.py / train_edm.py: AdamW(betas=(0.9, 0.999), weight_decay=0.01); betas equal the task's
    optim_overrides = {"weight_decay": 0.01}

    class Params(Params):
        # steps: 1 (SD1.5 and ImageNet runs); SDXL's 4-step run: --num_denoising_step 4 --backward_simulation
        steps: int = Field(1, ge=1, le=100, description="generator steps (1: one-step; >1: fixed times "
                                                        "range(999, 0, -1000 // steps) / 1000, backward simulation)")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="CFG scale of the real score "
                                                                          "(real_guidance_scale); None: the task's "
                                                                          "guidance")
        # train_sd.py / train_edm.py argparse defaults --min_step_percent 0.02 --max_step_percent 0.98
        min_step_percent: float = Field(0.02, ge=0.0, lt=1.0, description="lowest DM-loss step, fraction of 1000")
        max_step_percent: float = Field(0.98, gt=0.0, le=1.0, description="highest DM-loss step, fraction of 1000")
        # --dm_loss_weight default 1.0 (train_sd.py)
        dm_loss_weight: float = Field(1.0, ge=0.0, description="weight of the DM loss in the generator loss")
        # ImageNet run: --gan_classifier --gen_cls_loss_weight 3e-3 --cls_loss_weight 1e-2 --diffusion_gan
        # --diffusion_gan_max_timestep 1000
        gan: bool = Field(True, description="GAN head on the fake network's bottleneck (D and G losses)")
        gen_cls_loss_weight: float = Field(3e-3, ge=0.0, description="weight of the generator's GAN loss")
        guidance_cls_loss_weight: float = Field(1e-2, ge=0.0, description="weight of the discriminator loss "
                                                                          "(added to the fake-score loss)")
        diffusion_gan_max_timestep: int = Field(1000, ge=1, le=NUM_TRAIN_TIMESTEPS,
                                                description="GAN inputs are noised at k / 1000, k < this")

        @model_validator(mode="after")
        def _range(self) -> "DMD2.Params":
            return check_step_range(self)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.steps_idx = generator_steps(p.steps)
        self.times = tuple(k / NUM_TRAIN_TIMESTEPS for k in self.steps_idx)
        self.min_step = int(p.min_step_percent * NUM_TRAIN_TIMESTEPS)
        self.max_step = int(p.max_step_percent * NUM_TRAIN_TIMESTEPS)
        self.fake: nn.Module | None = None
        self.w = 1.0
        self._mid: torch.Tensor | None = None
        self._last: dict[str, float] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        return fixed_steps_error("dmd2", params.steps, task, task_params)

    # --- models ----------------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        return configure_generator(student, teacher, self.times, "DMD2")

    def create_modules(self, ctx: StepContext) -> None:
        import torch
        from torch import nn

        score = copy.deepcopy(ctx.teacher)  # the fake score network: a copy of the teacher
        score.requires_grad_(True)
        modules: dict[str, nn.Module] = {"score": score}
        if self.params.gan:
            mid = getattr(getattr(score.net, "unet", None), "mid_block", None)
            if mid is None:
                raise BenchError("dmd2: the GAN head needs the fake network's bottleneck at net.unet.mid_block "
                                 "(a diffusers UNet); set dmd2.gan=false for other networks")
            mid.register_forward_hook(self._keep_mid)
            probe = ctx.calibration_batches(1)[0]
            with torch.no_grad():  # one dry run for the bottleneck's shape
                x = torch.zeros_like(probe["x0"][:1])
                score.predict(x, torch.full((1,), 0.5, device=x.device), probe["cond"][:1])
            channels, side = int(self._mid.shape[1]), int(self._mid.shape[-1])
            self._mid = None
            modules["head"] = gan_head(channels, side)
        self.fake = nn.ModuleDict(modules)

    def _keep_mid(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._mid = output

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"fake": self.fake}

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        self.w = float(p.guidance if p.guidance is not None else getattr(ctx.task.params, "guidance", 1.0))

    # --- losses ------------------------------------------------------------------------------------------
    def generator_input(self, student: nn.Module, noise: torch.Tensor, cond: Any) -> tuple[torch.Tensor, float]:
        """Backward simulation (`backward_simulation`): the input and its time t_k (k = 0: the noise at 0.999)."""
        x, k = backward_simulation(student, self.times, noise, cond)
        return x, self.times[k]

    def _logits(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        """D(x): diffusion-GAN noise, the fake network's forward (the hook keeps its bottleneck), the head."""
        import torch

        score, head = self.fake["score"], self.fake["head"]
        k = torch.randint(0, self.params.diffusion_gan_max_timestep, (x.shape[0],), device=x.device)
        t = k.to(x.dtype) / NUM_TRAIN_TIMESTEPS
        score.predict(score.add_noise(x, torch.randn_like(x), t), t, cond)
        feat, self._mid = self._mid, None
        return head(feat.float()).flatten(1)

    def distribution_matching_loss(self, x: torch.Tensor, cond: Any, ctx: StepContext) -> torch.Tensor:
        import torch

        score = self.fake["score"]
        w = self.w
        with torch.no_grad():
            k = torch.randint(self.min_step, min(self.max_step + 1, NUM_TRAIN_TIMESTEPS), (x.shape[0],),
                              device=x.device)
            t = k.to(x.dtype) / NUM_TRAIN_TIMESTEPS
            x_t = score.add_noise(x, torch.randn_like(x), t)
            d_fake = score.denoise(x_t, t, cond)  # the fake score is never guided
            d_real = ctx.run_teacher(lambda g: g.denoise(x_t, t, cond, guidance=w),
                                     n_examples=x.shape[0] * (2 if w != 1.0 else 1))
            grad = dm_gradient(x.detach(), d_real, d_fake)
        return dm_loss(x, grad)

    def _fake_loss(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        return fake_score_loss(self.fake["score"], x, cond)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        real, cond = batch["x0"], batch["cond"]
        student = ctx.student
        generator_turn = ctx.updating("student")
        x_in, t_in = self.generator_input(student, torch.randn_like(real), cond)
        with torch.set_grad_enabled(generator_turn):
            x = student.denoise(x_in, torch.full((real.shape[0],), t_in, device=real.device), cond)
        losses: dict[str, torch.Tensor] = {}
        log: dict[str, float] = {}
        if generator_turn:
            loss_dm = self.distribution_matching_loss(x, cond, ctx)
            loss = p.dm_loss_weight * loss_dm
            log["loss_dm"] = float(loss_dm.detach())
            if p.gan:
                loss_g = gan_g_loss(self._logits(x, cond))
                loss = loss + p.gen_cls_loss_weight * loss_g
                log["gen_cls_loss"] = float(loss_g.detach())
            losses["student"] = loss
        fake = x.detach()
        loss_fake = self._fake_loss(fake, cond)
        log["loss_fake"] = float(loss_fake.detach())
        if p.gan:
            logits_fake, logits_real = self._logits(_cat(fake, real), _cat(cond, cond)).chunk(2)
            loss_d = gan_d_loss(logits_fake, logits_real)
            loss_fake = loss_fake + p.guidance_cls_loss_weight * loss_d
            log["guidance_cls_loss"] = float(loss_d.detach())
        losses["fake"] = loss_fake
        self._last = log
        return losses

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"sampler": "consistency", "timesteps": list(self.times), "steps": len(self.times),
                "backward_simulation": len(self.times) > 1, "update_every": {"student": 5, "fake": 1},
                "real_guidance": self.w, "fake_guidance": 1.0,
                "dm_steps": [self.min_step, min(self.max_step, NUM_TRAIN_TIMESTEPS - 1)],
                "gan": p.gan, "gen_cls_loss_weight": p.gen_cls_loss_weight if p.gan else 0.0,
                "guidance_cls_loss_weight": p.guidance_cls_loss_weight if p.gan else 0.0,
                "fake_loss": "flow-velocity MSE at t = k/1000, k ~ U{0..999}"}
