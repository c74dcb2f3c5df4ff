"""TwinFlow — Realizing One-step Generation on Large Models with Self-adversarial Flows (Cheng, Sun, Li, Lin;
arXiv 2512.05150, 2025; ICLR 2026 poster).

Official code read: inclusionAI/TwinFlow @ a109a71b19634d9c5d5c45c3587d36b19f014917 — ``tutorials/mnist/
methodes.py`` (``RCGM`` and ``TwinFlow``: every loss implemented here), ``tutorials/mnist/main.py`` (defaults:
``--estimate_order 2 --ema_decay_rate 0.99 --enhanced_ratio 0.5``, Adam lr 2e-4, batch 128, the sampler call),
``tutorials/mnist/networks.py`` (a network of (x, t, tt, c) with separate t and tt embeddings), and for
comparison ``src/methodes/twinflow/twinflow.py``, ``src/networks/stable_diffusion_3/{modeling,transformer}_sd_3.py``
and ``src/configs/*/*.yaml`` (the large-model recipe; see "Not implemented").

What is implemented (the tutorial's ``TwinFlow.training_step`` with ``--using_twinflow``). Linear flow
x_t = t z + (1 - t) x, velocity z - x; one network F(x_t, t, tt, c) over **signed** time t in [-1, 1]: t > 0
is the real flow (noise -> data), t < 0 a "fake" flow (noise -> the model's own one-step samples), both with
x_hat = x_t - |t| F, z_hat = x_t + (1 - |t|) F (the code's ``forward``: ``t = torch.abs(t)`` after the call).
tt is the target time of the any-step (RCGM) model. Per step, batch (x, c), null condition e:

* t ~ U(0, 1), tt = t - U(0, 1) t, z ~ N(0, I); x_t = t z + (1 - t) x; target v = z - x.
* F_th = F(x_t, t, tt, c) (gradient). The EMA copy is updated *before* the targets are built (as the code):
  ema <- d ema + (1 - d) theta with the code's warm-up d_0 = 0 (the first update copies the student),
  d_{k+1} = d_k + (1 - d_k)(0.99 - d_k) / 2 (``ema_decay`` 0.99; 0: the student itself; 1: frozen copy).
* CFG-enhanced target (``enhanced_ratio`` r = 0.5): v <- v + r (F_ema(x_t, t, t, c) - F_ema(x_t, t, t, e)).
* RCGM target (``get_rcgm_target``, order N = ``estimate_order`` = 2, dt = 0.01): t_m = max(t - 0.01, tt),
  x' = x_t - 0.01 v, I = sum_i F_ema(x_i, t_i, t_{i+1}) (t_i - t_{i+1}) over N Euler steps of the EMA from
  t_m to tt (t_i = t_m (1 - i/N) + tt i/N, x_{i+1} = x_i - (t_i - t_{i+1}) F); residual
  R = 100 (t - tt) F_th - 100 I - v where t >= tt + 0.01, else R = F_th - v (there t_m = tt and I = 0: the
  code's 1 / (t - tt) multiplies 0); target sg(F_th - clamp(R, -1, 1)).
* L_base = l2(F_th, rcgm target) — the any-step consistency base loss.
* L_fm = l2(F(x_t, t, t, c), v) — flow matching at +t (v: the CFG-enhanced target, as the code).
* One-step sample: F_fake = F(z, 1, 0, c), x_fake = z - F_fake (gradient through F_fake).
* L_adv = l2(F(x_t', -t, -t, c), z - sg(x_fake)), x_t' = t z + (1 - t) sg(x_fake) — fake-velocity flow
  matching at -t on the re-noised detached one-step samples (the same z and t).
* L_rect = l2(F_fake, sg(F_fake - dv)), dv = F(x_s, -s, -s, c) - F(x_s, s, s, c) at x_s = s z' + (1 - s)
  sg(x_fake), fresh s ~ U(0, 1), z' ~ N(0, I), no gradient (``dist_match``): its gradient in F_fake is
  2 dv / numel — the one-step velocity moves along the real-minus-fake velocity difference.
* L_cons = l2(F_fake, RCGM target at (z, t = 1, tt = 0) with the same v) — the consistency term 1 -> 0.
* loss = L_base + L_fm + L_adv + L_rect + L_cons (weights 1, the tutorial's plain sum; each weight is a
  parameter). ``twinflow=False`` keeps only L_base (the tutorial without ``--using_twinflow``: RCGM).
  l2 is the code's per-sample mean of squares, then the batch mean.

**Networks and negative time.** The task's `CondUNet` embeds the timestep it is given (`Schedule.model_time`:
1000 t under the flow schedule, linear, so a negative t becomes a negative model time) with diffusers'
sinusoidal ``Timesteps`` (sin / cos of t * freq): a negative value is valid and distinct from its positive
twin (the sine half flips sign), so the real and fake flows are told apart without any change to the
shared network; the large-model code does the same (``timestep = t * 1000`` with signed t). tt enters
through the network's optional scalar embedding (``CondUNet(guidance_embed=True)``: an MLP on sinusoidal(1000 tt)
added to the condition vector), the tutorial network's ``target_time_embedding`` / SD3.5's and Qwen-Image's
``aux_time_embed`` in this network's terms; its last layer is zeroed and its first drawn from N(0, 0.02)
(``init_time_embed_2_weights``), so the student starts exactly as the teacher. ``target_time_embed=False``
gives the network no tt (the code's LoRA recipes, ``aux_time_embed: false``); tt then only shapes targets.

**Initialisation, teacher and budget.** TwinFlow has no teacher network in its loss: the model distils
itself. For a pretrained model (the paper's Qwen-Image / SD3.5 runs, ``model_path`` of the configs) it is
fine-tuned from the pretrained weights, so the student here starts from the task's teacher weights (the
tutorial's MNIST run starts from scratch). The teacher is used only for that copy: the cell reports 0
teacher passes. The ``teacher`` row of a table is the base model at its many-step reference sampler (Euler,
``teacher_sampler_steps`` steps, CFG at the task's guidance). The shared budget is the cell's number of
optimiser steps at the task's batch size, learning rate and schedule, like every row; one TwinFlow step
costs 12 network evaluations of the student's size on the batch (4 with gradients: F_th, F_pred, F_fake,
the fake-flow F; 8 without: 2 for the CFG target, N = 2 per RCGM target x 2, 2 for dv), which the record's
wall time shows.

**Sampler.** The UCGM sampler of the tutorial (``sampling_loop`` defaults: ``sampling_style`` few, i.e. tt = 0,
``stochast_ratio`` 0, uniform times 1, 1 - 1/n, ..., 1/n, then 0) is the harness's deterministic ``ode``
sampler on the flow schedule (x_next = (1 - s) x_hat + s z_hat); ``stochastic=True`` re-noises with fresh
noise (``stochast_ratio`` 1, the SD3.5 few-step config): the ``consistency`` sampler. The model is any-step:
it samples at ``sample_steps`` (the tutorial's 1) and is evaluated at every count of the task's ``nfe``.

Deviations:

* Pixel space on the task's small conditional UNet instead of MNIST's UNet (tutorial) or SD3.5 / Qwen-Image
  latents; the student starts from the task's flow-matching teacher (the paper's fine-tuning setting).
* The "unconditional" branch of the CFG-enhanced target is the task's null condition (as the large-model
  code's empty prompt); the MNIST tutorial, whose network has no null class, uses the batch's labels shuffled.
* tt enters through the task network's added scalar embedding without the SD3.5 wrapper's (t - tt) gate
  (``temb + temb_2(tt) (t - tt)``); the zeroed last layer gives the same start (the teacher exactly).
* Optimiser, learning rate, schedule, batch, grad clipping and step budget are the harness's, the same for
  every method of the cell (the tutorial: Adam lr 2e-4 unclipped, batch 128, 20 epochs; Adam's betas and
  no weight decay agree with the task's); the tutorial's ``nan_to_num`` on gradients is not applied (the
  harness stops on a non-finite loss instead).
* The code restores the CUDA RNG state before each target forward so that dropout matches; the task's
  networks have no dropout or other randomness in their forward, so nothing is restored.
* Not implemented (large-model recipe of ``src/methodes/twinflow/twinflow.py``, not the tutorial's): the
  batch split into e2e / mul / any / adv quarters, Beta time sampling and the tan weighting, the
  Barron-reweighted loss, the dv clamp to [-1, 1] and its 0.5 weight (``dist_match_cof``), the image-free
  mode and LoRA. The full tier is refused (its pipeline UNet builds no tt embedding and may not be a flow).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from bench import BenchError
from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task
    from bench.diffusion import Generator

#: RCGM's temporal perturbation and residual clamp (``get_rcgm_target``: ``t - 0.01``, ``clamp(-1, 1)``)
RCGM_DT = 0.01
RCGM_CLAMP = 1.0

Velocity = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


# --------------------------------------------------------------------------------------------------
# The pieces of the loss (plain functions of tensors and velocity callables)
# --------------------------------------------------------------------------------------------------


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The code's ``l2_loss``, batch-averaged: per-sample mean of squared differences, then the mean."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1).mean()


def signed_split(x_t: torch.Tensor, t: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, z_hat) of velocity f at signed time t: the interpolation uses |t| (the code's ``forward``)."""
    a = _b(t.abs(), x_t)
    return x_t - a * f, x_t + (1 - a) * f


def ema_decay_after(decay: float, target: float) -> float:
    """The code's EMA warm-up: d <- d + (1 - d)(target - d) / 2 after each update (d starts at 0)."""
    return decay + (1 - decay) * (target - decay) * 0.5


def enhance_target(target: torch.Tensor, ratio: float, pred_cond: torch.Tensor,
                   pred_uncond: torch.Tensor) -> torch.Tensor:
    """Training-time CFG (``enhance_target``): v + r (F(c) - F(null))."""
    return target + ratio * (pred_cond - pred_uncond)


def multi_fwd(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, n: int) -> torch.Tensor:
    """N Euler steps of ``velocity`` from t to tt; returns the integral sum F_i (t_i - t_{i+1}) (``multi_fwd``).
    Each call gets its own step's end as the target time."""
    pred = 0
    ts = [t * (1 - i / n) + tt * (i / n) for i in range(n + 1)]
    for t_c, t_n in zip(ts[:-1], ts[1:]):
        f = velocity(x, t_c, t_n)
        x = x - _b(t_c - t_n, x) * f
        pred = pred + f * _b(t_c - t_n, f)
    return pred


def rcgm_target(velocity: Velocity, f_th: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor, tt: torch.Tensor, order: int) -> torch.Tensor:
    """RCGM's order-N consistency target (``get_rcgm_target``); see the module docstring."""
    import torch

    with torch.no_grad():
        t_m = torch.maximum(t - RCGM_DT, tt)
        integral = multi_fwd(velocity, x_t - target * RCGM_DT, t_m, tt, order)
        far = _b(t >= tt + RCGM_DT, f_th)
        gap = _b(t - tt, f_th)
        resid = torch.where(far, f_th * gap / RCGM_DT - integral / RCGM_DT - target, f_th - target)
        return f_th.detach() - resid.clamp(-RCGM_CLAMP, RCGM_CLAMP)


def rectify_target(f_fake: torch.Tensor, fake_v: torch.Tensor, real_v: torch.Tensor) -> torch.Tensor:
    """The rectification target sg(F_fake - dv), dv = v(x_s, -s) - v(x_s, s)."""
    return (f_fake - (fake_v - real_v)).detach()


# --------------------------------------------------------------------------------------------------
# The network over signed time
# --------------------------------------------------------------------------------------------------


class TwinNet:
    """F(x, t, tt, c) of one network (the student's or the EMA's) at signed time t: the task network is given
    ``schedule.model_time(t)`` (1000 t, sign kept) and, when it has the tt embedding, ``guidance=tt``."""

    def __init__(self, net: nn.Module, schedule: Any, tt_input: bool) -> None:
        self.net, self.schedule, self.tt_input = net, schedule, tt_input

    def __call__(self, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: Any) -> torch.Tensor:
        mt = self.schedule.model_time(t)
        if self.tt_input:
            return self.net(x, mt, cond, guidance=tt.to(x.dtype))
        return self.net(x, mt, cond)

    def bound(self, cond: Any) -> Velocity:
        return lambda x, t, tt: self(x, t, tt, cond)


def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay target + (1 - decay) source, by parameter name (the code's ``update_ema``)."""
    import torch

    src = dict(source.named_parameters())
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name in src:
                p.mul_(decay).add_(src[name].detach(), alpha=1 - decay)


def _cat(a: Any, b: Any) -> Any:
    import torch

    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


class TwinFlow(Method):
    """Cheng et al. (arXiv 2025): TwinFlow — one any-step network over t in [-1, 1], real flow at +t and a
    self-adversarial fake flow at -t, on RCGM's consistency base loss (see the module docstring)."""

    name = "twinflow"
    version = "1"
    domains = frozenset({"diffusion"})
    teacher_init_only = True  # the teacher only initialises the student (see the module docstring)

    class Params(Params):
        # tutorials/mnist/main.py: --estimate_order 2, --ema_decay_rate 0.99, --enhanced_ratio 0.5
        estimate_order: int = Field(2, ge=1, le=8, description="N of RCGM's N-th order target: Euler steps of "
                                                               "the EMA from t - 0.01 to tt (--estimate_order)")
        ema_decay: float = Field(0.99, ge=0.0, le=1.0, description="EMA decay the target network warms up to "
                                                                   "(--ema_decay_rate; 0: the student itself, "
                                                                   "1: a frozen copy)")
        enhanced_ratio: float = Field(0.5, ge=0.0, le=10.0, description="training-time CFG ratio r of the "
                                                                        "target v + r (F(c) - F(null)) "
                                                                        "(--enhanced_ratio; 0: none)")
        # --using_twinflow (the tutorial's TwinFlow run; without it the tutorial trains RCGM only)
        twinflow: bool = Field(True, description="add the TwinFlow terms (flow matching at +t, fake flow at -t, "
                                                 "rectification, consistency 1 -> 0); False: RCGM's base loss "
                                                 "only")
        # the tutorial sums the five terms with weight 1 (the large-model code weights rectification 0.5)
        base_weight: float = Field(1.0, ge=0.0, description="weight of RCGM's any-step base loss")
        fm_weight: float = Field(1.0, ge=0.0, description="weight of flow matching at +t")
        adv_weight: float = Field(1.0, ge=0.0, description="weight of fake-velocity flow matching at -t")
        rectify_weight: float = Field(1.0, ge=0.0, description="weight of the rectification term")
        consistency_weight: float = Field(1.0, ge=0.0, description="weight of the consistency term 1 -> 0")
        # tutorial networks.py: a separate target_time_embedding; SD3.5 / Qwen-Image full: aux_time_embed true
        target_time_embed: bool = Field(True, description="give the network the target time tt (the task "
                                                          "network's scalar embedding, zero-initialised "
                                                          "output); False: t only (aux_time_embed false)")
        # sampling_loop(sampling_steps=1, stochast_ratio=0.0) as tutorials/mnist/main.py calls it
        sample_steps: int = Field(1, ge=1, le=100, description="the student's own sampling steps (tt = 0 at "
                                                               "each; also evaluated at every task nfe)")
        stochastic: bool = Field(False, description="re-noise with fresh noise between steps (stochast_ratio "
                                                    "1, the SD3.5 few-step config); False: deterministic "
                                                    "(stochast_ratio 0, the tutorial)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.ema: nn.Module | None = None
        self._pending: dict[str, Any] | None = None
        self.decay = 0.0  # the code's cmd: the EMA decay of the next update (warm-up from 0)
        self.ema_updates = 0
        self._last: dict[str, float] = {}

    def unsupported(self, task: Task) -> str | None:
        if not hasattr(task, "_build"):
            return "TwinFlow needs a generative task that builds its student network (with a tt embedding)"
        if getattr(task, "tier", None) == "full":
            return ("TwinFlow is implemented for the linear-flow pixel UNets of the smoke and small tiers; the full "
                    "tier's pipeline UNet builds no target-time embedding and need not be a flow model")
        return None

    # --- models ----------------------------------------------------------------------------------------
    def init_student(self, teacher: Generator, student: Generator, ctx: StepContext) -> Generator:
        import torch

        from bench.diffusion import Generator, Sampler

        p = self.params
        if teacher.schedule.kind != "flow" or teacher.prediction != "flow":
            raise BenchError(f"TwinFlow needs a linear-flow teacher predicting velocity; this one has schedule "
                             f"{teacher.schedule.kind!r} and prediction {teacher.prediction!r}")
        built = ctx.task._build("student", ctx.seed, guidance_embed=True) if p.target_time_embed else student
        net = built.net
        res = net.load_state_dict(teacher.net.state_dict(), strict=False)
        if res.unexpected_keys or any(not k.startswith("guidance_proj.") for k in res.missing_keys):
            raise BenchError(f"TwinFlow: the student network does not match the teacher's (missing "
                             f"{res.missing_keys}, unexpected {res.unexpected_keys})")
        if p.target_time_embed:
            gp = net.guidance_proj
            with torch.no_grad():  # init_time_embed_2_weights: N(0, 0.02), zero bias; last layer 0: the teacher
                torch.nn.init.normal_(gp[0].weight, std=0.02)
                torch.nn.init.zeros_(gp[0].bias)
                torch.nn.init.zeros_(gp[-1].weight)
                torch.nn.init.zeros_(gp[-1].bias)
        kind = "consistency" if p.stochastic else "ode"
        return Generator(net, schedule=teacher.schedule, prediction="flow",
                         sampler=Sampler(kind, steps=p.sample_steps, guidance=1.0,
                                         guidance_input=0.0 if p.target_time_embed else None),
                         description=f"TwinFlow any-step student: UCGM few-step sampler (tt = 0, "
                                     f"{'stochastic' if p.stochastic else 'deterministic'}) at {p.sample_steps} "
                                     f"step(s), no CFG")

    def create_modules(self, ctx: StepContext) -> None:
        p = self.params
        net = ctx.student.net
        if p.ema_decay == 0.0:
            self.ema = None  # the code's ``self.mod = model``: targets from the student itself (no gradient)
            return
        ema = copy.deepcopy(net)
        if self._pending is not None:  # resume: the saved EMA weights
            ema.load_state_dict(self._pending)
            self._pending = None
        ema.train()  # the code keeps the EMA in train mode
        for q in ema.parameters():
            q.requires_grad_(False)
        self.ema = ema

    def _target_net(self, ctx: StepContext) -> nn.Module:
        return ctx.student.net if self.ema is None else self.ema

    def _update_ema(self, ctx: StepContext) -> None:
        p = self.params
        if self.ema is None or p.ema_decay == 1.0:
            return
        ema_update(self.ema, ctx.student.net, self.decay)
        self.decay = ema_decay_after(self.decay, p.ema_decay)
        self.ema_updates += 1

    # --- the step --------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        g = ctx.student
        x, c = batch["x0"], batch["cond"]
        b = x.shape[0]
        model = TwinNet(g.net, g.schedule, p.target_time_embed)
        # prepare_inputs: t ~ U(0, 1), tt ~ U(0, t), x_t = t z + (1 - t) x, v = z - x
        t = torch.rand(b, device=x.device, dtype=x.dtype)
        tt = t - torch.rand_like(t) * t
        z = torch.randn_like(x)
        x_t = _b(t, x) * z + (1 - _b(t, x)) * x
        target = z - x
        f_th = model(x_t, t, tt, c)
        self._update_ema(ctx)  # before the targets, as the code
        ema = TwinNet(self._target_net(ctx), g.schedule, p.target_time_embed)
        with torch.no_grad():
            if p.enhanced_ratio > 0:  # get_refer_predc at (x_t, t, tt = t), conditional and null in one call
                null = g.net.null_condition(c)
                both = ema(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), _cat(c, null))
                pred_c, pred_u = both.chunk(2)
                target = enhance_target(target, p.enhanced_ratio, pred_c, pred_u)
        loss_base = l2(f_th, rcgm_target(ema.bound(c), f_th, target, x_t, t, tt, p.estimate_order))
        parts = {"base": loss_base}
        if p.twinflow:
            ones, zeros = torch.ones_like(t), torch.zeros_like(t)
            parts["fm"] = l2(model(x_t, t, t, c), target)
            f_fake = model(z, ones, zeros, c)  # one step z -> x_fake (t = 1, tt = 0)
            x_fake = signed_split(z, ones, f_fake)[0].detach()
            x_t_fake = _b(t, x) * z + (1 - _b(t, x)) * x_fake
            parts["adv"] = l2(model(x_t_fake, -t, -t, c), z - x_fake)
            with torch.no_grad():  # dist_match: a fresh s and noise on the detached one-step sample
                s = torch.rand_like(t)
                x_s = _b(s, x) * torch.randn_like(x) + (1 - _b(s, x)) * x_fake
                fake_v, real_v = model(torch.cat([x_s, x_s]), torch.cat([-s, s]), torch.cat([-s, s]),
                                       _cat(c, c)).chunk(2)
            parts["rectify"] = l2(f_fake, rectify_target(f_fake, fake_v, real_v))
            parts["consistency"] = l2(f_fake, rcgm_target(ema.bound(c), f_fake, target, z, ones, zeros,
                                                          p.estimate_order))
        weights = {"base": p.base_weight, "fm": p.fm_weight, "adv": p.adv_weight, "rectify": p.rectify_weight,
                   "consistency": p.consistency_weight}
        loss = sum(weights[k] * v for k, v in parts.items())
        self._last = {f"loss_{k}": float(v.detach()) for k, v in parts.items()}
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return {**self._last, "ema_decay": self.decay}

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ema = None if self.ema is None else {k: v.detach().clone() for k, v in self.ema.state_dict().items()}
        return {"ema": ema, "decay": self.decay, "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state.get("ema")
        self.decay = float(state.get("decay", 0.0))
        self.ema_updates = int(state.get("ema_updates", 0))

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"sampler": f"UCGM few-step (tt = 0), {'stochastic' if p.stochastic else 'deterministic'}, "
                           f"{p.sample_steps} step(s); any step count at evaluation",
                "init": "the task's teacher weights (no teacher in the loss; 0 teacher passes)",
                "terms": ["base", *(("fm", "adv", "rectify", "consistency") if p.twinflow else ())],
                "estimate_order": p.estimate_order, "ema_decay": p.ema_decay, "ema_decay_now": self.decay,
                "ema_updates": self.ema_updates, "enhanced_ratio": p.enhanced_ratio,
                "target_time_embed": p.target_time_embed}
