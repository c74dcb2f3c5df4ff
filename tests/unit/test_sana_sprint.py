"""SANA-Sprint (Chen et al., ICCV 2025): the training-free TrigFlow conversion of a flow teacher against the flow
teacher's own x0/eps, sigma_d in the teacher direction, the student wrapper, the tangent and its normalisation,
the warm-up, the sCM loss, the JVP against central finite differences, the hinge losses and the sampler angles —
all worked out by hand or from the formulas in plain torch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion import sana_sprint as ss

pytestmark = pytest.mark.usefixtures("one_thread")


def analytic_velocity(x_f: torch.Tensor, t_f: torch.Tensor) -> torch.Tensor:
    """An arbitrary smooth 'flow teacher': v(x, t) = 0.3 x - 0.2 + t."""
    return 0.3 * x_f - 0.2 + t_f.reshape(-1, *([1] * (x_f.dim() - 1)))


def test_trigflow_conversion_reproduces_the_flow_teachers_x0_and_eps():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)  # unit-scale TrigFlow input x_t / sigma_d
    t = torch.tensor([0.2, math.pi / 4, 1.4], dtype=torch.float64)
    f = ss.trigflow_from_flow(x, t, analytic_velocity)
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    t_f = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    x_f = x / (c + s)  # cos t x0 + sin t e divided by (cos t + sin t) is the flow point (1 - t_f) x0 + t_f e
    v = analytic_velocity(x_f, t_f)
    tf = t_f.view(-1, 1, 1, 1)
    x0_flow, eps_flow = x_f - tf * v, x_f + (1 - tf) * v  # the flow teacher's x0 and eps
    assert torch.allclose(c * x - s * f, x0_flow, atol=1e-12)  # TrigFlow x0 = cos t x - sin t F
    assert torch.allclose(s * x + c * f, eps_flow, atol=1e-12)  # TrigFlow eps = sin t x + cos t F
    # at t = pi/4: t_f = 1/2, n = sqrt(1/2): x_f = x sqrt(1/2) and F = (0 x_f + 0.5 v) / sqrt(1/2) = v / sqrt(2)
    assert torch.allclose(f[1], v[1] / math.sqrt(2), atol=1e-12)


class Oracle(nn.Module):
    """A flow network returning a fixed velocity (the exact one of a single data point and noise)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x, timestep, cond, guidance=None):
        return self.value.expand_as(x)

    def null_condition(self, cond):
        return cond


def test_teacher_direction_is_dxt_dt_in_sigma_d_units():
    sd = 0.5
    m = ss.SanaSprint(ss.SanaSprint.Params(sigma_d=sd))
    x0p, e = torch.tensor([[0.6, -0.4]]), torch.tensor([[1.2, 0.3]])  # teacher-scale data and unit noise
    teacher = Generator(Oracle(e - x0p), schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode"))
    ctx = SimpleNamespace(run_teacher=lambda fn, n_examples: fn(teacher))
    t = torch.tensor([0.7])
    x0, z = sd * x0p, sd * e  # the scripts: model_input * sigma_data, noise * sigma_data
    x_t = math.cos(0.7) * x0 + math.sin(0.7) * z
    d = m.teacher_direction(ctx, x_t, t, torch.zeros(1, dtype=torch.long), torch.tensor([4.5]))
    assert torch.allclose(d, -math.sin(0.7) * x0 + math.cos(0.7) * z, atol=1e-6)  # d/dt (cos t x0 + sin t z)


def test_student_wrapper_denoises_in_the_tasks_flow_schedule():
    net = Oracle(torch.tensor([[0.5, -1.0]]))  # a flow student with velocity v = (0.5, -1)
    g = Generator(ss._modules()["TrigFlowStudent"](net), schedule=Schedule("flow"), prediction="x0",
                  sampler=Sampler("consistency"))
    x_f = torch.tensor([[0.2, 0.4], [1.0, -2.0]])
    for tf in (1.0, 0.78271, 0.3):
        expected = x_f - tf * torch.tensor([[0.5, -1.0]])  # the flow x0 of (x_f, v)
        assert torch.allclose(g.denoise(x_f, torch.full((2,), tf), None), expected, atol=1e-6)


def test_tangent_and_its_normalisation_by_hand():
    t = torch.tensor([math.pi / 4])  # cos^2 t = cos t sin t = 1/2
    f_minus = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    dxt_dt = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    x_t = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    jvp = torch.tensor([0.0, 4.0]).view(1, 1, 1, 2)
    g = ss.tangent(f_minus, dxt_dt, x_t, jvp, t, r=0.5, sigma_d=0.5, c=0.1)
    # g = -0.5 (0.5 F - dx) - 0.5 (0.5 x_t + 0.5 jvp) = [0, -0.25] - [0.5, 1] = [-0.5, -1.25]; |g| = 1.346291
    raw = torch.tensor([-0.5, -1.25])
    assert torch.allclose(g.flatten(), raw / (math.sqrt(1.8125) + 0.1), atol=1e-6)
    assert torch.allclose(g.flatten(), torch.tensor([-0.345713, -0.864283]), atol=1e-6)
    # per-sample normalisation
    two = ss.tangent(torch.cat([f_minus, 10 * f_minus]), torch.cat([dxt_dt, dxt_dt]), torch.cat([x_t, x_t]),
                     torch.cat([jvp, jvp]), torch.cat([t, t]), r=0.5, sigma_d=0.5)
    assert torch.allclose(two[0], g[0])


def test_warmup_r_and_its_budget_fraction():
    assert [ss.warmup_r(k, 10) for k in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert round(ss.SanaSprint.Params().tangent_warmup_fraction * 30000) == 4000


def test_scm_loss_by_hand():
    t = torch.tensor([math.pi / 4])  # weight 1 / (0.5 tan t) = 2
    f = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    f_minus = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    g = torch.tensor([0.25, 0.5]).view(1, 1, 1, 2)
    loss = ss.scm_loss(f, f_minus, g, t, torch.tensor([0.5]), sigma_d=0.5)
    # (F - F^- - g)^2 = [0.0625, 1]; mean(2 / e^0.5 * [.0625, 1] + 0.5) = 1.144439
    assert loss.item() == pytest.approx(2 / math.exp(0.5) * 0.53125 + 0.5, rel=1e-6)
    assert loss.item() == pytest.approx(1.144439, abs=1e-6)


class TinyFlowNet(nn.Module):
    """A tiny nonlinear flow network (float64): v = tanh(W x + a t_model / 1000 + guidance)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64))
        self.a = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))

    def forward(self, x, timestep, cond, guidance=None):
        h = torch.einsum("ij,bcj->bci", self.w, x) + self.a * (timestep / 1000.0).view(-1, 1, 1)
        return torch.tanh(h + guidance.view(-1, 1, 1))

    def null_condition(self, cond):
        return cond


def test_jvp_matches_central_finite_differences():
    student = ss._modules()["TrigFlowStudent"](TinyFlowNet())
    x = torch.randn(3, 1, 2, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.3], dtype=torch.float64)
    gin = torch.tensor([0.4, 0.45, 0.5], dtype=torch.float64)
    vx, vt = torch.randn_like(x), torch.cos(t) * torch.sin(t)

    def f(xs, ts):
        return student.trig(xs, ts, None, gin)

    with torch.no_grad():
        _, jvp = torch.func.jvp(f, (x, t), (vx, vt))
        h = 1e-6
        fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
    assert torch.allclose(jvp, fd, atol=1e-8)


def test_jvp_through_the_tasks_unet_student():
    """torch.func.jvp goes through the attention-free diffusers UNet2DModel (float32: central differences agree to ~1e-3)."""
    from bench.tasks.generative.nets import CondUNet

    torch.manual_seed(0)
    student = ss._modules()["TrigFlowStudent"](CondUNet(size=8, channels=(8, 16), num_classes=3, guidance_embed=True,
                                                        norm_groups=4))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 1.1])
    cond, gin = torch.tensor([0, 2]), torch.tensor([0.4, 0.5])
    vx, vt = torch.randn_like(x), torch.cos(t) * torch.sin(t)

    def f(xs, ts):
        return student.trig(xs, ts, cond, gin)

    with torch.no_grad():
        _, jvp = torch.func.jvp(f, (x, t), (vx, vt))
        h = 1e-4
        fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
    assert ((jvp - fd).norm() / jvp.norm()).item() < 1e-2


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2.5] -> 7/6; 0.5 (5/6 + 7/6) = 1
    assert ss.hinge_d_loss(real, fake).item() == pytest.approx(1.0)


def test_sampler_angles_in_flow_time():
    def tf(a):
        return math.sin(a) / (math.sin(a) + math.cos(a))

    assert ss.scm_timesteps(1) == (1.0,)  # 1.5708 is pi/2 rounded up: t_f clamps to 1
    two = ss.scm_timesteps(2)
    assert two[0] == 1.0 and two[1] == pytest.approx(tf(1.3)) and two[1] == pytest.approx(0.78271, abs=1e-5)
    assert ss.scm_timesteps(4) == pytest.approx((1.0, 0.70711, 0.5, 0.29289), abs=1e-4)
    assert ss.scm_timesteps(3) == pytest.approx((1.0, tf(1.5708 * 2 / 3), tf(1.5708 / 3)), abs=1e-6)


def test_time_sampling_matches_the_formula():
    torch.manual_seed(3)
    t = ss.sample_angles(5, 0.2, 1.6, 0.5)
    torch.manual_seed(3)
    assert torch.allclose(t, torch.atan(torch.exp(torch.randn(5) * 1.6 + 0.2) / 0.5))


def test_check_task():
    p = ss.SanaSprint.Params()
    assert ss.SanaSprint.check_task(p, "coco_fid", SimpleNamespace(nfe=[8])) is not None
    assert ss.SanaSprint.check_task(p, "coco_fid", SimpleNamespace(nfe=[1, 4])) is None


def test_student_starts_as_the_teacher_and_the_phases_alternate():
    from bench.tasks.generative import nets

    cfg = {"size": 8, "channels": [8, 16], "layers_per_block": 1, "norm_groups": 4, "num_classes": 3}
    torch.manual_seed(0)
    teacher = Generator(nets.build(cfg), schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode", 4))
    for p in teacher.parameters():
        p.requires_grad_(False)
    task = SimpleNamespace(_build=lambda role, seed, **kw: Generator(
        nets.build({**cfg, **kw}), schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode")))

    def run_teacher(fn, n_examples):
        with torch.no_grad():
            return fn(teacher)

    ctx = SimpleNamespace(task=task, seed=0, teacher=teacher, step=0, total_steps=10, run_teacher=run_teacher)
    m = ss.SanaSprint(ss.SanaSprint.Params())
    student = m.init_student(teacher, teacher, ctx)
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 0.6]), torch.tensor([0, 2])
    with torch.no_grad():  # the zero last guidance layer: the converted student is the (unguided) teacher
        assert torch.allclose(student.denoise(x, t, c, guidance_input=0.45), teacher.denoise(x, t, c), atol=1e-5)
    assert student.sampler.timesteps == ss.scm_timesteps(2) and student.sampler.guidance_input == pytest.approx(0.45)
    ctx.student = student
    m.create_modules(ctx)
    assert m.info["head_blocks"] == ["down.0", "mid", "up.0", "up.1"]  # 2/19, 8/19, 14/19, 19/19 of 5 blocks
    batch = {"x0": torch.rand(4, 3, 8, 8) * 2 - 1, "cond": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    ctx.updating = lambda key: ctx.step % 2 == 0
    g_losses = m.training_step(batch, ctx)
    assert set(g_losses) == {"student", "logvar"} and torch.isfinite(g_losses["student"])
    grads = torch.autograd.grad(g_losses["student"], list(student.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    ctx.step = 1
    d_losses = m.training_step(batch, ctx)
    assert set(d_losses) == {"disc"} and torch.isfinite(d_losses["disc"])
    assert all(p.grad is None for p in teacher.parameters())
