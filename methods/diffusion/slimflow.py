"""SlimFlow — Zhu, Liu & Liu, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow"
(ECCV 2024, arXiv 2407.12718). Official code: yuanzhi-zhu/SlimFlow @ 96d8b25, read in ``reflow/reflow.py``
(``RectifiedFlow``: ``randomness_schedule``, ``get_data_pair``, ``get_interpolations``, ``teacher_loss_new``,
``train_step``), ``reflow/losses.py`` (the L2 loss), ``train.py`` (stages, teacher loading, EMA),
``configs/rectified_flow/cifar10_rf_gaussian.py`` + ``configs/default_cifar10_configs.py`` (CIFAR-10
defaults), ``models/ema.py`` and the README's training commands.

**Time convention.** SlimFlow's time runs the other way from bench's: SlimFlow ``s = 0`` is noise and ``s = 1``
data, ``x_s = s x1 + (1 - s) z`` and its velocity is ``x1 - z`` (data - noise); bench's flow schedule has
``t = 1`` noise, ``x_t = (1 - t) x0 + t eps`` and velocity ``eps - x0``. So ``t = 1 - s`` (`bench_time`) and a
SlimFlow velocity is minus a bench velocity (`slimflow_velocity`): the losses below are written in SlimFlow's
convention and every network call goes through the generator adapter at ``t = 1 - s``.

What is implemented, two generations (`bench.api.Generation`) of ONE compact student, the narrower network
of ``task.compact_student`` (built in ``init_student``; the second generation keeps it, ``fresh_student=False``):

1. **Annealing reflow** (``x0_randomness=warmup_K``, ``h_flip=True``, ``flow_t_schedule=uniform``): flow matching
   on the teacher's noise -> image pairs ``(z, x1)`` (``ctx.teacher_pairs``), the pair's noise blended with fresh
   noise ``z' = sqrt(1 - beta^2) z + beta eps`` (no draw when beta = 0), beta annealed from 1 to 0 over the first
   ``anneal_fraction`` of the stage (``randomness_schedule``: linear ``1 - min(1, k/K)`` — the README's
   ``warmup_300000`` —, cosine ``(1 + cos(pi min(1, k/K))) / 2`` or exponential ``exp(-k/K)``); then, as the code
   does, with probability 1/2 per batch both halves of the pair are flipped horizontally together (the code's
   comment says "when x0_randomness == 1", the code flips at every beta: we follow the code). ``s ~ U[eps, 1)``,
   ``eps = 1e-3``; loss ``mean((v(x_s, s) - (x1 - z'))^2)`` (``loss_type=l2``, ``reduce_mean=True``, uniform
   weights). The result is the small student's 2-rectified flow, needing no pre-trained initialisation.
2. **Flow-guided distillation** (``flow_t_schedule=t0``, ``use_teacher=True``, ``x0_randomness=fix_0``, no flip):
   the one-step velocity at ``s = eps`` regressed onto the pair, ``mean((v(eps x1 + (1 - eps) z, eps) - (x1 -
   z))^2)``, PLUS the guidance term of ``teacher_loss_new`` (the one ``train_step`` calls): fresh noise ``n``, the
   student's one-step velocity ``v_s = v(n, eps)``, ``s' ~ U[0.2, 0.8]``, the student's partial step ``x_s' = n +
   s' sg(v_s)``, the guide flow completes it ``x1 = x_s' + (1 - s') v_G(x_s', s')`` and ``v_s`` regresses on
   ``x1 - n``, ``mean((v_s - (x1 - n))^2)``; weights 1 and 1. The guide, as in ``train.py`` (its teacher is
   ``flow.pre_train_model``, the annealing-reflow checkpoint, loaded with its EMA weights), is the student's
   own 2-rectified flow of stage 1: a frozen copy of its EMA weights (``guide="reflow"``, the default). The
   paper's 2-RF is thus the stage-1 reflow of the task's 1-RF flow-matching teacher; ``guide="teacher"`` uses
   the task's 1-RF teacher (at its reference guidance) instead (counted teacher calls).

EMA (``models/ema.py``, ``ema_rate = 0.999999`` with the ``num_updates`` warm-up ``min(rate, (1+k)/(10+k))``):
kept per stage from that stage's initial weights (stage 2 starts from the raw stage-1 weights, as ``train.py``
loads ``checkpoint['model']``); the evaluated student carries the EMA weights (``evaluation_fid.py
--use_ema=True``). Sampler: one Euler step from t = 1 (``ode``, 1 step, no guidance: the README's "Sample from
distilled one-step models: euler + sample_N 1"); ``steps_options = (1,)`` because stage 2 trains only
``s = eps``, so the distilled student is not a multi-step flow any more.

Deviations: pixel-space CIFAR-10/smoke images and the task's small UNets (the paper: DDPM++/EDM UNets of
3.4M-80.7M parameters); L2 instead of the README's LPIPS (``loss_type=lpips`` needs VGG weights, unavailable
offline); the teacher pairs come from the task's flow teacher's Euler sampler with its CFG guidance (the
paper: 1-RF / EDM pairs from RK45), a fixed store of ``teacher_pairs`` pairs; the optimiser and learning
rate are the task's (the code: Adam 2e-4, 5000 warm-up steps in stage 1 and none in stage 2), only the
gradient-norm clip 1.0 of the config is applied (``optim_overrides``); the one-step sampler calls the
network at bench t = 1 (SlimFlow: ``s = eps``, i.e. t = 0.999) and steps by 1 (SlimFlow: ``1 - eps``).
**Budget split**: neither the code nor the README pins the stage lengths (both README commands run the
config's ``n_iters = 1,300,001``; the distillation starts from annealing checkpoint 16 at ``snapshot_freq
50000``, i.e. 800k iterations, whose first 300k anneal beta) and the paper's text was not available offline:
``reflow_fraction = 0.5`` (equal stages) and ``anneal_fraction = 300k / 800k = 0.375`` of stage 1.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task
    from bench.diffusion import Generator


# --------------------------------------------------------------------------------------------------
# SlimFlow's schedule and conventions (reflow/reflow.py)
# --------------------------------------------------------------------------------------------------


def beta_schedule(step: int, warmup: int, kind: str = "linear") -> float:
    """The noise-blend weight beta at stage step ``step`` (``randomness_schedule`` with ``warmup_K``)."""
    frac = min(1.0, step / max(1, warmup))
    if kind == "exp":
        return math.exp(-step / max(1, warmup))
    if kind == "cos":
        return (1.0 + math.cos(math.pi * frac)) / 2.0
    return 1.0 - frac


def blend_noise(z: torch.Tensor, fresh: torch.Tensor, beta: float) -> torch.Tensor:
    """``sqrt(1 - beta^2) z + beta fresh`` (``get_data_pair``): a unit-variance mix of the paired and a fresh noise."""
    return math.sqrt(max(0.0, 1.0 - beta * beta)) * z + beta * fresh


def bench_time(s: torch.Tensor | float) -> torch.Tensor | float:
    """bench time of SlimFlow time ``s`` (SlimFlow: 0 = noise, 1 = data; bench: 1 = noise)."""
    return 1.0 - s


def slimflow_velocity(g: Generator, x: torch.Tensor, s: torch.Tensor, cond: Any,
                      guidance: float = 1.0) -> torch.Tensor:
    """SlimFlow's velocity dx/ds (data - noise direction) of a bench generator: minus its PF-ODE velocity at t = 1 - s."""
    return -g.velocity(x, bench_time(s), cond, guidance=guidance)


def guided_target(noise: torch.Tensor, v_student: torch.Tensor, s_prime: torch.Tensor, guide_velocity) -> torch.Tensor:
    """The flow-guided target of ``teacher_loss_new`` (SlimFlow convention): the student's partial step
    ``x_s' = n + s' v_s``, completed by the guide flow ``x1 = x_s' + (1 - s') v_G(x_s', s')``; returns ``x1 - n``.
    ``guide_velocity(x, s)`` is the guide's SlimFlow velocity."""
    sp = s_prime.reshape(-1, *([1] * (noise.dim() - 1)))
    x_sp = noise + sp * v_student.detach()
    x1 = x_sp + (1.0 - sp) * guide_velocity(x_sp, s_prime)
    return x1 - noise


class SlimFlow(Method):
    """Zhu et al. 2024: annealing reflow of a compact student on teacher pairs, then flow-guided one-step distillation."""

    name = "slimflow"
    version = "1"
    domains = frozenset({"diffusion"})
    # configs/default_cifar10_configs.py: optim.grad_clip = 1. (Adam 2e-4 itself stays the task's).
    optim_overrides: ClassVar[dict[str, Any]] = {"grad_clip": 1.0}

    class Params(Params):
        # Not pinned by the official code/README, paper text unavailable offline: equal stages (module docstring).
        reflow_fraction: float = Field(0.5, gt=0, lt=1, description="share of the step budget for annealing "
                                                                    "reflow (the rest: flow-guided distillation)")
        # README: x0_randomness warmup_300000, and the distillation starts from the 800k-iteration checkpoint 16.
        anneal_fraction: float = Field(0.375, gt=0, le=1, description="share of the reflow stage over which beta "
                                                                      "goes from 1 to 0")
        # reflow.py randomness_schedule: 'warmup_K' is linear, 'warmup_cos_K' cosine, 'warmup_exp_K' exponential.
        anneal_schedule: Literal["linear", "cos", "exp"] = Field("linear", description="beta schedule of annealing "
                                                                                       "reflow")
        # README annealing-reflow command: --config.flow.h_flip=true (the distillation command leaves it False).
        flip_pairs: bool = Field(True, description="flip both halves of a pair horizontally with probability 1/2 "
                                                   "per batch during annealing reflow")
        # cifar10_rf_gaussian.py: flow.eps = 1e-3 (time offset of uniform t and of the one-step time t0).
        eps: float = Field(1e-3, gt=0, lt=0.1, description="SlimFlow time offset eps")
        # reflow.py teacher_loss_new: t_ = rand * 0.6 + 0.2.
        guide_t_min: float = Field(0.2, ge=0, lt=1, description="lower end of the guidance time s'")
        guide_t_max: float = Field(0.8, gt=0, le=1, description="upper end of the guidance time s'")
        # train.py: the distillation teacher is flow.pre_train_model, the annealing-reflow checkpoint (its EMA).
        guide: Literal["reflow", "teacher"] = Field("reflow", description="guide flow of stage 2: the frozen EMA "
                                                                          "copy of the stage-1 student (the small "
                                                                          "2-RF) or the task's 1-RF teacher")
        # cifar10_rf_gaussian.py: model.ema_rate = 0.999999 (with models/ema.py's num_updates warm-up).
        ema_rate: float = Field(0.999999, ge=0, le=1, description="EMA decay cap of the evaluated weights "
                                                                  "(0 disables the EMA)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.ema: dict[str, torch.Tensor] | None = None
        self.ema_updates = 0
        self.guide_net: Generator | None = None
        self._pending_guide: dict[str, torch.Tensor] | None = None
        self.info: dict[str, Any] = {}

    # --- contract ------------------------------------------------------------------------------------
    def unsupported(self, task: Task) -> str | None:
        if not hasattr(task, "compact_student") or not hasattr(task, "teacher_pairs"):
            return "SlimFlow trains a compact student on teacher noise -> image pairs; this task offers neither"
        return None

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        nfe = list(getattr(task_params, "nfe", None) or [])
        if nfe and 1 not in nfe:
            return (f"SlimFlow's distilled student samples in one step only; {task}.nfe={nfe} must contain 1 "
                    f"(e.g. --set {task}.nfe=[1,4])")
        if params.guide_t_min >= params.guide_t_max:
            return f"slimflow.guide_t_min ({params.guide_t_min}) must be below guide_t_max ({params.guide_t_max})"
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        if total_steps < 2:
            plan = [Generation(total_steps, fresh_student=False, name="annealing reflow")]
        else:
            reflow = min(total_steps - 1, max(1, round(self.params.reflow_fraction * total_steps)))
            plan = [Generation(reflow, fresh_student=False, name="annealing reflow"),
                    Generation(total_steps - reflow, fresh_student=False, name="flow-guided distillation")]
        self.info["stage_steps"] = [g.steps for g in plan]
        return plan

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.diffusion import Sampler

        # The paper's student is a smaller network trained from scratch (no teacher weights).
        g = ctx.task.compact_student(ctx.seed)
        g.sampler = Sampler("ode", steps=1)
        g.steps_options = (1,)
        g.timestep_table = {}
        g.description = "SlimFlow compact one-step student (annealing reflow + flow-guided distillation), 1 Euler step"
        self.info["student_params"] = sum(p.numel() for p in g.parameters())
        return g

    def create_modules(self, ctx: StepContext) -> None:
        # On resume the EMA and the guide come back from state_dict; the guide needs the student's structure.
        if self._pending_guide is not None:
            self.guide_net = self._frozen_copy(ctx.student, self._pending_guide)
            self._pending_guide = None
        if self.ema is not None:
            dev = next(ctx.student.parameters()).device
            self.ema = {k: v.to(dev) for k, v in self.ema.items()}

    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        if index == 1:
            # train.py: the guide is the annealing-reflow checkpoint with its EMA weights; the student continues
            # from the raw weights and a new EMA starts from them.
            self.guide_net = self._frozen_copy(ctx.student, self.ema if self.params.ema_rate > 0 else None)
        self.ema = {k: p.detach().clone() for k, p in ctx.student.named_parameters()}
        self.ema_updates = 0

    def _frozen_copy(self, student: nn.Module, weights: dict[str, torch.Tensor] | None) -> Generator:
        import torch

        guide = copy.deepcopy(student)
        if weights is not None:
            with torch.no_grad():
                for k, p in guide.named_parameters():
                    p.copy_(weights[k])
        guide.eval()
        for p in guide.parameters():
            p.requires_grad_(False)
        return guide

    # --- the two stages -----------------------------------------------------------------------------
    def beta(self, ctx: StepContext) -> float:
        """beta of the current annealing-reflow step (0 in the distillation stage)."""
        if ctx.generation != 0:
            return 0.0
        warm = max(1, round(self.params.anneal_fraction * ctx.generation_steps))
        return beta_schedule(ctx.generation_step, warm, self.params.anneal_schedule)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        g = ctx.student
        pairs = ctx.teacher_pairs(len(batch["index"]))
        z, x1, cond = pairs["noise"].float(), pairs["image"].float(), pairs["cond"]
        n = x1.shape[0]
        if ctx.generation == 0:  # annealing reflow
            beta = self.beta(ctx)
            if beta > 0:
                z = blend_noise(z, torch.randn_like(z), beta)
            if p.flip_pairs and float(torch.rand(())) > 0.5:
                z, x1 = torch.flip(z, dims=[3]), torch.flip(x1, dims=[3])
            s = torch.rand(n, device=z.device) * (1.0 - p.eps) + p.eps
            x_s = g.add_noise(x1, z, bench_time(s))  # = s x1 + (1 - s) z
            loss = (slimflow_velocity(g, x_s, s, cond) - (x1 - z)).pow(2).mean()
            self.info["beta_last"] = beta
            return {"student": loss}
        # flow-guided distillation: the pair term at s = eps ...
        s0 = torch.full((n,), p.eps, device=z.device)
        x_s = g.add_noise(x1, z, bench_time(s0))
        pair_loss = (slimflow_velocity(g, x_s, s0, cond) - (x1 - z)).pow(2).mean()
        # ... and the guidance term on fresh noise (teacher_loss_new).
        noise = torch.randn_like(x1)
        v_s = slimflow_velocity(g, noise, s0, cond)
        s_prime = torch.rand(n, device=z.device) * (p.guide_t_max - p.guide_t_min) + p.guide_t_min
        with torch.no_grad():
            target = guided_target(noise, v_s, s_prime, self._guide_velocity(ctx, cond))
        guide_loss = (v_s - target).pow(2).mean()
        self.info["pair_loss_last"] = float(pair_loss.detach())
        self.info["guide_loss_last"] = float(guide_loss.detach())
        return {"student": pair_loss + guide_loss}

    def _guide_velocity(self, ctx: StepContext, cond: Any):
        if self.params.guide == "teacher":
            w = float(ctx.teacher.sampler.guidance)

            def teacher_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return ctx.run_teacher(lambda t: slimflow_velocity(t, x, s, cond, guidance=w),
                                       n_examples=x.shape[0] * (2 if w != 1.0 else 1))

            return teacher_velocity
        if self.guide_net is None:
            raise RuntimeError("SlimFlow's flow-guided stage needs the stage-1 guide; it was not built")
        guide = self.guide_net
        return lambda x, s: slimflow_velocity(guide, x, s, cond)

    # --- EMA, state, record --------------------------------------------------------------------------
    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        import torch

        if self.ema is None or self.params.ema_rate <= 0:
            return {"beta": self.beta(ctx)}
        self.ema_updates += 1
        decay = min(self.params.ema_rate, (1 + self.ema_updates) / (10 + self.ema_updates))
        with torch.no_grad():
            for k, prm in ctx.student.named_parameters():
                self.ema[k].sub_((1.0 - decay) * (self.ema[k] - prm.detach()))
        return {"beta": self.beta(ctx)}

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        import torch

        if self.ema is not None and self.params.ema_rate > 0:
            with torch.no_grad():
                for k, prm in student.named_parameters():
                    prm.copy_(self.ema[k])
        return student

    def state_dict(self) -> dict[str, Any]:
        guide = None
        if self.guide_net is not None:
            guide = {k: v.detach().cpu().clone() for k, v in self.guide_net.named_parameters()}
        return {"ema": None if self.ema is None else {k: v.detach().cpu().clone() for k, v in self.ema.items()},
                "ema_updates": self.ema_updates, "guide": guide, "info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = state.get("ema")
        self.ema_updates = int(state.get("ema_updates", 0))
        self._pending_guide = state.get("guide")
        self.info.update(state.get("info", {}))

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "sampler": "ode (Euler), 1 step at t=1, no guidance", "steps_options": [1],
                "guide": ("frozen EMA copy of the stage-1 (annealing reflow) student, the small 2-RF"
                          if p.guide == "reflow" else "the task's 1-RF flow-matching teacher"),
                "anneal": {"schedule": p.anneal_schedule, "fraction_of_stage1": p.anneal_fraction},
                "loss": "L2 (LPIPS unavailable offline)", "ema_rate": p.ema_rate}
