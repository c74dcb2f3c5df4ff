"""The generative domain's conventions in one place: noise schedules, parameterisations, conversions,
classifier-free guidance, samplers, and the `Generator` module that tasks train, evaluate and measure.

DESIGN.md ("the other domains"): the task owns the teacher's conventions in one adapter that every method
uses, so that no method re-derives schedule maths. That adapter is `Generator`: a denoiser network plus

* its **schedule** (`Schedule`): continuous time ``t`` in [0, 1], ``t = 1`` pure noise, forward noising
  ``x_t = alpha(t) x0 + sigma(t) eps``. Kinds: ``flow`` (rectified flow / flow matching, Liu et al. 2023,
  Lipman et al. 2023: alpha = 1 - t, sigma = t; SD3, SANA and SlimFlow use it), ``vp_cosine`` (the cosine
  schedule of Nichol & Dhariwal 2021 without offset, alpha = cos(pi t / 2), sigma = sin(pi t / 2), as
  progressive distillation uses it, Salimans & Ho 2022) and ``vp_discrete`` (DDPM's discrete
  ``alphas_cumprod`` from betas, e.g. Stable Diffusion 1.5's scaled-linear 0.00085..0.012 over 1000 steps,
  with log-alpha interpolated between integer steps);
* its **parameterisation** (``prediction``): ``epsilon``, ``v`` (v = alpha eps - sigma x0, Salimans & Ho
  2022), ``x0`` or ``flow`` (the probability-flow velocity dx_t/dt = alpha'(t) x0 + sigma'(t) eps, which is
  eps - x0 under the flow schedule). Every prediction is converted through the pair (x0, eps) it implies
  (`split`, `combine`), so a method asks for what it needs (`Generator.denoise`, `Generator.velocity`, ...);
* **classifier-free guidance** (Ho & Salimans 2022): D^w = D(null) + w (D(c) - D(null)) in the network's
  own parameterisation (every conversion is affine in the prediction at fixed x_t, so guiding x0, eps, v or
  the velocity is the same thing). The network owns its null condition (``net.null_condition(cond)``);
* its **sampler** (`Sampler`): ``ode`` (deterministic DDIM steps, x_s = alpha_s x0 + sigma_s eps; under
  the flow schedule exactly Euler on the velocity; the teachers' reference sampler and the samplers of
  progressive distillation and SlimFlow) or ``consistency`` (multistep consistency sampling, Song et al.
  2023 Alg. 1: predict x0, re-noise it to the next time with fresh noise; LCM, DMD2's multi-step student,
  SiD's few-step generator, sCM), at a number of steps, timesteps and guidance scale.

``Generator.forward(noise, cond)`` runs the whole sampler, so the efficiency probes (FLOPs, latency,
memory) measure *one image*: every step and every guidance pass is counted; ``Sampler.nfe`` is the number
of network evaluations per image (steps, twice where guidance needs the null pass).

The network contract (tasks build these): ``net(x, timestep, cond, guidance=None) -> tensor`` shaped like
``x``; ``timestep`` is `Schedule.model_time(t)` (diffusers' convention: 1000 t, or the discrete index);
``guidance`` is an optional per-sample scale for students that take it as an input (LCM's w-embedding,
SANA-Sprint's guidance embedding); ``net.null_condition(cond)`` is the unconditional input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from bench import BenchError

if TYPE_CHECKING:
    import torch

SCHEDULES = ("flow", "vp_cosine", "vp_discrete")
PREDICTIONS = ("epsilon", "v", "x0", "flow")
SAMPLERS = ("ode", "consistency")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` [B] (or scalar) shaped to broadcast against ``like`` [B, ...]."""
    import torch

    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if v.dim() == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Schedule:
    """A noise schedule in continuous time ``t`` in [0, 1] (``t = 1`` is pure noise); see the module docstring."""

    kind: Literal["flow", "vp_cosine", "vp_discrete"] = "flow"
    # vp_discrete only: DDPM betas (diffusers' DDPMScheduler fields; defaults are Stable Diffusion 1.5's).
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise BenchError(f"unknown noise schedule {self.kind!r}; valid: {', '.join(SCHEDULES)}")

    def _log_alpha_bar(self):
        import torch

        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        return torch.cumsum(torch.log1p(-betas), 0)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) with the shape and dtype of ``t``."""
        import torch

        if self.kind == "flow":
            return 1.0 - t, t
        if self.kind == "vp_cosine":
            return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
        lab = self._log_alpha_bar().to(t.device)
        pos = (t.double() * (self.num_train_timesteps - 1)).clamp(0, self.num_train_timesteps - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = pos - lo.double()
        log_ab = lab[lo] * (1 - frac) + lab[hi] * frac
        alpha = torch.exp(0.5 * log_ab)
        return alpha.to(t.dtype), torch.sqrt(-torch.expm1(log_ab)).to(t.dtype)

    def derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha'(t), sigma'(t)): the probability-flow velocity is alpha' x0 + sigma' eps."""
        import torch

        if self.kind == "flow":
            return -torch.ones_like(t), torch.ones_like(t)
        if self.kind == "vp_cosine":
            return -0.5 * math.pi * torch.sin(0.5 * math.pi * t), 0.5 * math.pi * torch.cos(0.5 * math.pi * t)
        h = 1.0 / (self.num_train_timesteps - 1)
        a1, s1 = self.alpha_sigma((t + h).clamp(max=1.0))
        a0, s0 = self.alpha_sigma((t - h).clamp(min=0.0))
        width = ((t + h).clamp(max=1.0) - (t - h).clamp(min=0.0))
        return (a1 - a0) / width, (s1 - s0) / width

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given as its timestep: 1000 t (diffusers' flow-matching and our continuous
        nets), or the fractional DDPM step index t (T - 1) for discrete-schedule networks."""
        if self.kind == "vp_discrete":
            return t * (self.num_train_timesteps - 1)
        return t * 1000.0

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, x0) * eps

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return (a / s) ** 2

    def t_max(self) -> float:
        """The largest time a sampler starts from: 1, except where alpha(1) = 0 makes an epsilon-prediction
        unusable (the sampler then starts just below, at the last discrete step or 1 - 1e-3)."""
        return 1.0 if self.kind != "vp_cosine" else 1.0 - 1e-3

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "vp_discrete":
            out.update(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                       beta_end=self.beta_end, beta_schedule=self.beta_schedule)
        return out


def _vp_only(schedule: Schedule) -> None:
    if schedule.kind == "flow":
        raise BenchError("v-prediction (Salimans & Ho 2022) is defined for variance-preserving schedules "
                         "(alpha^2 + sigma^2 = 1); under the flow schedule use the 'flow' prediction")


def split(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str,
          schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x0, eps) pair a prediction in ``prediction``'s parameterisation implies at (x_t, t)."""
    a, s = (_bcast(v, x_t) for v in schedule.alpha_sigma(t))
    if prediction == "epsilon":
        return (x_t - s * pred) / a, pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    if prediction == "v":  # v = a eps - s x0 with a^2 + s^2 = 1 (VP schedules)
        _vp_only(schedule)
        return a * x_t - s * pred, s * x_t + a * pred
    if prediction == "flow":  # u = a' x0 + s' eps and x_t = a x0 + s eps: solve the 2 x 2 system
        da, ds = (_bcast(v, x_t) for v in schedule.derivatives(t))
        det = a * ds - s * da
        x0 = (ds * x_t - s * pred) / det
        return x0, (a * pred - da * x_t) / det
    raise BenchError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def combine(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction: str,
            schedule: Schedule) -> torch.Tensor:
    """The prediction in ``prediction``'s parameterisation of the pair (x0, eps) at time t (inverse of `split`)."""
    a, s = (_bcast(v, x0) for v in schedule.alpha_sigma(t))
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        _vp_only(schedule)
        return a * eps - s * x0
    if prediction == "flow":
        da, ds = (_bcast(v, x0) for v in schedule.derivatives(t))
        return da * x0 + ds * eps
    raise BenchError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def guide(cond_pred: torch.Tensor, null_pred: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, D(null) + w (D(c) - D(null)) (Ho & Salimans 2022; w = 1 is the conditional)."""
    if not isinstance(scale, (int, float)):
        scale = _bcast(scale, cond_pred)
    return null_pred + scale * (cond_pred - null_pred)


@dataclass(frozen=True)
class Sampler:
    """How a generator turns noise into an image: ``steps`` network calls at ``timesteps`` (descending times
    in (0, 1]; uniform ``t_max (1 - i / steps)`` when not given), deterministic ``ode`` steps or ``consistency``
    jumps with fresh re-noising, at guidance scale ``guidance`` (1: conditional only)."""

    kind: Literal["ode", "consistency"] = "ode"
    steps: int = 1
    timesteps: tuple[float, ...] | None = None
    guidance: float = 1.0
    #: For students that take the guidance scale as an input (``net(..., guidance=w)``): the scale given to
    #: the network at sampling; ``guidance`` then stays 1 (no null pass).
    guidance_input: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise BenchError(f"unknown sampler {self.kind!r}; valid: {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise BenchError(f"a sampler needs at least 1 step; got {self.steps}")
        if self.timesteps is not None:
            ts = tuple(float(v) for v in self.timesteps)
            if len(ts) != self.steps or any(not 0 < v <= 1 for v in ts) or list(ts) != sorted(ts, reverse=True):
                raise BenchError(f"sampler timesteps {ts} must be {self.steps} descending times in (0, 1]")

    @property
    def nfe(self) -> int:
        """Network evaluations per image (a guided step costs two: conditional and null)."""
        return self.steps * (2 if self.guidance != 1.0 else 1)

    def grid(self, t_max: float = 1.0) -> list[float]:
        """The times the network is called at, then 0 (the data end)."""
        if self.timesteps is not None:
            return [*self.timesteps, 0.0]
        return [t_max * (1 - i / self.steps) for i in range(self.steps)] + [0.0]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "nfe": self.nfe, "guidance": self.guidance,
                "guidance_input": self.guidance_input, "timesteps": list(self.timesteps) if self.timesteps else None}


def _torch_module():
    from torch import nn

    return nn.Module


class Generator(_torch_module()):  # type: ignore[misc]
    """A denoiser network with its schedule, parameterisation and sampler (see the module docstring).

    ``steps_options``: the step counts this generator can be sampled at (None: any; a student trained for
    fixed timesteps, e.g. DMD2's 4-step {999, 749, 499, 249}, allows only its own); ``timestep_table``
    gives explicit timesteps per step count where the uniform grid is not the method's (SANA-Sprint's
    2-step 1.5708 -> 1.3 TrigFlow angles, converted to this schedule's time).
    """

    def __init__(self, net: Any, *, schedule: Schedule, prediction: str, sampler: Sampler,
                 steps_options: tuple[int, ...] | None = None,
                 timestep_table: dict[int, tuple[float, ...]] | None = None, description: str = "") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise BenchError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.sampler = sampler
        self.steps_options = tuple(steps_options) if steps_options is not None else None
        self.timestep_table = dict(timestep_table or {})
        self.description = description

    # --- conventions ---------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float | torch.Tensor = 1.0,
                guidance_input: torch.Tensor | float | None = None) -> torch.Tensor:
        """The network's raw prediction at (x_t, t), guided at scale ``guidance`` (one batched call for the
        conditional and null halves). ``t`` is [B] or a scalar in [0, 1]."""
        import torch

        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        mt = self.schedule.model_time(t)
        gin = None
        if guidance_input is not None:
            gin = torch.as_tensor(guidance_input, dtype=x_t.dtype, device=x_t.device)
            gin = gin.expand(x_t.shape[0]) if gin.dim() == 0 else gin
        plain = isinstance(guidance, (int, float)) and guidance == 1.0
        if plain:
            return self._call(x_t, mt, cond, gin)
        null = self.net.null_condition(cond)
        both = self._call(torch.cat([x_t, x_t]), torch.cat([mt, mt]), _cat(cond, null),
                          None if gin is None else torch.cat([gin, gin]))
        c, u = both.chunk(2)
        return guide(c, u, guidance)

    def _call(self, x, mt, cond, gin):
        if gin is None:
            return self.net(x, mt, cond)
        return self.net(x, mt, cond, guidance=gin)

    def x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float | torch.Tensor = 1.0,
               guidance_input: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_time(t, x_t)
        return split(self.predict(x_t, t, cond, guidance, guidance_input), x_t, t, self.prediction, self.schedule)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float | torch.Tensor = 1.0,
                guidance_input: Any = None) -> torch.Tensor:
        """The x0 prediction D(x_t, t, c) (guided at ``guidance``)."""
        return self.x0_eps(x_t, t, cond, guidance, guidance_input)[0]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float | torch.Tensor = 1.0,
                 guidance_input: Any = None) -> torch.Tensor:
        """The probability-flow ODE velocity dx_t/dt = alpha'(t) x0 + sigma'(t) eps."""
        t = _as_time(t, x_t)
        x0, eps = self.x0_eps(x_t, t, cond, guidance, guidance_input)
        return combine(x0, eps, t, "flow", self.schedule) if self.schedule.kind != "flow" else eps - x0

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(x0, eps, _as_time(t, x0))

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the network's own parameterisation for the pair (x0, eps) at t."""
        return combine(x0, eps, _as_time(t, x0), self.prediction, self.schedule)

    def ddim_step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Any,
                  guidance: float | torch.Tensor = 1.0, guidance_input: Any = None) -> torch.Tensor:
        """One deterministic DDIM step from time t to time s < t: x_s = alpha_s x0 + sigma_s eps."""
        x0, eps = self.x0_eps(x_t, t, cond, guidance, guidance_input)
        return self.schedule.add_noise(x0, eps, _as_time(s, x_t))

    # --- sampling ------------------------------------------------------------------------------------
    def supports_steps(self, steps: int) -> bool:
        return steps >= 1 and (self.steps_options is None or steps in self.steps_options)

    def sampler_at(self, steps: int) -> Sampler:
        """This generator's sampler at ``steps`` steps (its kind and guidance; the method's timesteps)."""
        if not self.supports_steps(steps):
            raise BenchError(f"this generator samples at {self._steps_text()} step(s), not {steps}")
        table = self.timestep_table.get(steps)
        return replace(self.sampler, steps=steps, timesteps=tuple(table) if table else
                       (self.sampler.timesteps if steps == self.sampler.steps else None))

    def _steps_text(self) -> str:
        return "any number of" if self.steps_options is None else "/".join(map(str, self.steps_options))

    def sample(self, noise: torch.Tensor, cond: Any, sampler: Sampler | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images x0 from ``noise`` (x at t = t_max) under ``sampler`` (default: the generator's own)."""
        import torch

        sp = sampler or self.sampler
        grid = sp.grid(self.schedule.t_max())
        # x at the first time: sigma(t_0) eps (the signal term alpha(t_0) x0 is 0 at t = 1 and negligible at t_max)
        x = noise * float(self.schedule.alpha_sigma(torch.tensor([grid[0]], dtype=torch.float64))[1])
        gin = sp.guidance_input
        for i, t in enumerate(grid[:-1]):
            s = grid[i + 1]
            tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            x0, eps = self.x0_eps(x, tt, cond, sp.guidance, gin)
            if s == 0.0:
                x = x0
            elif sp.kind == "ode":
                x = self.schedule.add_noise(x0, eps, torch.full_like(tt, s))
            else:  # consistency: jump to x0, re-noise with fresh noise to the next time
                fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                    device="cpu" if generator is None else generator.device).to(x.device)
                x = self.schedule.add_noise(x0, fresh, torch.full_like(tt, s))
        return x

    def forward(self, noise: torch.Tensor, cond: Any) -> torch.Tensor:
        """One image per noise: the whole sampler (what the efficiency probes time and count)."""
        return self.sample(noise, cond)

    def describe(self) -> dict[str, Any]:
        return {"schedule": self.schedule.describe(), "prediction": self.prediction,
                "sampler": self.sampler.describe(), "steps_options": list(self.steps_options) if self.steps_options
                else None, "description": self.description}


def _as_time(t: Any, like: torch.Tensor) -> torch.Tensor:
    import torch

    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


def _cat(a: Any, b: Any) -> Any:
    import torch

    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])
