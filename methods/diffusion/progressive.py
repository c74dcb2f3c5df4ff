"""Progressive distillation — Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models"
(ICLR 2022, arXiv 2202.00512).

Official code read: google-research/google-research ``diffusion_distillation/`` (``diffusion_distillation/dpm.py``
@ 1d4d2f1: ``Model.training_losses``, the distillation target and the ``snr_trunc`` weighting; ``model.py``
@ 21e6730: ``current_num_steps`` = the teacher's sampler steps // 2; ``config/cifar_distill.py`` and
``config/imagenet64_distill.py``: ``start_num_steps``, ``end_num_steps = 1``, the optimiser;
``diffusion_distillation.ipynb``: the round loop, "student becomes new teacher for next distillation
iteration", the student starting as a copy of the teacher).

What is implemented (Algorithm 2 of the paper, as ``dpm.py`` computes it):

* **Rounds.** The student starts as a copy of the teacher. Round r trains a student sampled with N_r DDIM
  steps against a teacher sampled with 2 N_r: N_1 = ``start_steps`` / 2, then N halves each round down to
  ``final_steps`` (``model.py``: ``teacher_state.num_sample_steps // 2``). Each round's trained student is
  frozen and becomes the next round's teacher (the harness's generations with ``fresh_student=False``: the
  student keeps training; this method keeps the frozen copy itself, deep-copied at the start of each round).
  The budget is split equally between the rounds (the paper trains every round for the same number of
  updates, ``distill_steps_per_iter``); each round gets new optimiser state and its own schedule (the harness
  does so per generation), as the notebook re-creates the optimiser each round.
* **Target.** Data x, t = (i + 1) / N with i ~ U{0, ..., N - 1} on the student's N-step grid, z_t = alpha_t x +
  sigma_t eps. Two teacher DDIM steps t -> t' = t - 0.5/N -> t'' = t - 1/N give z_t''; the target x~ is the x0
  that makes one student DDIM step from t land exactly on z_t'':
  x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t); at t'' = 0 the teacher's
  last x prediction (``jnp.where(i == 0, x_pred, x_target)``).
* **Loss.** x-space MSE weighted by max(SNR(t), 1) ("truncated SNR", ``mean_loss_weight_type='snr_trunc'``:
  ``max(x_mse, eps_mse)``, the same thing since eps_mse = SNR x_mse), averaged over the batch. ``snr`` (=
  eps-MSE) and ``constant`` (= x-MSE), the code's other options, are offered.
* **Sampler.** Deterministic DDIM (``ode``; under the flow schedule exactly Euler) at ``final_steps`` on the
  uniform grid the student was trained on; the student offers only that step count (``steps_options``).
* **Optimiser.** The task's AdamW at lr 1e-4 (``imagenet64_distill.py``: Adam 1e-4; CIFAR uses 5e-5), with the
  official per-round linear decay to 0 (``learning_rate_anneal_type='linear'`` over ``steps_per_iter``) and
  gradient clipping at 1.0 (``grad_clip=1.0``) as ``optim_overrides``; no EMA (``ema_decay=0.``).

Deviations:

* **Schedule and parameterisation.** The paper uses the cosine VP schedule with x/v/"both" prediction; the task's
  teacher is a rectified-flow teacher (alpha = 1 - t, sigma = t, flow-velocity prediction). The target is written
  generically through the adapter (``schedule.alpha_sigma``, ``x0_eps``, ``add_noise``), so it is the same formula;
  the student stays in the teacher's (flow) parameterisation. Endpoints: the paper clips log-SNR to [-20, 20]
  and special-cases t'' = 0. Under the flow schedule nothing needs clipping on the student's grid: t >= 1/N > 0,
  so sigma_t > 0; the denominator is (alpha_t'' sigma_t - sigma_t'' alpha_t) / sigma_t = (t - t'') / t > 0 (at
  t = 1, alpha_t = 0 and it is alpha_t'' = 1/N); SNR(1) = 0 gives weight 1 and the largest weight is SNR(1/N) =
  (N - 1)^2; t'' = 0 takes the teacher's x prediction as the official code does. (The grid is scaled by
  ``Schedule.t_max`` for schedules whose sampler starts below 1.)
* **Guidance.** The paper distils unguided models. The task's teacher is evaluated and distilled with
  classifier-free guidance (``guidance``, default the task's): round 1's targets use the guided teacher (two
  network passes per step), so the student absorbs the guidance and samples unguided (one pass per step);
  later rounds' teachers are unguided students. (Meng et al., CVPR 2023, distil guidance with a w-conditioned
  first stage; not done here.)
* **Start.** Default ``start_steps``: the task's reference sampler steps rounded up to ``final_steps`` * 2^k
  (8 -> 8 at the smoke tier; 25 -> 32 at the small tier), since every round halves exactly. When the cell's
  budget has fewer steps than rounds, the earliest rounds are dropped (the first kept round distils the task's
  teacher directly, at twice its N); the record says so.
* **Budgets.** The paper trains 50k updates per round at batch 128-2048; here the cell's budget. The paper's
  sampler clips x predictions to [-1, 1] (``eval_clip_denoised``); the harness's sampler does not.
* **One model.** Only the final round's student is evaluated (one Generator per cell), so it is offered at
  ``final_steps`` only; set ``final_steps=4`` for the 4-step model (the intermediate rounds' students are not kept).
* **Teacher accounting.** Evaluations of the round teachers (earlier students) are counted as teacher passes,
  like the task teacher's; ``record_info`` splits them.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from bench import BenchError
from bench.api import Generation, Method, Params, split_steps

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext, Task
    from bench.diffusion import Generator, Schedule


def round_plan(start_steps: int, final_steps: int) -> list[int]:
    """The student's sampler steps of each round: start/2, start/4, ..., final (``start = final * 2^k``, k >= 1)."""
    ratio = start_steps // final_steps
    if start_steps % final_steps or ratio < 2 or ratio & (ratio - 1):
        raise BenchError(f"progressive: start_steps {start_steps} must be final_steps {final_steps} times a power "
                         f"of 2 (at least 2): each round halves the sampler's steps")
    plan, n = [], start_steps
    while n > final_steps:
        n //= 2
        plan.append(n)
    return plan


def default_start(teacher_steps: int, final_steps: int) -> int:
    """The teacher's reference steps rounded up to ``final * 2^k`` with k >= 1."""
    k = max(1, math.ceil(math.log2(max(teacher_steps, 1) / final_steps)))
    return final_steps * 2 ** k


def teacher_two_steps(teacher: Generator, z_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_end: torch.Tensor,
                      cond: Any, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two deterministic DDIM steps of ``teacher`` t -> t_mid -> t_end: (z at t_end, the last x prediction)."""
    z_mid = teacher.ddim_step(z_t, t, t_mid, cond, guidance)
    x_mid, eps_mid = teacher.x0_eps(z_mid, t_mid, cond, guidance)
    return teacher.add_noise(x_mid, eps_mid, t_end), x_mid


def ddim_x_target(z_end: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, schedule: Schedule,
                  x_last: torch.Tensor | None = None) -> torch.Tensor:
    """x~ such that one DDIM step from (z_t, t) with x0 = x~ lands on z_end at t_end (Algorithm 2):
    (z_end - (sigma_end/sigma_t) z_t) / (alpha_end - (sigma_end/sigma_t) alpha_t); ``x_last`` where t_end = 0."""
    import torch

    shape = (-1, *([1] * (z_t.dim() - 1)))
    a_t, s_t = (v.reshape(shape) for v in schedule.alpha_sigma(t))
    a_e, s_e = (v.reshape(shape) for v in schedule.alpha_sigma(t_end))
    frac = s_e / s_t
    x = (z_end - frac * z_t) / (a_e - frac * a_t)
    if x_last is None:
        return x
    return torch.where(t_end.reshape(shape) <= 0, x_last, x)


def weighted_x_loss(x_hat: torch.Tensor, x_target: torch.Tensor, t: torch.Tensor, schedule: Schedule,
                    weighting: str = "snr_trunc") -> torch.Tensor:
    """Batch mean of w(t) * mean_pixels (x_hat - x~)^2 with w = max(SNR, 1) (snr_trunc), SNR or 1."""
    x_mse = (x_hat.float() - x_target.float()).pow(2).flatten(1).mean(1)
    snr = schedule.snr(t.float())
    w = {"snr_trunc": snr.clamp(min=1.0), "snr": snr, "constant": snr.new_ones(snr.shape)}[weighting]
    return (w * x_mse).mean()


class Progressive(Method):
    """Salimans & Ho 2022 (ICLR): progressive distillation, halving the DDIM steps each round (two-step target)."""

    name = "progressive"
    version = "1"
    domains = frozenset({"diffusion"})
    # cifar_distill.py / imagenet64_distill.py: learning_rate_anneal_type='linear' over each round
    # (learning_rate_anneal_steps=distill_steps_per_iter), warm-up 0, grad_clip=1.0.
    optim_overrides = {"schedule": "linear", "warmup_ratio": 0.0, "grad_clip": 1.0}

    class Params(Params):
        # end_num_steps = 1 in every official distillation config (cifar/imagenet64/bedroom/church _distill.py).
        final_steps: int = Field(1, ge=1, le=64, description="sampler steps of the final student (must be one "
                                                             "of the task's evaluated nfe counts)")
        # start_num_steps: "number of steps in baseline sampler" (8192 CIFAR, 1024 ImageNet); here the task's
        # teacher reference steps by default (rounded up to final * 2^k).
        start_steps: int | None = Field(None, ge=2, le=8192, description="sampler steps of round 1's teacher "
                                                                         "(round 1's student takes half); must "
                                                                         "be final_steps * 2^k; default: the "
                                                                         "task's teacher_sampler_steps rounded "
                                                                         "up to such a count")
        # the paper distils unguided teachers; the task distils its teacher at its guidance (module docstring)
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="classifier-free guidance scale of "
                                                                          "round 1's teacher (default: the "
                                                                          "task's guidance; later rounds' "
                                                                          "teachers are unguided students)")
        # mean_loss_weight_type='snr_trunc' in every official distillation config (dpm.py offers the others)
        weighting: Literal["snr_trunc", "snr", "constant"] = Field(
            "snr_trunc", description="loss weight on the x-space MSE: max(SNR, 1), SNR (= eps-MSE) or 1")

        @model_validator(mode="after")
        def _start(self):
            if self.start_steps is not None:
                try:
                    round_plan(self.start_steps, self.final_steps)
                except BenchError as exc:
                    raise ValueError(str(exc)) from None
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.teacher_steps: int | None = None  # the task's reference sampler steps (set by `unsupported`)
        self.task_guidance: float | None = None
        self.rounds: list[int] = []  # the student's sampler steps per round (after any dropped rounds)
        self.round_steps: list[int] = []
        self.dropped: list[int] = []
        self.round_teacher: Generator | None = None  # the frozen previous-round student (rounds 2, 3, ...)
        self._pending: dict[str, Any] | None = None
        self.evals = {"task_teacher": 0, "round_teachers": 0}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        nfe = list(getattr(task_params, "nfe", []) or [])
        if params.final_steps not in nfe:
            return (f"the progressive student samples at final_steps={params.final_steps} only; the task evaluates "
                    f"nfe {nfe}: set progressive.final_steps to one of them")
        return None

    def unsupported(self, task: Task) -> str | None:
        steps = getattr(task.params, "teacher_sampler_steps", None)
        if steps is None and hasattr(task, "tier_defaults"):
            steps = task.tier_defaults().get("teacher_sampler_steps")
        self.teacher_steps = int(steps) if steps else None
        self.task_guidance = float(getattr(task.params, "guidance", 1.0))
        if self.params.start_steps is None and self.teacher_steps is None:
            return "progressive needs the teacher's sampler steps (task teacher_sampler_steps) or start_steps"
        return None

    def start_steps(self) -> int:
        if self.params.start_steps is not None:
            return self.params.start_steps
        if self.teacher_steps is None:
            raise BenchError("progressive: start_steps is not set and the task's teacher_sampler_steps is unknown "
                             "(the harness resolves it through Method.unsupported(task))")
        return default_start(self.teacher_steps, self.params.final_steps)

    def generations(self, total_steps: int) -> list[Generation]:
        plan = round_plan(self.start_steps(), self.params.final_steps)
        keep = min(len(plan), total_steps)  # a budget shorter than the rounds keeps the last ones
        self.dropped, self.rounds = plan[:len(plan) - keep], plan[len(plan) - keep:]
        self.round_steps = split_steps(total_steps, keep)
        return [Generation(s, fresh_student=False, name=f"round {i + 1}: {2 * n} -> {n} steps")
                for i, (s, n) in enumerate(zip(self.round_steps, self.rounds))]

    def init_student(self, teacher: Any, student: Any, ctx: StepContext) -> Any:
        from bench.diffusion import Sampler

        student.net.load_state_dict(teacher.net.state_dict())  # the student starts as a copy of the teacher
        student.sampler = Sampler("ode", steps=self.params.final_steps, guidance=1.0)
        student.steps_options = (self.params.final_steps,)
        student.description = (f"progressive distillation student (Salimans & Ho 2022): DDIM/Euler at "
                               f"{self.params.final_steps} step(s), no guidance")
        return student

    def create_modules(self, ctx: StepContext) -> None:
        if self._pending is not None:  # resumed inside round >= 2: rebuild that round's frozen teacher
            self.round_teacher = self._frozen(ctx.student)
            self.round_teacher.net.load_state_dict(self._pending)
            self._pending = None

    @staticmethod
    def _frozen(g: Any) -> Any:
        frozen = copy.deepcopy(g).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen

    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        # Round 1 distils the task's teacher; every later round the previous round's student, frozen now.
        self.round_teacher = None if index == 0 else self._frozen(ctx.student)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        g = ctx.student
        x0, cond = batch["x0"], batch["cond"]
        b = x0.shape[0]
        n = self.rounds[ctx.generation]
        t_max = g.schedule.t_max()
        # dpm.py: i ~ U{0..N-1}, u = (i + 1) / N; teacher steps to u - 0.5/N and u - 1/N
        i = torch.randint(0, n, (b,), device=x0.device)
        t = t_max * (i + 1).to(x0.dtype) / n
        t_mid, t_end = t - 0.5 * t_max / n, t - t_max / n
        eps = torch.randn_like(x0)
        z_t = g.add_noise(x0, eps, t)
        if self.round_teacher is None:
            w = self.round1_guidance(ctx.task)
            passes = 2 * b * (2 if w != 1.0 else 1)
            z_end, x_last = ctx.run_teacher(lambda teacher: teacher_two_steps(teacher, z_t, t, t_mid, t_end, cond, w),
                                            n_examples=passes)
            self.evals["task_teacher"] += passes
        else:
            rt = self.round_teacher
            z_end, x_last = ctx.run_teacher(lambda _: teacher_two_steps(rt, z_t, t, t_mid, t_end, cond), n_examples=2 * b)
            self.evals["round_teachers"] += 2 * b
        x_target = ddim_x_target(z_end, z_t, t, t_end, g.schedule, x_last).detach()
        x_hat = g.denoise(z_t, t, cond)
        return {"student": weighted_x_loss(x_hat, x_target, t, g.schedule, self.params.weighting)}

    def round1_guidance(self, task: Any = None) -> float | None:
        if self.params.guidance is not None:
            return self.params.guidance
        if task is not None:
            self.task_guidance = float(getattr(task.params, "guidance", 1.0))
        return self.task_guidance

    def state_dict(self) -> dict[str, Any]:
        rt = None if self.round_teacher is None else {k: v.detach().clone()
                                                       for k, v in self.round_teacher.net.state_dict().items()}
        return {"round_teacher": rt, "evals": dict(self.evals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state.get("round_teacher")
        self.evals = dict(state.get("evals", self.evals))

    def record_info(self) -> dict[str, Any]:
        start = self.start_steps() if (self.params.start_steps or self.teacher_steps) else None
        return {"start_steps": start,
                "task_teacher_sampler_steps": self.teacher_steps, "final_steps": self.params.final_steps,
                "rounds_student_steps": self.rounds, "rounds_teacher_steps": [2 * n for n in self.rounds],
                "steps_per_round": self.round_steps, "rounds_dropped_for_budget": self.dropped,
                "round1_teacher": "the task's teacher", "later_teachers": "the previous round's student (frozen)",
                "round1_guidance": self.round1_guidance(),
                "weighting": self.params.weighting, "sampler": f"ode (DDIM/Euler) at {self.params.final_steps} steps",
                "teacher_examples_task_teacher": self.evals["task_teacher"],
                "teacher_examples_round_teachers": self.evals["round_teachers"]}
