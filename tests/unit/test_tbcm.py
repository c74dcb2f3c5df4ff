"""TBCM (Tang et al. 2025): the reference route and its stratified draws, the trajectory states of hand-integrable
teachers and the times they carry, the trajectory as the teacher's own Euler run, the black filter, the r
schedule, the masked sCM loss against the script's formula in plain torch (finite differences for the JVP), and
end-to-end runs on both smoke tasks whose real images are NaN (never read), with exact resume."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.api import TaskEnv
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion import sana_sprint as ss
from bench.methods.diffusion.tbcm import TBCM, black_keep, reference_route, sample_route, tangent_r
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SD = 0.5


# ------------------------------------------------------------------------------------------------
# The route
# ------------------------------------------------------------------------------------------------


def test_reference_route_by_hand():
    # shift 2.5: s -> 2.5 s / (1 + 1.5 s). sigma_max = 1, sigma_min = shifted(1/1000) = 0.0025 / 1.0015 = 0.00249626.
    # 3 steps: linspace(1, 0.00249626, 3) = (1, 0.50124813, 0.00249626), shifted again: (1, 0.71530351, 0.00621736);
    # angles atan(s / (1 - s)): (pi/2 -> 1.5708, atan(2.51250) = 1.192008, atan(0.0062563) = 0.006256)
    assert reference_route(3, 2.5).tolist() == pytest.approx([1.5708, 1.192008, 0.006256], abs=1e-6)
    # 16 steps (the yaml's route_steps): tau_1 = 1 - 0.99750374 / 15 = 0.93350, shifted 0.97229444,
    # atan(0.97229444 / 0.02770556) = pi/2 - atan(0.0284948) = 1.542309; the last is the same 0.006256
    r16 = reference_route(16, 2.5)
    assert len(r16) == 16 and r16[0].item() == 1.5708
    assert r16[1].item() == pytest.approx(1.542309, abs=1e-6) and r16[-1].item() == pytest.approx(0.006256, abs=1e-6)
    assert r16[8].item() == pytest.approx(1.144037, abs=1e-6)
    # shift 1 is the plain flow schedule: linspace(1, 0.001, 3)[1] = 0.5005 -> atan(0.5005 / 0.4995) = 0.785398 + 0.001
    assert reference_route(3, 1.0)[1].item() == pytest.approx(math.atan(0.5005 / 0.4995), abs=1e-9)


def test_routes_are_stratified_and_start_at_pure_noise():
    ref = torch.tensor([1.5708, 1.2, 0.7, 0.1], dtype=torch.float64)
    torch.manual_seed(0)
    rows = sample_route(ref, 4000)
    assert rows.shape == (4000, 4) and (rows[:, 0] == 1.5708).all()
    for k, (low, high) in enumerate([(1.2, 1.5708), (0.7, 1.2), (0.1, 0.7)], start=1):
        col = rows[:, k]
        assert col.min() >= low and col.max() <= high  # inside its own interval of the reference
        assert col.min() < low + 0.01 and col.max() > high - 0.01  # covering it
        assert col.mean().item() == pytest.approx((low + high) / 2, abs=0.02)  # uniformly
    assert (rows[:, 1:] < rows[:, :-1]).all()  # strictly descending
    assert not torch.equal(rows[0], rows[1])  # one route per trajectory


# ------------------------------------------------------------------------------------------------
# Trajectory states of hand-integrable teachers
# ------------------------------------------------------------------------------------------------


class ConstantFlow(nn.Module):
    """A flow 'teacher' whose velocity is v_c for the condition 1 and v_null for the null condition 0 (any x, t).

    Its probability-flow ODE dx/dt_f = v from noise z at t_f = 1 is the straight line x(t_f) = z - (1 - t_f) v,
    reaching x0 = z - v; guided at w the velocity is v_null + w (v_c - v_null) (constant again)."""

    def __init__(self, v_c: torch.Tensor, v_null: torch.Tensor) -> None:
        super().__init__()
        self.v_c, self.v_null = v_c, v_null

    def forward(self, x, timestep, cond, guidance=None):
        sel = cond.float().view(-1, *([1] * (x.dim() - 1)))
        return sel * self.v_c + (1 - sel) * self.v_null + 0 * x

    def null_condition(self, cond):
        return torch.zeros_like(cond)


def _ctx(teacher, shape, calls=None, **kw):
    def run_teacher(fn, n_examples):
        if calls is not None:
            calls.append(n_examples)
        with torch.no_grad():
            return fn(teacher)

    return SimpleNamespace(run_teacher=run_teacher, task=SimpleNamespace(sample_shape=lambda: shape), step=0,
                           total_steps=10, teacher=teacher, **kw)


def test_constant_velocity_teacher_states_by_hand():
    v_c, v_null = torch.tensor([0.4, -0.2]).view(1, 2, 1, 1), torch.tensor([0.1, 0.1]).view(1, 2, 1, 1)
    teacher = Generator(ConstantFlow(v_c, v_null), schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode"))
    m = TBCM(TBCM.Params(black_filter=False))
    z = torch.tensor([[1.0, -0.5], [0.3, 2.0]]).view(2, 2, 1, 1)
    times = torch.tensor([[1.5708, 1.2, 0.5], [1.5708, 0.9, 0.3]])
    w = torch.tensor([4.0, 5.0])
    calls: list[int] = []
    traj = m.trajectory(_ctx(teacher, (2, 1, 1), calls), torch.tensor([1, 1]), w, times, z)
    # guided velocities: 0.1 + 4 (0.3, -0.3) = (1.3, -1.1); 0.1 + 5 (0.3, -0.3) = (1.6, -1.4)
    vw = torch.tensor([[1.3, -1.1], [1.6, -1.4]]).view(2, 2, 1, 1)
    a = z - vw  # the trajectory's end, x0 (unit scale)
    # TrigFlow: the state at angle tau is sigma_d (cos tau x0 + sin tau z), its direction sigma_d (-sin tau x0 + cos tau z)
    for k in range(3):
        tau = times[:, k].view(2, 1, 1, 1)
        assert torch.allclose(traj["x_t"][k], SD * (torch.cos(tau) * a + torch.sin(tau) * z), atol=1e-4)
        assert torch.allclose(traj["dxt_dt"][k], SD * (-torch.sin(tau) * a + torch.cos(tau) * z), atol=1e-4)
        assert torch.equal(traj["t"][k], times[:, k])  # each state carries its own angle
    assert torch.allclose(traj["image"], SD * a, atol=1e-4)  # the last step lands on x0 (t = 0)
    # state 1 by hand: trajectory 0 at tau = 1.2 (cos 0.362358, sin 0.932039): 0.5 (0.362358 (-0.3) + 0.932039 1.0)
    assert traj["x_t"][1][0, 0].item() == pytest.approx(0.5 * (0.362358 * -0.3 + 0.932039), abs=1e-4)
    # flow time of that state: sin / (sin + cos) = 0.720078; on the flow line z - (1 - t_f) v_w, scaled by
    # sigma_d (sin + cos): 0.5 * 1.294397 * (1 - 0.279922 * 1.3) = 0.411609
    assert traj["x_t"][1][0, 0].item() == pytest.approx(0.411609, abs=1e-4)
    assert calls == [4, 4, 4]  # one guided teacher pass (cond + null) per state, 2 trajectories each


def test_training_points_are_the_states_after_pure_noise_with_their_times():
    v_c, v_null = torch.tensor([0.4, -0.2]).view(1, 2, 1, 1), torch.tensor([0.1, 0.1]).view(1, 2, 1, 1)
    teacher = Generator(ConstantFlow(v_c, v_null), schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode"))
    m = TBCM(TBCM.Params(route_steps=4, black_filter=False))
    ref = reference_route(4, 2.5)  # (1.5708, 1.37412.., 0.74246.., 0.006256): 3 training points per trajectory
    b = 3
    torch.manual_seed(7)
    z_expected = torch.randn(b, 2, 1, 1)  # the first draw of the step: the trajectories' noise
    torch.manual_seed(7)
    pts = m.training_points(_ctx(teacher, (2, 1, 1)), torch.tensor([1, 1, 1]))
    assert pts["x_t"].shape == (9, 2, 1, 1) and pts["t"].shape == (9,)
    assert pts["keep"].all() and torch.equal(pts["cond"], torch.tensor([1] * 9))
    w = pts["gin"] / 0.1  # guidance input 0.1 w, one w per trajectory, from {4, 4.5, 5}
    assert set(torch.round(w * 2).tolist()) <= {8.0, 9.0, 10.0}
    t = pts["t"].view(3, b)  # point-major: point k of every trajectory, then point k + 1
    for k in range(3):  # point k is the state after k + 1 steps: its angle is in [ref_{k+1}, ref_k]
        assert ((t[k] >= ref[k + 1].float()) & (t[k] <= ref[k].float())).all()
    x, d = pts["x_t"].view(3, b, 2, 1, 1), pts["dxt_dt"].view(3, b, 2, 1, 1)
    for i in range(b):
        vw = 0.1 + w.view(3, b)[0, i] * torch.tensor([0.3, -0.3]).view(2, 1, 1)
        assert torch.equal(w.view(3, b)[:, i], w.view(3, b)[0, i].expand(3))  # one w for a trajectory's points
        for k in range(3):
            c, s = math.cos(t[k, i]), math.sin(t[k, i])
            x0 = (c * x[k, i] - s * d[k, i]) / SD  # every point recovers its trajectory's x0 and noise
            noise = (s * x[k, i] + c * d[k, i]) / SD
            assert torch.allclose(noise, z_expected[i], atol=1e-4)
            assert torch.allclose(x0, z_expected[i] - vw, atol=1e-4)
        assert torch.allclose(pts["image"][i], SD * (z_expected[i] - vw), atol=1e-4)


class TinyFlowNet(nn.Module):
    """A small nonlinear conditional flow network (float64): v = tanh(W x + a t + b c) (+ guidance)."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.5 * torch.randn(2, 2, generator=g, dtype=torch.float64))
        self.a = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))

    def forward(self, x, timestep, cond, guidance=None):
        h = torch.einsum("ij,bjhw->bihw", self.w, x) + (self.a * (timestep / 1000.0).view(-1, 1)
                                                        + self.b * cond.double().view(-1, 1)).view(-1, 2, 1, 1)
        if guidance is not None:
            h = h + guidance.view(-1, 1, 1, 1)
        return torch.tanh(h)

    def null_condition(self, cond):
        return torch.zeros_like(cond)


def test_trajectory_is_the_teachers_own_euler_run_in_flow_time():
    teacher = Generator(TinyFlowNet(), schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode"))
    m = TBCM(TBCM.Params(sigma_d=SD))
    times = torch.tensor([[1.5708, 1.3, 0.8, 0.2], [1.5708, 1.0, 0.6, 0.05]], dtype=torch.float64)
    z = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    w, cond = torch.tensor([4.0, 4.5], dtype=torch.float64), torch.tensor([1, 2])
    traj = m.trajectory(_ctx(teacher, (2, 1, 1)), cond, w, times, z)
    # The task's own reference sampler (Euler = DDIM under the flow schedule) over the flow times t_f of the angles
    tf = (torch.sin(times) / (torch.sin(times) + torch.cos(times))).clamp(0, 1)
    tf = torch.cat([tf, torch.zeros(2, 1, dtype=torch.float64)], 1)
    x = z.clone()  # flow x at t_f = 1 is the noise
    for k in range(4):
        scale = (torch.sin(times[:, k]) + torch.cos(times[:, k])).view(-1, 1, 1, 1)
        assert torch.allclose(traj["x_t"][k], SD * scale * x, atol=1e-4)  # TrigFlow state = sigma_d (sin + cos) x_f
        x = teacher.ddim_step(x, tf[:, k], tf[:, k + 1], cond, guidance=w)
    assert torch.allclose(traj["image"], SD * x, atol=1e-4)  # the teacher's sample


# ------------------------------------------------------------------------------------------------
# Black filter, r schedule
# ------------------------------------------------------------------------------------------------


def test_black_filter_by_hand():
    n = 4000
    black = -torch.ones(n, 3, 2, 2)
    keep, m = black_keep(black)
    assert (m == 0).all() and not keep.any()  # m = 0: dropped with probability 1
    torch.manual_seed(0)
    keep, m = black_keep(black + 0.5)  # m = 0.25: dropped with probability 0.75
    assert torch.allclose(m, torch.full((n,), 0.25)) and keep.float().mean().item() == pytest.approx(0.25, abs=0.03)
    keep, m = black_keep(torch.zeros(n, 3, 2, 2))  # m = 1 = threshold: kept
    assert keep.all()
    keep, _ = black_keep(black + 0.5, threshold=0.2)  # m above a threshold of 0.2: kept
    assert keep.all()


def test_r_warms_up_then_calms_down_to_final_r():
    args = (4000, 15000, 2000, 0.75)
    assert [tangent_r(s, *args) for s in (0, 1000, 2000, 4000, 15000)] == pytest.approx([0, 0.25, 0.5, 1, 1])
    assert tangent_r(16000, *args) == pytest.approx(0.875)  # halfway: 1 * 0.5 + 0.75 * 0.5
    assert tangent_r(17000, *args) == tangent_r(29000, *args) == pytest.approx(0.75)
    m = TBCM(TBCM.Params())  # 30,000 reference steps mapped onto a 30-step budget: harness step s is 1000 s
    assert m.r_at(2, 30) == pytest.approx(0.5) and m.r_at(16, 30) == pytest.approx(0.875)
    assert m.r_at(30, 30) == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------
# The loss against the script's formula in plain torch
# ------------------------------------------------------------------------------------------------


def test_masked_scm_loss_matches_the_scripts_formula():
    torch.manual_seed(0)
    m = TBCM(TBCM.Params(sigma_d=SD))
    m.create_modules(None)
    student = ss.TrigFlowStudent(TinyFlowNet(seed=3))
    n = 6
    pts = {"x_t": torch.randn(n, 2, 1, 1, dtype=torch.float64), "t": torch.linspace(0.2, 1.4, n, dtype=torch.float64),
           "dxt_dt": torch.randn(n, 2, 1, 1, dtype=torch.float64), "cond": torch.tensor([0, 1, 2, 0, 1, 2]),
           "gin": torch.tensor([0.4, 0.45, 0.5, 0.4, 0.45, 0.5], dtype=torch.float64),
           "keep": torch.tensor([True, False, True, True, False, True])}
    ctx = SimpleNamespace(student=SimpleNamespace(net=student), step=1, total_steps=30)  # harness step 2 of 30: r = 0.5
    loss = m.points_loss(pts, ctx)
    assert m.info["r"] == pytest.approx(0.5) and m.info["kept"] == pytest.approx(4 / 6)

    # the script: F(x / sigma_d, t); dF/dt along (dx_t/dt / sigma_d, 1) by central differences;
    # g = -cos^2 (sigma_d F - dx) - r (cos sin x + sigma_d cos sin dF/dt), g / (|g| + 0.1);
    # loss = mean(mask (1 / (sigma_d tan t) / e^logvar (F - F^- - g)^2 + logvar)) with F = F^- in value
    x, t, dx, c, gin = pts["x_t"], pts["t"], pts["dxt_dt"], pts["cond"], pts["gin"]
    with torch.no_grad():
        def f(xs, ts):
            return student.trig(xs, ts, c, gin)

        h = 1e-6
        col = t.view(-1, 1, 1, 1)
        f0 = f(x / SD, t)
        dfdt = (f(x / SD + h * dx / SD, t + h) - f(x / SD - h * dx / SD, t - h)) / (2 * h)
        cos, sin = torch.cos(col), torch.sin(col)
        g = -cos ** 2 * (SD * f0 - dx) - 0.5 * (cos * sin * x + SD * cos * sin * dfdt)
        g = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
        lv = m.logvar(t, gin).view(-1, 1, 1, 1)
        per = (1 / (SD * torch.tan(col))) / torch.exp(lv) * g ** 2 + lv
        expected = (per * pts["keep"].double().view(-1, 1, 1, 1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # its gradient reaches the student and the logvar head
    grads = torch.autograd.grad(loss, [*student.parameters(), *m.logvar.parameters()])
    assert all(gr.abs().sum() > 0 for gr in grads)

    none = dict(pts, keep=torch.zeros(n, dtype=torch.bool))  # all filtered: a zero loss, connected to both
    zero = m.points_loss(none, ctx)
    assert zero.item() == 0.0 and zero.requires_grad


# ------------------------------------------------------------------------------------------------
# End to end on the smoke tasks, with NaN images
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, Path(tmp_path_factory.mktemp("tbcm-cache"))))


def _nan_images(task, monkeypatch):
    """The training split's batches with every image NaN: an image-free method never notices (the teacher is
    trained, on the real images, before)."""
    task.teacher()
    split = task.train_data()
    real = type(split).batch

    def batch(indices):
        out = real(split, indices)
        out["x0"] = torch.full_like(out["x0"], float("nan"))
        return out

    monkeypatch.setattr(split, "batch", batch)


def _run(task, method, steps, bs=4, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=bs)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_trains_image_free_and_samples_one_step_consistency(coco, monkeypatch):
    _nan_images(coco, monkeypatch)
    assert torch.isnan(coco.train_data().batch([0, 1])["x0"]).all()
    init = TBCM(TBCM.Params()).init_student(coco.teacher(), coco.student(0),
                                            SimpleNamespace(task=coco, seed=0)).state_dict()
    method = TBCM(TBCM.Params())
    model, result = _run(coco, method, 2)
    assert result.updates == {"student": 2, "logvar": 2}
    # 16 guided teacher passes per step (one per trajectory state), over 4 trajectories x (cond + null)
    assert result.teacher_forward_passes == 2 * 16 and result.teacher_examples == 2 * 16 * 8
    assert method.info["points"] == 4 * 15 and all(math.isfinite(e["student"]) for e in result.loss_log)
    assert any(not torch.equal(v, init[k]) for k, v in model.state_dict().items())  # the student trained
    # evaluation sampler: SCMScheduler one step at pi/2 (flow time 1), guidance input 0.1 x 5
    assert model.sampler.kind == "consistency" and model.sampler.steps == 1 and model.sampler.timesteps == (1.0,)
    assert model.sampler.guidance_input == pytest.approx(0.5) and model.sampler.nfe == 1
    assert model.sampler_at(2).timesteps == pytest.approx((1.0, math.sin(1) / (math.sin(1) + math.cos(1))))
    with torch.no_grad():
        out = model(torch.randn(2, 3, coco.image_size, coco.image_size), torch.tensor([0, 1]))
    assert torch.isfinite(out).all()


def test_resume_is_exact(coco, tmp_path):
    params = TBCM.Params(route_steps=4)
    full_model, full = _run(coco, TBCM(params), 3)
    ckpt = tmp_path / "state.pt"

    def stop_after_2(step, total, losses):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(coco, TBCM(params), 3, checkpoint_path=ckpt, checkpoint_every=1, on_step=stop_after_2)
    model, resumed = _run(coco, TBCM(params), 3, checkpoint_path=ckpt, checkpoint_every=1)
    assert resumed.resumed_from_step == 1
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert [e["student"] for e in full.loss_log] == [e["student"] for e in resumed.loss_log]


def test_geneval_prompts_train_image_free(tmp_path, monkeypatch):
    from bench.tasks.geneval import GenEval

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1]), TaskEnv("smoke", "val", None, tmp_path))
    _nan_images(task, monkeypatch)
    method = TBCM(TBCM.Params(route_steps=3, prompts_per_step=2))
    _, result = _run(task, method, 1)
    assert result.updates == {"student": 1, "logvar": 1} and math.isfinite(result.loss_log[0]["student"])
    assert method.info["points"] == 2 * 2  # 2 prompts x (3 - 1) states
    assert result.teacher_forward_passes == 3 and result.teacher_examples == 3 * 2 * 2


def test_check_task():
    p = TBCM.Params()
    assert TBCM.check_task(p, "coco_fid", SimpleNamespace(nfe=[8])) is not None
    assert TBCM.check_task(p, "coco_fid", SimpleNamespace(nfe=[1, 4])) is None
