"""SlimFlow (Zhu et al., ECCV 2024): the annealing schedule and noise blend, SlimFlow's time convention against
bench's, the flow-guided target on an analytic guide flow, and both stages' losses, all worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.slimflow import (
    SlimFlow, beta_schedule, bench_time, blend_noise, guided_target, slimflow_velocity,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearVelocity(nn.Module):
    """A flow 'network' whose bench velocity is c * x + b * (model time / 1000)."""

    def __init__(self, c: float, b: float = 0.0) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.b = b

    def forward(self, x, timestep, cond, guidance=None):
        return self.c * x + self.b * (timestep / 1000.0).reshape(-1, *([1] * (x.dim() - 1)))

    def null_condition(self, cond):
        return cond


class ConstantVelocity(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x, timestep, cond, guidance=None):
        return self.value.expand_as(x)

    def null_condition(self, cond):
        return cond


def flow_gen(net: nn.Module) -> Generator:
    return Generator(net, schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode", steps=1))


def test_beta_schedule_values():
    assert [beta_schedule(k, 10) for k in (0, 5, 10, 15)] == [1.0, 0.5, 0.0, 0.0]
    assert beta_schedule(5, 10, "cos") == pytest.approx(0.5)
    assert beta_schedule(2, 10, "cos") == pytest.approx((1 + math.cos(0.2 * math.pi)) / 2)  # 0.904508...
    assert beta_schedule(2, 10, "cos") == pytest.approx(0.9045085, abs=1e-7)
    assert beta_schedule(5, 10, "exp") == pytest.approx(0.6065307, abs=1e-7)
    assert beta_schedule(30, 10, "exp") == pytest.approx(math.exp(-3))


def test_beta_of_the_stages():
    m = SlimFlow(SlimFlow.Params())  # anneal_fraction 0.375: K = round(0.375 * 16) = 6 steps of a 16-step stage
    ctx = SimpleNamespace(generation=0, generation_steps=16, generation_step=3)
    assert m.beta(ctx) == pytest.approx(0.5)
    ctx.generation_step = 6
    assert m.beta(ctx) == 0.0
    ctx.generation, ctx.generation_step = 1, 0
    assert m.beta(ctx) == 0.0


def test_blend_noise_by_hand():
    z, fresh = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 3.0])
    # beta = 0.6: sqrt(1 - 0.36) = 0.8 -> [0.8 * 2 - 0.6, -0.8 + 1.8]
    assert torch.allclose(blend_noise(z, fresh, 0.6), torch.tensor([1.0, 1.0]))
    assert torch.equal(blend_noise(z, fresh, 0.0), z)
    assert torch.equal(blend_noise(z, fresh, 1.0), fresh)


def test_time_convention_points_velocities_and_one_step():
    x1, z = torch.tensor([[0.5, -0.25]]), torch.tensor([[1.5, 2.0]])
    s = torch.tensor([0.3])
    g = flow_gen(ConstantVelocity(z - x1))  # the exact bench velocity eps - x0 of this single pair
    # SlimFlow's x_s = s x1 + (1 - s) z is bench's point at t = 1 - s.
    assert bench_time(0.3) == pytest.approx(0.7)
    assert torch.allclose(g.add_noise(x1, z, bench_time(s)), 0.3 * x1 + 0.7 * z)
    # SlimFlow's velocity (data - noise) is minus bench's (noise - data).
    assert torch.allclose(slimflow_velocity(g, 0.3 * x1 + 0.7 * z, s, None), x1 - z)
    # SlimFlow's one step x = z + v (s: 0 -> 1) is bench's one Euler step from t = 1.
    assert torch.allclose(g.sample(z, None, Sampler("ode", steps=1)), x1)


def test_flow_guided_target_on_an_analytic_guide():
    # guide's SlimFlow velocity v_G(x, s) = 0.5 x + s, i.e. bench velocity u(x, t) = -(0.5 x + (1 - t)).
    class Guide(nn.Module):
        def forward(self, x, timestep, cond, guidance=None):
            return -(0.5 * x + (1.0 - timestep / 1000.0).reshape(-1, 1))

        def null_condition(self, cond):
            return cond

    guide = flow_gen(Guide())
    noise, v_s, s_p = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([0.5])
    # x_s' = 1 + 0.5 * 2 = 2; v_G = 0.5 * 2 + 0.5 = 1.5; x1 = 2 + 0.5 * 1.5 = 2.75; target = 2.75 - 1 = 1.75.
    target = guided_target(noise, v_s, s_p, lambda x, s: slimflow_velocity(guide, x, s, None))
    assert target.item() == pytest.approx(1.75, abs=1e-6)


def _stub_ctx(student: Generator, pairs: dict, generation: int, gen_step: int = 0, gen_steps: int = 8):
    return SimpleNamespace(student=student, generation=generation, generation_step=gen_step,
                           generation_steps=gen_steps, teacher_pairs=lambda n: pairs)


def _pairs(n: int = 4):
    g = torch.Generator().manual_seed(3)
    return {"noise": torch.randn(n, 3, 2, 2, generator=g), "image": torch.randn(n, 3, 2, 2, generator=g).tanh(),
            "cond": torch.zeros(n, dtype=torch.long)}


def test_annealing_reflow_loss_by_hand():
    m = SlimFlow(SlimFlow.Params())
    student = flow_gen(LinearVelocity(0.7))
    pairs = _pairs()
    ctx = _stub_ctx(student, pairs, generation=0, gen_step=1, gen_steps=8)  # K = 3: beta = 1 - 1/3
    torch.manual_seed(11)
    loss = m.training_step({"index": torch.arange(4)}, ctx)["student"]
    # by hand, same draws in the same order: fresh noise, the flip coin, s ~ U[eps, 1)
    torch.manual_seed(11)
    beta, eps = 2.0 / 3.0, 1e-3
    z = math.sqrt(1 - beta ** 2) * pairs["noise"] + beta * torch.randn(4, 3, 2, 2)
    x1 = pairs["image"]
    if float(torch.rand(())) > 0.5:
        z, x1 = z.flip(3), x1.flip(3)
    s = (torch.rand(4) * (1 - eps) + eps).view(-1, 1, 1, 1)
    x_s = s * x1 + (1 - s) * z
    v = -0.7 * x_s  # SlimFlow velocity of bench velocity 0.7 x
    assert loss.item() == pytest.approx(((v - (x1 - z)) ** 2).mean().item(), rel=1e-5)


def test_flow_guided_distillation_loss_by_hand():
    m = SlimFlow(SlimFlow.Params())
    student = flow_gen(LinearVelocity(0.7))
    m.guide_net = flow_gen(LinearVelocity(-0.4))
    pairs = _pairs()
    ctx = _stub_ctx(student, pairs, generation=1)
    torch.manual_seed(5)
    loss = m.training_step({"index": torch.arange(4)}, ctx)["student"]
    torch.manual_seed(5)
    eps, z, x1 = 1e-3, pairs["noise"], pairs["image"]
    pair = ((-0.7 * (eps * x1 + (1 - eps) * z) - (x1 - z)) ** 2).mean()
    n = torch.randn(4, 3, 2, 2)
    sp = (torch.rand(4) * 0.6 + 0.2).view(-1, 1, 1, 1)
    v_s = -0.7 * n
    x_sp = n + sp * v_s
    x1_g = x_sp + (1 - sp) * (0.4 * x_sp)  # guide's SlimFlow velocity: -(-0.4 x)
    guide = ((v_s - (x1_g - n)) ** 2).mean()
    assert loss.item() == pytest.approx((pair + guide).item(), rel=1e-5)


def test_ema_warmup_and_stage_handover():
    m = SlimFlow(SlimFlow.Params())
    student = flow_gen(LinearVelocity(1.0))
    ctx = SimpleNamespace(student=student, generation=0, generation_step=0, generation_steps=4)
    m.on_generation_start(0, ctx)
    with torch.no_grad():
        student.net.c.fill_(2.0)
    m.on_step_end(ctx)  # decay min(0.999999, 2/11): shadow = 1 - (9/11)(1 - 2)
    assert m.ema["net.c"].item() == pytest.approx(1 + 9 / 11)
    with torch.no_grad():
        student.net.c.fill_(3.0)
    m.on_step_end(ctx)  # decay 3/12
    expected = (1 + 9 / 11) - (9 / 12) * ((1 + 9 / 11) - 3)
    assert m.ema["net.c"].item() == pytest.approx(expected)
    # stage 2: the guide is the stage-1 EMA, the new EMA starts from the raw weights
    m.on_generation_start(1, ctx)
    assert m.guide_net.net.c.item() == pytest.approx(expected) and not m.guide_net.net.c.requires_grad
    assert m.ema["net.c"].item() == 3.0 and m.ema_updates == 0
    # resume: state round trip rebuilds the guide on the student's structure
    m2 = SlimFlow(SlimFlow.Params())
    m2.load_state_dict(m.state_dict())
    m2.create_modules(ctx)
    assert m2.guide_net.net.c.item() == pytest.approx(expected) and m2.ema["net.c"].item() == 3.0


def test_generations_and_check_task():
    m = SlimFlow(SlimFlow.Params())
    assert [g.steps for g in m.generations(20)] == [10, 10]
    assert [g.steps for g in m.generations(1)] == [1]
    assert all(not g.fresh_student for g in m.generations(7))
    p = SlimFlow.Params()
    assert SlimFlow.check_task(p, "coco_fid", SimpleNamespace(nfe=[2, 4])) is not None
    assert SlimFlow.check_task(p, "coco_fid", SimpleNamespace(nfe=[1, 4])) is None
