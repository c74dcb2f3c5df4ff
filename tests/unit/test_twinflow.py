"""TwinFlow (methods/diffusion/twinflow.py; Cheng et al. 2025, inclusionAI/TwinFlow tutorials/mnist/methodes.py):
RCGM's consistency target, the rectification target and its gradient, the CFG-enhanced target and the EMA warm-up
worked out by hand; the sign handling of t (signed model time, |t| in the interpolation, the task network's
embedding of a negative time); one whole training step against the tutorial's formulas in plain torch on a tiny
analytic network; and end-to-end on the smoke tasks: the student starts as the teacher and samples few-step at
tt = 0, only the student steps, no teacher passes, and an exact resume with the EMA."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench.api import TaskEnv
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.twinflow import (TwinFlow, TwinNet, enhance_target, ema_decay_after, rcgm_target,
                                              rectify_target, signed_split)
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _v(*values):
    """[B, 1] tensors: one scalar 'image' per sample."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


# --- RCGM target ------------------------------------------------------------------------------------


def test_rcgm_target_with_a_constant_velocity_by_hand():
    # the EMA predicts velocity 1 everywhere, so its N-step integral from t_m to tt is (t_m - tt)
    # sample 1: t = 0.5, tt = 0.2 (far: t >= tt + 0.01): t_m = 0.49, integral 0.29
    #   F_th = 1, v = 0.5: R = 100 * 0.3 * 1 - 100 * 0.29 - 0.5 = 30 - 29 - 0.5 = 0.5 -> target 1 - 0.5 = 0.5
    # sample 2: same times, F_th = 2, v = 0: R = 60 - 29 - 0 = 31 -> clamped to 1 -> target 2 - 1 = 1
    # sample 3: t = 0.5, tt = 0.495 (near: t_m = tt, integral 0): R = F_th - v = 1 - 0.4 = 0.6 -> target 0.4
    # sample 4: near, F_th = 1, v = -1: R = 2 -> clamped to 1 -> target 0
    t = torch.tensor([0.5, 0.5, 0.5, 0.5])
    tt = torch.tensor([0.2, 0.2, 0.495, 0.495])
    f_th, v = _v(1.0, 2.0, 1.0, 1.0), _v(0.5, 0.0, 0.4, -1.0)
    out = rcgm_target(lambda x, a, b: torch.ones_like(x), f_th, v, torch.zeros(4, 1), t, tt, order=2)
    assert torch.allclose(out, _v(0.5, 1.0, 0.4, 0.0), atol=1e-5)


def test_rcgm_target_euler_steps_and_target_times_by_hand():
    # EMA velocity F(x) = x; t = 0.5, tt = 0.1, x_t = 1, v = 2, N = 2
    #   x' = x_t - 0.01 v = 0.98; t_m = 0.49; step h = (0.49 - 0.1) / 2 = 0.195; times 0.49 -> 0.295 -> 0.1
    #   step 1: F = 0.98, x1 = 0.98 - 0.195 * 0.98 = 0.7889; step 2: F = 0.7889
    #   integral = 0.195 * (0.98 + 0.7889) = 0.3449355
    #   F_th = 0.92: R = 100 * 0.4 * 0.92 - 34.49355 - 2 = 0.30645 -> target 0.92 - 0.30645 = 0.61355
    calls = []

    def vel(x, t_c, t_n):
        calls.append((round(float(t_c), 6), round(float(t_n), 6)))
        return x

    out = rcgm_target(vel, _v(0.92), _v(2.0), _v(1.0), torch.tensor([0.5]), torch.tensor([0.1]), order=2)
    assert out.item() == pytest.approx(0.61355, abs=1e-5)
    assert calls == [(0.49, 0.295), (0.295, 0.1)]  # each call gets its step's end as the target time
    # no gradient flows into the target
    f = _v(0.92).requires_grad_(True)
    assert not rcgm_target(vel, f, _v(2.0), _v(1.0), torch.tensor([0.5]), torch.tensor([0.1]), 2).requires_grad


# --- rectification, CFG target, EMA warm-up --------------------------------------------------------------


def test_rectification_target_and_its_gradient_by_hand():
    # F_fake = (1, -2), fake velocity (0.5, 1), real velocity (0.25, 3): dv = (0.25, -2)
    # target = F_fake - dv = (0.75, 0); loss = mean((F - sg(F - dv))^2) = mean(dv^2) = (0.0625 + 4) / 2 = 2.03125
    # d loss / d F = 2 dv / 2 = dv = (0.25, -2): the one-step velocity moves by -lr dv, towards the real flow
    f = torch.tensor([[1.0, -2.0]], requires_grad=True)
    tgt = rectify_target(f, torch.tensor([[0.5, 1.0]]), torch.tensor([[0.25, 3.0]]))
    assert torch.allclose(tgt, torch.tensor([[0.75, 0.0]])) and not tgt.requires_grad
    loss = ((f - tgt) ** 2).mean()
    loss.backward()
    assert loss.item() == pytest.approx(2.03125)
    assert torch.allclose(f.grad, torch.tensor([[0.25, -2.0]]))


def test_enhanced_target_and_ema_warmup_by_hand():
    # v + r (F(c) - F(null)) with r = 0.5: (1, 0) + 0.5 * ((3, 1) - (1, 2)) = (2, -0.5)
    out = enhance_target(torch.tensor([1.0, 0.0]), 0.5, torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0]))
    assert torch.allclose(out, torch.tensor([2.0, -0.5]))
    # d_0 = 0; d_1 = 0 + 1 * 0.99 / 2 = 0.495; d_2 = 0.495 + 0.505 * 0.495 / 2 = 0.6199875
    d1 = ema_decay_after(0.0, 0.99)
    assert d1 == pytest.approx(0.495) and ema_decay_after(d1, 0.99) == pytest.approx(0.6199875)


# --- sign handling of t ----------------------------------------------------------------------------------


class SpyNet(torch.nn.Module):
    """F(x, tau, c, w) = a x + (tau / 1000) m + e[c] + q w, recording every call's (tau, w)."""

    NULL = 2

    def __init__(self, a=0.5, m=0.3, q=0.2):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.m = torch.nn.Parameter(torch.tensor(m))
        self.q = torch.nn.Parameter(torch.tensor(q))
        self.register_buffer("e", torch.tensor([0.1, -0.2, 0.05]))
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def null_condition(self, cond):
        return torch.full_like(cond, self.NULL)

    def forward(self, x, timestep, cond, guidance=None):
        self.calls.append((timestep.detach().clone(), None if guidance is None else guidance.detach().clone()))
        shape = (-1, *([1] * (x.dim() - 1)))
        out = self.a * x + self.m * (timestep / 1000.0).reshape(shape) + self.e[cond].reshape(shape)
        return out if guidance is None else out + self.q * guidance.reshape(shape)


def test_signed_time_reaches_the_network_and_interpolation_uses_its_magnitude():
    net = SpyNet()
    f = TwinNet(net, Schedule("flow"), tt_input=True)
    x = torch.ones(2, 1)
    out = f(x, torch.tensor([-0.25, 0.25]), torch.tensor([-0.25, 0.0]), torch.tensor([0, 0]))
    tau, w = net.calls[-1]
    assert torch.allclose(tau, torch.tensor([-250.0, 250.0])) and torch.allclose(w, torch.tensor([-0.25, 0.0]))
    # 0.5 + 0.3 * (-0.25) + 0.1 + 0.2 * (-0.25) = 0.475 ; 0.5 + 0.075 + 0.1 + 0 = 0.675
    assert torch.allclose(out, _v(0.475, 0.675))
    # x_hat = x - |t| F, z_hat = x + (1 - |t|) F at t = -0.25 and +0.25 alike
    xh, zh = signed_split(_v(1.0, 1.0), torch.tensor([-0.25, 0.25]), _v(2.0, 2.0))
    assert torch.allclose(xh, _v(0.5, 0.5)) and torch.allclose(zh, _v(2.5, 2.5))
    # without the tt embedding the network is called with t only
    plain = SpyNet()
    TwinNet(plain, Schedule("flow"), tt_input=False)(x, torch.tensor([-0.5, 0.5]), torch.tensor([0.0, 0.0]),
                                                     torch.tensor([0, 1]))
    assert plain.calls[-1][1] is None and torch.allclose(plain.calls[-1][0], torch.tensor([-500.0, 500.0]))


def test_task_network_embeds_a_negative_time_as_the_mirror_of_the_positive_one():
    from bench.tasks.generative.nets import CondUNet

    assert Schedule("flow").model_time(torch.tensor([-0.3])).item() == pytest.approx(-300.0)
    torch.manual_seed(0)
    net = CondUNet(size=8, channels=(8, 16), num_classes=3, norm_groups=4, guidance_embed=True).eval()
    tau = torch.tensor([300.0])
    pos, neg = net.unet.time_proj(tau), net.unet.time_proj(-tau)
    half = pos.shape[-1] // 2  # diffusers' Timesteps(flip_sin_to_cos=True): [cos, sin] of tau * freq
    assert torch.allclose(neg[:, :half], pos[:, :half]) and torch.allclose(neg[:, half:], -pos[:, half:])
    x, c = torch.randn(1, 3, 8, 8), torch.tensor([1])
    with torch.no_grad():
        a, b = net(x, tau, c, guidance=torch.tensor([0.3])), net(x, -tau, c, guidance=torch.tensor([-0.3]))
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-4  # the fake flow is told apart


# --- one training step against the tutorial's formulas ----------------------------------------------------


def _step_ctx(net):
    student = Generator(net, schedule=Schedule("flow"), prediction="flow", sampler=Sampler())
    return SimpleNamespace(student=student)


def test_training_step_equals_the_tutorial_formulas_in_plain_torch():
    params = TwinFlow.Params()
    m = TwinFlow(params)
    net = SpyNet()
    ctx = _step_ctx(net)
    m.create_modules(ctx)
    x = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.5, 0.25]]).reshape(3, 1, 1, 2)
    c = torch.tensor([0, 1, 1])
    torch.manual_seed(3)
    loss = m.training_step({"x0": x, "cond": c, "index": torch.arange(3)}, ctx)["student"]
    calls = net.calls
    # --- the same step written out from methodes.py (TwinFlow.training_step), EMA = student (d_0 = 0)
    torch.manual_seed(3)
    t = torch.rand(3)
    tt = t - torch.rand(3) * t
    z = torch.randn_like(x)
    s = torch.rand(3)
    z2 = torch.randn_like(x)
    theta = torch.tensor([0.5, 0.3, 0.2], requires_grad=True)  # the student's (a, m, q); the EMA: detached
    e = torch.tensor([0.1, -0.2, 0.05])

    def F(xx, tm, ttt, cc, w=None):  # the analytic network at signed time tm, target time ttt
        a, mm, q = theta.detach() if w is None else w
        b = (-1, 1, 1, 1)
        return a * xx + mm * tm.reshape(b) + e[cc].reshape(b) + q * ttt.reshape(b)

    def S(xx, tm, ttt, cc):  # the student, with gradient
        return F(xx, tm, ttt, cc, theta)

    def mse(p, y):
        return ((p - y) ** 2).flatten(1).mean(1).mean()

    def rcgm(f_th, v, xt, tq, ttq):
        tm_ = torch.maximum(tq - 0.01, ttq)
        xx, integ = xt - 0.01 * v, 0
        ts = [tm_, (tm_ + ttq) / 2, ttq]
        for t_c, t_n in zip(ts[:-1], ts[1:]):
            fc = F(xx, t_c, t_n, c)
            xx = xx + (t_n - t_c).reshape(-1, 1, 1, 1) * fc  # alpha(t_n) z_hat + gamma(t_n) x_hat
            integ = integ + fc * (t_c - t_n).reshape(-1, 1, 1, 1)
        far = (tq >= ttq + 0.01).reshape(-1, 1, 1, 1)
        r = torch.where(far, 100 * (tq - ttq).reshape(-1, 1, 1, 1) * f_th - 100 * integ - v, f_th - v)
        return f_th - r.clamp(-1, 1)

    tb = t.reshape(-1, 1, 1, 1)
    x_t = tb * z + (1 - tb) * x
    v = (z - x) + 0.5 * (F(x_t, t, t, c) - F(x_t, t, t, torch.full_like(c, 2)))  # CFG-enhanced target
    f_th = S(x_t, t, tt, c)
    base = mse(f_th, rcgm(f_th.detach(), v, x_t, t, tt))
    fm = mse(S(x_t, t, t, c), v)
    ones, zeros = torch.ones(3), torch.zeros(3)
    f_fake = S(z, ones, zeros, c)
    x_fake = (z - f_fake).detach()
    xtf = tb * z + (1 - tb) * x_fake
    adv = mse(S(xtf, -t, -t, c), z - x_fake)
    sb = s.reshape(-1, 1, 1, 1)
    x_s = sb * z2 + (1 - sb) * x_fake
    dv = F(x_s, -s, -s, c) - F(x_s, s, s, c)  # the student without gradient (dist_match is no_grad)
    rect = mse(f_fake, (f_fake - dv).detach())
    cons = mse(f_fake, rcgm(f_fake.detach(), v, z, ones, zeros))
    expected = base + fm + adv + rect + cons
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m._last["loss_rectify"] == pytest.approx(rect.item(), rel=1e-5)
    assert m._last["loss_adv"] == pytest.approx(adv.item(), rel=1e-5)
    # sign handling: every negative model time comes with tt equal to it (the fake flow at -t, tt = -t); the
    # one-step sample is called at t = 1 with tt = 0
    neg = [(tau, w) for tau, w in calls if (tau < 0).any()]
    assert len(neg) == 2  # the fake-flow loss at -t, and dist_match's fake half (batched with its real half)
    assert torch.allclose(neg[0][0], -1000 * t) and torch.allclose(neg[0][1], -t)
    assert torch.allclose(neg[1][0], torch.cat([-1000 * s, 1000 * s])) and torch.allclose(neg[1][1],
                                                                                          torch.cat([-s, s]))
    assert any(torch.allclose(tau, torch.full((3,), 1000.0)) and torch.allclose(w, zeros) for tau, w in calls)
    # the gradient: only through F_th, F_pred, F_fake and the fake-flow prediction (every target detached)
    loss.backward()
    expected.backward()
    got = torch.stack([net.a.grad, net.m.grad, net.q.grad])
    assert torch.allclose(got, theta.grad, rtol=1e-4, atol=1e-6) and theta.grad.abs().sum() > 0


def test_rcgm_only_and_weights():
    # twinflow=False: RCGM's base loss only: one student pass (F_th), three EMA passes (the CFG pair batched, N = 2)
    net = SpyNet()
    ctx = _step_ctx(net)
    m = TwinFlow(TwinFlow.Params(twinflow=False))
    m.create_modules(ctx)
    batch = {"x0": torch.randn(4, 1, 1, 2), "cond": torch.tensor([0, 1, 0, 1]), "index": torch.arange(4)}
    torch.manual_seed(0)
    only = m.training_step(batch, ctx)["student"]
    assert set(m._last) == {"loss_base"} and len(net.calls) == 1 and len(m.ema.calls) == 1 + 2
    # all weights 0 but the base: the same loss as twinflow=False from the same draws and EMA state
    m2 = TwinFlow(TwinFlow.Params(fm_weight=0, adv_weight=0, rectify_weight=0, consistency_weight=0))
    ctx2 = _step_ctx(SpyNet())
    m2.create_modules(ctx2)
    torch.manual_seed(0)
    assert m2.training_step(batch, ctx2)["student"].item() == pytest.approx(only.item(), rel=1e-6)


# --- end to end on the smoke tasks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("twinflow-cache")))


def _run(task, method, steps, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_student_starts_as_the_teacher_and_samples_few_step_at_tt_zero(task):
    m = TwinFlow(TwinFlow.Params())
    teacher = task.teacher()
    g = m.init_student(teacher, task.student(0), SimpleNamespace(task=task, seed=0))
    assert g.net.guidance_proj is not None and g.prediction == "flow" and g.schedule.kind == "flow"
    x = torch.randn(2, 3, task.image_size, task.image_size)
    tau, c = torch.tensor([700.0, -300.0]), torch.tensor([1, 3])
    with torch.no_grad():  # zeroed tt embedding: the teacher's velocity at any tt, negative times included
        assert torch.allclose(g.net(x, tau, c, guidance=torch.tensor([0.2, -0.3])), teacher.net(x, tau, c),
                              atol=1e-6)
    assert g.sampler.kind == "ode" and g.sampler.steps == 1 and g.sampler.guidance_input == 0.0
    assert g.sampler.nfe == 1 and g.supports_steps(4) and g.supports_steps(7)  # any-step
    assert TwinFlow(TwinFlow.Params(stochastic=True)).init_student(
        teacher, task.student(0), SimpleNamespace(task=task, seed=0)).sampler.kind == "consistency"
    assert m.unsupported(task) is None
    assert "full tier" in m.unsupported(SimpleNamespace(_build=None, tier="full"))


def test_only_the_student_steps_no_teacher_passes_and_resume_is_exact(task, tmp_path):
    full_model, full = _run(task, TwinFlow(TwinFlow.Params()), 4)
    assert full.updates == {"student": 4} and full.teacher_forward_passes == 0
    assert {"loss_base", "loss_fm", "loss_adv", "loss_rectify", "loss_consistency"} <= set(full.loss_log[0])
    ckpt = tmp_path / "state.pt"

    def stop_after_3(step, total, losses):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(task, TwinFlow(TwinFlow.Params()), 4, checkpoint_path=ckpt, checkpoint_every=2, on_step=stop_after_3)
    resumed_method = TwinFlow(TwinFlow.Params())
    model, resumed = _run(task, resumed_method, 4, checkpoint_path=ckpt, checkpoint_every=2)
    assert resumed.resumed_from_step == 2
    assert resumed_method.decay == pytest.approx(ema_decay_after(ema_decay_after(
        ema_decay_after(ema_decay_after(0.0, 0.99), 0.99), 0.99), 0.99))  # 4 warm-up updates, across the resume
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # the EMA (the targets' network) was restored exactly


def test_runs_on_geneval_prompts(tmp_path_factory):
    from bench.tasks.geneval import GenEval

    gtask = GenEval(GenEval.Params(teacher_steps=2),
                    TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("twinflow-geneval")))
    _, result = _run(gtask, TwinFlow(TwinFlow.Params(sample_steps=4)), 1)
    assert result.updates == {"student": 1} and result.loss_log[0]["loss_rectify"] >= 0
