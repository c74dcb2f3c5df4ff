"""TBCM — Tang, Zhang, Zhu, Xiang, Yang, Yu, Liu, Wang, "Image-Free Timestep Distillation via Continuous-Time
Consistency with Trajectory-Sampled Pairs" (Trajectory-Backward Consistency Model; arXiv 2511.20410, 2025).

Read: the paper's abstract and project README (the paper's body was not available here), and the official
code hustvl/TBCM @ c6a4583 (c6a45836203791744ece0fff22c2ef53215b9a78): ``train_scripts/train_tbcm.py`` (the
training loop), ``diffusion/utils/tbcm_utils.py`` (``compute_refer_route``, ``sample_ordered_timesteps_from_ref``,
``black_filter``), ``configs/600M_1024px_tbcm.yaml``, ``diffusion/utils/config.py`` (defaults the yaml does not
set) and ``train_scripts/train_tbcm.sh`` (8 GPUs x 4 nodes). TBCM is the sCM objective of SANA-Sprint (see
`bench.methods.diffusion.sana_sprint`, whose TrigFlow conversion, student, logvar head, teacher direction,
tangent and loss this module imports) with one change: the training points ``(x_t, t)`` are not noised
dataset latents but the intermediate states of the teacher's own sampling trajectory. No image is read and
nothing is encoded; the batch contributes its conditions (the prompts) only.

**Trajectory points** (``train_tbcm.py``, per step). A reference route of ``route_steps`` = 16 TrigFlow angles
(``compute_refer_route(shift=2.5)``): diffusers' flow-matching Euler schedule with shift 2.5 (shifted sigmas
of 1000 training steps; ``linspace(sigma_max, sigma_min, 16)`` of them in timestep units, shifted again, as
``FlowMatchEulerDiscreteScheduler.set_timesteps`` does), converted to angles ``atan(s / (1 - s))``, the first
replaced by 1.5708 (pi/2). Each step draws an ordered route from it (``sample_ordered_timesteps_from_ref``):
``tau_0 = 1.5708`` and ``tau_k ~ U[ref_k, ref_{k-1}]`` for k = 1..15 (stratified, strictly descending). From
``x = sigma_d z`` the guided teacher is integrated along that route by TrigFlow DDIM steps
``x <- cos(tau_k - tau_{k+1}) x - sin(tau_k - tau_{k+1}) dx/dt`` (the last step to 0), with ``dx/dt = sigma_d
F_T^w(x / sigma_d, tau_k)`` at a CFG scale w per trajectory from {4, 4.5, 5}; under the flow schedule this is
exactly the teacher's Euler sampler on the flow times ``sin tau / (sin tau + cos tau)``. Every state but the
first (pure noise) is a training point, with the teacher direction already computed there (no further
teacher call): 15 points per trajectory, trained together with the condition and w of their trajectory.
**Black filter** (``black_filter``): a trajectory whose final sample x0 (unit scale, ``x0 / sigma_d``) is near
an all-black image (mean squared distance m < 1) is dropped with probability ``1 - m``; its points' losses
are multiplied by 0 (the loss is the mean over all points, dropped ones included as zeros).

**Loss** (as SANA-Sprint's sCM, `sana_sprint.tangent` / `sana_sprint.scm_loss`): ``F^-`` and ``cos t sin t
dF^-/dt`` from one ``torch.func.jvp`` of the student along ``(cos t sin t dx_t/dt / sigma_d, cos t sin t)``;
``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt)``, ``g / (||g|| +
0.1)``; loss ``mean(mask / (sigma_d tan t) / e^{logvar} (F_theta - F^- - g)^2 + mask logvar)``, times
``scm_lambda`` = 1. ``r``: warm-up ``min(1, s / 4000)``, then a "calm-down" to ``final_r`` = 0.75 linearly over
2000 steps from step 15000 (``config.py``: ``start_calmdown_step``, ``tangent_calmdown_steps``, ``final_r``; the
yaml sets ``tangent_warmup_steps: 4000``), ``s`` the 1-based step (the script's ``global_step``). There is no
discriminator (the script passes ``disc=None``) and no EMA (``ema_update`` False).

**Student**: SANA-Sprint's (`sana_sprint.SanaSprint.init_student`): the teacher's network with a guidance
input, teacher weights, NVlabs' cfg-embedder initialisation, in the TrigFlow wrapper; the guidance input is
``0.1 w`` (``cfg_embed_scale: 0.1``); the logvar head is its own module and optimiser (key ``logvar``).
Sampler: consistency (SCMScheduler) at guidance input ``0.1 * 5`` (``model.cfg_scale: 5``, the scale of the
script's validation); 1 step by default (the paper's headline is one-step FID 6.52 on MJHQ-30k), 2 steps at
the validation's angles (1.5708, 1.0) -> flow times (1, 0.60898), 3 and 4 at ``linspace(1.5708, 0, n + 1)``.

Deviations:

* Pixel space and the task's small UNets (TBCM: SANA 0.6B on DC-AE latents, Gemma text features); the
  task's flow-matching teacher through SANA-Sprint's training-free TrigFlow conversion (TBCM loads a
  TrigFlow-trained SANA-Sprint teacher); conditions are the training split's labels or prompts, not a prompt
  file. The black filter compares with the all-black image in pixel space (-1 everywhere) instead of the
  DC-AE latent of a black image.
* Batch: one trajectory per condition of the harness batch (``prompts_per_step`` can take fewer), so a step
  trains on 15 x the batch's size in points (the script: 1 prompt per GPU, 32 GPUs); each trajectory draws
  its own route and w (the script draws one route per GPU and step, which is per prompt at its batch of 1).
* The released ``black_filter`` calls ``random.random()`` without importing ``random`` (it would raise whenever
  a sample is near black); this module draws that coin with torch.
* The optimiser and learning rate are the task's (the script: CAME, lr 1e-5, constant after 5000 warm-up
  steps, weight decay 0); only its gradient clip 0.1 is applied (``optim_overrides``). The step counts of the
  r schedule (4000, 15000, 2000) are of a reference run of ``reference_steps`` = 30,000 steps mapped onto the
  cell's budget: TBCM states no run length, 30,000 is the SANA-Sprint recipe it builds on (as in
  `sana_sprint`).
* Not at the full tier (``unsupported``): the student needs a guidance input, which the task's pipeline UNet
  lacks (as for `sana_sprint`); both smoke/small generative tasks (``coco_fid``, ``geneval``) run.
* Trajectories are integrated on line every step (as the script does), not read from the shared on-disk
  store of teacher pairs (`bench.pairs`): that store keeps the reference sampler's fixed uniform grid at the
  task's guidance, while TBCM draws a fresh stratified route and a CFG scale per trajectory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from bench.api import Method, Params

from . import sana_sprint as ss

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task

#: the angle the script starts every route at (1.5708: pi/2 rounded up, as SANA-Sprint's largest timestep)
TOP = 1.5708


# --------------------------------------------------------------------------------------------------
# The route: where trajectory states are taken
# --------------------------------------------------------------------------------------------------


def reference_route(steps: int = 16, shift: float = 2.5, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``compute_refer_route``: TrigFlow angles [steps] (float64) of diffusers' shifted flow-matching Euler
    schedule. Shifted sigmas ``shift s / (1 + (shift - 1) s)`` of ``s = k / T``, k = T..1, give sigma_max and
    sigma_min; ``steps`` sigmas evenly spaced between them are shifted again (diffusers' ``set_timesteps``);
    the angles are ``atan(s / (1 - s))`` with the first replaced by 1.5708."""
    import torch

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigma_max, sigma_min = shifted(1.0), shifted(1.0 / num_train_timesteps)
    s = shifted(torch.linspace(sigma_max, sigma_min, steps, dtype=torch.float64))
    angles = torch.atan(s / (1 - s))
    angles[0] = TOP
    return angles


def sample_route(ref: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``sample_ordered_timesteps_from_ref`` for ``n`` trajectories: rows ``[ref_0, U[ref_1, ref_0], ...,
    U[ref_{N-1}, ref_{N-2}]]`` [n, N], one uniform draw inside each interval of the reference route."""
    import torch

    low, high = ref[1:], ref[:-1]
    u = torch.rand(n, len(ref) - 1, generator=generator, dtype=ref.dtype, device=ref.device)
    return torch.cat([ref[:1].expand(n, 1), low + (high - low) * u], dim=1)


def black_keep(x0: torch.Tensor, threshold: float = 1.0, black: float = -1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``black_filter``: per sample the mean squared distance m of ``x0`` (unit scale) to the all-``black``
    image; a sample with m < threshold is dropped with probability ``1 - m / threshold``. Returns (keep [B]
    bool, m [B])."""
    import torch

    m = (x0.float() - black).pow(2).flatten(1).mean(1)
    coin = torch.rand(m.shape, generator=generator, device=m.device)
    drop = (m < threshold) & (coin < 1 - m / threshold)
    return ~drop, m


def tangent_r(step: int, warmup: float, start_calmdown: float, calmdown: float, final_r: float) -> float:
    """The script's r: ``min(1, step / warmup)``, then linearly to ``final_r`` over ``calmdown`` steps from
    ``start_calmdown`` (``r (1 - p) + final_r p``, ``p = clip((step - start_calmdown) / calmdown, 0, 1)``)."""
    r = ss.warmup_r(step, warmup)
    progress = min(max((step - start_calmdown) / max(calmdown, 1e-12), 0.0), 1.0)
    return r * (1 - progress) + final_r * progress


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _repeat(cond: torch.Tensor, k: int) -> torch.Tensor:
    """``cond`` of B trajectories for their K points, point-major like the script's ``y.repeat(K, ...)``."""
    import torch

    return torch.cat([cond] * k)


# --------------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------------


class TBCM(Method):
    """Tang et al. 2025 (TBCM): sCM consistency distillation on the teacher's own trajectory states, image-free."""

    name = "tbcm"
    version = "1"
    domains = frozenset({"diffusion"})
    # train.gradient_clip 0.1 (configs/600M_1024px_tbcm.yaml).
    optim_overrides: ClassVar[dict[str, Any]] = {"grad_clip": 0.1}

    class Params(Params):
        # yaml scheduler.sigma_data 0.5.
        sigma_d: float = Field(0.5, gt=0, description="TrigFlow data standard deviation sigma_d")
        # yaml scheduler.route_steps 16 (config.py's default is 8).
        route_steps: int = Field(16, ge=2, le=1000, description="states per teacher trajectory (the first, "
                                                                "pure noise, is not trained on)")
        # train_tbcm.py: compute_refer_route(shift=2.5, ...).
        route_shift: float = Field(2.5, gt=0, description="flow-matching schedule shift of the reference route")
        # yaml train.scm_cfg_scale [4, 4.5, 5].
        cfg_scales: tuple[float, ...] = Field((4.0, 4.5, 5.0), min_length=1,
                                              description="teacher CFG scales, one drawn per trajectory")
        # yaml model.cfg_embed_scale 0.1.
        guidance_embed_scale: float = Field(0.1, gt=0, description="factor on w before the student's guidance input")
        # yaml train.tangent_warmup_steps 4000; config.py start_calmdown_step 15000, tangent_calmdown_steps 2000,
        # final_r 0.75.
        tangent_warmup_steps: float = Field(4000, ge=0, description="steps (of reference_steps) over which r "
                                                                   "goes from 0 to 1")
        start_calmdown_step: float = Field(15000, ge=0, description="step (of reference_steps) where r starts "
                                                                    "to move to final_r")
        tangent_calmdown_steps: float = Field(2000, ge=0, description="steps (of reference_steps) over which r "
                                                                      "moves to final_r")
        final_r: float = Field(0.75, ge=0, le=1, description="r after the calm-down")
        # SANA-Sprint's diffusers README --max_train_steps 30000 (TBCM states no run length).
        reference_steps: int = Field(30000, ge=1, description="length of the run the r-schedule steps refer "
                                                              "to; mapped onto the cell's budget")
        # train_tbcm.py: g / (g_norm + 0.1).
        tangent_norm_c: float = Field(0.1, gt=0, description="tangent normalisation constant c")
        # config.py scm_lambda 1.0.
        scm_lambda: float = Field(1.0, gt=0, description="weight of the sCM loss")
        # train_tbcm.py: black_filter(x0 / sigma_data, black_latent) with its threshold 1.0.
        black_filter: bool = Field(True, description="drop trajectories whose sample is near an all-black image")
        black_threshold: float = Field(1.0, gt=0, description="mean squared distance below which the black "
                                                              "filter may drop a trajectory")
        # None: every condition of the batch makes one trajectory (the script: its batch of prompts).
        prompts_per_step: int | None = Field(None, ge=1, description="trajectories per step (None: one per "
                                                                     "condition of the batch)")
        # The paper's headline is one-step; log_validation: SCMScheduler 2 steps, intermediate 1.0, cfg 5.
        steps: int = Field(1, ge=1, le=4, description="the student's own sampler step count (1-4)")
        intermediate_timestep: float = Field(1.0, gt=0, lt=1.5708, description="second TrigFlow angle of the "
                                                                               "2-step sampler")
        sample_guidance: float = Field(5.0, ge=1, description="CFG scale given to the student at sampling")
        logvar_dim: int = Field(64, ge=8, description="width of the logvar head's embeddings")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        # SANA-Sprint supplies the student, its TrigFlow wrapper and the converted teacher's direction.
        self.sprint = ss.SanaSprint(ss.SanaSprint.Params(
            sigma_d=p.sigma_d, steps=p.steps, sample_guidance=p.sample_guidance,
            guidance_embed_scale=p.guidance_embed_scale, logvar_dim=p.logvar_dim))
        self.route = reference_route(p.route_steps, p.route_shift)
        self.logvar: nn.Module | None = None
        self.info: dict[str, Any] = {}

    def unsupported(self, task: Task) -> str | None:
        if not hasattr(task, "_build") or not hasattr(task, "sample_shape"):
            return "TBCM needs a generative task that builds a guidance-embedding student"
        if getattr(task, "tier", None) == "full":
            return ("TBCM's student takes the CFG scale as an input (SANA-Sprint's guidance embedding); the full "
                    "tier builds students only as the teacher pipeline's own UNet, which has none")
        return None

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        nfe = list(getattr(task_params, "nfe", None) or [])
        if nfe and not any(n in ss.STEPS_OPTIONS for n in nfe):
            return f"TBCM's student samples at 1-4 steps; {task}.nfe={nfe} offers none of them"
        return None

    # --- models ----------------------------------------------------------------------------------------
    def timestep_table(self) -> dict[int, tuple[float, ...]]:
        """Flow times of the sampler per step count (SCMScheduler angles; 2 steps: 1.5708, intermediate)."""
        return {n: ss.scm_timesteps(n, intermediate=self.params.intermediate_timestep) for n in ss.STEPS_OPTIONS}

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.diffusion import Generator, Sampler, Schedule

        p = self.params
        built = self.sprint.init_student(teacher, student, ctx)  # TrigFlowStudent around the teacher's copy
        table = self.timestep_table()
        sampler = Sampler("consistency", steps=p.steps, timesteps=table[p.steps],
                          guidance_input=p.guidance_embed_scale * p.sample_guidance)
        self.info["timestep_table"] = {n: [round(v, 5) for v in ts] for n, ts in table.items()}
        return Generator(built.net, schedule=Schedule("flow"), prediction="x0", sampler=sampler,
                         steps_options=ss.STEPS_OPTIONS, timestep_table=table,
                         description="TBCM TrigFlow student (sCM on teacher trajectory states), consistency "
                                     "sampler on SCMScheduler angles, guidance input 0.1 w")

    def create_modules(self, ctx: StepContext) -> None:
        self.logvar = ss.LogvarHead(self.params.logvar_dim)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"logvar": self.logvar}

    # --- trajectories ----------------------------------------------------------------------------------
    def draw_w(self, n: int, device: Any) -> torch.Tensor:
        import torch

        scales = torch.tensor(self.params.cfg_scales, device=device)
        return scales[torch.randint(0, len(scales), (n,), device=device)]

    def trajectory(self, ctx: StepContext, cond: torch.Tensor, w: torch.Tensor, times: torch.Tensor,
                   z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guided teacher's TrigFlow DDIM run from ``sigma_d z`` along ``times`` [B, N] (descending angles,
        then 0). Returns the states ``x_t`` [N, B, ...] at ``t`` [N, B], the teacher directions ``dxt_dt`` there
        (all N, the first being the pure-noise state) and the final sample ``image`` (sigma_d scale)."""
        import torch

        x = z * self.params.sigma_d
        n = times.shape[1]
        states, dirs = [], []
        for k in range(n):
            tk = times[:, k]
            d = self.sprint.teacher_direction(ctx, x, tk, cond, w)
            states.append(x)
            dirs.append(d)
            dt = tk - times[:, k + 1] if k + 1 < n else tk
            x = _col(torch.cos(dt), x) * x - _col(torch.sin(dt), x) * d
        return {"x_t": torch.stack(states), "t": times.t(), "dxt_dt": torch.stack(dirs), "image": x}

    def r_at(self, step: int, total_steps: int) -> float:
        """r at 1-based harness step ``step``, the schedule's reference steps mapped onto ``total_steps``."""
        p = self.params
        s = step * p.reference_steps / max(1, total_steps)
        return tangent_r(s, p.tangent_warmup_steps, p.start_calmdown_step, p.tangent_calmdown_steps, p.final_r)

    # --- the step ----------------------------------------------------------------------------------------
    def training_points(self, ctx: StepContext, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's training points: one guided teacher trajectory per condition (noise, w and route drawn
        here), every state but the first, point-major ([K * B, ...], K = route_steps - 1), with the teacher
        direction, the repeated condition, the student's guidance input 0.1 w, and ``keep`` (the black filter
        of the point's trajectory); ``image`` [B, ...] is each trajectory's final sample (sigma_d scale)."""
        import torch

        p = self.params
        b, dev = cond.shape[0], cond.device
        z = torch.randn(b, *ctx.task.sample_shape(), device=dev)
        w = self.draw_w(b, dev)
        times = sample_route(self.route.to(dev), b).float()
        traj = self.trajectory(ctx, cond, w, times, z)
        k = p.route_steps - 1
        keep = torch.ones(b, dtype=torch.bool, device=dev)
        if p.black_filter:
            keep, _ = black_keep(traj["image"] / p.sigma_d, p.black_threshold)
        return {"x_t": traj["x_t"][1:].flatten(0, 1), "t": traj["t"][1:].flatten(),
                "dxt_dt": traj["dxt_dt"][1:].flatten(0, 1), "cond": _repeat(cond, k),
                "gin": w.repeat(k) * p.guidance_embed_scale, "keep": keep.repeat(k), "image": traj["image"]}

    def points_loss(self, pts: dict[str, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        """The sCM loss over the points (SANA-Sprint's tangent and loss on the kept ones), as the script's mean
        over all points with the dropped ones' losses multiplied by 0."""
        import torch

        p, sd = self.params, self.params.sigma_d
        student = ctx.student.net  # the TrigFlowStudent
        r = self.r_at(ctx.step + 1, ctx.total_steps)
        rows = pts["keep"].nonzero().flatten()
        n_all = len(pts["keep"])
        self.info.update(r=r, kept=len(rows) / n_all, points=n_all)
        if len(rows) == 0:  # every trajectory filtered: a zero loss that still reaches both optimisers
            return sum(q.sum() for q in (*student.parameters(), *self.logvar.parameters())) * 0.0
        x_t, t, dxt_dt, cond, gin = (pts[key][rows] for key in ("x_t", "t", "dxt_dt", "cond", "gin"))
        cs = torch.cos(t) * torch.sin(t)
        with torch.no_grad():
            f_minus, jvp_out = torch.func.jvp(lambda xs, ts: student.trig(xs, ts, cond, gin),
                                              (x_t / sd, t), (dxt_dt / sd * _col(cs, x_t), cs))
        f_theta = student.trig(x_t / sd, t, cond, gin)
        g = ss.tangent(f_minus.detach(), dxt_dt, x_t, jvp_out.detach(), t, r, sd, p.tangent_norm_c)
        # mean over all points, dropped ones as zeros = the kept points' mean x (kept / all)
        loss = ss.scm_loss(f_theta, f_minus.detach(), g, t, self.logvar(t, gin), sd) * (len(rows) / n_all)
        self.info.update(scm_loss=float(loss.detach()),
                         g_norm_mean=float(torch.linalg.vector_norm(g.flatten(1), dim=1).mean()))
        return loss

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        cond = batch["cond"]  # the prompts: the batch's images (x0) are never read
        if self.params.prompts_per_step is not None:
            cond = cond[: self.params.prompts_per_step]
        total = self.params.scm_lambda * self.points_loss(self.training_points(ctx, cond), ctx)
        return {"student": total, "logvar": total}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return {k: float(v) for k, v in self.info.items() if k in ("r", "kept")}

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "sampler": f"consistency (SCMScheduler angles -> flow time), {p.steps} step(s), "
                                        f"guidance input {p.guidance_embed_scale * p.sample_guidance:g}",
                "steps_options": list(ss.STEPS_OPTIONS), "sigma_d": p.sigma_d, "cfg_scales": list(p.cfg_scales),
                "reference_route": [round(float(v), 5) for v in self.route],
                "points_per_trajectory": p.route_steps - 1,
                "r_schedule": f"warm-up {p.tangent_warmup_steps:g}, calm-down from {p.start_calmdown_step:g} over "
                              f"{p.tangent_calmdown_steps:g} to {p.final_r:g}, of {p.reference_steps} reference steps",
                "image_free": True}
