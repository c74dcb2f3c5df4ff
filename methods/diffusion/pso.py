"""PSO — Pairwise Sample Optimization: "Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample
Optimization" (Miao, Yang, Lin, Wang, Liu, Wang, Qiu; ICLR 2025; arXiv 2410.03190).

Read: the paper's abstract (arXiv / ICLR proceedings pages) and an OpenReview summary (paperhub.cn/paper/fXnE4gB64o);
the full text (its equations) was not in the stored corpora, so the losses below follow the official code.
Official code read: ZichenMiao/Pairwise_Sample_Optimization @ 85e09df — ``human_preference_tuning/
train_online_pso_sdxl_dmd2.py`` (online PSO on SDXL-DMD2: two sampled trajectories, reward comparison
``compare``, clipped current/reference transition ratios, logistic loss), ``human_preference_tuning/pso_pytorch/
diffusers_patch/distilled_inference_with_logprob.py`` (``distilled_step_with_logprob``: the log-likelihood of the
distilled sampler's transition) and ``sdxl_dmd_with_logprob.py`` (the sampler), ``human_preference_tuning/config/
config_sdxl_dmd_dpo.py`` + ``online_pso_sdxl_dmd2.sh`` (beta 50, eps 0.1), ``personalization/
train_pso_sdxl_turbo_dreambooth.py`` + ``personalization/scripts/*.sh`` (offline PSO: target images vs reference
images sampled from the distilled model, Diffusion-DPO-style loss at the distilled timesteps).

**Where the student comes from (two stages, one cell).** PSO fine-tunes an *already distilled* few-step student.
Here that student is the cell's own DMD2 student (`bench.methods.diffusion.dmd2`, Yin et al. 2024): the cell's
step budget is split into two generations of ONE student (``fresh_student=False``, new optimisers per stage):

1. **DMD2** for ``1 - pso_fraction`` of the steps: DMD2's own ``training_step`` (DM loss, fake score, GAN head,
   backward simulation) with its defaults, its consistency sampler at ``steps`` fixed times, and its TTUR
   (generator every 5th step of the stage, fake score every step). The harness's ``update_every`` is one ratio
   per cell, so this module declares none and hands the student's loss in only on DMD2's generator turns.
2. **PSO** for ``pso_fraction`` of the steps (the student only; the fake network rests). When the stage starts,
   the DMD2 student is copied and frozen: that copy is the **reference model** pi_ref of every PSO step.

The row's budget is therefore the cell's, like every other row's: distillation and fine-tuning both count. No
source pins the split (the paper tunes public DMD2/Turbo checkpoints, distilled far longer than they are tuned);
``pso_fraction = 0.2`` keeps most of the budget on distillation while giving the PSO stage about as many student
updates as the DMD2 stage's TTUR gives the generator (0.2 N vs 0.8 N / 5).

**Offline PSO** (``variant="offline"``, the default; the personalisation script's ``--loss_type pso``, i.e. the
Diffusion-DPO form with the distilled model's own timesteps): per condition c of the batch, a target image x^w
(``target="data"``: the batch's real image; ``"teacher"``: an image of the teacher's reference sampler from the
task's pair store, with its condition) and a reference image x^l sampled without gradient from the current student
(``reference_source="current"``; ``"initial"``: from the frozen reference model, as the code draws its negatives
once from the initial model) with the same c. One time t ~ U{the student's sampler times} and one noise eps per
pair, shared by both images (``indices.repeat(2)``, ``noise.chunk(2)[0].repeat(2)``); x^*_t = alpha_t x^* + sigma_t eps.
With e_m(x) = mean over elements of (F_m(x_t, t, c) - target(x, eps, t))^2 in the network's parameterisation
(the flow velocity here; the code's EDM-weighted epsilon error), for m = theta (the student) and ref:

    logit = [e_ref(x^w) - lambda e_ref(x^l)] - [e_theta(x^w) - lambda e_theta(x^l)]
    L_offline = mean_pairs -log sigmoid(beta * logit)  +  mu * mean_pairs e_theta(x^l)

lambda = ``reference_weight`` (the code's ``neg_defactor``), mu = ``reference_fit_weight`` (the code's
``prior_loss_weight`` "to keep the lose image fit"). Raising the logit raises the target's likelihood relative to
the reference image's, both measured against the frozen initial student.

**Online PSO** (``variant="online"``; ``train_online_pso_sdxl_dmd2.py``): per condition, two trajectories of the
current student's own stochastic few-step chain (the consistency sampler: x0 jump, re-noise with fresh noise), each
stochastic transition x_{t_i} -> x_{t_i+1} ~ N(alpha_{i+1} x0_m(x_{t_i}, t_i, c), sigma_{i+1}^2 I) (the code's
``distilled_step_with_logprob``; the final jump to x0 is deterministic and dropped, as the code does). The two final
images are scored by a reward; ``compare`` gives the pair signs h = (+1, -1) when trajectory 0 wins, (-1, +1) when
it loses, (0, 0) on a tie. Per transition, log r_k = clamp(exp(log pi_theta - log pi_ref), 1 - eps, 1 + eps), in
log, with the Gaussian log-density averaged over elements as the code does (the constants cancel):
log pi_theta - log pi_ref = -mean((x' - mu_theta)^2 - (x' - mu_ref)^2) / (2 sigma_{i+1}^2). Loss: the mean over
pairs and transitions of -log sigmoid(beta (h_0 log r_0 + h_1 log r_1)).

Defaults: beta = 200 offline (``--beta_pso`` default of the offline script), 50 online (``train.beta`` of the
DMD2 config and script); eps = 0.1 (``train.eps``); lambda = 1 (the symmetric DPO form; the script's
``--neg_defactor`` default is 0.1, its comment says "default 1.0"); mu = 0 (the DPO form; the personalisation
scripts use 0.5 with their hinge variant). DMD2 stage: DMD2's defaults (steps 1, its GAN and TTUR).

Deviations:

* The student is the cell's own DMD2 student (pixel space, the task's small flow UNet), not SDXL-DMD2/Turbo; both
  stages share the cell's budget (above), the harness's optimiser, learning rate (constant 1e-4; the code: 1e-5
  online, 2e-4 offline LoRA), gradient clip 10 (the code: 1.0) and DMD2's weight decay 0.01 (``optim_overrides``
  are cell-wide). Full fine-tuning instead of LoRA (rank 16/32); the reference model is a frozen copy, not the
  LoRA-disabled base.
* Offline: targets are the task's training images (or the teacher's ODE images), not DreamBooth/style/preference
  images; the reference images are drawn fresh for each batch's conditions (the code: a pool of 20 drawn once for
  the class prompt at step 0). The hinge variant ``pso_db`` is not implemented.
* Online: the reward is a stand-in for PickScore + ImageReward, usable on both tasks: the frozen teacher's guided
  denoising agreement r(x) = -mean((D_T^w(alpha x + sigma eps, t_r, c) - x)^2) at t_r = ``reward_t``, one eps
  shared by a pair. Sampling and training alternate every harness step on the batch's conditions (the code
  samples num_batches_per_epoch batches, then runs one inner epoch over them, accumulating the gradients of every
  transition into one update: the mean over transitions here). Trajectories run at the student's own times (the
  SDXL-DMD2 script samples its 4-step model on an 8-step grid) and start at sigma(t_0) eps like the evaluation
  sampler. A one-step student has no stochastic transition, so online PSO needs ``steps`` >= 2 (``check_task``
  refuses otherwise).
* With a budget of 1 step there is no PSO stage (the cell is DMD2 alone); ``record_info`` gives the stage steps.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from bench.api import Generation, Method, Params
from bench.methods.diffusion.dmd2 import DMD2, fixed_steps_error

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext

#: DMD2's generator update ratio (--dfake_gen_update_ratio 5 of DMD2's ImageNet/SDXL runs), applied in its stage
DMD2_UPDATE_RATIO = 5


# --------------------------------------------------------------------------------------------------
# The losses (plain functions, tested by hand)
# --------------------------------------------------------------------------------------------------


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all but the batch dimension of (pred - target)^2: the code's ``model_losses``."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def offline_logits(err_theta: torch.Tensor, err_ref: torch.Tensor, reference_weight: float = 1.0) -> torch.Tensor:
    """PSO's offline logit per pair from per-sample errors laid out [targets; references] (2B): the reference
    model's error gap minus the student's, ``ref_diff - model_diff`` with diff = e(x^w) - lambda e(x^l)."""
    theta_w, theta_l = err_theta.chunk(2)
    ref_w, ref_l = err_ref.chunk(2)
    return (ref_w - reference_weight * ref_l) - (theta_w - reference_weight * theta_l)


def pairwise_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * logit), averaged."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * logits).mean()


def transition_log_ratio(x_next: torch.Tensor, mean_theta: torch.Tensor, mean_ref: torch.Tensor,
                         sigma: torch.Tensor) -> torch.Tensor:
    """log N(x'; mu_theta, sigma^2) - log N(x'; mu_ref, sigma^2) with the log-density averaged over elements
    (``distilled_step_with_logprob``): -mean((x' - mu_theta)^2 - (x' - mu_ref)^2) / (2 sigma^2), per sample."""
    d = (x_next.float() - mean_theta.float()).pow(2) - (x_next.float() - mean_ref.float()).pow(2)
    return -d.flatten(1).mean(dim=1) / (2.0 * sigma.float().reshape(-1) ** 2)


def preference_signs(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """The code's ``compare`` for scalar rewards: [B, 2] with (+1, -1) where sample 0 has the higher reward,
    (-1, +1) where sample 1 has, (0, 0) on a tie."""
    import torch

    out = torch.zeros(r0.shape[0], 2, dtype=torch.float32, device=r0.device)
    out[r0 > r1] = torch.tensor([1.0, -1.0], device=r0.device)
    out[r1 > r0] = torch.tensor([-1.0, 1.0], device=r0.device)
    return out


def online_pso_loss(log_ratio0: torch.Tensor, log_ratio1: torch.Tensor, signs: torch.Tensor, beta: float,
                    clip: float) -> torch.Tensor:
    """Online PSO: log r = log clamp(exp(log_ratio), 1 - clip, 1 + clip) for both trajectories of a pair, then
    mean of -log sigmoid(beta (h_0 log r_0 + h_1 log r_1)). ``log_ratio*`` are [B] or [B, K] (K transitions),
    ``signs`` [B, 2]."""
    import torch

    lr0 = torch.log(torch.clamp(torch.exp(log_ratio0), 1.0 - clip, 1.0 + clip))
    lr1 = torch.log(torch.clamp(torch.exp(log_ratio1), 1.0 - clip, 1.0 + clip))
    shape = (-1,) + (1,) * (lr0.dim() - 1)
    return pairwise_loss(signs[:, 0].reshape(shape) * lr0 + signs[:, 1].reshape(shape) * lr1, beta)


class _DMD2Turns:
    """The harness's context seen by the DMD2 stage, with DMD2's TTUR: the student is due every 5th stage step."""

    def __init__(self, ctx: StepContext, student_due: bool) -> None:
        self._ctx = ctx
        self._student_due = student_due

    def updating(self, key: str) -> bool:
        return self._student_due if key == "student" else self._ctx.updating(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class PSO(Method):
    """Miao et al. (ICLR 2025; arXiv 2410.03190, 2024): Pairwise Sample Optimization of a timestep-distilled
    student (here the cell's DMD2 student, trained first in the same cell), offline or online (module docstring)."""

    name = "pso"
    version = "1"
    domains = frozenset({"diffusion"})
    # DMD2's train_sd.py / train_edm.py AdamW weight decay 0.01 (its stage); the harness applies it cell-wide.
    optim_overrides: ClassVar[dict[str, Any]] = dict(DMD2.optim_overrides)
    # No harness ratio: DMD2's TTUR is applied in its stage only (the PSO stage updates the student every step).
    update_every: ClassVar[dict[str, int]] = {}

    class Params(Params):
        # DMD2's own default (one step; SDXL-DMD2, the paper's model, is its 4-step backward-simulation recipe)
        steps: int = Field(1, ge=1, le=100, description="sampler steps of the DMD2 student that PSO tunes (its "
                                                        "fixed times range(999, 0, -1000 // steps) / 1000)")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="DMD2 stage: CFG scale of the real score; "
                                                                          "None: the task's guidance")
        # No source pins the split (module docstring).
        pso_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of the cell's steps for the PSO stage "
                                                                     "(the rest distils the student with DMD2)")
        variant: Literal["offline", "online"] = Field("offline", description="offline: target images vs reference "
                                                                             "images of the student; online: "
                                                                             "reward-ranked pairs of student "
                                                                             "trajectories")
        target: Literal["data", "teacher"] = Field("data", description="offline targets: the batch's training "
                                                                       "images or the teacher's reference-sampler "
                                                                       "images")
        reference_source: Literal["current", "initial"] = Field("current", description="offline reference images: "
                                                                                       "sampled from the current "
                                                                                       "student or from the frozen "
                                                                                       "initial (DMD2) student")
        # offline: --beta_pso default 200 (train_pso_sdxl_turbo_dreambooth.py); online: train.beta = 50
        beta: float | None = Field(None, gt=0.0, description="beta of the pairwise loss; None: 200 offline, 50 "
                                                             "online (the official defaults)")
        # --neg_defactor (0.1 in the script's argparse, whose comment says "default 1.0"); 1 is the DPO form
        reference_weight: float = Field(1.0, ge=0.0, description="lambda: weight of the reference image's error in "
                                                                 "each model's error gap (offline)")
        # --prior_loss_weight (0.5 in the personalisation scripts' hinge variant); 0 is the DPO form
        reference_fit_weight: float = Field(0.0, ge=0.0, description="mu: weight of the student's denoising error on "
                                                                     "the reference images (offline)")
        # config_sdxl_dmd_dpo.py: train.eps = 0.1
        ratio_clip: float = Field(0.1, gt=0.0, lt=1.0, description="online: the ratio pi_theta / pi_ref is clipped "
                                                                   "to [1 - eps, 1 + eps]")
        reward_t: float = Field(0.5, gt=0.0, lt=1.0, description="online: time at which the teacher-denoising "
                                                                 "reward noises the sample")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.dmd2 = DMD2(DMD2.Params(steps=p.steps, guidance=p.guidance))
        self.times = self.dmd2.times
        self.beta = float(p.beta if p.beta is not None else (200.0 if p.variant == "offline" else 50.0))
        self.ref: nn.Module | None = None
        self._pending_ref: dict[str, torch.Tensor] | None = None
        self._last: dict[str, float] = {}
        self.stage_steps: list[int] = []

    # --- contract --------------------------------------------------------------------------------------
    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        if params.variant == "online" and params.steps < 2:
            return ("pso.variant=online needs a multi-step student (pso.steps >= 2, e.g. --set pso.steps=4): the last "
                    "step of the student's chain is deterministic, so a one-step student has no stochastic "
                    "transition whose likelihood online PSO could raise")
        return fixed_steps_error("pso", params.steps, task, task_params)

    def generations(self, total_steps: int) -> list[Generation]:
        if total_steps < 2:
            plan = [Generation(total_steps, fresh_student=False, name="dmd2")]
        else:
            pso = min(total_steps - 1, max(1, round(self.params.pso_fraction * total_steps)))
            plan = [Generation(total_steps - pso, fresh_student=False, name="dmd2"),
                    Generation(pso, fresh_student=False, name=f"pso ({self.params.variant})")]
        self.stage_steps = [g.steps for g in plan]
        return plan

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        return self.dmd2.init_student(teacher, student, ctx)

    def create_modules(self, ctx: StepContext) -> None:
        self.dmd2.create_modules(ctx)
        if self._pending_ref is not None:  # resumed inside the PSO stage: the frozen reference comes back
            self.ref = self._frozen_copy(ctx.student)
            self.ref.load_state_dict(self._pending_ref)
            self._pending_ref = None

    def extra_modules(self) -> dict[str, nn.Module]:
        return self.dmd2.extra_modules()

    def setup(self, ctx: StepContext) -> None:
        self.dmd2.setup(ctx)

    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        if index == 1:  # the distilled student at the end of the DMD2 stage is the frozen reference model
            self.ref = self._frozen_copy(ctx.student)

    @staticmethod
    def _frozen_copy(student: nn.Module) -> nn.Module:
        ref = copy.deepcopy(student).eval()
        ref.requires_grad_(False)
        return ref

    # --- steps -----------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.generation == 0:
            due = ctx.generation_step % DMD2_UPDATE_RATIO == 0
            losses = self.dmd2.training_step(batch, _DMD2Turns(ctx, due))
            self._last = {f"dmd2_{k}": v for k, v in self.dmd2._last.items()}
            return losses
        if self.params.variant == "offline":
            return {"student": self._offline_loss(batch, ctx)}
        return {"student": self._online_loss(batch, ctx)}

    def _t(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        import torch

        return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()

    def offline_pair(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(targets x^w, reference images x^l, condition): the targets are the batch's images (or the teacher's
        pairs), the references the student's own samples for the same conditions, drawn without gradient."""
        import torch

        p = self.params
        if p.target == "teacher":
            pairs = ctx.teacher_pairs(len(batch["index"]))
            target, cond = pairs["image"], pairs["cond"]
        else:
            target, cond = batch["x0"], batch["cond"]
        sampler = self.ref if p.reference_source == "initial" else ctx.student
        with torch.no_grad():
            reference = sampler.sample(torch.randn_like(target), cond).detach()
        return target, reference, cond

    def _offline_loss(self, batch: Batch, ctx: StepContext) -> torch.Tensor:
        import torch

        p = self.params
        student = ctx.student
        target, reference, cond = self.offline_pair(batch, ctx)
        b = target.shape[0]
        # one distilled time and one noise per pair, shared by its target and reference (the code's repeat(2))
        k = torch.randint(0, len(self.times), (b,))
        t = torch.tensor(self.times, dtype=target.dtype)[k].to(target.device).repeat(2)
        eps = torch.randn_like(target).repeat(2, 1, 1, 1)
        x0 = torch.cat([target, reference])
        cond2 = torch.cat([cond, cond])
        x_t = student.add_noise(x0, eps, t)
        goal = student.target(x0, eps, t)
        err_theta = per_sample_error(student.predict(x_t, t, cond2), goal)
        with torch.no_grad():
            err_ref = per_sample_error(self.ref.predict(x_t, t, cond2), goal)
        logits = offline_logits(err_theta, err_ref, p.reference_weight)
        loss = pairwise_loss(logits, self.beta)
        if p.reference_fit_weight > 0:
            loss = loss + p.reference_fit_weight * err_theta.chunk(2)[1].mean()
        e_w, e_l = err_theta.detach().chunk(2)
        self._last = {"loss_pso": float(loss.detach()), "implicit_acc": float((logits.detach() > 0).float().mean()),
                      "err_target": float(e_w.mean()), "err_reference": float(e_l.mean())}
        return loss

    def rollout(self, student: nn.Module, noise: torch.Tensor, cond: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The student's stochastic chain at its times, no gradient: the states x_{t_0..t_{K-1}} and the image."""
        import torch

        times = self.times
        with torch.no_grad():
            x = noise * float(student.schedule.alpha_sigma(torch.tensor([times[0]], dtype=torch.float64))[1])
            states = [x]
            for i in range(len(times) - 1):
                x0 = student.denoise(x, self._t(x, times[i]), cond)
                x = student.add_noise(x0, torch.randn_like(x0), self._t(x, times[i + 1]))
                states.append(x)
            image = student.denoise(x, self._t(x, times[-1]), cond)
        return states, image

    def teacher_reward(self, images: torch.Tensor, cond: Any, ctx: StepContext) -> torch.Tensor:
        """The stand-in reward: minus the guided teacher's denoising error of each image at ``reward_t``; the two
        halves [first samples; second samples] of a pair share one noise draw."""
        import torch

        w = self.dmd2.w
        half = images.shape[0] // 2
        eps = torch.randn_like(images[:half]).repeat(2, 1, 1, 1)
        t = self._t(images, self.params.reward_t)
        x_t = ctx.teacher.add_noise(images, eps, t)
        d = ctx.run_teacher(lambda g: g.denoise(x_t, t, cond, guidance=w),
                            n_examples=images.shape[0] * (2 if w != 1.0 else 1))
        return -per_sample_error(d, images)

    def _online_loss(self, batch: Batch, ctx: StepContext) -> torch.Tensor:
        import torch

        p = self.params
        student, times = ctx.student, self.times
        cond = batch["cond"]
        b = cond.shape[0]
        noise = torch.randn_like(batch["x0"])
        states0, img0 = self.rollout(student, noise, cond)
        states1, img1 = self.rollout(student, torch.randn_like(noise), cond)
        with torch.no_grad():
            r = self.teacher_reward(torch.cat([img0, img1]), torch.cat([cond, cond]), ctx)
            signs = preference_signs(*r.chunk(2))
        n = len(times) - 1  # stochastic transitions (the final x0 jump is deterministic)
        cur = torch.cat([torch.cat([states0[j], states1[j]]) for j in range(n)])  # [n * 2B], j-major
        nxt = torch.cat([torch.cat([states0[j + 1], states1[j + 1]]) for j in range(n)])
        t_cur = torch.cat([self._t(states0[j], times[j]).repeat(2) for j in range(n)])
        t_nxt = torch.cat([self._t(states0[j], times[j + 1]).repeat(2) for j in range(n)])
        cond_all = torch.cat([cond] * (2 * n))
        alpha_nxt, sigma_nxt = student.schedule.alpha_sigma(t_nxt)
        scale = alpha_nxt.reshape(-1, *([1] * (cur.dim() - 1)))
        mean_theta = scale * student.denoise(cur, t_cur, cond_all)
        with torch.no_grad():
            mean_ref = scale * self.ref.denoise(cur, t_cur, cond_all)
        lr = transition_log_ratio(nxt, mean_theta, mean_ref, sigma_nxt).reshape(n, 2, b)  # [n, traj, B]
        loss = online_pso_loss(lr[:, 0].T, lr[:, 1].T, signs, self.beta, p.ratio_clip)
        self._last = {"loss_pso": float(loss.detach()), "reward": float(r.mean()),
                      "ties": float((signs[:, 0] == 0).float().mean())}
        return loss

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    # --- resume and record -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.ref is None:
            return {}
        return {"ref": {k: v.detach().cpu().clone() for k, v in self.ref.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_ref = state.get("ref")

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"stages": ["dmd2", f"pso ({p.variant})"][:len(self.stage_steps)], "stage_steps": self.stage_steps,
                "budget_split": f"dmd2 {1 - p.pso_fraction:g}, pso {p.pso_fraction:g} of the cell's steps",
                "sampler": "consistency", "timesteps": list(self.times), "variant": p.variant, "beta": self.beta,
                "reference_model": "frozen copy of the DMD2 student at the start of the PSO stage",
                **({"target": p.target, "reference_source": p.reference_source,
                    "reference_weight": p.reference_weight, "reference_fit_weight": p.reference_fit_weight}
                   if p.variant == "offline" else
                   {"ratio_clip": p.ratio_clip, "reward": f"teacher denoising agreement at t={p.reward_t}"}),
                "dmd2": self.dmd2.record_info()}
