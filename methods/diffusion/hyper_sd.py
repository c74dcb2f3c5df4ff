"""Hyper-SD — Ren, Xia, Lu, Zhang, Wu, Xie, Wang & Xiao (ByteDance), "Hyper-SD: Trajectory Segmented Consistency
Model for Efficient Image Synthesis" (NeurIPS 2024, arXiv 2404.13686).

Official code: **no training code released.** ByteDance/Hyper-SD publishes checkpoints and inference examples only
(Hugging Face model card ``ByteDance/Hyper-SD``, README revisions 831b863, ed14162, a08b9c3: N-step LoRAs sampled
with ``DDIMScheduler(timestep_spacing="trailing")`` and ``guidance_scale=0``; the 1-step *unified* LoRA sampled at
1..8 steps with ``TCDScheduler`` and ``eta`` (default 1.0, "lower eta results in more detail"); a 1-step SDXL UNet).
No GitHub snapshot of ByteDance/Hyper-SD could be had here, and the paper's full text was not in the stored
corpora: what follows was read in the paper's abstract and in secondary summaries of it (chatpaper.com/paper/83153,
besthub.dev's article, the NeurIPS 2024 poster digest deep-diver/neurips2024 ``content/posters/O5XbOoi0x3``, notes
greasebig/represent-t2i ``415419/单步推理/Hyper-SD.md``): [0, T] split into k segments with consistency distillation
inside each, k reduced 8 -> 4 -> 2 -> 1 over stages; the distance d combines MSE and an adversarial loss whose
weight grows as k falls, plus a noise perturbation for stability; human-feedback learning with reward models (LAION
aesthetics, ImageReward, an instance-segmentation model, SOLO); a one-step enhancement by score distillation (DMD)
combined with the MSE; one unified LoRA for all step counts. Equations and hyper-parameters of the paper could not
be checked; every default below names where it does come from.

What is implemented (one student, trained in stages that are the harness's generations, ``fresh_student=False``:
each stage starts from the previous stage's weights with new optimiser state):

* **Stages and budget.** ``segments`` = (8, 4, 2, 1) TSCD stages, then a human-feedback stage and a
  score-distillation stage: 6 stages sharing the cell's step budget equally (`bench.api.split_steps`: earlier
  stages take the remainder; 20 steps -> 4, 4, 3, 3, 3, 3). With fewer budget steps than stages the earliest
  stages are dropped (a stage needs a step); ``record_info`` says which.
* **TSCD** (`segment_end`, `tscd_times`). The LCM/TCD skip grid (``num_ddim_timesteps`` = 50, as consistency.py): t = t_max (n + 1) / 50, n ~ U{0..49}, one teacher step back to t - t_max / 50. The k segments
  have boundaries b_j = j t_max / k; a point at t belongs to (b_j, b_j+1] and its target time is that segment's
  **lower boundary** t_end = b_j (k = 1: t_end = 0, ordinary consistency distillation to x0). The teacher step
  stays inside the segment: prev = max(t - t_max / 50, t_end). The consistency function maps x_t to t_end
  along a DDIM step with the network's own (x0, eps) (TCD's semi-linear trajectory function, the form the
  released checkpoints are sampled with: ``TCDScheduler``/``DDIMScheduler`` use the raw prediction, no LCM
  c_skip/c_out): F_theta(x, t, t_end) = alpha(t_end) x0_theta + sigma(t_end) eps_theta (x0_theta itself at
  t_end = 0), so F(x, t, t) = x. Loss: mean((F_theta(x_t, t, t_end) - sg(F_ema(x_prev, prev, t_end)))^2),
  x_prev = one guided teacher DDIM step t -> prev (F_ema(x_prev, t_end, t_end) = x_prev exactly when the step
  reaches the boundary). EMA target (consistency.py's ``ema_update``) with decay 0.95 (LCM/TCD scripts'
  ``--ema_decay``), carried across stages.
* **Human feedback** (stage 5; also in stage 6): the student's one-step sample x^ = f_theta(z) (no gradient) is
  scored by a reward r in [0, 1] and the reward-weighted regression term of Lee et al. 2023 ("Aligning
  text-to-image models using human feedback", arXiv 2302.12192) is added: ``reward_weight`` * mean_i r_i
  mean((x0_theta(x^_t, t) - sg(x^))^2), x^_t = x^ re-noised at a grid t (`reward_weighted_loss`), beside the
  k = 1 TSCD loss. Rewards: geneval (smoke, small): GenEval's rules on the task's programmatic detector
  (``tasks/geneval/detect.py``, ``rules.py``): 1 if the image is correct for its training prompt, else 0;
  coco_fid (smoke, small; class-conditional): the stand-in p_T(c | x^), the frozen teacher used as a diffusion
  classifier (Li et al., ICCV 2023, arXiv 2303.16203) at one noise level: softmax over classes c' of
  -sum((D_T(x_t, t_c, c') - x^)^2), x_t = x^ noised at t_c = 0.5 with one noise draw shared by all classes
  (`teacher_class_posterior`).
* **Score distillation** (stage 6, one step): DMD2's distribution-matching gradient and loss, by import from
  dmd2.py (``dm_gradient``, ``dm_loss``: t = k / 1000, k ~ U{20..980}, real score = the guided teacher, fake
  score = a copy of the teacher trained by ``fake_score_loss`` on the detached one-step samples, every step of
  this stage, its own optimiser ``fake``) on x = f_theta(z), added to the k = 1 TSCD loss and the reward term.
* **Sampler.** One student for every step count: ``Sampler("consistency")`` (x0, then fresh noise to the next
  time: ``TCDScheduler`` at eta = 1, the model card's default) at the "trailing" grid t_max (1 - i / n) (the
  N-step LoRAs' ``timestep_spacing="trailing"``; these are the upper segment boundaries at k = n),
  ``steps_options`` = (1, 2, 4, 8) (the paper's 1/2/4/8-step results, the unified LoRA), no guidance at
  sampling (``guidance_scale=0`` on the card: CFG is distilled). Own step count ``sample_steps`` = 1.

Deviations:

* No official training code or paper text was read (above): the stage budget split, the grid, the target
  parameterisation, the EMA, the loss weights are this module's choices from LCM/TCD/DMD2 defaults, not Hyper-SD's.
* Only the MSE part of d: no adversarial loss and no noise perturbation (their form is not known here).
* Human feedback: a reward-weighted regression term on the student's own samples, not ReFL's differentiable
  reward loss (the task rewards are not differentiable); rewards are the task's detector + GenEval rules
  (geneval) or a teacher diffusion-classifier stand-in (coco_fid), not LAION aesthetics / ImageReward / SOLO.
  At the full tier there is no such reward: ``unsupported`` refuses ``reward_weight > 0`` there.
* The teacher is guided at one fixed scale (``guidance``, default the task's) and the student has no guidance
  input; pixel space with the task's small flow-matching UNet instead of SD1.5/SDXL latents; full fine-tuning
  instead of LoRA; the harness's optimiser, learning rate, batch and budget; one unified model, no per-step LoRAs.
* The score-distillation stage uses DMD2's normalised DM loss without its GAN and without TTUR (fake and student
  step together).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field, field_validator, model_validator

from bench import BenchError
from bench.api import Generation, Method, Params, split_steps
from bench.methods.diffusion.consistency import EMATargetState, consistency_loss, ema_update
from bench.methods.diffusion.dmd2 import NUM_TRAIN_TIMESTEPS, dm_gradient, dm_loss, fake_score_loss

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task
    from bench.diffusion import Generator

#: the step counts the one student is evaluated at (the paper's 1, 2, 4 and 8-step results; the unified LoRA)
STEP_OPTIONS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------------
# Segments, times and stages
# --------------------------------------------------------------------------------------------------


def segment_boundaries(k: int, t_max: float = 1.0) -> list[float]:
    """The k + 1 boundaries b_j = j t_max / k of k equal time segments of [0, t_max]."""
    return [t_max * j / k for j in range(k + 1)]


def segment_end(t: torch.Tensor, k: int, t_max: float = 1.0) -> torch.Tensor:
    """The target time of points at ``t``: the lower boundary b_j of the segment (b_j, b_j+1] holding t
    (a point on a boundary belongs to the segment below it; t = 0 maps to 0)."""
    import torch

    j = (torch.ceil(t * k / t_max - 1e-6) - 1).clamp(min=0)  # 1e-6 absorbs float rounding at boundaries
    return j * (t_max / k)


def tscd_times(index: torch.Tensor, num_ddim_timesteps: int, k: int,
               t_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, prev, t_end) of grid points ``index`` in 0..N-1: t = t_max (index + 1) / N, the teacher's step ends at
    prev = max(t - t_max / N, t_end) inside the segment, t_end = `segment_end`."""
    t = t_max * (index + 1).to(float_dtype(index)) / num_ddim_timesteps
    end = segment_end(t, k, t_max)
    return t, (t - t_max / num_ddim_timesteps).clamp(min=0.0).maximum(end), end


def float_dtype(x: torch.Tensor):
    import torch

    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


@dataclass(frozen=True)
class Stage:
    """One training stage: ``kind`` tscd / feedback / score, its segment count k, its share of the budget."""

    kind: str
    k: int
    steps: int

    @property
    def name(self) -> str:
        return {"tscd": f"TSCD k={self.k}", "feedback": "human feedback (k=1)",
                "score": "score distillation, one step (k=1)"}[self.kind]


def stage_plan(total_steps: int, segments: tuple[int, ...] = (8, 4, 2, 1), feedback: bool = True,
               score: bool = True) -> tuple[list[Stage], list[str]]:
    """The stages over ``total_steps``: TSCD at each k of ``segments``, then feedback, then score distillation,
    sharing the budget by `split_steps`; with fewer steps than stages the earliest are dropped (returned)."""
    kinds = [("tscd", k) for k in segments] + [("feedback", 1)] * feedback + [("score", 1)] * score
    keep = min(len(kinds), total_steps)
    dropped = [Stage(kind, k, 0).name for kind, k in kinds[:len(kinds) - keep]]
    kept = kinds[len(kinds) - keep:]
    return [Stage(kind, k, n) for (kind, k), n in zip(kept, split_steps(total_steps, keep))], dropped


def trailing_timesteps(steps: int, t_max: float = 1.0) -> tuple[float, ...]:
    """DDIM "trailing" spacing: t_max (1 - i / steps), i = 0..steps-1 (4 steps: 1, 0.75, 0.5, 0.25)."""
    return tuple(t_max * (1 - i / steps) for i in range(steps))


# --------------------------------------------------------------------------------------------------
# Losses and rewards
# --------------------------------------------------------------------------------------------------


def jump(g: Generator, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Any,
         guidance: float = 1.0) -> torch.Tensor:
    """The trajectory function: one DDIM step of ``g``'s own (x0, eps) from t to s (x0 itself where s = 0,
    x_t itself where s = t)."""
    import torch

    x0, eps = g.x0_eps(x_t, t, cond, guidance)
    shape = (-1, *([1] * (x_t.dim() - 1)))
    out = g.schedule.add_noise(x0, eps, s)
    out = torch.where(s.reshape(shape) <= 0, x0, out)
    return torch.where(s.reshape(shape) >= t.reshape(shape), x_t, out)


def reward_weighted_loss(pred: torch.Tensor, target: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Reward-weighted regression: batch mean of r_i * mean_pixels (pred_i - sg(target_i))^2."""
    per = (pred.float() - target.detach().float()).pow(2).flatten(1).mean(1)
    return (reward.to(per) * per).mean()


def teacher_class_posterior(teacher: Generator, x: torch.Tensor, cond: torch.Tensor, num_classes: int,
                            t: float = 0.5, noise: torch.Tensor | None = None) -> torch.Tensor:
    """p_T(cond | x): softmax over classes c of -sum_pixels (D_T(x_t, t, c) - x)^2, x_t = x noised at t with one
    noise draw shared by every class (a one-level diffusion classifier)."""
    import torch

    b = x.shape[0]
    noise = torch.randn_like(x) if noise is None else noise
    tt = torch.full((b,), t, dtype=x.dtype, device=x.device)
    x_t = teacher.add_noise(x, noise, tt)
    classes = torch.arange(num_classes, device=x.device)
    d = teacher.denoise(x_t.repeat(num_classes, *([1] * (x.dim() - 1))), tt.repeat(num_classes),
                        classes.repeat_interleave(b))
    err = (d - x.repeat(num_classes, *([1] * (x.dim() - 1)))).pow(2).flatten(1).sum(1).view(num_classes, b)
    return torch.softmax(-err, dim=0).gather(0, cond.view(1, b).long()).squeeze(0)


def geneval_train_metadata(task: Any) -> list[dict]:
    """GenEval metadata of the geneval task's training prompts (`GenEval.train_metadata`), checked against the
    training split's tokens."""
    import torch

    metas = task.train_metadata()
    conds = task.train_data().conds
    if len(metas) != len(conds) or not torch.equal(task.tokenizer.batch([m["prompt"] for m in metas]), conds):
        raise BenchError("hyper_sd: the geneval task's training metadata does not match its training split")
    return metas


def geneval_reward(images: torch.Tensor, metas: list[dict]) -> torch.Tensor:
    """1 where GenEval's rules on the task's shape detector find the image ([-1, 1], [B, 3, H, W]) correct for its
    prompt's metadata, else 0."""
    import torch

    from bench.tasks.generative.base import to_uint8
    from bench.tasks.geneval import detect, rules
    from bench.tasks.geneval import prompts as P

    arrays = to_uint8(images.detach().float().cpu())
    return torch.tensor([float(rules.evaluate_detections(m, detect.detect(a, P.SHAPES))["correct"])
                         for a, m in zip(arrays, metas)], device=images.device)


def reward_kind(task: Any) -> str | None:
    """Which tier-computable reward a task offers: "geneval" (GenEval's rules on the shape detector), "classifier"
    (the teacher-classifier stand-in of class-conditional tasks) or None (the full tier, other tasks)."""
    if getattr(task, "tier", None) == "full":
        return None
    if getattr(task, "name", None) == "geneval":
        return "geneval"
    if "num_classes" in (task.net_condition() if hasattr(task, "net_condition") else {}):
        return "classifier"
    return None


def task_reward(task: Any, classifier_time: float, method: str) -> Callable[..., torch.Tensor]:
    """``reward(x, index, cond, ctx)``: the reward in [0, 1] of samples ``x`` of the training examples ``index``
    with conditions ``cond`` (`reward_kind`); the classifier's teacher passes are counted through ``ctx``."""
    kind = reward_kind(task)
    if kind == "geneval":
        metas = geneval_train_metadata(task)
        return lambda x, index, cond, ctx: geneval_reward(x, [metas[int(i)] for i in index])
    if kind == "classifier":
        n = int(task.net_condition()["num_classes"])
        return lambda x, index, cond, ctx: ctx.run_teacher(
            lambda T: teacher_class_posterior(T, x, cond, n, classifier_time), n_examples=n * x.shape[0])
    raise BenchError(f"{method}: no reward for this task (the geneval shape task and class-conditional coco_fid, "
                     "smoke and small tiers)")


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class HyperSD(EMATargetState, Method):
    """Ren et al. (NeurIPS 2024) Hyper-SD: trajectory-segmented consistency distillation 8 -> 4 -> 2 -> 1, a
    reward-weighted feedback stage and a one-step score-distillation stage, one student for 1/2/4/8 steps."""

    name = "hyper_sd"
    version = "1"
    domains = frozenset({"diffusion"})

    class Params(Params):
        # the stage sequence of the paper (as summarised; see the module docstring)
        segments: tuple[int, ...] = Field((8, 4, 2, 1), min_length=1, description="segment counts k of the "
                                          "TSCD stages, strictly decreasing to 1 (paper: 8 -> 4 -> 2 -> 1)")
        feedback_stage: bool = Field(True, description="train a human-feedback stage after TSCD")
        score_stage: bool = Field(True, description="train a one-step score-distillation (DMD) stage last")
        # LCM/TCD scripts' --num_ddim_timesteps 50 and --ema_decay 0.95
        num_ddim_timesteps: int = Field(50, ge=2, le=1000, description="points of the skip-step grid over the "
                                                                       "teacher's time range")
        ema_decay: float = Field(0.95, ge=0.0, lt=1.0, description="EMA rate of the consistency target network")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="CFG scale of the teacher (TSCD steps, "
                                                                          "real score); None: the task's guidance")
        # not from the paper (its reward weights are not known here): the regression term at unit weight
        reward_weight: float = Field(1.0, ge=0.0, description="weight of the reward-weighted regression term in "
                                                              "the feedback and score stages (0: off)")
        classifier_time: float = Field(0.5, gt=0.0, lt=1.0, description="coco_fid stand-in reward: the noise "
                                                                        "level of the teacher diffusion classifier")
        # dmd2.py / DMD2's train_sd.py defaults
        dm_loss_weight: float = Field(1.0, ge=0.0, description="weight of DMD2's DM loss in the score stage")
        min_step_percent: float = Field(0.02, ge=0.0, lt=1.0, description="lowest DM-loss step, fraction of 1000")
        max_step_percent: float = Field(0.98, gt=0.0, le=1.0, description="highest DM-loss step, fraction of 1000")
        sample_steps: int = Field(1, description="the student's own sampling steps (one of 1, 2, 4, 8; evaluation "
                                                 "also samples at every task nfe count among them)")

        @field_validator("sample_steps")
        @classmethod
        def _own(cls, v: int) -> int:
            if v not in STEP_OPTIONS:
                raise ValueError(f"sample_steps {v} must be one of {STEP_OPTIONS}")
            return v

        @model_validator(mode="after")
        def _segments(self):
            s = list(self.segments)
            if any(k < 1 for k in s) or any(a <= b for a, b in zip(s, s[1:])) or s[-1] != 1:
                raise ValueError(f"segments {s} must be strictly decreasing positive counts ending at 1")
            if self.min_step_percent > self.max_step_percent:
                raise ValueError("min_step_percent must not exceed max_step_percent")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.plan: list[Stage] = []
        self.dropped: list[str] = []
        self.target: Generator | None = None  # the EMA consistency target (method state, no optimiser)
        self.fake: nn.Module | None = None  # DMD's fake score network (its own optimiser)
        self.reward_fn: Callable[[torch.Tensor, Batch, StepContext], torch.Tensor] | None = None
        self.reward_kind = "none"
        self.w = 1.0
        self._pending: dict[str, Any] | None = None
        self._last: dict[str, float] = {}
        self.ema_updates = 0

    # --- checks --------------------------------------------------------------------------------------
    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        nfe = list(getattr(task_params, "nfe", []) or [])
        if not any(n in STEP_OPTIONS for n in nfe):
            return (f"the hyper_sd student samples at {'/'.join(map(str, STEP_OPTIONS))} steps; the task evaluates "
                    f"nfe {nfe}: add one of those counts")
        return None

    def unsupported(self, task: Task) -> str | None:
        if self.params.reward_weight > 0 and (getattr(task, "tier", None) == "full" or reward_kind(task) is None):
            return ("hyper_sd's feedback reward exists for the geneval shape task and class-conditional coco_fid "
                    "(smoke, small tiers) only; set hyper_sd.reward_weight=0 here")
        return None

    # --- stages --------------------------------------------------------------------------------------
    def generations(self, total_steps: int) -> list[Generation]:
        p = self.params
        self.plan, self.dropped = stage_plan(total_steps, tuple(p.segments), p.feedback_stage, p.score_stage)
        return [Generation(s.steps, fresh_student=False, name=s.name) for s in self.plan]

    def init_student(self, teacher: Any, student: Any, ctx: StepContext) -> Any:
        from bench.diffusion import Sampler

        student.net.load_state_dict(teacher.net.state_dict())  # the student starts as the teacher
        t_max = teacher.schedule.t_max()
        table = {n: trailing_timesteps(n, t_max) for n in STEP_OPTIONS}
        student.sampler = Sampler("consistency", steps=self.params.sample_steps,
                                  timesteps=table[self.params.sample_steps], guidance=1.0)
        student.steps_options = STEP_OPTIONS
        student.timestep_table = table
        student.description = (f"Hyper-SD student: consistency (TCD eta=1) sampling at trailing timesteps, "
                               f"{'/'.join(map(str, STEP_OPTIONS))} steps, own {self.params.sample_steps}, no guidance")
        return student

    def create_modules(self, ctx: StepContext) -> None:
        from bench.diffusion import Generator

        g = ctx.student
        net = copy.deepcopy(g.net)
        if self._pending is not None:  # resume: the saved EMA weights
            net.load_state_dict(self._pending)
            self._pending = None
        for q in net.parameters():
            q.requires_grad_(False)
        self.target = Generator(net, schedule=g.schedule, prediction=g.prediction, sampler=g.sampler,
                                description="EMA target of the Hyper-SD student")
        if self.params.score_stage:
            self.fake = copy.deepcopy(ctx.teacher)  # DMD: the fake score starts as the teacher
            self.fake.requires_grad_(True)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"fake": self.fake} if self.fake is not None else {}

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        task = ctx.task
        self.w = float(p.guidance if p.guidance is not None else getattr(task.params, "guidance", 1.0))
        if self.reward_fn is not None or p.reward_weight == 0:
            return
        kind = reward_kind(task)
        reward = task_reward(task, p.classifier_time, "hyper_sd")
        self.reward_fn = lambda x, batch, c: reward(x, batch["index"], batch["cond"], c)
        self.reward_kind = kind

    # --- losses --------------------------------------------------------------------------------------
    def _tscd(self, g: Generator, x0: torch.Tensor, cond: Any, k: int, ctx: StepContext) -> torch.Tensor:
        import torch

        t_max = g.schedule.t_max()
        index = torch.randint(0, self.params.num_ddim_timesteps, (x0.shape[0],), device=x0.device)
        t, prev, end = tscd_times(index, self.params.num_ddim_timesteps, k, t_max)
        t, prev, end = (v.to(x0.dtype) for v in (t, prev, end))
        x_t = g.add_noise(x0, torch.randn_like(x0), t)
        pred = jump(g, x_t, t, end, cond)
        w = self.w
        x_prev = ctx.run_teacher(lambda T: T.ddim_step(x_t, t, prev, cond, guidance=w),
                                 n_examples=x0.shape[0] * (2 if w != 1.0 else 1))
        with torch.no_grad():
            target = jump(self.target, x_prev, prev, end, cond)
        return consistency_loss(pred, target, "l2")

    def _reward(self, g: Generator, x_in: torch.Tensor, cond: Any, batch: Batch,
                ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        t_max = g.schedule.t_max()
        b = x_in.shape[0]
        with torch.no_grad():
            x_hat = g.denoise(x_in, torch.full((b,), t_max, device=x_in.device, dtype=x_in.dtype), cond)
            r = self.reward_fn(x_hat, batch, ctx).to(x_hat.dtype)
        n = self.params.num_ddim_timesteps
        t = t_max * (torch.randint(0, n, (b,), device=x_in.device) + 1).to(x_in.dtype) / n
        pred = g.denoise(g.add_noise(x_hat, torch.randn_like(x_hat), t), t, cond)
        return reward_weighted_loss(pred, x_hat, r), r

    def _dm(self, x: torch.Tensor, cond: Any, ctx: StepContext) -> torch.Tensor:
        import torch

        p = self.params
        lo, hi = int(p.min_step_percent * NUM_TRAIN_TIMESTEPS), int(p.max_step_percent * NUM_TRAIN_TIMESTEPS)
        w = self.w
        with torch.no_grad():
            k = torch.randint(lo, min(hi + 1, NUM_TRAIN_TIMESTEPS), (x.shape[0],), device=x.device)
            t = k.to(x.dtype) / NUM_TRAIN_TIMESTEPS
            x_t = self.fake.add_noise(x, torch.randn_like(x), t)
            d_fake = self.fake.denoise(x_t, t, cond)
            d_real = ctx.run_teacher(lambda T: T.denoise(x_t, t, cond, guidance=w),
                                     n_examples=x.shape[0] * (2 if w != 1.0 else 1))
            grad = dm_gradient(x.detach(), d_real, d_fake)
        return dm_loss(x, grad)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        stage = self.plan[ctx.generation]
        g = ctx.student
        x0, cond = batch["x0"], batch["cond"]
        loss_cd = self._tscd(g, x0, cond, stage.k, ctx)
        loss = loss_cd
        log = {"stage_k": float(stage.k), "loss_tscd": float(loss_cd.detach())}
        losses: dict[str, torch.Tensor] = {}
        if stage.kind in ("feedback", "score"):
            t_max = g.schedule.t_max()
            sigma_max = float(g.schedule.alpha_sigma(torch.tensor([t_max], dtype=torch.float64))[1])
            x_in = torch.randn_like(x0) * sigma_max  # pure noise at t_max, as Generator.sample starts
            if p.reward_weight > 0:
                loss_r, r = self._reward(g, x_in, cond, batch, ctx)
                loss = loss + p.reward_weight * loss_r
                log.update(loss_reward=float(loss_r.detach()), reward=float(r.mean()))
            if stage.kind == "score":
                b = x0.shape[0]
                x = g.denoise(x_in, torch.full((b,), t_max, device=x0.device, dtype=x0.dtype), cond)
                loss_dm = self._dm(x, cond, ctx)
                loss = loss + p.dm_loss_weight * loss_dm
                losses["fake"] = fake_score_loss(self.fake, x.detach(), cond)
                log.update(loss_dm=float(loss_dm.detach()), loss_fake=float(losses["fake"].detach()))
        losses["student"] = loss
        self._last = log
        return losses

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        ema_update(self.target.net, ctx.student.net, self.params.ema_decay)
        self.ema_updates += 1
        return dict(self._last)

    # --- state (EMATargetState) and record ------------------------------------------------------------
    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"stages": [{"name": s.name, "kind": s.kind, "k": s.k, "steps": s.steps} for s in self.plan],
                "stages_dropped_for_budget": self.dropped, "budget_split": "equal (bench.api.split_steps)",
                "segment_boundaries": {k: segment_boundaries(k) for k in p.segments},
                "target_time": "lower boundary of the segment holding t", "num_ddim_timesteps": p.num_ddim_timesteps,
                "ema_decay": p.ema_decay, "ema_updates": self.ema_updates, "teacher_guidance": self.w,
                "reward": self.reward_kind if p.reward_weight > 0 else "off", "reward_weight": p.reward_weight,
                "sampler": "consistency (TCD eta=1) at trailing timesteps",
                "steps_options": list(STEP_OPTIONS), "sample_steps": p.sample_steps,
                "timesteps": {n: list(trailing_timesteps(n)) for n in STEP_OPTIONS},
                "score_stage": {"dm_loss_weight": p.dm_loss_weight, "dm_steps": [int(p.min_step_percent * 1000),
                                                                                int(p.max_step_percent * 1000)]}
                if p.score_stage else None}
