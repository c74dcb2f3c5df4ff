"""The generative adapter (`bench.diffusion`): schedules, conversions between parameterisations, guidance,
and the samplers, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from bench import BenchError
from bench.diffusion import Generator, Sampler, Schedule, combine, guide, split

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flow_schedule_and_noising_by_hand():
    s = Schedule("flow")
    a, sg = s.alpha_sigma(torch.tensor([0.0, 0.25, 1.0]))
    assert a.tolist() == [1.0, 0.75, 0.0] and sg.tolist() == [0.0, 0.25, 1.0]
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    # x_t = (1 - t) x0 + t eps at t = 0.25: 0.75 * 2 - 0.25 = 1.25
    assert s.add_noise(x0, eps, torch.tensor([0.25])).item() == pytest.approx(1.25)
    assert s.model_time(torch.tensor([0.25])).item() == pytest.approx(250.0)


def test_cosine_schedule_by_hand():
    s = Schedule("vp_cosine")
    a, sg = s.alpha_sigma(torch.tensor([0.5]))
    assert a.item() == pytest.approx(math.cos(math.pi / 4)) and sg.item() == pytest.approx(math.sin(math.pi / 4))
    da, ds = s.derivatives(torch.tensor([0.5]))
    assert da.item() == pytest.approx(-math.pi / 2 * math.sin(math.pi / 4))
    assert ds.item() == pytest.approx(math.pi / 2 * math.cos(math.pi / 4))


def test_discrete_schedule_matches_ddpm_alphas_cumprod():
    """Stable Diffusion 1.5's scaled-linear betas: alpha(t)^2 at integer steps is DDPMScheduler's alphas_cumprod."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").alphas_cumprod.double()
    s = Schedule("vp_discrete")
    steps = torch.tensor([0, 1, 250, 999])
    a, sg = s.alpha_sigma(steps.double() / 999)
    assert torch.allclose(a ** 2, ref[steps], rtol=1e-5)  # diffusers computes them in float32
    assert torch.allclose(sg ** 2, 1 - ref[steps], rtol=1e-5, atol=1e-7)
    # between two steps, log alpha_bar is interpolated linearly
    mid, _ = s.alpha_sigma(torch.tensor([250.5 / 999], dtype=torch.float64))
    assert mid.item() == pytest.approx(math.exp(0.25 * (math.log(ref[250]) + math.log(ref[251]))), rel=1e-6)


@pytest.mark.parametrize("kind,prediction", [(k, p) for k in ("flow", "vp_cosine", "vp_discrete")
                                              for p in ("epsilon", "v", "x0", "flow") if (k, p) != ("flow", "v")])
def test_split_inverts_combine(kind, prediction):
    s = Schedule(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = s.add_noise(x0, eps, t)
    pred = combine(x0, eps, t, prediction, s)
    back_x0, back_eps = split(pred, x_t, t, prediction, s)
    assert torch.allclose(back_x0, x0, atol=1e-9) and torch.allclose(back_eps, eps, atol=1e-9)


def test_parameterisations_by_hand():
    # vp_cosine at t = 0.5: alpha = sigma = 1/sqrt(2); x0 = 1, eps = 2
    s = Schedule("vp_cosine")
    r = 1 / math.sqrt(2)
    x0, eps, t = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5])
    assert combine(x0, eps, t, "v", s).item() == pytest.approx(r * 2 - r * 1)  # v = a eps - s x0
    u = combine(x0, eps, t, "flow", s).item()  # u = a' x0 + s' eps
    assert u == pytest.approx(-math.pi / 2 * r * 1 + math.pi / 2 * r * 2)
    # flow schedule: the velocity is eps - x0, and x0 = x_t - t u
    f = Schedule("flow")
    assert combine(x0, eps, torch.tensor([0.3]), "flow", f).item() == pytest.approx(1.0)
    x_t = torch.tensor([0.7 * 1 + 0.3 * 2])
    back = split(torch.tensor([1.0]), x_t, torch.tensor([0.3]), "flow", f)[0].item()
    assert back == pytest.approx(1.3 - 0.3 * 1.0)


def test_v_prediction_needs_a_variance_preserving_schedule():
    with pytest.raises(BenchError, match="variance-preserving"):
        split(torch.ones(1), torch.ones(1), torch.tensor([0.5]), "v", Schedule("flow"))


def test_guidance_by_hand():
    c, u = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    assert guide(c, u, 1.0).tolist() == [3.0, -1.0]
    assert guide(c, u, 2.5).tolist() == [1 + 2.5 * 2, 1 + 2.5 * -2]
    assert guide(c, u, torch.tensor([0.0, 2.0])).tolist() == [1.0, -3.0]


class _PointMass(torch.nn.Module):
    """The exact flow velocity of a data distribution concentrated at ``c`` (class c -> value c, null -> 0):
    u(x_t, t) = (x_t - c) / t. Records the conditions it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[torch.Tensor] = []

    def null_condition(self, cond):
        return torch.full_like(cond, -1)

    def forward(self, x, timestep, cond, guidance=None):
        self.calls.append(cond.clone())
        c = torch.where(cond >= 0, cond.float(), torch.zeros_like(cond.float())).view(-1, 1, 1, 1)
        t = (timestep / 1000.0).view(-1, 1, 1, 1)
        return (x - c) / t + 0 * self.w


def _gen(sampler: Sampler, **kw) -> Generator:
    return Generator(_PointMass(), schedule=Schedule("flow"), prediction="flow", sampler=sampler, **kw)


@pytest.mark.parametrize("kind", ["ode", "consistency"])
@pytest.mark.parametrize("steps", [1, 4])
def test_samplers_reach_the_point_mass(kind, steps):
    g = _gen(Sampler(kind, steps=steps))
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    out = g.sample(noise, torch.tensor([3, 5]))
    assert torch.allclose(out, torch.tensor([3.0, 5.0]).view(2, 1, 1, 1).expand_as(out), atol=1e-5)
    assert len(g.net.calls) == steps


def test_euler_steps_follow_the_uniform_grid():
    """ode sampling under the flow schedule is Euler: x_s = x_t + (s - t) u, at t = 1, 0.5 then 0."""

    class Constant(_PointMass):
        def forward(self, x, timestep, cond, guidance=None):
            self.calls.append(timestep.clone())
            return torch.ones_like(x) * 2.0  # u = 2 everywhere

    g = Generator(Constant(), schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode", steps=2))
    out = g.sample(torch.zeros(1, 1, 1, 1), torch.tensor([0]))
    assert out.item() == pytest.approx(0 + (0.5 - 1) * 2 + (0 - 0.5) * 2)
    assert [c.item() for c in g.net.calls] == [1000.0, 500.0]


def test_guided_call_batches_conditional_and_null():
    g = _gen(Sampler("ode", steps=1, guidance=3.0))
    x_t, t = torch.full((1, 1, 1, 1), 2.0), torch.tensor([0.5])
    pred = g.predict(x_t, t, torch.tensor([1]), guidance=3.0)
    # conditional u = (2 - 1) / 0.5 = 2, null u = (2 - 0) / 0.5 = 4: 4 + 3 (2 - 4) = -2
    assert pred.item() == pytest.approx(-2.0)
    assert g.net.calls[-1].tolist() == [1, -1]  # one batched call, conditional half first
    assert g.sampler.nfe == 2 and Sampler("ode", steps=4).nfe == 4


def test_step_options_and_timestep_table():
    g = _gen(Sampler("consistency", steps=4, timesteps=(0.999, 0.749, 0.499, 0.249)), steps_options=(4,))
    assert g.supports_steps(4) and not g.supports_steps(1)
    assert g.sampler_at(4).timesteps == (0.999, 0.749, 0.499, 0.249)
    with pytest.raises(BenchError, match="samples at 4 step"):
        g.sampler_at(1)
    free = _gen(Sampler("consistency", steps=1), timestep_table={2: (1.0, 0.7827)})
    assert free.sampler_at(2).timesteps == (1.0, 0.7827) and free.sampler_at(3).grid() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2, timesteps=(0.5, 0.9)), dict(kind="heun")])
def test_bad_samplers_are_refused(bad):
    with pytest.raises(BenchError):
        Sampler(**bad)


def test_ddim_step_matches_the_formula():
    g = _gen(Sampler("ode", steps=1))
    x_t = torch.full((1, 1, 1, 1), 2.0)
    # point mass at c = 1: x0 = 1, eps = (x_t - (1 - t) x0) / t = (2 - 0.5) / 0.5 = 3 at t = 0.5; at s = 0.2:
    # x_s = 0.8 * 1 + 0.2 * 3 = 1.4
    out = g.ddim_step(x_t, torch.tensor([0.5]), torch.tensor([0.2]), torch.tensor([1]))
    assert out.item() == pytest.approx(1.4)
