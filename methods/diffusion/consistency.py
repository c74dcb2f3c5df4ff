"""Consistency distillation in the latent-consistency-model recipe — Song, Dhariwal, Chen & Sutskever,
"Consistency Models" (ICML 2023, arXiv 2303.01469), as Luo, Tan, Huang, Li & Zhao, "Latent Consistency Models:
Synthesizing High-Resolution Images with Few-Step Inference" (arXiv 2310.04378, 2023) distil a guided teacher.

Official code read: huggingface/diffusers @ 58eb52c, ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``
(``DDIMSolver``, ``scalings_for_boundary_conditions``, ``guidance_scale_embedding``, ``update_ema``, the training
loop steps 2-12, the argument defaults), ``src/diffusers/schedulers/scheduling_lcm.py`` (``set_timesteps``,
``step``) and ``pipelines/latent_consistency_models/pipeline_latent_consistency_text2img.py`` (the sampling
defaults).

What is implemented (one training step, as the script's loop):

* **Skip-step grid.** ``num_ddim_timesteps`` = 50 solver points over the teacher's time range: start times
  t_n = n/50 (n = 1..50) and end times t_n - 1/50 (the script's discrete ``[19, 39, ..., 999]`` and
  ``start - 20`` clamped at 0, k = 1000 // 50 = 20). n ~ U{1..50}; real images are noised to t_n.
* **Consistency function.** f(x, t, w) = c_skip(t) x + c_out(t) x0_theta(x, t, w) with the script's
  ``scalings_for_boundary_conditions``: c_skip = sigma_d^2 / ((10 tau)^2 + sigma_d^2), c_out = 10 tau /
  sqrt((10 tau)^2 + sigma_d^2), sigma_d = 0.5, ``timestep_scaling_factor`` 10, where tau is the DDPM timestep.
  Mapping: the flow teacher's continuous t in [0, 1] is given to the networks as tau = 1000 t
  (``Schedule.model_time``) and the scalings take that tau, so c_skip(0) = 1, c_out(0) = 0 exactly as at the
  script's clamped end timestep 0. The student Generator's network is this f (`BoundaryConditioned`:
  prediction ``x0``), so sampling uses the boundary-conditioned output as ``LCMScheduler.step`` does.
* **Guidance.** w ~ U[w_min, w_max] = U[5, 15] per sample, given to the student through its guidance embedding
  (``CondUNet(guidance_embed=True)``: sinusoidal embedding of 1000 w, as ``guidance_scale_embedding``). The
  teacher is guided in the script's form x0 = cond + w (cond - uncond) (the code's comment: "the LCM paper's CFG
  formulation rather than the Imagen CFG formulation"), i.e. the adapter's D(null) + (w + 1)(D(c) - D(null)):
  the teacher runs at scale w + 1. (The ``--w_min`` help text says the opposite; the code is what is followed.)
* **Target.** One teacher DDIM step with that guidance from t_n to t_n - 1/50 (x0 and eps both guided, x_prev =
  alpha_s x0 + sigma_s eps), then the EMA target network's f at (x_prev, t_n - 1/50, w), without gradient.
* **Loss.** ``l2`` (default: mean squared error) or ``huber``: mean(sqrt((f - target)^2 + c^2) - c), c = 0.001.
* **Networks.** The student is built with the guidance embedding (``time_cond_proj_dim``) and loads the teacher's
  weights with ``strict=False``; as in the script (``UNet2DConditionModel.from_config(...,
  time_cond_proj_dim=...)`` then ``load_state_dict(teacher, strict=False)``), the new guidance projection keeps
  its default random initialisation (``guidance_init="zero"`` zeroes its last layer instead, so the student
  starts exactly as the teacher). The EMA target starts as a copy of the student and is updated after every
  optimiser step, target = decay target + (1 - decay) student, decay 0.95 (``--ema_decay``).
* **Optimiser.** The task's AdamW at lr 1e-4 (the script's ``--learning_rate``, constant schedule) with the script's
  weight decay 1e-2 on every parameter (``--adam_weight_decay``) and gradient clipping at 1.0 (``--max_grad_norm``)
  as ``optim_overrides``.
* **Sampler.** Multistep consistency sampling (``Sampler("consistency")``: f, then re-noise with fresh noise to the
  next time; the last step returns f) at ``LCMScheduler``'s timesteps for n steps: the 50-point grid reversed,
  indices floor(linspace(0, 50, n, endpoint=False)) (n = 4: tau 999, 759, 499, 259 -> t 1.0, 0.76, 0.5, 0.26).
  Any n in 1..8 is offered; the student's own count is ``sample_steps`` = 4 (the pipeline's
  ``num_inference_steps``); its guidance input is ``sample_guidance`` - 1 = 7.5 (the pipeline's default
  ``guidance_scale`` 8.5, embedded as ``guidance_scale - 1``); one network pass per step.

Deviations: pixel space with the task's flow-matching teacher instead of Stable Diffusion latents with an
epsilon-prediction DDPM teacher (the DDIM step, x0/eps conversions and guidance go through the adapter, so
they are the same formulas under the flow schedule); the grid is continuous t = n/50 rather than the discrete
19 + 20 (n - 1), and the scalings take tau = 1000 t (20 n rather than 20 n - 1: c_skip ~ 1e-5 at every start
point either way); the student's guidance embedding is the task network's (a 2-layer MLP on the sinusoidal
embedding added to the condition vector, diffusers: a linear ``cond_proj`` into the timestep embedding); the
cell's step budget and batch instead of the script's run; no mixed precision; the condition is a class label.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from bench import BenchError
from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext
    from bench.diffusion import Generator, Schedule

#: the step counts the student offers at evaluation (LCM samples in 1-8 steps)
STEP_OPTIONS = tuple(range(1, 9))


def boundary_scalings(timestep: torch.Tensor, sigma_data: float = 0.5,
                      timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at DDPM timestep tau: sigma_d^2 / ((s tau)^2 + sigma_d^2), s tau / sqrt((s tau)^2 + sigma_d^2)."""
    scaled = timestep_scaling * timestep
    return sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2), scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5


def _time_of(schedule: Schedule, timestep: torch.Tensor) -> torch.Tensor:
    """The continuous time t whose `Schedule.model_time` is ``timestep`` (its inverse)."""
    if schedule.kind == "vp_discrete":
        return timestep / (schedule.num_train_timesteps - 1)
    return timestep / 1000.0


def _module():
    from torch import nn

    return nn.Module


class BoundaryConditioned(_module()):  # type: ignore[misc]
    """The consistency function f = c_skip(tau) x + c_out(tau) x0(x, tau) around a network in ``prediction``'s
    parameterisation: a network whose output is f (use it with prediction ``x0``)."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str, sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.sigma_data = sigma_data
        self.timestep_scaling = timestep_scaling

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net.null_condition(cond)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Any, guidance: Any = None) -> torch.Tensor:
        from bench.diffusion import split

        raw = self.net(x, timestep, cond, guidance=guidance)
        x0, _ = split(raw, x, _time_of(self.schedule, timestep), self.prediction, self.schedule)
        c_skip, c_out = boundary_scalings(timestep, self.sigma_data, self.timestep_scaling)
        shape = (-1, *([1] * (x.dim() - 1)))
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * x0


def ddim_grid(num_ddim_timesteps: int, t_max: float = 1.0) -> list[float]:
    """The solver's start times t_n = t_max n / K, n = 1..K (ascending); each step ends at t_n - t_max / K."""
    return [t_max * n / num_ddim_timesteps for n in range(1, num_ddim_timesteps + 1)]


def lcm_timesteps(steps: int, num_ddim_timesteps: int = 50, t_max: float = 1.0) -> tuple[float, ...]:
    """``LCMScheduler.set_timesteps(steps)``: the grid reversed, indices floor(linspace(0, K, steps, endpoint=False))."""
    import numpy as np

    if not 1 <= steps <= num_ddim_timesteps:
        raise BenchError(f"consistency: {steps} sampling steps; the skip-step grid has {num_ddim_timesteps} points")
    origin = ddim_grid(num_ddim_timesteps, t_max)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return tuple(float(origin[i]) for i in idx)


def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay target + (1 - decay) source, parameter by parameter (the script's ``update_ema``)."""
    import torch

    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """``l2``: mean (pred - target)^2; ``huber``: mean sqrt((pred - target)^2 + c^2) - c (pseudo-Huber)."""
    d2 = (pred.float() - target.float()).pow(2)
    if kind == "l2":
        return d2.mean()
    return ((d2 + huber_c ** 2).sqrt() - huber_c).mean()


def consistency_target(teacher: Generator, target: Generator, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                       cond: Any, w: torch.Tensor) -> torch.Tensor:
    """One guided teacher DDIM step t -> s (teacher scale w + 1: cond + w (cond - uncond)), then the target
    network's f at (x_prev, s, w)."""
    x_prev = teacher.ddim_step(x_t, t, s, cond, guidance=w + 1.0)
    return target.denoise(x_prev, s, cond, guidance_input=w)


class EMATargetState:
    """Method state of an EMA consistency target (``self.target``, a `Generator` without an optimiser): its weights
    and update count are saved; on resume the weights wait in ``self._pending`` until the target is rebuilt."""

    target: Any
    ema_updates: int
    _pending: dict[str, Any] | None

    def state_dict(self) -> dict[str, Any]:
        ema = None if self.target is None else {k: v.detach().clone() for k, v in self.target.net.state_dict().items()}
        return {"ema": ema, "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state.get("ema")
        self.ema_updates = int(state.get("ema_updates", 0))


class Consistency(EMATargetState, Method):
    """Song et al. 2023 (ICML) consistency distillation, in Luo et al. 2023's latent-consistency (LCM) recipe."""

    name = "consistency"
    version = "1"
    domains = frozenset({"diffusion"})
    # train_lcm_distill_sd_wds.py: AdamW over unet.parameters() with --adam_weight_decay 1e-2 (every parameter),
    # --max_grad_norm 1.0; --learning_rate 1e-4 with the constant scheduler is the task's.
    optim_overrides = {"weight_decay": 1e-2, "no_decay": (), "grad_clip": 1.0}

    class Params(Params):
        # every default below: train_lcm_distill_sd_wds.py's argument defaults unless noted
        num_ddim_timesteps: int = Field(50, ge=2, le=1000, description="points of the DDIM solver's skip-step "
                                                                       "grid over the teacher's time range "
                                                                       "(--num_ddim_timesteps)")
        w_min: float = Field(5.0, ge=0.0, le=50.0, description="smallest guidance w (teacher: cond + w (cond - "
                                                               "uncond)) drawn per sample (--w_min)")
        w_max: float = Field(15.0, ge=0.0, le=50.0, description="largest guidance w drawn per sample (--w_max)")
        ema_decay: float = Field(0.95, ge=0.0, lt=1.0, description="EMA rate of the target network (--ema_decay)")
        loss_type: Literal["l2", "huber"] = Field("l2", description="l2 or pseudo-Huber loss (--loss_type)")
        huber_c: float = Field(0.001, gt=0.0, description="pseudo-Huber c (--huber_c)")
        timestep_scaling: float = Field(10.0, gt=0.0, description="timestep scaling of the boundary scalings "
                                                                  "(--timestep_scaling_factor)")
        # sigma_data = 0.5: scalings_for_boundary_conditions' default and LCMScheduler's
        sigma_data: float = Field(0.5, gt=0.0, description="sigma_data of the boundary scalings")
        # the script keeps from_config's random init of the new time_cond_proj layer
        guidance_init: Literal["default", "zero"] = Field(
            "default", description="initialisation of the student's new guidance embedding: the layer default "
                                   "(as the script) or a zeroed last layer (the student starts as the teacher)")
        # LatentConsistencyModelPipeline.__call__: num_inference_steps=4, guidance_scale=8.5 (embedded as - 1)
        sample_steps: int = Field(4, ge=1, le=8, description="the student's own sampling steps (evaluation also "
                                                             "samples at every task nfe count in 1..8)")
        sample_guidance: float = Field(8.5, ge=1.0, le=51.0, description="the pipeline's guidance_scale at "
                                                                         "sampling; the student is given w = "
                                                                         "guidance_scale - 1")

        @model_validator(mode="after")
        def _range(self):
            if self.w_min > self.w_max:
                raise ValueError(f"w_min {self.w_min} must not exceed w_max {self.w_max}")
            if self.sample_steps > self.num_ddim_timesteps:
                raise ValueError(f"sample_steps {self.sample_steps} exceeds the {self.num_ddim_timesteps}-point grid")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.target: Generator | None = None  # the EMA target network's Generator (method state, no optimiser)
        self._pending: dict[str, Any] | None = None
        self.ema_updates = 0
        self.t_max = 1.0

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        nfe = list(getattr(task_params, "nfe", []) or [])
        offered = [n for n in nfe if n in STEP_OPTIONS and n <= params.num_ddim_timesteps]
        if not offered:
            return (f"the consistency student samples at 1..{max(STEP_OPTIONS)} steps; the task evaluates nfe {nfe}: "
                    f"add one of those counts")
        return None

    def _timestep_table(self, t_max: float) -> dict[int, tuple[float, ...]]:
        return {n: lcm_timesteps(n, self.params.num_ddim_timesteps, t_max) for n in STEP_OPTIONS
                if n <= self.params.num_ddim_timesteps}

    def init_student(self, teacher: Any, student: Any, ctx: StepContext) -> Any:
        import torch

        from bench.diffusion import Generator, Sampler

        p = self.params
        built = ctx.task._build("student", ctx.seed, guidance_embed=True)  # the net with the w-embedding
        net = built.net
        res = net.load_state_dict(teacher.net.state_dict(), strict=False)
        if res.unexpected_keys or any(not k.startswith("guidance_proj.") for k in res.missing_keys):
            raise BenchError(f"consistency: the guidance-embedded student does not match the teacher's network "
                             f"(missing {res.missing_keys}, unexpected {res.unexpected_keys})")
        if p.guidance_init == "zero":
            with torch.no_grad():
                last = net.guidance_proj[-1]
                last.weight.zero_()
                last.bias.zero_()
        table = self._timestep_table(teacher.schedule.t_max())
        return Generator(BoundaryConditioned(net, teacher.schedule, teacher.prediction, p.sigma_data, p.timestep_scaling),
                         schedule=teacher.schedule, prediction="x0",
                         sampler=Sampler("consistency", steps=p.sample_steps, timesteps=table[p.sample_steps],
                                         guidance=1.0, guidance_input=p.sample_guidance - 1.0),
                         steps_options=tuple(table), timestep_table=table,
                         description=f"latent-consistency student (LCM recipe): consistency multistep sampling at "
                                     f"{p.sample_steps} step(s), guidance embedding w = {p.sample_guidance - 1:g}")

    def create_modules(self, ctx: StepContext) -> None:
        from bench.diffusion import Generator

        g = ctx.student
        self.t_max = g.schedule.t_max()
        net = copy.deepcopy(g.net)  # the target starts as the (teacher-initialised) online student
        if self._pending is not None:  # resume: the saved EMA weights
            net.load_state_dict(self._pending)
            self._pending = None
        net.train()  # the script keeps target_unet in train mode
        for q in net.parameters():
            q.requires_grad_(False)
        self.target = Generator(net, schedule=g.schedule, prediction=g.prediction, sampler=g.sampler,
                                description="EMA target of the consistency student")

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        g = ctx.student
        x0, cond = batch["x0"], batch["cond"]
        b = x0.shape[0]
        t_max = g.schedule.t_max()
        k = p.num_ddim_timesteps
        # 2. start point on the skip grid (index ~ U{0..K-1}: t = (index + 1) / K), end point one skip earlier
        index = torch.randint(0, k, (b,), device=x0.device)
        t = t_max * (index + 1).to(x0.dtype) / k
        s = (t - t_max / k).clamp(min=0.0)
        # 4. noise real images to t; 5. w ~ U[w_min, w_max]
        noise = torch.randn_like(x0)
        x_t = g.add_noise(x0, noise, t)
        w = ((p.w_max - p.w_min) * torch.rand((b,)) + p.w_min).to(device=x0.device, dtype=x0.dtype)
        # 7. online f; 8.-9. teacher DDIM step with CFG, then the EMA target's f (no gradient)
        pred = g.denoise(x_t, t, cond, guidance_input=w)
        x_prev = ctx.run_teacher(lambda teacher: teacher.ddim_step(x_t, t, s, cond, guidance=w + 1.0), n_examples=2 * b)
        with torch.no_grad():
            target = self.target.denoise(x_prev, s, cond, guidance_input=w)
        return {"student": consistency_loss(pred, target, p.loss_type, p.huber_c)}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        ema_update(self.target.net, ctx.student.net, self.params.ema_decay)  # 12. after every optimiser step
        self.ema_updates += 1
        return {}


    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"sampler": "consistency multistep (LCMScheduler timesteps)", "sample_steps": p.sample_steps,
                "steps_options": list(STEP_OPTIONS), "lcm_timesteps": {n: list(v) for n, v in self._timestep_table(self.t_max).items()},
                "guidance_input_at_sampling": p.sample_guidance - 1.0,
                "teacher_guidance": f"cond + w (cond - uncond), w ~ U[{p.w_min}, {p.w_max}] (scale w + 1)",
                "num_ddim_timesteps": p.num_ddim_timesteps, "ema_decay": p.ema_decay, "ema_updates": self.ema_updates,
                "loss": p.loss_type if p.loss_type == "l2" else f"huber c={p.huber_c}",
                "boundary": f"c_skip/c_out at tau = 1000 t, scaling {p.timestep_scaling}, sigma_data {p.sigma_data}",
                "guidance_init": p.guidance_init}
