"""Progressive distillation (Salimans & Ho 2022): the two-DDIM-step target worked out by hand on an analytic
flow "teacher" (a fixed linear function of x), the max(SNR, 1) weight, the loss of one training step, the
round schedule (N halves, equal budget split) and the frozen round teacher across a resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.progressive import (Progressive, ddim_x_target, teacher_two_steps,
                                                 weighted_x_loss)
from pydantic import ValidationError

pytestmark = pytest.mark.usefixtures("one_thread")

NULL = 2  # the null class of the toy nets


class LinearFlowNet(torch.nn.Module):
    """u(x, tau, c) = a x + (tau / 1000) m + e[c]: a fixed linear function of x, with a class offset."""

    def __init__(self, a: float, m: list[float], e: list[list[float]]) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.register_buffer("m", torch.tensor(m))
        self.register_buffer("e", torch.tensor(e))

    def null_condition(self, cond):
        return torch.full_like(cond, NULL)

    def forward(self, x, timestep, cond, guidance=None):
        return self.a * x + (timestep / 1000.0)[:, None] * self.m + self.e[cond]


def flow_generator(net):
    return Generator(net, schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode", steps=1))


E = [[0.5, -1.0, 0.0, 2.0], [1.0, 0.0, -0.5, 0.3], [0.1, 0.2, 0.3, -0.4]]  # rows: class 0, class 1, null
M = [0.2, -0.1, 0.4, 0.0]


def hand_flow_ddim(z, t, s, u):
    """Flow schedule by hand: x0 = z - t u, eps = z + (1 - t) u, z_s = (1 - s) x0 + s eps."""
    t, s = t[:, None], s[:, None]
    x0, eps = z - t * u, z + (1 - t) * u
    return (1 - s) * x0 + s * eps, x0


def hand_u(z, t, c, a, w):
    e = torch.tensor(E)
    m = torch.tensor(M)
    plain = lambda cls: a * z + t[:, None] * m + e[cls]  # noqa: E731
    null = plain(torch.full_like(c, NULL))
    return null + w * (plain(c) - null)


def test_two_step_target_lands_on_the_teachers_two_steps():
    teacher = flow_generator(LinearFlowNet(0.3, M, E))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=g)
    c = torch.tensor([0, 1, 0])
    # the student's grid N = 4: the teacher steps 1/8 twice
    t = torch.tensor([1.0, 0.5, 0.25])
    t_mid, t_end = t - 0.125, t - 0.25
    w = 2.0
    with torch.no_grad():
        z_end, x_last = teacher_two_steps(teacher, z, t, t_mid, t_end, c, w)
    # by hand: two guided Euler/DDIM steps of u = a x + t m + e[c]
    z_mid, _ = hand_flow_ddim(z, t, t_mid, hand_u(z, t, c, 0.3, w))
    z_exp, x_mid = hand_flow_ddim(z_mid, t_mid, t_end, hand_u(z_mid, t_mid, c, 0.3, w))
    assert torch.allclose(z_end, z_exp, atol=1e-6) and torch.allclose(x_last, x_mid, atol=1e-6)
    x_t = ddim_x_target(z_end, z, t, t_end, teacher.schedule, x_last)
    # x~ = (z'' - (s/t) z) / ((1 - s) - (s/t)(1 - t)) with alpha = 1 - t, sigma = t
    tt, ss = t[:, None], t_end[:, None]
    x_formula = (z_exp - (ss / tt) * z) / ((1 - ss) - (ss / tt) * (1 - tt))
    assert torch.allclose(x_t[:2], x_formula[:2], atol=1e-5)
    assert torch.allclose(x_t[2], x_mid[2], atol=1e-6)  # t'' = 0: the teacher's last x prediction
    # one student DDIM step from (z, t) with x0 = x~ lands on z'': eps = (z - (1 - t) x~) / t
    eps_hat = (z - (1 - tt) * x_t) / tt
    assert torch.allclose((1 - ss) * x_t + ss * eps_hat, z_exp, atol=1e-5)


def test_truncated_snr_weight():
    sched = Schedule("flow")
    t = torch.tensor([0.25, 0.75, 1.0])  # SNR = ((1 - t) / t)^2 = 9, 1/9, 0 -> weights 9, 1, 1
    x_hat = torch.tensor([[1.0, 3.0], [0.0, 2.0], [1.0, 1.0]])
    x_tgt = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, -1.0]])  # per-example x-MSE 2.5, 2, 2.5
    assert weighted_x_loss(x_hat, x_tgt, t, sched).item() == pytest.approx((9 * 2.5 + 2 + 2.5) / 3)
    assert weighted_x_loss(x_hat, x_tgt, t, sched, "snr").item() == pytest.approx((9 * 2.5 + 2 / 9) / 3, rel=1e-5)
    assert weighted_x_loss(x_hat, x_tgt, t, sched, "constant").item() == pytest.approx(7 / 3)


def fake_task(steps=8, guidance=2.0):
    return SimpleNamespace(params=SimpleNamespace(teacher_sampler_steps=steps, guidance=guidance),
                           tier_defaults=lambda: {"teacher_sampler_steps": steps})


def test_round_schedule_halves_and_splits_the_budget_equally():
    m = Progressive(Progressive.Params())
    assert m.unsupported(fake_task(8)) is None
    plan = m.generations(20)
    assert [g.steps for g in plan] == [7, 7, 6] and not any(g.fresh_student for g in plan)
    assert m.rounds == [4, 2, 1] and [2 * n for n in m.rounds] == [8, 4, 2]
    m.unsupported(fake_task(25))  # 25 reference steps -> start 32: 16, 8, 4, 2, 1
    assert [g.steps for g in m.generations(300)] == [60] * 5 and m.rounds == [16, 8, 4, 2, 1]
    assert [g.steps for g in m.generations(3)] == [1, 1, 1] and m.rounds == [4, 2, 1] and m.dropped == [16, 8]
    m4 = Progressive(Progressive.Params(final_steps=4, start_steps=64))
    m4.generations(9)
    assert m4.rounds == [32, 16, 8, 4]
    with pytest.raises(ValidationError):
        Progressive.Params(start_steps=12)  # not final * 2^k
    nfe = SimpleNamespace(nfe=[1, 4])
    assert Progressive.check_task(Progressive.Params(final_steps=2), "coco_fid", nfe)
    assert Progressive.check_task(Progressive.Params(final_steps=4, start_steps=16), "coco_fid", nfe) is None


class FakeCtx(SimpleNamespace):
    def run_teacher(self, fn, n_examples):
        self.examples.append(n_examples)
        with torch.no_grad():
            return fn(self.teacher)


def test_training_step_loss_by_hand_and_round_teachers():
    teacher = flow_generator(LinearFlowNet(0.3, M, E))
    student = flow_generator(LinearFlowNet(-0.2, M, E))
    m = Progressive(Progressive.Params())
    m.unsupported(fake_task(4))
    m.generations(4)  # rounds 2 -> 1: student N = 2, then 1
    ctx = FakeCtx(student=student, teacher=teacher, task=fake_task(4), generation=0, examples=[])
    m.on_generation_start(0, ctx)
    x0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1, 1, 0, 1])
    torch.manual_seed(3)
    loss = m.training_step({"x0": x0, "cond": c}, ctx)["student"]
    torch.manual_seed(3)  # the same draws, by hand: i ~ U{0, 1}, t = (i + 1) / 2, eps ~ N(0, 1)
    i = torch.randint(0, 2, (5,))
    eps = torch.randn_like(x0)
    t = (i + 1).float() / 2
    z = (1 - t[:, None]) * x0 + t[:, None] * eps
    z_mid, _ = hand_flow_ddim(z, t, t - 0.25, hand_u(z, t, c, 0.3, 2.0))  # round 1: the guided task teacher
    z_end, x_mid = hand_flow_ddim(z_mid, t - 0.25, t - 0.5, hand_u(z_mid, t - 0.25, c, 0.3, 2.0))
    tt, ss = t[:, None], (t - 0.5)[:, None]
    x_tilde = torch.where(ss <= 0, x_mid, (z_end - (ss / tt) * z) / ((1 - ss) - (ss / tt) * (1 - tt)))
    x_hat = z - tt * hand_u(z, t, c, -0.2, 1.0)
    weight = (((1 - t) / t) ** 2).clamp(min=1)
    expected = (weight * (x_hat - x_tilde).pow(2).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ctx.examples == [2 * 5 * 2]  # two guided steps: 2 passes each
    # round 2: the teacher is the frozen round-1 student, unguided; it survives a resume
    ctx.generation = 1
    m.on_generation_start(1, ctx)
    with torch.no_grad():
        student.net.a.fill_(0.7)  # the online student moves on; the frozen copy does not
    assert m.round_teacher.net.a.item() == pytest.approx(-0.2) and not m.round_teacher.net.a.requires_grad
    state = m.state_dict()
    resumed = Progressive(Progressive.Params())
    resumed.load_state_dict(state)
    resumed.create_modules(ctx)
    assert resumed.round_teacher.net.a.item() == pytest.approx(-0.2)
    m.training_step({"x0": x0, "cond": c}, ctx)
    assert ctx.examples[-1] == 2 * 5
