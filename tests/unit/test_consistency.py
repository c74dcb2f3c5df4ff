"""Consistency distillation, LCM recipe (Song et al. 2023; Luo et al. 2023; diffusers train_lcm_distill_sd_wds.py):
the boundary scalings by hand, the EMA update, the pseudo-Huber loss, LCMScheduler's timesteps, the target (one
guided teacher DDIM step, then the EMA network's f) and one training step's loss on tiny analytic networks,
computed independently in plain torch; the student built from the teacher with a guidance embedding."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.consistency import (BoundaryConditioned, Consistency, boundary_scalings,
                                                 consistency_loss, consistency_target, ema_update, lcm_timesteps)

pytestmark = pytest.mark.usefixtures("one_thread")

NULL = 2
E = [[0.5, -1.0, 0.0, 2.0], [1.0, 0.0, -0.5, 0.3], [0.1, 0.2, 0.3, -0.4]]  # class 0, class 1, null
M = [0.2, -0.1, 0.4, 0.0]
G = [0.05, -0.02, 0.01, 0.03]


class LinearFlowNet(torch.nn.Module):
    """u(x, tau, c, w) = a x + (tau / 1000) m + e[c] + w g: linear in x, with class and guidance offsets."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        for k, v in (("m", M), ("e", E), ("g", G)):
            self.register_buffer(k, torch.tensor(v))

    def null_condition(self, cond):
        return torch.full_like(cond, NULL)

    def forward(self, x, timestep, cond, guidance=None):
        out = self.a * x + (timestep / 1000.0)[:, None] * self.m + self.e[cond]
        return out if guidance is None else out + guidance[:, None] * self.g


def hand_u(z, t, c, a, w_in=None):
    e, m, g = torch.tensor(E), torch.tensor(M), torch.tensor(G)
    out = a * z + t[:, None] * m + e[c]
    return out if w_in is None else out + w_in[:, None] * g


def hand_cskip_cout(t):
    tau = 1000.0 * t  # continuous flow time -> DDPM timestep
    return 0.25 / ((10 * tau) ** 2 + 0.25), 10 * tau / torch.sqrt((10 * tau) ** 2 + 0.25)


def hand_f(z, t, c, a, w_in):
    """f = c_skip z + c_out x0 with the flow x0 = z - t u."""
    cs, co = hand_cskip_cout(t)
    return cs[:, None] * z + co[:, None] * (z - t[:, None] * hand_u(z, t, c, a, w_in))


def student_generator(a):
    net = BoundaryConditioned(LinearFlowNet(a), Schedule("flow"), "flow")
    return Generator(net, schedule=Schedule("flow"), prediction="x0", sampler=Sampler("consistency", steps=1))


def test_boundary_scalings_by_hand():
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 1.0, 20.0, 999.0]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # the boundary condition f(x, 0) = x
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25) and c_out[1].item() == pytest.approx(10 / math.sqrt(100.25))
    assert c_skip[2].item() == pytest.approx(0.25 / (200 ** 2 + 0.25))
    assert c_out[3].item() == pytest.approx(9990 / math.sqrt(9990 ** 2 + 0.25))
    cs, co = boundary_scalings(torch.tensor([0.5]), sigma_data=1.0, timestep_scaling=2.0)  # scaled t = 1
    assert cs.item() == pytest.approx(0.5) and co.item() == pytest.approx(1 / math.sqrt(2))


def test_ema_update_by_hand():
    target, source = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.fill_(1.0)
        target.bias.fill_(-2.0)
        source.weight.fill_(3.0)
        source.bias.fill_(2.0)
    ema_update(target, source, 0.95)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.95 * 1 + 0.05 * 3))  # 1.1
    assert target.bias.item() == pytest.approx(0.95 * -2 + 0.05 * 2)  # -1.8
    assert source.weight.flatten().tolist() == [3.0, 3.0]


def test_huber_and_l2_losses():
    pred, target = torch.tensor([0.003, 0.0]), torch.tensor([0.0, 0.004])
    huber = ((math.sqrt(9e-6 + 1e-6) - 1e-3) + (math.sqrt(16e-6 + 1e-6) - 1e-3)) / 2
    assert consistency_loss(pred, target, "huber", 0.001).item() == pytest.approx(huber, rel=1e-5)
    assert consistency_loss(pred, target, "l2").item() == pytest.approx((9e-6 + 16e-6) / 2, rel=1e-5)


def test_lcm_scheduler_timesteps():
    # LCMScheduler(original_inference_steps=50): [999, 979, ..., 19]; n = 4 picks indices 0, 12, 25, 37
    # -> tau 999, 759, 499, 259 -> t = (tau + 1) / 1000
    assert lcm_timesteps(4) == pytest.approx((1.0, 0.76, 0.5, 0.26))
    assert lcm_timesteps(1) == pytest.approx((1.0,)) and lcm_timesteps(2) == pytest.approx((1.0, 0.5))
    assert lcm_timesteps(8) == pytest.approx((1.0, 0.88, 0.76, 0.64, 0.5, 0.38, 0.26, 0.14))


def test_target_one_guided_ddim_step_then_ema_f():
    teacher = Generator(LinearFlowNet(0.3), schedule=Schedule("flow"), prediction="flow", sampler=Sampler())
    target = student_generator(-0.4)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0, 1, 1])
    t, s = torch.tensor([1.0, 0.5, 0.02]), torch.tensor([0.98, 0.48, 0.0])
    w = torch.tensor([5.0, 7.5, 15.0])
    with torch.no_grad():
        out = consistency_target(teacher, target, z, t, s, c, w)
    # by hand: teacher u in LCM's CFG form cond + w (cond - uncond), DDIM step of the flow x0/eps
    u_c, u_n = hand_u(z, t, c, 0.3), hand_u(z, t, torch.full_like(c, NULL), 0.3)
    u = u_c + w[:, None] * (u_c - u_n)
    x0, eps = z - t[:, None] * u, z + (1 - t[:, None]) * u
    x_prev = (1 - s[:, None]) * x0 + s[:, None] * eps
    expected = hand_f(x_prev, s, c, -0.4, w)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out[2], x_prev[2], atol=1e-6)  # at s = 0, f = x (c_skip = 1, c_out = 0)


class FakeCtx(SimpleNamespace):
    def run_teacher(self, fn, n_examples):
        self.examples.append(n_examples)
        with torch.no_grad():
            return fn(self.teacher)


def test_training_step_loss_by_hand_and_ema_resume():
    teacher = Generator(LinearFlowNet(0.3), schedule=Schedule("flow"), prediction="flow", sampler=Sampler())
    student = student_generator(-0.2)
    m = Consistency(Consistency.Params(num_ddim_timesteps=10, loss_type="huber"))
    ctx = FakeCtx(student=student, teacher=teacher, examples=[])
    m.create_modules(ctx)
    with torch.no_grad():
        m.target.net.net.a.fill_(-0.5)  # an EMA target that has drifted from the student
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1, 1, 0, 1, 0])
    torch.manual_seed(5)
    loss = m.training_step({"x0": x0, "cond": c}, ctx)["student"]
    torch.manual_seed(5)  # by hand with the same draws: index, noise, w
    index = torch.randint(0, 10, (6,))
    noise = torch.randn_like(x0)
    w = 10.0 * torch.rand((6,)) + 5.0
    t = (index + 1).float() / 10
    s = t - 0.1
    z = (1 - t[:, None]) * x0 + t[:, None] * noise
    pred = hand_f(z, t, c, -0.2, w)
    u_c, u_n = hand_u(z, t, c, 0.3), hand_u(z, t, torch.full_like(c, NULL), 0.3)
    u = u_c + w[:, None] * (u_c - u_n)
    x_prev = (1 - s[:, None]) * (z - t[:, None] * u) + s[:, None] * (z + (1 - t[:, None]) * u)
    target = hand_f(x_prev, s, c, -0.5, w)
    expected = (torch.sqrt((pred - target) ** 2 + 1e-6) - 1e-3).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert ctx.examples == [12]  # the guided teacher: conditional and null passes
    # the EMA after an optimiser step, and an exact resume of it
    m.on_step_end(ctx)
    assert m.target.net.net.a.item() == pytest.approx(0.95 * -0.5 + 0.05 * -0.2)
    resumed = Consistency(m.params)
    resumed.load_state_dict(m.state_dict())
    resumed.create_modules(ctx)
    assert resumed.target.net.net.a.item() == pytest.approx(m.target.net.net.a.item())
    assert resumed.ema_updates == 1 and not resumed.target.net.net.a.requires_grad


class TinyCondNet(torch.nn.Module):
    """The task network's contract in miniature: a condition vector plus an optional guidance projection
    (zeroed in the last layer when asked), as CondUNet(guidance_embed=True) adds it."""

    def __init__(self, guidance_embed=False):
        super().__init__()
        self.cond_embed = torch.nn.Embedding(NULL + 1, 4)
        self.lin = torch.nn.Linear(4, 4)
        self.guidance_proj = (torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.SiLU(), torch.nn.Linear(4, 4))
                              if guidance_embed else None)

    def null_condition(self, cond):
        return torch.full_like(cond, NULL)

    def forward(self, x, timestep, cond, guidance=None):
        vec = self.cond_embed(cond) + (timestep / 1000.0)[:, None]
        if self.guidance_proj is not None:
            w = torch.zeros(x.shape[0]) if guidance is None else guidance
            vec = vec + self.guidance_proj(w[:, None])
        return self.lin(x) + vec


def test_student_has_the_teacher_weights_and_an_lcm_sampler():
    torch.manual_seed(0)
    teacher = Generator(TinyCondNet(), schedule=Schedule("flow"), prediction="flow", sampler=Sampler())

    def build(role, seed, **extra):
        torch.manual_seed(seed + 1)
        return Generator(TinyCondNet(**extra), schedule=Schedule("flow"), prediction="flow", sampler=Sampler())

    task = SimpleNamespace(_build=build)
    m = Consistency(Consistency.Params(guidance_init="zero"))
    g = m.init_student(teacher, build("student", 0), SimpleNamespace(task=task, seed=0))
    inner = g.net.net
    assert inner.guidance_proj is not None and g.prediction == "x0"
    assert torch.equal(inner.lin.weight, teacher.net.lin.weight)  # loaded from the teacher (strict=False)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    ts, c = torch.tensor([500.0, 20.0]), torch.tensor([1, 0])
    with torch.no_grad():  # zeroed guidance projection: the teacher's prediction at any w
        assert torch.allclose(inner(x, ts, c, guidance=torch.tensor([7.5, 5.0])), teacher.net(x, ts, c))
    default = Consistency(Consistency.Params()).init_student(teacher, build("student", 0),
                                                             SimpleNamespace(task=task, seed=0))
    assert default.net.net.guidance_proj[-1].weight.abs().sum() > 0  # the script: the layer's own init
    assert g.steps_options == tuple(range(1, 9)) and g.sampler.kind == "consistency"
    assert g.sampler.guidance_input == pytest.approx(7.5) and g.sampler.steps == 4 and g.sampler.nfe == 4
    assert g.sampler_at(4).timesteps == pytest.approx((1.0, 0.76, 0.5, 0.26))
    assert g.sampler_at(1).timesteps == pytest.approx((1.0,))
    assert Consistency.check_task(Consistency.Params(), "coco_fid", SimpleNamespace(nfe=[16]))
    assert Consistency.check_task(Consistency.Params(), "coco_fid", SimpleNamespace(nfe=[1, 4])) is None
