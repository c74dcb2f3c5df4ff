"""Decoupled DMD — CFG Augmentation as the Spear, Distribution Matching as the Shield (Liu, Gao, Liu, Du, Li,
Wu, Jin, Cao, Zhang, Li, Hoi; Tongyi Lab / CUHK; arXiv 2511.22677, 2025; ICLR 2026; the Z-Image-Turbo recipe).

Official code: none found — the authors' Z-Image release has no training code for this loss that could be
read here, so a third-party port (below) stands in for it, and everything taken from it is labelled.

Sources and what each gave:

* **Paper** (only its abstract and first section were readable here: arxiv.org/html/2511.22677v1): the
  decomposition of the DMD direction. With teacher CFG D^a = D_u + a (D_c - D_u) = D_c + (a - 1)(D_c - D_u),
  the DMD direction D_fake - D^a_real = [D_fake,c - D_real,c] - (a - 1)(D_real,c - D_real,u): a
  distribution-matching (DM) term and a CFG-augmentation (CA) term; CA is the engine of few-step
  distillation, DM a regulariser that can be dropped (the CA-only ablation) or replaced; giving the two terms
  separate re-noising schedules improves results.
* **Third-party port** AaronCaoZJ/DMDs @ 706853c (a DMD2 fork with ``--use_decoupled_dmd``):
  ``main/decoupled_guidance.py`` (``compute_decoupled_loss``), ``main/sd_unified_model.py`` (it passes the
  generator's timestep to the loss), ``experiments/sdv1.5/sdv15_decoupled_dmd.sh`` (the recipe). Taken from it:
  the DM term's tau ~ U{min_step..max_step} with ``--min_step_percent 0.0 --max_step_percent 1.0`` (the full
  range, k in {0..999}); the CA term's tau' ~ U{min_step..t_gen - 1} per sample, where t_gen is the step the
  generator currently denoises from (the port's HEAD; an earlier revision, 6a7a00d, drew tau' >= t_gen and
  commit 1798cd0 reversed it); independent noise for the two terms; each term normalised per sample by
  mean|D_real,c(x_tau) - x| at its own tau (the conditional teacher: the DM term has no other teacher
  prediction); fake network without CFG; loss = DM + CA; 4 steps with backward simulation, TTUR 5,
  AdamW (0.9, 0.999) wd 0.01, clip 10, CFG 7.5 for SD1.5 (a community SD1.5 run used CFG 3).
* **DMD2 code** (tianweiy/DMD2 @ 8d8fa55, which the port keeps): the fake-score loss, TTUR, backward
  simulation, the generator times ``range(999, 0, -1000 // steps)`` and nan_to_num normalisation — see
  ``methods/diffusion/dmd2.py``, whose functions this module imports (one copy).
* **Chosen here**: CFG a = the task's ``guidance`` (the harness's teacher scale; the port's 7.5 is SD1.5's);
  4 steps (the port's recipe; Z-Image-Turbo's 8 steps is not in the task's default ``nfe`` [1, 4]); each term
  as a DMD2 loss 0.5 * mean((x - sg(x - g))^2) (the port uses mean((x - sg(x + u))^2) with u = -g, twice the
  gradient, a constant factor); normalisation with ``nan_to_num`` as DMD2 (the port adds 1e-8 instead); the
  CA-only ablation keeps training the fake network (unused by the generator then) so that it differs from the
  full method only in the generator's loss and the update schedule stays the same; no GAN (the port's GAN
  lines are commented out in its decoupled loss).

The generator directions (descent moves x against them): g_DM = (D_fake,c - D_real,c)(x_tau) /
mean|D_real,c(x_tau) - x| and g_CA = -(a - 1)(D_real,c - D_real,u)(x_tau') / mean|D_real,c(x_tau') - x|;
student loss = w_DM 0.5 mean((x - sg(x - g_DM))^2) + w_CA 0.5 mean((x - sg(x - g_CA))^2). With tau' = tau,
the same noise and w_DM = w_CA = 1, g_DM + g_CA = (D_fake - D^a_real) / mean|D_real,c - x|: DMD2's direction.
One batched teacher call gives D_real,c at tau and D_real,c, D_real,u at tau' (3B network evaluations).

Sampler: ``Sampler("consistency", steps, timesteps=(0.999, 0.749, 0.499, 0.249))``, ``steps_options = (steps,)``.

Deviations: as DMD2's module (pixel space, the flow teacher's time k / 1000 for the DDPM index, the harness's
learning rate and budget, unscaled noise at t = 0.999 in training vs 0.999 z in the sampler), and the paper's
own schedules and weights could not be checked against its text (the port's are used, labelled above).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from bench.api import Method, Params
from bench.methods.diffusion.dmd2 import (NUM_TRAIN_TIMESTEPS, backward_simulation, configure_generator, dm_loss,
                                          fake_score_loss, fixed_steps_error, generator_steps)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext

def decoupled_directions(x: torch.Tensor, d_fake_c: torch.Tensor | None, d_real_c_dm: torch.Tensor | None,
                         d_real_c_ca: torch.Tensor, d_real_u_ca: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(g_DM, g_CA): the DM direction (D_fake,c - D_real,c) at tau and the CA direction -(a - 1)(D_real,c -
    D_real,u) at tau', each divided per sample by mean|D_real,c - x| at its own tau and passed through
    ``nan_to_num``. ``d_fake_c`` None (the CA-only ablation): g_DM is None."""
    import torch

    dims = tuple(range(1, x.dim()))
    g_dm = None
    if d_fake_c is not None:
        g_dm = torch.nan_to_num((d_fake_c - d_real_c_dm) / (d_real_c_dm - x).abs().mean(dim=dims, keepdim=True))
    g_ca = torch.nan_to_num(-(scale - 1.0) * (d_real_c_ca - d_real_u_ca)
                            / (d_real_c_ca - x).abs().mean(dim=dims, keepdim=True))
    return g_dm, g_ca


#: DMD2's 0.5 * mean((x - sg(x - grad))^2), whose gradient in x is grad / x.numel(): each term's loss
direction_loss = dm_loss


class DecoupledDMD(Method):
    """Liu et al. (2025): DMD's direction split into a DM and a CA term with separate re-noising schedules, on
    DMD2's machinery (fake score, TTUR 5, backward-simulated 4-step generator); see the module docstring."""

    name = "decoupled_dmd"
    version = "1"
    domains = frozenset({"diffusion"})
    # the port's recipe: --dfake_gen_update_ratio 5 (experiments/sdv1.5/sdv15_decoupled_dmd.sh)
    update_every = {"student": 5}
    # DMD2 train_sd.py (kept by the port): AdamW(betas=(0.9, 0.999), weight_decay=0.01)
    optim_overrides = {"weight_decay": 0.01}

    class Params(Params):
        # the port's recipe: --num_denoising_step 4 --denoising_timestep 1000 --backward_simulation
        steps: int = Field(4, ge=1, le=100, description="generator steps at times range(999, 0, -1000 // steps) "
                                                        "/ 1000, trained with backward simulation")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="CFG scale a of the CA term; None: the "
                                                                          "task's guidance")
        # the port's loss = loss_dm + loss_ca (equal weights)
        dm_weight: float = Field(1.0, ge=0.0, description="weight of the DM term")
        ca_weight: float = Field(1.0, ge=0.0, description="weight of the CA term")
        # the paper's ablation: CA alone (the DM regulariser removed)
        use_dm: bool = Field(True, description="false: CA term only (the paper's ablation)")
        # the port's recipe: --min_step_percent 0.0 --max_step_percent 1.0 (DM over the full range)
        dm_min_step_percent: float = Field(0.0, ge=0.0, lt=1.0, description="lowest DM re-noising step / 1000")
        dm_max_step_percent: float = Field(1.0, gt=0.0, le=1.0, description="highest DM re-noising step / 1000")
        # the port: tau' ~ U{min_step..t_gen - 1} with the same min_step (0.0 in its recipe)
        ca_min_step_percent: float = Field(0.0, ge=0.0, lt=1.0, description="lowest CA re-noising step / 1000; "
                                                                            "the highest is the generator's "
                                                                            "current step - 1")

        @model_validator(mode="after")
        def _range(self) -> "DecoupledDMD.Params":
            if self.dm_min_step_percent >= self.dm_max_step_percent:
                raise ValueError(f"dm_min_step_percent ({self.dm_min_step_percent}) must be below "
                                 f"dm_max_step_percent ({self.dm_max_step_percent})")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.steps_idx = generator_steps(p.steps)
        self.times = tuple(k / NUM_TRAIN_TIMESTEPS for k in self.steps_idx)
        self.dm_min = int(p.dm_min_step_percent * NUM_TRAIN_TIMESTEPS)
        self.dm_max = int(p.dm_max_step_percent * NUM_TRAIN_TIMESTEPS)
        self.ca_min = int(p.ca_min_step_percent * NUM_TRAIN_TIMESTEPS)
        self.fake: nn.Module | None = None
        self.w = 1.0
        self._last: dict[str, float] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        error = fixed_steps_error("decoupled_dmd", params.steps, task, task_params)
        if error:
            return error
        if min(generator_steps(params.steps)) <= int(params.ca_min_step_percent * NUM_TRAIN_TIMESTEPS):
            return (f"decoupled_dmd: ca_min_step_percent={params.ca_min_step_percent} leaves no CA re-noising step "
                    f"below the generator's last step {min(generator_steps(params.steps))}")
        return None

    # --- models ----------------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        return configure_generator(student, teacher, self.times, "Decoupled-DMD")

    def create_modules(self, ctx: StepContext) -> None:
        self.fake = copy.deepcopy(ctx.teacher)  # fake score: a copy of the teacher, trained on generator samples
        self.fake.requires_grad_(True)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"fake": self.fake}

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        self.w = float(p.guidance if p.guidance is not None else getattr(ctx.task.params, "guidance", 1.0))

    # --- losses ------------------------------------------------------------------------------------------
    def _generator_loss(self, x: torch.Tensor, cond: Any, t_gen: int, ctx: StepContext) -> torch.Tensor:
        import torch

        fake, w, b = self.fake, self.w, x.shape[0]
        use_dm = self.params.use_dm
        with torch.no_grad():
            # CA: tau' ~ U{ca_min..t_gen - 1}: only noise levels below the one the generator denoises from
            k_ca = torch.randint(self.ca_min, max(t_gen, self.ca_min + 1), (b,), device=x.device)
            t_ca = k_ca.to(x.dtype) / NUM_TRAIN_TIMESTEPS
            x_ca = fake.add_noise(x, torch.randn_like(x), t_ca)
            null = ctx.teacher.net.null_condition(cond)
            xs, ts, cs = [x_ca, x_ca], [t_ca, t_ca], [cond, null]
            if use_dm:  # DM: tau over the full range, its own noise
                k_dm = torch.randint(self.dm_min, min(self.dm_max + 1, NUM_TRAIN_TIMESTEPS), (b,), device=x.device)
                t_dm = k_dm.to(x.dtype) / NUM_TRAIN_TIMESTEPS
                x_dm = fake.add_noise(x, torch.randn_like(x), t_dm)
                xs, ts, cs = xs + [x_dm], ts + [t_dm], cs + [cond]
            x_all, t_all, c_all = torch.cat(xs), torch.cat(ts), torch.cat(cs)
            d_all = ctx.run_teacher(lambda g: g.denoise(x_all, t_all, c_all), n_examples=len(x_all))
            parts = d_all.split(b)
            d_real_c_ca, d_real_u_ca = parts[0], parts[1]
            d_real_c_dm = parts[2] if use_dm else None
            d_fake_c = fake.denoise(x_dm, t_dm, cond) if use_dm else None  # the fake score is never guided
            g_dm, g_ca = decoupled_directions(x.detach(), d_fake_c, d_real_c_dm, d_real_c_ca, d_real_u_ca, w)
        loss_ca = direction_loss(x, g_ca)
        loss = self.params.ca_weight * loss_ca
        self._last["loss_ca"] = float(loss_ca.detach())
        if g_dm is not None:
            loss_dm = direction_loss(x, g_dm)
            loss = loss + self.params.dm_weight * loss_dm
            self._last["loss_dm"] = float(loss_dm.detach())
        return loss

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        real, cond = batch["x0"], batch["cond"]
        student = ctx.student
        generator_turn = ctx.updating("student")
        self._last = {}
        x_in, k = backward_simulation(student, self.times, torch.randn_like(real), cond)
        with torch.set_grad_enabled(generator_turn):
            x = student.denoise(x_in, torch.full((real.shape[0],), self.times[k], device=real.device), cond)
        losses: dict[str, torch.Tensor] = {}
        if generator_turn:
            losses["student"] = self._generator_loss(x, cond, self.steps_idx[k], ctx)
        losses["fake"] = fake_score_loss(self.fake, x.detach(), cond)
        return losses

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"sampler": "consistency", "timesteps": list(self.times), "steps": len(self.times),
                "backward_simulation": len(self.times) > 1, "update_every": {"student": 5, "fake": 1},
                "cfg_scale": self.w, "use_dm": p.use_dm, "dm_weight": p.dm_weight if p.use_dm else 0.0,
                "ca_weight": p.ca_weight, "dm_steps": [self.dm_min, min(self.dm_max, NUM_TRAIN_TIMESTEPS - 1)],
                "ca_steps": f"[{self.ca_min}, t_gen - 1], t_gen in {self.steps_idx}",
                "normaliser": "mean|D_real,c(x_tau) - x| per term (the port)"}
