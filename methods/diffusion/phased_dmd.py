"""Phased DMD — Few-step Distribution Matching Distillation via Score Matching within Subintervals (Fan, Qiu, Wu,
Wang, Lin, Ren, Lin, Gong, Yang; SenseTime Research / Beihang University; arXiv 2510.27684, 2025; CVPR 2026).

Sources read:

* **Paper**: only its abstract and introduction were readable here (arxiv.org/html/2510.27684v1 and v3, first
  page): K SNR subintervals, a mixture of experts over time (one expert per phase), *progressive* distribution
  matching toward higher SNR, and "score matching within subintervals" with "rigorous mathematical derivations"
  of the objective. The method section itself could not be read.
* **Code** (taken as the official code): ModelTC/LightX2V @ f8aee98 (ModelTC is the authors' organisation; the paper's v3 project page names
  a code release, and this repository's ``lightx2v_train`` holds the only Phased DMD trainer found in the stored
  GitHub index; whether it is the paper's exact release could not be confirmed) —
  ``lightx2v_train/lightx2v_train/trainers/phased_dmd/{math,rollout,trainer,config}.py``,
  ``trainers/dmd/math.py`` (``dmd_loss``) and ``configs/train/phased_dmd/wan2_1_t2v_1_3b_phased_dmd.yaml``,
  ``wan2_2_t2v_a14b_phased_dmd.yaml`` (defaults). Read, not copied.

What is implemented (K = ``phases`` experts, N = ``steps`` sampler steps, m = N / K steps per phase):

* **Experts.** The student's network becomes a `PhasedNet`: K full copies of the student network, each
  initialised from the teacher's weights (the code's ``train_type: full`` student and student_2, both from the
  pretrained model), routed by the timestep it is called at: expert k serves the sampler steps k m .. (k+1) m - 1.
  One image still calls one network per step (FLOPs and NFE unchanged); the parameter column counts all K
  experts. (LoRA experts, the paper's choice for Qwen-Image, are not implemented: the task networks have no
  adapter mechanism, and the code's configs train full copies.)
* **Sampler** (the code's ``denoising_step_list`` 1000/750/500/250 with ``match_timestep`` 500 as the phase
  boundary): ``Sampler("ode", N, timesteps = t_max (1 - i / N))`` — deterministic DDIM steps (Euler on the flow
  teacher), ``steps_options = (N,)``. Phase k maps x at t_start(k) = grid[k m] to x at t_end(k) = grid[(k+1) m]
  (the last phase ends at the data, t = 0).
* **Phase schedule** ``schedule="progressive"`` (the paper's progressive distribution matching): the budget is
  split into K generations (`bench.api.Generation`, the same student continues, optimisers restart per phase)
  of near-equal length; generation k trains expert k and fake network k only, from inputs made by the (already
  trained) experts 0..k-1. ``"alternating"`` (the code's trainer: ``_region_for_iteration``, High on even and Low
  on odd iterations): phase (step // 5) mod K, i.e. the phase changes with every generator update.
* **Generator rollout** (``_run_region_rollout``): from noise, the experts run the sampler's own steps without
  gradient up to a step j ~ U{k m .. (k+1) m - 1} of phase k (``truncation``; the code's random gradient step),
  step j runs with gradient and its prediction (x0_j, eps_j) jumps straight to the phase end:
  x_anchor = alpha(t_end) x0_j + sigma(t_end) eps_j (the code's ``euler_step`` to ``sigma_s``). With
  ``truncation=False`` every step of the phase keeps its gradient.
* **Subinterval transition.** For t > s = t_end(k): x_t | x_s ~ N(a x_s, b^2 I) with a = alpha_t / alpha_s and
  b^2 = sigma_t^2 - a^2 sigma_s^2 (the forward process restricted to (s, t]; the code's ``phased_coefficients``
  for the flow schedule, alpha = 1 - sigma). At the data end (s = 0) it is the ordinary x_t = alpha_t x0 +
  sigma_t eps.
* **Fake score: score matching within the subinterval** (``_fake_loss_for_score_range``). Fake network k (a copy
  of the teacher, unguided) learns the noised distribution of the generator's phase-end samples x_s (the full
  rollout through phase k, no gradient): t = i / 1000 drawn as below, x_t = a x_s + b eps, and the regression
  target is that of the pair (x0_hat, eps_hat) = ((x_s - a sigma_s^2 eps / b) / alpha_s, sigma_t eps / b) in the
  network's own parameterisation (`Generator.target`). Both are affine in (x_s, eps), satisfy
  alpha_t x0_hat + sigma_t eps_hat = x_t, and E[x0_hat | x_t] = E[x0 | x_t] (denoising score matching from x_s:
  grad log p(x_t | x_s) = -(x_t - a x_s) / b^2 is unbiased for the marginal score), so the minimiser is the
  fake distribution's denoiser at t. Under the flow schedule eps_hat - x0_hat is exactly the code's
  ``phased_velocity_target``: -x_s / (1 - s) + (t + (1 - t) s^2 / (1 - s)^2) eps / b. Loss: MSE, mean over
  elements (``F.mse_loss``).
* **DMD gradient only inside the subinterval** (``_dmd_loss_for_region``): the same t and transition from the
  detached anchor, D_fake = fake k's x0 prediction, D_real = the teacher's at CFG scale w (the code's
  ``guidance_distill``; here the task's ``guidance``); grad = (D_fake - D_real) / max(mean|x0_j - D_real|, 1e-4)
  per sample (``norm_clip_min``), ``nan_to_num``; loss = 0.5 mean((x0_j - sg(x0_j - grad))^2), applied to the
  gradient step's x0 prediction as the code does (x0_j and x_anchor are both affine in the network output with
  positive relative slope, so this is the direction of the KL gradient on x_{t_end}, rescaled per step).
* **Which t** (``dmd_range``): ``"to_noise"`` (the code): t in [t_end + margin, 1) — integer steps
  i in {round(1000 t_end) + score_margin .. 999}, margin 20 (``score_timestep_margin``) where t_end > 0 (the
  transition's b -> 0 at t_end) and none at the data end (i from 1); ``"phase"``: t in (t_end, t_start] only,
  i up to round(1000 t_start). Per sample (the code draws one t per batch).
* **Updates**: ``update_every = {"student": 5}`` (``fake_update_ratio: 5``: five fake updates per generator
  update); both optimisers AdamW betas (0, 0.999), weight decay 0.01 (``adam_beta1: 0.0``, ``weight_decay:
  1e-2`` for student, student_2, fake, fake_2) through ``optim_overrides``; grad-norm clip 10 (the 1.3B config's
  ``max_grad_norm`` and the task's; the A14B config uses 1.0). Within a harness step both losses are computed
  before either optimiser steps (the code updates the generator first); fake k trains on the same step's
  rollout (the code draws a new one).

Deviations:

* Pixel space on the task's small flow UNet (and the full tier's SD UNet) instead of Wan/Qwen-Image latents;
  the teacher's continuous time t stands in for the code's warped Wan timesteps (no ``timestep_shift`` 7.0: the
  grid is uniform in t), one teacher for every phase (Wan2.2's high/low-noise teachers and the code's
  teacher-branch alternation in the low region do not exist here); one fake network per phase (the code's
  optional ``fake_low_high`` extra fake is not built).
* Progressive phases by default (the paper); the code trains both regions in alternation (option
  ``schedule="alternating"``). The paper's per-phase schedules and any restriction of t to the subinterval
  could not be checked against its method section.
* Left out: the code's add-ons ``div_loss`` (diversity regulariser against teacher trajectories),
  ``fake_real_*`` (real-data DMD terms), ``ida`` (decay 0.97 weight averaging); LoRA experts; CFG
  normalisation (``cfg_norm: none`` in the configs anyway).
* The harness's learning rate, warm-up, batch and budget for both networks (the code: student 2e-6, fake 4e-7,
  batch 2, 1000-4000 iterations); real images of the batch are unused (data-free, as the code without
  ``fake_real``), only its conditions.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from bench.api import Generation, Method, Params, split_steps
from bench.methods.diffusion.dmd2 import fixed_steps_error

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext

#: t is drawn on a 1000-step grid, t = i / 1000 (the code's ``num_train_timestep``)
NUM_TRAIN_TIMESTEPS = 1000
#: the generator's update ratio (``fake_update_ratio: 5``)
UPDATE_RATIO = 5


def _torch_module():
    from torch import nn

    return nn.Module


# --------------------------------------------------------------------------------------------------
# The subinterval transition and the losses (pure functions of tensors)
# --------------------------------------------------------------------------------------------------


def transition(a_s: torch.Tensor, s_s: torch.Tensor, a_t: torch.Tensor,
               s_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of x_t | x_s ~ N(a x_s, b^2 I) for t > s: a = alpha_t / alpha_s, b = sqrt(sigma_t^2 - a^2 sigma_s^2)
    (b^2 clamped at 1e-8, the code's ``eps``)."""
    a = a_t / a_s
    b = (s_t ** 2 - a ** 2 * s_s ** 2).clamp(min=1e-8).sqrt()
    return a, b


def subinterval_targets(x_s: torch.Tensor, eps: torch.Tensor, a_s: torch.Tensor, s_s: torch.Tensor,
                        a_t: torch.Tensor, s_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, x0_hat, eps_hat) for score matching within (s, 1]: x_t = a x_s + b eps, and the unbiased pair
    x0_hat = (x_s - a sigma_s^2 eps / b) / alpha_s, eps_hat = sigma_t eps / b (alpha_t x0_hat + sigma_t eps_hat
    = x_t). The coefficients broadcast against ``x_s``."""
    a, b = transition(a_s, s_s, a_t, s_t)
    x_t = a * x_s + b * eps
    return x_t, (x_s - a * s_s ** 2 * eps / b) / a_s, s_t * eps / b


def phased_dm_gradient(x0: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor,
                       norm_clip_min: float) -> torch.Tensor:
    """(D_fake - D_real) / max(mean|x0 - D_real|, norm_clip_min) per sample, ``nan_to_num`` (the code's
    ``dmd_loss``)."""
    import torch

    dims = tuple(range(1, x0.dim()))
    norm = (x0 - d_real).abs().mean(dim=dims, keepdim=True).clamp(min=norm_clip_min)
    return torch.nan_to_num((d_fake - d_real) / norm)


def dm_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 mean((x0 - sg(x0 - grad))^2): its gradient in x0 is grad / x0.numel()."""
    import torch.nn.functional as F

    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float(), reduction="mean")


# --------------------------------------------------------------------------------------------------
# The mixture of experts over time
# --------------------------------------------------------------------------------------------------


class PhasedNet(_torch_module()):  # type: ignore[misc]
    """K expert networks behind one network interface, chosen by the timestep a row is called at: expert k for
    model times in (boundary_k, boundary_{k-1}] (``boundaries``: the K - 1 interior phase ends, descending, in
    the schedule's model time; a step exactly at a boundary starts the next phase)."""

    def __init__(self, experts: list[nn.Module], boundaries: list[float]) -> None:
        super().__init__()
        from torch import nn

        if len(boundaries) != len(experts) - 1:
            raise ValueError(f"{len(experts)} experts need {len(experts) - 1} boundaries, got {boundaries}")
        self.experts = nn.ModuleList(experts)
        self.boundaries = [float(b) for b in boundaries]

    def null_condition(self, cond: Any) -> Any:
        return self.experts[0].null_condition(cond)

    def expert_index(self, timestep: torch.Tensor) -> torch.Tensor:
        """The expert of each row (LongTensor [B]): the number of boundaries at or above its model time."""
        import torch

        idx = torch.zeros(timestep.shape, dtype=torch.long, device=timestep.device)
        for b in self.boundaries:
            idx = idx + (timestep <= b + 1e-4).long()
        return idx

    def _one(self, k: int, x, timestep, cond, guidance):
        net = self.experts[k]
        return net(x, timestep, cond) if guidance is None else net(x, timestep, cond, guidance=guidance)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Any,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        groups = self.expert_index(timestep)
        present = torch.unique(groups).tolist()
        if len(present) == 1:  # a sampler step: every row at the same time, one expert runs
            return self._one(present[0], x, timestep, cond, guidance)
        out = None
        for k in present:
            rows = (groups == k).nonzero(as_tuple=True)[0]
            y = self._one(k, x[rows], timestep[rows], _rows(cond, rows), None if guidance is None else guidance[rows])
            out = y.new_zeros((x.shape[0], *y.shape[1:])) if out is None else out
            out = out.index_copy(0, rows, y)
        return out


def _rows(cond: Any, rows: torch.Tensor) -> Any:
    if isinstance(cond, dict):
        return {k: v[rows] for k, v in cond.items()}
    return cond[rows]


def _alpha_sigma(schedule: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at t, with the data end t = 0 exactly (1, 0) (the samplers return x0 there)."""
    import torch

    a, s = schedule.alpha_sigma(t)
    zero = t == 0
    return torch.where(zero, torch.ones_like(a), a), torch.where(zero, torch.zeros_like(s), s)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class PhasedDMD(Method):
    """Fan et al. (2025): few-step DMD with the SNR range split into K phases, one expert per phase trained
    progressively toward high SNR, fake scores trained by score matching within their subinterval, and the DMD
    gradient evaluated there (see the module docstring)."""

    name = "phased_dmd"
    version = "1"
    domains = frozenset({"diffusion"})
    # fake_update_ratio: 5 (configs/train/phased_dmd/*.yaml): one generator update per five fake updates
    update_every = {"student": UPDATE_RATIO}
    # student/fake optimizers in the configs: adam_beta1 0.0, adam_beta2 0.999, weight_decay 1e-2
    optim_overrides = {"betas": (0.0, 0.999), "weight_decay": 0.01}

    class Params(Params):
        # num_inference_steps: 4, denoising_step_list [1000, 750, 500, 250] (both phased configs)
        steps: int = Field(4, ge=1, le=100, description="sampler steps N (times t_max (1 - i / N), deterministic "
                                                        "DDIM/Euler steps)")
        # match_timestep: 500 splits the 4 steps into a High and a Low phase (the code's two experts)
        phases: int = Field(2, ge=1, le=100, description="phases K = experts; must divide steps (N / K steps "
                                                         "each)")
        schedule: Literal["progressive", "alternating"] = Field(
            "progressive", description="progressive: the budget split into K consecutive phases, phase k trains "
                                       "expert k only (the paper); alternating: the phase changes with every "
                                       "generator update (the code's trainer)")
        dmd_range: Literal["to_noise", "phase"] = Field(
            "to_noise", description="t of the fake loss and the DMD gradient of phase k: to_noise = [t_end + "
                                    "margin, 1) (the code); phase = (t_end, t_start] only")
        # score_timestep_margin: 20 (both configs; config.py's default)
        score_margin: int = Field(20, ge=1, le=500, description="t >= t_end + score_margin / 1000 above an "
                                                                "intermediate phase end (none at the data end)")
        # the code's rollout: a random gradient step inside the phase, earlier steps without gradient
        truncation: bool = Field(True, description="gradient through one random step of the phase, jumping from "
                                                   "it to the phase end (the code); false: through every step")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="CFG scale of the real score "
                                                                          "(guidance_distill); None: the task's "
                                                                          "guidance")
        # norm_clip_min: 1e-4 (both configs)
        norm_clip_min: float = Field(1e-4, gt=0.0, description="lower clamp of the DMD normaliser mean|x0 - "
                                                               "D_real|")

        @model_validator(mode="after")
        def _phases(self) -> "PhasedDMD.Params":
            if self.steps % self.phases:
                raise ValueError(f"phases ({self.phases}) must divide steps ({self.steps}): each phase is N / K "
                                 f"sampler steps")
            m = self.steps // self.phases
            for k in range(self.phases - 1):  # an intermediate phase end must leave t above its margin
                end = round(NUM_TRAIN_TIMESTEPS * (1 - (k + 1) * m / self.steps))
                start = round(NUM_TRAIN_TIMESTEPS * (1 - k * m / self.steps))
                top = NUM_TRAIN_TIMESTEPS - 1 if self.dmd_range == "to_noise" or k == 0 else start
                if end + self.score_margin > top:
                    raise ValueError(f"score_margin {self.score_margin} leaves no t above phase {k + 1}'s end "
                                     f"{end}/1000 (up to {top}/1000)")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.m = p.steps // p.phases
        self.times: tuple[float, ...] = tuple(1.0 - i / p.steps for i in range(p.steps))  # t_max = 1 until init
        self.fakes: nn.Module | None = None
        self.w = 1.0
        self._last: dict[str, float] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        return fixed_steps_error("phased_dmd", params.steps, task, task_params)

    # --- phases ----------------------------------------------------------------------------------------
    @property
    def grid(self) -> list[float]:
        """The sampler's times, then 0 (the data end)."""
        return [*self.times, 0.0]

    def phase_times(self, k: int) -> tuple[float, float]:
        """(t_start, t_end) of phase k: the sampler time its first step is called at, and where it ends."""
        return self.grid[k * self.m], self.grid[(k + 1) * self.m]

    def score_steps(self, k: int) -> tuple[int, int]:
        """The integer range [lo, hi] of i, t = i / 1000, that phase k's fake loss and DMD gradient draw from."""
        start, end = self.phase_times(k)
        i_end = round(NUM_TRAIN_TIMESTEPS * end)
        lo = i_end + self.params.score_margin if i_end > 0 else 1
        hi = NUM_TRAIN_TIMESTEPS - 1
        if self.params.dmd_range == "phase":
            hi = min(hi, round(NUM_TRAIN_TIMESTEPS * start))
        return lo, hi

    def draw_t(self, k: int, n: int, device: Any = "cpu") -> torch.Tensor:
        import torch

        lo, hi = self.score_steps(k)
        return torch.randint(lo, hi + 1, (n,), device=device).float() / NUM_TRAIN_TIMESTEPS

    def phase_at(self, step: int, generation: int) -> int:
        """The phase trained at harness step ``step`` (in generation ``generation``)."""
        if self.params.schedule == "alternating":
            return (step // UPDATE_RATIO) % self.params.phases
        return min(generation, self.params.phases - 1)

    def generations(self, total_steps: int) -> list[Generation]:
        if self.params.schedule == "alternating":
            return [Generation(total_steps, fresh_student=False, name="all phases, alternating")]
        parts = split_steps(total_steps, self.params.phases)
        n = self.params.steps
        return [Generation(s, fresh_student=False, name=f"phase {k + 1}/{self.params.phases}: expert {k + 1}, "
                                                          f"sampler steps {k * self.m + 1}-{(k + 1) * self.m} of {n}")
                for k, s in enumerate(parts)]

    # --- models ----------------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        """K experts, each a copy of the student network with the teacher's weights, behind one `PhasedNet`; the
        sampler: N deterministic steps at t_max (1 - i / N), at exactly N steps."""
        import torch

        from bench.diffusion import Sampler

        p = self.params
        t_max = student.schedule.t_max()
        self.times = tuple(t_max * (1 - i / p.steps) for i in range(p.steps))
        experts = []
        for _ in range(p.phases):
            net = copy.deepcopy(student.net)
            net.load_state_dict(teacher.net.state_dict())
            experts.append(net)
        ends = [self.phase_times(k)[1] for k in range(p.phases - 1)]
        boundaries = [float(student.schedule.model_time(torch.tensor(e, dtype=torch.float64))) for e in ends]
        student.net = PhasedNet(experts, boundaries)
        student.sampler = Sampler("ode", steps=p.steps, timesteps=self.times)
        student.steps_options = (p.steps,)
        student.timestep_table = {p.steps: self.times}
        student.description = (f"Phased DMD: {p.phases} experts x {self.m} step(s) at t = {list(self.times)} "
                               f"(deterministic sampler)")
        return student

    def create_modules(self, ctx: StepContext) -> None:
        from torch import nn

        t_max = ctx.student.schedule.t_max()  # on resume init_student did not run: the times again
        self.times = tuple(t_max * (1 - i / self.params.steps) for i in range(self.params.steps))
        fakes = [copy.deepcopy(ctx.teacher) for _ in range(self.params.phases)]  # one fake score per phase
        for f in fakes:
            f.requires_grad_(True)
        self.fakes = nn.ModuleList(fakes)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"fake": self.fakes}

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        self.w = float(p.guidance if p.guidance is not None else getattr(ctx.task.params, "guidance", 1.0))

    # --- rollouts --------------------------------------------------------------------------------------
    def rollout(self, student: nn.Module, noise: torch.Tensor, cond: Any, upto: int) -> list[torch.Tensor]:
        """The sampler's states x_0 .. x_upto (x_i at grid[i]) from ``noise``, without gradient: exactly what
        `Generator.sample` computes (x_0 = sigma(t_0) noise; deterministic steps; x0 at the data end)."""
        import torch

        grid = self.grid
        with torch.no_grad():
            s0 = student.schedule.alpha_sigma(torch.tensor([grid[0]], dtype=torch.float64))[1]
            x = noise * float(s0)
            states = [x]
            for i in range(upto):
                x = self._step(student, x, grid[i], grid[i + 1], cond)[0]
                states.append(x)
        return states

    def _step(self, student: nn.Module, x: torch.Tensor, t: float, s: float, cond: Any):
        """One deterministic step t -> s: (x_s, x0 prediction)."""
        import torch

        x0, eps = student.x0_eps(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), cond)
        if s == 0.0:
            return x0, x0
        return student.schedule.add_noise(x0, eps, torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)), x0

    def generator_output(self, student: nn.Module, states: list[torch.Tensor], k: int,
                         cond: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(x at phase k's end, the x0 prediction the DMD gradient is applied to, the gradient step j), with
        gradient: truncation: step j ~ U{k m .. (k+1) m - 1} from the stored state x_j, jumping to the phase end;
        otherwise every step of the phase."""
        import torch

        first, last = k * self.m, (k + 1) * self.m
        grid = self.grid
        if self.params.truncation:
            j = int(torch.randint(first, last, (1,)).item()) if self.m > 1 else first
            x, x0 = self._step(student, states[j], grid[j], grid[last], cond)
            return x, x0, j
        x = states[first]
        for i in range(first, last):
            x, x0 = self._step(student, x, grid[i], grid[i + 1], cond)
        return x, x0, first

    def _end_coeffs(self, k: int, like: torch.Tensor, schedule: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        end = torch.full((like.shape[0],), self.phase_times(k)[1], device=like.device, dtype=torch.float64)
        a, s = _alpha_sigma(schedule, end)
        return _bc(a, like), _bc(s, like)

    # --- losses ------------------------------------------------------------------------------------------
    def _dmd_loss(self, anchor: torch.Tensor, x0: torch.Tensor, cond: Any, k: int, ctx: StepContext) -> torch.Tensor:
        import torch

        fake, w, b = self.fakes[k], self.w, anchor.shape[0]
        with torch.no_grad():
            t = self.draw_t(k, b, anchor.device).to(anchor.dtype)
            a_s, s_s = self._end_coeffs(k, anchor, fake.schedule)
            a_t, s_t = (_bc(v, anchor) for v in _alpha_sigma(fake.schedule, t))
            x_t = subinterval_targets(anchor, torch.randn_like(anchor), a_s, s_s, a_t, s_t)[0]
            d_fake = fake.denoise(x_t, t, cond)  # the fake score is never guided
            d_real = ctx.run_teacher(lambda g: g.denoise(x_t, t, cond, guidance=w),
                                     n_examples=b * (2 if w != 1.0 else 1))
            grad = phased_dm_gradient(x0.detach(), d_real, d_fake, self.params.norm_clip_min)
        self._last["t_dmd"] = float(t.mean())
        return dm_loss(x0, grad)

    def _fake_loss(self, x_s: torch.Tensor, cond: Any, k: int) -> torch.Tensor:
        import torch

        fake = self.fakes[k]
        t = self.draw_t(k, x_s.shape[0], x_s.device).to(x_s.dtype)
        a_s, s_s = self._end_coeffs(k, x_s, fake.schedule)
        a_t, s_t = (_bc(v, x_s) for v in _alpha_sigma(fake.schedule, t))
        x_t, x0_hat, eps_hat = subinterval_targets(x_s, torch.randn_like(x_s), a_s, s_s, a_t, s_t)
        pred = fake.predict(x_t, t, cond)
        return (pred.float() - fake.target(x0_hat, eps_hat, t).float()).pow(2).mean()

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        cond, student = batch["cond"], ctx.student
        k = self.phase_at(ctx.step, ctx.generation)
        self._last = {"phase": float(k + 1)}
        noise = torch.randn_like(batch["x0"])
        states = self.rollout(student, noise, cond, (k + 1) * self.m)  # through phase k, no gradient
        losses: dict[str, torch.Tensor] = {}
        if ctx.updating("student"):
            anchor, x0, j = self.generator_output(student, states, k, cond)
            loss = self._dmd_loss(anchor.detach(), x0, cond, k, ctx)
            losses["student"] = loss
            self._last.update(loss_dmd=float(loss.detach()), gradient_step=float(j))
        loss_fake = self._fake_loss(states[-1].detach(), cond, k)  # the sampler's own phase-end samples
        losses["fake"] = loss_fake
        self._last["loss_fake"] = float(loss_fake.detach())
        return losses

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def record_info(self) -> dict[str, Any]:
        p = self.params
        phases = []
        for k in range(p.phases):
            start, end = self.phase_times(k)
            lo, hi = self.score_steps(k)
            phases.append({"expert": k + 1, "sampler_steps": list(range(k * self.m, (k + 1) * self.m)),
                           "t_start": start, "t_end": end, "score_t": [lo / NUM_TRAIN_TIMESTEPS,
                                                                       hi / NUM_TRAIN_TIMESTEPS]})
        return {"sampler": "ode", "timesteps": list(self.times), "steps": p.steps, "phases": phases,
                "experts": f"{p.phases} full copies of the student network, initialised from the teacher",
                "schedule": p.schedule, "dmd_range": p.dmd_range, "truncation": p.truncation,
                "update_every": {"student": UPDATE_RATIO, "fake": 1}, "real_guidance": self.w, "fake_guidance": 1.0,
                "norm_clip_min": p.norm_clip_min}
