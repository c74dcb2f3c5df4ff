"""SiD — Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for
One-Step Generation (Zhou, Zheng, Wang, Yin, Huang; ICML 2024; arXiv 2404.04057), with the few-step
extension of "Few-Step Diffusion via Score identity Distillation" (Zhou, Gu, Wang; arXiv 2505.12674, 2025).

Official code read: mingyuanzhou/SiD @ 01fbb13 — ``training/sid_loss.py`` (generator and fake-score losses),
``training/sid_training_loop.py`` (update order, EMA), ``sid_train.py`` and ``run_sid.sh`` (defaults); its
``sida`` branch @ a5510fd — ``sida_training/sida_loss.py``, ``sida_networks.py``, ``run_sida.sh`` (the
Diffusion-GAN that the few-step paper applies); mingyuanzhou/SiD-LSG @ 709fc22 — ``training/sid_sd_util.py``
and ``sid_training_loop.py`` (guidance scales kappa1..kappa4, multi-step sampler, context dropout);
apple-aiml-research/ml-sid-dit @ 9596ed9 (the authors' few-step code for flow-matching teachers) —
``training/sid_dit_util.py`` and ``sid_dit_training_loop.py`` (the uniform mixture over generation steps).
Of the few-step paper only the abstract was readable here.

What is implemented:

* **EDM sigma on the flow teacher.** SiD works in EDM's x_sigma = x0 + sigma eps. Under the flow schedule
  x_t = (1 - t) x0 + t eps = (1 - t) x_sigma with t = sigma / (1 + sigma), so the EDM denoiser D(x_sigma,
  sigma) is the flow teacher's x0 prediction ``denoise(x_t, t)`` (the input scaling is 1 - t). The generator
  G(sigma_init z) with sigma_init = 2.5 (``--init_sigma 2.5``) is the student's x0 prediction at
  t_init = 2.5 / 3.5 from x = t_init z — exactly what the consistency sampler feeds at t_init.
* **Generator loss** (``generator_loss``): u ~ U(0, tmax / 1000), tmax = 800, sigma = (sigma_max^(1/rho) +
  (1 - u)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho on the Karras grid (0.002, 80, rho 7), so sigma runs
  from 0.002 up to about 24; x_t = x_g noised at t = sigma / (1 + sigma); y_real = teacher D, y_fake = fake D;
  per pixel (y_real - y_fake)((y_real - x_g) - alpha (y_real - y_fake)) / sg(mean|x_g - y_real|) (per sample,
  clipped at 1e-5), alpha = 1.2; summed over pixels and the batch, divided by the batch and multiplied by
  ``loss_scale_g`` = 100 (``--lsg 100``, fp32 too). Gradients flow through x_g, y_real and y_fake (both score
  networks are differentiated with respect to their input; only G's parameters are updated). At alpha = 1 the
  loss is (y_real - y_fake)(y_fake - x_g) / w, whose gradient in x_g at fixed y's is (y_fake - y_real) / w:
  DMD's direction with the same normaliser. Samples with NaNs are dropped, as the code does.
* **Fake score** (``__call__`` of ``SID_EDMLoss``): a copy of the teacher trained on detached generator
  samples with EDM's loss: sigma = exp(N(-1.2, 1.2^2)), weight (sigma^2 + 0.5^2) / (0.5 sigma)^2 on
  |D_fake(x_sigma) - x|^2 (x0 prediction), summed over pixels, mean over the batch.
* **Updates**: both networks every step (1:1); the code updates the fake network first (on a fresh batch of
  generator samples), then G on another fresh batch. Adam betas (0, 0.999) for both (``sid_train.py``:
  ``torch.optim.Adam(betas=[0, 0.999], eps=1e-8)``; the task's AdamW has weight decay 0, i.e. Adam) and no
  gradient clipping (the fp32 code only replaces NaN gradients; SiD-LSG clips only under fp16):
  ``optim_overrides = {"betas": (0.0, 0.999), "grad_clip": None}``.
* **EMA** of G (``--ema 0.5`` Mimg = 500 kimg half-life, ramp-up 0.05: half-life = min(500k, 0.05 x images
  seen), beta = 0.5^(batch / half-life)); the evaluated student is the EMA, as the code evaluates ``G_ema``.
  Kept as method state (``state_dict``), so resume is exact.
* **Few steps** (``steps`` K > 1; the few-step paper, SiD-DiT's ``sid_dit_generate`` with fresh noise):
  generation times t_i = t_init (1 - i / K) (SiD-LSG's ``init_timesteps * (1 - i / num_steps)``); every
  harness step draws k ~ U{1..K} once (SiD-DiT's ``num_steps_random``) and both the fake network and G train
  on the generator's output after k steps: the first k - 1 steps without gradient (x0 prediction re-noised to
  the next time with fresh noise), the k-th with gradient — the uniform mixture of all steps' outputs.
* **Guidance** ``cfg`` (kappa1: fake when trained, kappa2 = kappa3: fake in the G loss, kappa4: teacher in the
  G loss, SiD-LSG's names; kappa = 0 is the null condition, as SiD-DiT's ``guidance_scale == 0`` branch):
  ``lsg`` (default) all kappa = w, the task's guidance (SiD-LSG's and SiD-DiT's released scripts set the three
  scales equal: 2 and 4.5); ``none`` all 1 (SiD, ICML 2024: no CFG); ``zero`` (Zero-CFG, from the few-step
  paper's abstract: "disables CFG in the teacher and removes text conditioning in the fake score network")
  kappa4 = 1, kappa1 = kappa2 = kappa3 = 0; ``anti`` (Anti-CFG: "negative CFG in the fake score network")
  kappa4 = 1, kappa2 = kappa3 = ``anti_scale`` (default -1) and kappa1 = 1 with the null condition for 10% of
  the fake network's training examples (SiD-LSG's ``use_context_dropout_train_fake``) so that it learns both
  branches. The Anti-CFG scale and the teacher's kappa4 in it are choices made here: the paper's text was
  not available.
* **Diffusion-GAN** (optional, ``gan_weight`` > 0; off by default: SiD is data-free and the few-step paper adds
  it only when real images are available): SiDA's zero-parameter discriminator — the channel mean of the fake
  network's bottleneck (the UNet's mid block, by a forward hook) is a spatial logit map; D loss, added to the
  fake loss: mean over the batch of lambda(sigma) (BCE(D(real), 1) + BCE(D(fake), 0)) / 2 with real images
  (the batch's x0) noised like the fake ones; G loss BCE(D(x_g), 1) / w x C H W, scaled by ``gan_weight``
  (SiDA's ``--lsg_gan 0.01``), and G minimises 0.5 x SiD loss + 0.5 x GAN loss (SiDA's combination). With
  guidance, the conditional half's features are used.

Sampler: ``Sampler("consistency", K, timesteps=(t_init (1 - i / K)))``, ``steps_options = (K,)``.

Deviations: pixel space on the task's small flow UNet instead of EDM/SD networks (schedules mapped as above);
within a harness step G's loss sees the fake network from before that step's fake update (the harness
computes every loss, then steps every optimiser), one fake update of lag against the code's order; the
harness's learning rate, batch and budget (the code: lr 1e-5, batch 256, hundreds of millions of images);
SiDA's warm-ups (G frozen for 100k images, GAN term after 200k) are not applied (beyond these budgets); no
augmentation pipe or dropout (the task's networks have none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from bench import BenchError
from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext


def karras_sigma(u: torch.Tensor, tmax: int = 800, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> torch.Tensor:
    """SiD's generator-loss noise level for u ~ U(0, 1): rnd_t = u tmax / 1000 on the Karras ramp, 0 at sigma_min."""
    rnd_t = u * tmax / 1000.0
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + (1.0 - rnd_t) * (lo - hi)) ** rho


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """The flow time of EDM noise level sigma: x_t = x_sigma / (1 + sigma) has t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)


def sid_generator_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """(y_real - y_fake)((y_real - x_g) - alpha (y_real - y_fake)) / sg(mean|x_g - y_real|), summed over
    pixels and samples and divided by the batch size (samples with NaNs dropped, the divisor kept)."""
    import torch

    b = x_g.shape[0]
    keep = ~(torch.isnan(x_g).flatten(1).any(1) | torch.isnan(y_real).flatten(1).any(1)
             | torch.isnan(y_fake).flatten(1).any(1))
    if not keep.all():
        x_g, y_real, y_fake = x_g[keep], y_real[keep], y_fake[keep]
    with torch.no_grad():
        w = (x_g - y_real).abs().float().mean(dim=tuple(range(1, x_g.dim())), keepdim=True).clip(min=1e-5)
    loss = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w
    return loss.sum() / b


def edm_fake_loss(d_fake: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's denoising loss: (sigma^2 + sd^2) / (sigma sd)^2 |D - x|^2 summed over pixels, mean over the batch."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    weight = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    return (weight * (d_fake - x) ** 2).sum() / x.shape[0]


def _denoise(g: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any, kappa: float) -> torch.Tensor:
    """g's x0 prediction at guidance kappa (1: conditional; 0: the null condition alone; else CFG)."""
    if kappa == 1.0:
        return g.denoise(x, t, cond)
    if kappa == 0.0:
        return g.denoise(x, t, g.net.null_condition(cond))
    return g.denoise(x, t, cond, guidance=kappa)


class SiD(Method):
    """Zhou et al. (ICML 2024; few-step 2025): score identity distillation with a fake score network, alpha = 1.2,
    generator from sigma_init = 2.5, uniform mixture over K steps, LSG/Zero/Anti-CFG (see the module docstring)."""

    name = "sid"
    version = "1"
    domains = frozenset({"diffusion"})
    # sid_train.py: Adam(betas=[0, 0.999]) for both networks; sid_training_loop.py: no gradient clipping (fp32)
    optim_overrides = {"betas": (0.0, 0.999), "grad_clip": None}

    class Params(Params):
        # 1 step: SiD (ICML 2024); few-step: arXiv 2505.12674 (SiD-DiT's default --num_steps 4)
        steps: int = Field(1, ge=1, le=100, description="generation steps K (times t_init (1 - i / K))")
        # run_sid.sh / sid_train.py: --alpha 1.2 --init_sigma 2.5 --tmax 800 --lsg 100
        alpha: float = Field(1.2, description="alpha of the generator loss (1: DMD-like direction)")
        init_sigma: float = Field(2.5, gt=0.0, description="EDM sigma of the generator's input "
                                                           "(flow time sigma / (1 + sigma))")
        tmax: int = Field(800, ge=1, le=1000, description="generator-loss noise drawn on the first tmax/1000 "
                                                          "of the Karras ramp")
        loss_scale_g: float = Field(100.0, gt=0.0, description="factor of the generator loss (--lsg)")
        # SID_EDMLoss defaults (EDM): P_mean -1.2, P_std 1.2, sigma_data 0.5; Karras grid 0.002..80, rho 7
        p_mean: float = Field(-1.2, description="mean of log sigma of the fake-score loss")
        p_std: float = Field(1.2, gt=0.0, description="std of log sigma of the fake-score loss")
        sigma_data: float = Field(0.5, gt=0.0, description="EDM sigma_data of the fake-score weighting")
        # sid_train.py --ema 0.5 (Mimg); training_loop ema_rampup_ratio 0.05; 0 disables (SiD-DiT)
        ema_halflife_kimg: float = Field(500.0, ge=0.0, description="EMA half-life of G in thousands of images "
                                                                    "(0: evaluate G itself)")
        ema_rampup_ratio: float | None = Field(0.05, gt=0.0, description="half-life at most this x images seen")
        # SiD-LSG / SiD-DiT released scripts: cfg_train_fake = cfg_eval_fake = cfg_eval_real (LSG)
        cfg: Literal["lsg", "none", "zero", "anti"] = Field("lsg", description="guidance: lsg (all kappa = w), "
                                                                              "none (no CFG), zero (Zero-CFG), "
                                                                              "anti (Anti-CFG)")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="w of lsg; None: the task's guidance")
        anti_scale: float = Field(-1.0, lt=0.0, description="Anti-CFG: the fake score's guidance in the G loss "
                                                            "(a choice: the paper's value was not available)")
        # SiD-LSG use_context_dropout_train_fake: 10% empty prompts when training the fake network
        anti_fake_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Anti-CFG: null-condition rate of the "
                                                                           "fake network's training examples")
        # SiDA: --lsg_gan 0.01 when --use_gan 1; off: SiD is data-free
        gan_weight: float = Field(0.0, ge=0.0, description="Diffusion-GAN generator-loss factor (SiDA 0.01; 0: off)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.t_init = p.init_sigma / (1.0 + p.init_sigma)
        self.times = tuple(self.t_init * (1.0 - i / p.steps) for i in range(p.steps))
        self.fake: nn.Module | None = None
        self.kappa: dict[str, float] = {}
        self.ema: dict[str, torch.Tensor] | None = None
        self._batch = 0
        self._mid: torch.Tensor | None = None
        self._last: dict[str, float] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        from bench.methods.diffusion.dmd2 import fixed_steps_error

        return fixed_steps_error("sid", params.steps, task, task_params)

    # --- models ----------------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.diffusion import Sampler

        student.net.load_state_dict(teacher.net.state_dict())  # G initialised from the teacher
        student.sampler = Sampler("consistency", steps=len(self.times), timesteps=self.times)
        student.steps_options = (len(self.times),)
        student.timestep_table = {len(self.times): self.times}
        student.description = f"SiD generator at t = {[round(t, 4) for t in self.times]} (consistency sampler)"
        return student

    def create_modules(self, ctx: StepContext) -> None:
        import copy

        self.fake = copy.deepcopy(ctx.teacher)  # fake score: a copy of the teacher
        self.fake.requires_grad_(True)
        if self.params.gan_weight > 0:
            mid = getattr(getattr(self.fake.net, "unet", None), "mid_block", None)
            if mid is None:
                raise BenchError("sid: the Diffusion-GAN needs the fake network's bottleneck at net.unet.mid_block "
                                 "(a diffusers UNet); set sid.gan_weight=0 for other networks")
            mid.register_forward_hook(self._keep_mid)

    def _keep_mid(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._mid = output

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"fake": self.fake}

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        w = float(p.guidance if p.guidance is not None else getattr(ctx.task.params, "guidance", 1.0))
        self.kappa = {"lsg": {"train_fake": w, "eval_fake": w, "real": w},
                      "none": {"train_fake": 1.0, "eval_fake": 1.0, "real": 1.0},
                      "zero": {"train_fake": 0.0, "eval_fake": 0.0, "real": 1.0},
                      "anti": {"train_fake": 1.0, "eval_fake": p.anti_scale, "real": 1.0}}[p.cfg]
        if self.ema is None and p.ema_halflife_kimg > 0:
            self.ema = {k: v.detach().clone() for k, v in ctx.student.named_parameters()}
        elif self.ema is not None:
            device = next(ctx.student.parameters()).device
            self.ema = {k: v.to(device) for k, v in self.ema.items()}

    # --- generation ----------------------------------------------------------------------------------------
    def generate(self, student: nn.Module, z: torch.Tensor, cond: Any, k: int, grad: bool) -> torch.Tensor:
        """The generator's x0 after k steps from x = t_0 z: steps 1..k-1 without gradient (re-noised with fresh
        noise to the next time), the k-th with gradient when ``grad``."""
        import torch

        x = self.times[0] * z  # (1 - t_0) * 0 + t_0 * z: EDM's sigma_init z in flow coordinates
        d = z
        for i in range(k):
            if i > 0:
                x = student.add_noise(d, torch.randn_like(d), self.times[i])
            with torch.set_grad_enabled(grad and i == k - 1):
                d = student.denoise(x, torch.full((z.shape[0],), self.times[i], device=z.device), cond)
        return d

    # --- losses ------------------------------------------------------------------------------------------
    def _bottleneck_logits(self, b: int) -> torch.Tensor:
        """SiDA's zero-parameter discriminator: channel mean of the last fake forward's mid block (first b rows:
        the conditional half of a guided call)."""
        feat, self._mid = self._mid, None
        return feat[:b].float().mean(dim=1, keepdim=True)

    def _fake_loss(self, x: torch.Tensor, cond: Any, real: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        p, fake, b = self.params, self.fake, x.shape[0]
        if p.cfg == "anti" and p.anti_fake_dropout > 0:
            drop = torch.rand(b, device=x.device) < p.anti_fake_dropout
            cond = torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), fake.net.null_condition(cond), cond)
        sigma = (torch.randn(b, device=x.device) * p.p_std + p.p_mean).exp()
        t = sigma_to_t(sigma)
        n = torch.randn_like(x)
        d = _denoise(fake, fake.add_noise(x, n, t), t, cond, self.kappa["train_fake"])
        loss = edm_fake_loss(d, x, sigma, p.sigma_data)
        self._last["loss_fake"] = float(loss.detach())
        if p.gan_weight > 0:
            logit_fake = self._bottleneck_logits(b)
            _denoise(fake, fake.add_noise(real, n, t), t, cond, self.kappa["train_fake"])
            logit_real = self._bottleneck_logits(b)
            lam = (sigma ** 2 + p.sigma_data ** 2) / (sigma * p.sigma_data) ** 2
            bce = (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
                   + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
            loss_d = (lam * bce / 2).mean()
            self._last["loss_D"] = float(loss_d.detach())
            loss = loss + loss_d
        return loss

    def _generator_loss(self, x_g: torch.Tensor, cond: Any, ctx: StepContext) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        p, fake, b = self.params, self.fake, x_g.shape[0]
        sigma = karras_sigma(torch.rand(b, device=x_g.device), tmax=p.tmax)
        t = sigma_to_t(sigma)
        x_t = fake.add_noise(x_g, torch.randn_like(x_g), t)
        y_fake = _denoise(fake, x_t, t, cond, self.kappa["eval_fake"])
        logits = self._bottleneck_logits(b) if p.gan_weight > 0 else None
        k_real = self.kappa["real"]

        def real_score(g: nn.Module) -> torch.Tensor:
            with torch.enable_grad():  # SiD differentiates the teacher's output with respect to x_g
                return _denoise(g, x_t, t, cond, k_real)

        y_real = ctx.run_teacher(real_score, n_examples=b * (1 if k_real in (0.0, 1.0) else 2))
        loss_sid = sid_generator_loss(x_g, y_real, y_fake, p.alpha)
        self._last["loss_sid"] = float(loss_sid.detach())
        loss = p.loss_scale_g * loss_sid
        if logits is not None:
            with torch.no_grad():
                w = (x_g - y_real).abs().float().mean(dim=tuple(range(1, x_g.dim()))).clip(min=1e-5)
            bce = F.binary_cross_entropy_with_logits(logits.clamp(-10, 10), torch.ones_like(logits))
            loss_gan = p.gan_weight * (bce * x_g[0].numel() / w).mean()
            self._last["loss_G_gan"] = float(loss_gan.detach())
            loss = 0.5 * loss + 0.5 * loss_gan
        return loss

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        real, cond = batch["x0"], batch["cond"]
        self._batch = real.shape[0]
        self._last = {}
        student = ctx.student
        k = int(torch.randint(1, len(self.times) + 1, (1,)).item()) if len(self.times) > 1 else 1
        with torch.no_grad():  # the fake network's batch: fresh noise, no gradient to G
            x_fake = self.generate(student, torch.randn_like(real), cond, k, grad=False)
        loss_fake = self._fake_loss(x_fake, cond, real)
        x_g = self.generate(student, torch.randn_like(real), cond, k, grad=True)  # G's batch: fresh noise
        return {"fake": loss_fake, "student": self._generator_loss(x_g, cond, ctx)}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        import torch

        p = self.params
        if self.ema is not None:
            nimg = ctx.step * self._batch  # images seen before this step (the code's cur_nimg)
            half = p.ema_halflife_kimg * 1000
            if p.ema_rampup_ratio is not None:
                half = min(half, nimg * p.ema_rampup_ratio)
            beta = 0.5 ** (self._batch / max(half, 1e-8))
            with torch.no_grad():
                for name, param in ctx.student.named_parameters():
                    self.ema[name].copy_(param.detach().lerp(self.ema[name], beta))
        return dict(self._last)

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        import torch

        if self.ema is not None:  # the code evaluates G_ema
            with torch.no_grad():
                for name, param in student.named_parameters():
                    param.copy_(self.ema[name])
        return student

    def state_dict(self) -> dict[str, Any]:
        return {"ema": None if self.ema is None else {k: v.detach().cpu().clone() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = state.get("ema")

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"sampler": "consistency", "timesteps": list(self.times), "steps": len(self.times),
                "t_init": self.t_init, "init_sigma": p.init_sigma, "alpha": p.alpha, "tmax": p.tmax,
                "cfg": p.cfg, "kappa": dict(self.kappa), "update_every": {"student": 1, "fake": 1},
                "ema_halflife_kimg": p.ema_halflife_kimg, "evaluated": "EMA of G" if self.ema is not None else "G",
                "gan_weight": p.gan_weight, "loss_scale_g": p.loss_scale_g}
