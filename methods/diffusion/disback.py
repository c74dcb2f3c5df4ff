"""DisBack — Distribution Backtracking: "Distribution Backtracking Builds A Faster Convergence Trajectory for
Diffusion Distillation" (Zhang, Yang, Li, Zhao, Meng, Yang, Yang, Yang, Sun; ICLR 2025; arXiv 2408.15991).

Read: the paper's abstract and its Algorithm 1 (Degradation Recording) as quoted by a proceedings page; the
full text (its equations, appendix schedules) was not in the stored corpora, so the schedule below follows the
official code and its README. Official code read: SYZhang0805/DisBack @ d015b5e5c552666881a967cbee245ca5e895190b
(built on DMD2, tianweiy/DMD2) — ``README.md`` (the method's pseudocode, "Compatibility of other models"),
``main/degradation.py`` (stage 1), ``main/train_sd.py`` (stage 2: ``Trainer.train`` swaps the real score),
``main/sd_guidance.py`` (DM loss, fake loss, GAN losses), ``experiments/sdxl/degradation_sdxl_*.sh`` and
``experiments/sdxl/sdxl_cond399_*.sh`` (defaults).

What is implemented — two stages of ONE student, the harness's two generations (``fresh_student=False``,
optimisers and schedules restart per stage), sharing the cell's step budget:

1. **Degradation recording** (``degradation_fraction`` of the steps, ``degradation.py``). The generator G is
   the task's student initialised from the teacher (the README: ``s_theta_prime, G_stu = s_theta.clone(),
   s_theta.clone()``) and stays FROZEN (``compute_generator_gradient=False``, the generator never steps). A copy
   s_theta' of the teacher (DMD2's fake score network, with its GAN head) is fine-tuned toward G's distribution
   with DMD2's fake-score loss on G's samples x0 = G(z) (the flow-velocity MSE at t = k / 1000, k ~ U{0..999};
   the paper's Eq. 7, the teacher's own denoising loss) plus ``guidance_cls_loss_weight`` x the GAN
   discriminator loss on G's samples vs the batch's real images (``loss_fake_mean + guidance_cls_loss *
   guidance_cls_loss_weight``). Intermediate checkpoints s'_1 .. s'_N are saved on the way: the **degradation
   path** s'_0 = s_theta (the teacher), s'_1, ..., s'_N ~ the initial generator's score (Algorithm 1).
2. **Distribution backtracking** (the rest, ``train_sd.py``): DMD2 (`bench.methods.diffusion.dmd2`, its DM loss,
   fake-score loss, GAN head, TTUR, backward simulation for steps > 1) with two changes. (a) The fake score
   s_phi starts as the last path checkpoint s'_N (the README: ``s_phi = path_backtracking[0].clone()``): it is
   the degradation network itself, which simply continues. (b) The **real score is a moving target** walking
   the path backwards, s'_{N-1}, s'_{N-2}, ..., s'_1 and finally the teacher s'_0 = s_theta: the target
   switches every ``interval`` steps of the stage (the README: ``if idx % interval_2nd == 0: target += 1``; the
   code's ``--interval 1000``) and stays the teacher once reached. The DM gradient is DMD2's
   (p_target - p_fake) / mean|p_target| with p = x - D(x_t), the target guided at the real score's CFG scale
   (the code applies ``real_guidance_scale`` to whatever network sits in ``real_unet``); the paper's Eq. 8 is
   the same difference of scores s_phi - s_target.

**Budget split and schedule** (`disback_plan`, the hand-worked tests pin it). With S steps:
D = min(S - 1, max(1, round(degradation_fraction * S))) degradation steps, B = S - D backtracking steps,
n = min(path_checkpoints, D, B) checkpoints saved after degradation update round(i D / n), i = 1..n (the last
one is the state the fake network carries into stage 2), interval I = max(1, round(interval_fraction * B)),
lowered to (B - 1) // (n - 1) if the n - 1 intermediate targets would not leave the teacher at least one step.
At backtracking step k (0-based within the stage) the target is s'_j with j = max(0, n - 1 - k // I) (j = 0:
the teacher). Defaults, from the SDXL scripts: the degradation run trains 1000 iterations (24000 -> 25000) and
saves every ``log_iters`` 100 (10 checkpoints); the backtracking run trains 100,000 iterations (24000 ->
124000) with ``--interval 1000``: ``degradation_fraction`` = 0.01 (1000 of 101,000, rounded),
``path_checkpoints`` = 10, ``interval_fraction`` = 0.01 (1000 of 100,000). At S = 2000 (the full tier): D = 20,
checkpoints after updates 2, 4, ..., 20; I = 20; targets s'_9 .. s'_1 for stage steps 0..179, then the teacher.
With S = 1 there is no degradation stage (the single stage is DMD2 on the teacher).

DMD2 settings (``experiments/sdxl/*.sh`` of DisBack): ``--dfake_gen_update_ratio 5`` (the generator every 5th
step of the backtracking stage, counted from the stage's first step, as the code's step % 5 with a start step
of 24000; the fake network every step of both stages), ``--gen_cls_loss_weight 5e-3 --guidance_cls_loss_weight
1e-2 --diffusion_gan --diffusion_gan_max_timestep 1000 --cls_on_clean_image --gen_cls_loss``,
``--max_step_percent 0.98`` (``--min_step_percent`` default 0.02), ``--dm_loss_weight`` 1, AdamW weight decay
0.01 (both stages, ``optim_overrides``), grad-norm clip 10 (the task's; the code's ``--max_grad_norm 10``).
Sampler: DMD2's consistency sampler at its fixed times, ``steps_options = (steps,)``.

Deviations:

* Pixel space on the task's small flow-matching UNet instead of SDXL latents; the flow time t stands in for
  DDPM's k / 1000 (as in dmd2.py). The generator is conditioned at 0.999 (DMD2's 1-step default), not SDXL's
  ``--conditioning_timestep 399``, and starts as the teacher (the README's pseudocode), not — as the released
  SDXL scripts do — from a DMD2 checkpoint trained for 24,000 iterations (``--ckpt_only_path``).
* The released ``train_sd.py`` loads each path checkpoint (a whole guidance-model state dict, keys
  ``fake_unet.*``, ``real_unet.*``, ...) into ``real_unet`` with ``strict=False``, which appears to match no
  key, and its switching condition ``ckpt_num >= self.step`` is false after the first switch for the path's
  checkpoint numbers (24000..24900 against steps from 25000 on); the backtracking run also loads DMD2's own
  fake network (its step-24000 checkpoint) instead of the path's last checkpoint. This module follows the
  README pseudocode and the paper: target = the checkpoint's score network, switched every ``interval``
  steps, back to the teacher; s_phi = the last checkpoint.
* The teacher s'_0 ends the walk (Algorithm 1's path starts at s_theta; the README's list starts one update
  after it); checkpoints are taken after round(i D / n) updates (the code: after updates 1, 101, ..., 901).
* Intermediate targets are teacher-sized networks doing the teacher's job: their passes are counted as teacher
  forward passes (``StepContext.run_teacher``). The path is kept in memory on the CPU and in the cell's
  checkpoint (n - 1 copies of the score network; the last one is the live fake network), not on disk per step.
* Learning rate, warm-up, batch size and budget are the harness's (the code: lr 5e-7 for both networks, batch
  1 per GPU, 500 warm-up steps, 101,000 iterations); the harness restarts the optimisers at the stage boundary
  (the code's two stages are separate runs, so the same); real images come from the task's training batch.
* The schedule is scaled to the cell's budget by the fractions above; at small budgets the path shrinks: at
  the smoke tier's 20 steps D = 1, one checkpoint, no intermediate target (DMD2 on the teacher with a fake
  network one degradation update old); at the small tier's 300 steps, 3 checkpoints and 2 targets of 3 steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from bench.api import Generation, Method, Params
from bench.methods.diffusion.dmd2 import DMD2, check_step_range, fixed_steps_error

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext


# --------------------------------------------------------------------------------------------------
# The budget split and the backtracking schedule (plain functions, tested by hand)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The two stages of one cell: ``degradation_steps`` D, the degradation updates after which s'_1..s'_n are
    saved (``save_at``, the last = D), the backtracking stage's ``backtracking_steps`` B and target ``interval``."""

    degradation_steps: int
    save_at: tuple[int, ...]
    backtracking_steps: int
    interval: int

    @property
    def checkpoints(self) -> int:
        """n: the path's checkpoints after the teacher (s'_1 .. s'_n)."""
        return len(self.save_at)

    def target_at(self, k: int) -> int:
        """Path index j of the real-score target at backtracking step ``k`` (0-based in the stage); 0 is the teacher."""
        return max(0, self.checkpoints - 1 - k // self.interval)

    def schedule(self) -> list[dict[str, int]]:
        """The targets in order: ``{"target": j, "from": first stage step, "to": last stage step}``."""
        out: list[dict[str, int]] = []
        for j in range(self.checkpoints - 1, 0, -1):
            k0 = (self.checkpoints - 1 - j) * self.interval
            out.append({"target": j, "from": k0, "to": k0 + self.interval - 1})
        start = (self.checkpoints - 1) * self.interval if self.checkpoints else 0
        out.append({"target": 0, "from": start, "to": self.backtracking_steps - 1})
        return out


def disback_plan(total: int, degradation_fraction: float, path_checkpoints: int, interval_fraction: float) -> Plan:
    """The cell's budget of ``total`` steps split into degradation recording and backtracking (module docstring)."""
    if total < 2:  # no room for a degradation stage: DMD2 on the teacher
        return Plan(0, (), total, 1)
    d = min(total - 1, max(1, round(degradation_fraction * total)))
    b = total - d
    n = min(path_checkpoints, d, b)
    save_at = tuple(round(i * d / n) for i in range(1, n + 1))
    interval = max(1, round(interval_fraction * b))
    if n > 1 and (n - 1) * interval >= b:  # keep at least one step on the teacher itself
        interval = max(1, (b - 1) // (n - 1))
    return Plan(d, save_at, b, interval)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class _Stage:
    """The harness's context as DMD2's ``training_step`` sees it in a DisBack stage: the generator is due on the
    stage's own turns, and the "teacher" DMD2 asks for (its real score) is the current path target."""

    def __init__(self, ctx: StepContext, student_due: bool, target: nn.Module | None) -> None:
        self._ctx = ctx
        self._student_due = student_due
        self._target = target

    def updating(self, key: str) -> bool:
        return self._student_due if key == "student" else self._ctx.updating(key)

    def run_teacher(self, fn: Any, n_examples: int, index: int = 0) -> Any:
        target = self._target
        if target is None:  # the walk has reached s'_0: the teacher itself
            return self._ctx.run_teacher(fn, n_examples, index)
        # a path checkpoint: a teacher-sized network doing the teacher's job, counted as a teacher pass
        return self._ctx.run_teacher(lambda _teacher: fn(target), n_examples, index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class DisBack(Method):
    """Zhang et al. (ICLR 2025; arXiv 2408.15991, 2024): degradation recording (a teacher copy fine-tuned toward the
    frozen initial generator, checkpoints saved on the way), then DMD2 whose real score walks that path back to the
    teacher (module docstring)."""

    name = "disback"
    version = "1"
    domains = frozenset({"diffusion"})
    # degradation.py / train_sd.py: AdamW(betas=(0.9, 0.999), weight_decay=0.01) for both networks
    optim_overrides: ClassVar[dict[str, Any]] = dict(DMD2.optim_overrides)
    # No harness ratio: the generator's turns are counted within the backtracking stage (it never steps in stage 1).
    update_every: ClassVar[dict[str, int]] = {}

    class Params(Params):
        steps: int = Field(1, ge=1, le=100, description="generator steps (1: one-step, the paper's; >1: DMD2's fixed "
                                                        "times with backward simulation)")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="CFG scale of the real score (every path "
                                                                          "target and the teacher; the code's "
                                                                          "real_guidance_scale); None: the task's")
        # experiments/sdxl/*.sh: degradation 1000 iterations of 101,000 in all
        degradation_fraction: float = Field(0.01, gt=0.0, lt=1.0, description="share of the cell's steps spent on "
                                                                              "degradation recording (stage 1)")
        # degradation.py: a checkpoint every --log_iters 100 of the script's 1000 iterations
        path_checkpoints: int = Field(10, ge=1, le=1000, description="checkpoints saved on the degradation path "
                                                                     "after the teacher (fewer if stage 1 is shorter)")
        # train_sd.py --interval 1000 of the backtracking script's 100,000 iterations
        interval_fraction: float = Field(0.01, gt=0.0, le=1.0, description="share of the backtracking stage's steps "
                                                                           "spent on each intermediate target")
        # --dfake_gen_update_ratio 5 (both SDXL scripts)
        dfake_gen_update_ratio: int = Field(5, ge=1, le=100, description="the generator steps every this many "
                                                                         "backtracking steps; the fake every step")
        # train_sd.py argparse default 0.02; the scripts' --max_step_percent 0.98
        min_step_percent: float = Field(0.02, ge=0.0, lt=1.0, description="lowest DM-loss step, fraction of 1000")
        max_step_percent: float = Field(0.98, gt=0.0, le=1.0, description="highest DM-loss step, fraction of 1000")
        dm_loss_weight: float = Field(1.0, ge=0.0, description="weight of the DM loss (--dm_loss_weight default 1)")
        # --cls_on_clean_image --gen_cls_loss --gen_cls_loss_weight 5e-3 --guidance_cls_loss_weight 1e-2
        # --diffusion_gan --diffusion_gan_max_timestep 1000 (both SDXL scripts)
        gan: bool = Field(True, description="DMD2's GAN head on the fake network's bottleneck (both stages train D)")
        gen_cls_loss_weight: float = Field(5e-3, ge=0.0, description="weight of the generator's GAN loss")
        guidance_cls_loss_weight: float = Field(1e-2, ge=0.0, description="weight of the discriminator loss (added "
                                                                          "to the fake-score loss, both stages)")
        diffusion_gan_max_timestep: int = Field(1000, ge=1, le=1000, description="GAN inputs are noised at k / 1000, "
                                                                                 "k < this")

        @model_validator(mode="after")
        def _check(self) -> "DisBack.Params":
            if (self.path_checkpoints - 1) * self.interval_fraction >= 1.0:
                raise ValueError(f"path_checkpoints ({self.path_checkpoints}) - 1 intermediate targets of "
                                 f"interval_fraction {self.interval_fraction} each fill the whole backtracking "
                                 f"stage; the walk must reach the teacher: make (path_checkpoints - 1) * "
                                 f"interval_fraction < 1")
            return check_step_range(self)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        # DMD2 does the score distillation; DisBack decides what its real score is and when its generator trains.
        self.dmd2 = DMD2(DMD2.Params(steps=p.steps, guidance=p.guidance, min_step_percent=p.min_step_percent,
                                     max_step_percent=p.max_step_percent, dm_loss_weight=p.dm_loss_weight, gan=p.gan,
                                     gen_cls_loss_weight=p.gen_cls_loss_weight,
                                     guidance_cls_loss_weight=p.guidance_cls_loss_weight,
                                     diffusion_gan_max_timestep=p.diffusion_gan_max_timestep))
        self.times = self.dmd2.times
        self.plan: Plan | None = None
        #: the saved checkpoints s'_1 .. s'_{n-1}: (degradation update, CPU state dict of the score network);
        #: s'_n is the fake network itself at the stage boundary
        self.path: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.target: nn.Module | None = None  # the frozen network holding the current intermediate target
        self.loaded: int | None = None  # path index whose weights ``target`` holds
        self.switches: list[tuple[int, int]] = []  # (backtracking step, path index) each time the target changed
        self._last: dict[str, float] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        return fixed_steps_error("disback", params.steps, task, task_params)

    # --- stages --------------------------------------------------------------------------------------
    def generations(self, total_steps: int) -> list[Generation]:
        p = self.params
        self.plan = disback_plan(total_steps, p.degradation_fraction, p.path_checkpoints, p.interval_fraction)
        if self.plan.degradation_steps == 0:
            return [Generation(total_steps, fresh_student=False, name="distribution backtracking (teacher only)")]
        return [Generation(self.plan.degradation_steps, fresh_student=False,
                           name=f"degradation recording ({self.plan.checkpoints} path checkpoint"
                                f"{'' if self.plan.checkpoints == 1 else 's'})"),
                Generation(self.plan.backtracking_steps, fresh_student=False, name="distribution backtracking")]

    def in_degradation(self, ctx: StepContext) -> bool:
        return self.plan is not None and self.plan.degradation_steps > 0 and ctx.generation == 0

    # --- models --------------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        student = self.dmd2.init_student(teacher, student, ctx)  # G_stu = s_theta.clone(), DMD2's sampler
        student.description = student.description.replace("DMD2", "DisBack")
        return student

    def create_modules(self, ctx: StepContext) -> None:
        self.dmd2.create_modules(ctx)  # s_theta' = the fake score network (+ GAN head): a copy of the teacher
        if self.plan is None:
            self.generations(ctx.total_steps)
        if self.plan.checkpoints > 1:  # intermediate targets exist: one frozen network to hold them
            self.target = copy.deepcopy(ctx.teacher).eval()
            self.target.requires_grad_(False)

    def extra_modules(self) -> dict[str, nn.Module]:
        return self.dmd2.extra_modules()

    def setup(self, ctx: StepContext) -> None:
        self.dmd2.setup(ctx)

    def select_target(self, k: int) -> nn.Module | None:
        """The real score at backtracking step ``k``: the frozen network loaded with s'_j, or None for the teacher."""
        j = self.plan.target_at(k)
        if not self.switches or self.switches[-1][1] != j:
            self.switches.append((k, j))
        if j == 0:
            return None
        if self.loaded != j:  # (after a resume the target is reloaded from the path)
            self.target.load_state_dict(self.path[j - 1][1])
            self.loaded = j
        return self.target

    # --- steps ---------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.in_degradation(ctx):  # the generator is frozen: only the fake network (and D) trains
            losses = self.dmd2.training_step(batch, _Stage(ctx, False, None))
            self._last = {"stage": 1.0, **self.dmd2.on_step_end(ctx)}
            return losses
        k = ctx.generation_step
        target = self.select_target(k)
        due = k % self.params.dfake_gen_update_ratio == 0
        losses = self.dmd2.training_step(batch, _Stage(ctx, due, target))
        self._last = {"stage": 2.0, "target": float(self.plan.target_at(k)), **self.dmd2.on_step_end(ctx)}
        return losses

    def dm_step_loss(self, x: torch.Tensor, cond: Any, ctx: StepContext) -> torch.Tensor:
        """The generator's DM loss on samples ``x`` against the target of backtracking step ``ctx.generation_step``
        (the loss of a generator turn, without the GAN term)."""
        return self.dmd2.distribution_matching_loss(x, cond, _Stage(ctx, True, self.select_target(ctx.generation_step)))

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        if self.in_degradation(ctx):
            done = ctx.generation_step + 1  # degradation updates completed
            if done in self.plan.save_at[:-1]:  # s'_n is the fake network itself when stage 2 starts
                score = self.dmd2.fake["score"]
                self.path.append((done, {k: v.detach().cpu().clone() for k, v in score.state_dict().items()}))
        return dict(self._last)

    # --- resume and record ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"path": [(u, s) for u, s in self.path], "switches": list(self.switches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.path = [(int(u), s) for u, s in state.get("path", [])]
        self.switches = [tuple(s) for s in state.get("switches", [])]
        self.loaded = None  # the target is reloaded from the path at the next backtracking step

    def record_info(self) -> dict[str, Any]:
        p, plan = self.params, self.plan
        info: dict[str, Any] = {"sampler": "consistency", "timesteps": list(self.times), "steps": len(self.times),
                                "real_guidance": self.dmd2.w, "fake_guidance": 1.0,
                                "generator_update_every": p.dfake_gen_update_ratio,
                                "dm_steps": [self.dmd2.min_step, min(self.dmd2.max_step, 999)], "gan": p.gan,
                                "gen_cls_loss_weight": p.gen_cls_loss_weight if p.gan else 0.0,
                                "guidance_cls_loss_weight": p.guidance_cls_loss_weight if p.gan else 0.0,
                                "path_targets_count_as": "teacher forward passes"}
        if plan is not None:
            info.update({"degradation_steps": plan.degradation_steps, "backtracking_steps": plan.backtracking_steps,
                         "path_checkpoints": plan.checkpoints, "saved_after_updates": list(plan.save_at),
                         "interval": plan.interval, "schedule": plan.schedule(),
                         "target_switches": [{"step": k, "target": j} for k, j in self.switches]})
        return info
