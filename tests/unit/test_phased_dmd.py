"""Phased DMD (methods/diffusion/phased_dmd.py): the subinterval transition x_t | x_s (mean and variance by hand
for given alpha/sigma, on the flow and a VP schedule), the fake network's score-matching targets by hand and
their unbiasedness (a Monte Carlo regression against the exact Gaussian denoiser), the normalised DMD gradient,
the phase schedule (which phase/expert trains at which harness step, which t each phase draws), routing of the
experts by time, the training rollout equal to the evaluation sampler, and in the real training loop: which
expert and fake network step in which phase, and an exact resume across the phase boundary."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from bench.api import TaskEnv
from bench.diffusion import Schedule, combine
from bench.methods.diffusion.phased_dmd import (PhasedDMD, PhasedNet, dm_loss, phased_dm_gradient,
                                                subinterval_targets, transition)
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# The subinterval transition
# --------------------------------------------------------------------------------------------------


def test_transition_mean_and_variance_by_hand_flow_and_vp():
    # flow schedule (alpha = 1 - t, sigma = t), s = 0.5 -> t = 0.8:
    #   alpha_s = sigma_s = 0.5, alpha_t = 0.2, sigma_t = 0.8
    #   mean coefficient a = alpha_t / alpha_s = 0.4
    #   variance b^2 = sigma_t^2 - a^2 sigma_s^2 = 0.64 - 0.16 * 0.25 = 0.6
    (a_s, a_t), (s_s, s_t) = Schedule("flow").alpha_sigma(_t(0.5, 0.8))
    a, b = transition(a_s, s_s, a_t, s_t)
    assert a.item() == pytest.approx(0.4) and (b ** 2).item() == pytest.approx(0.6)
    # VP cosine schedule at the times where (alpha, sigma) = (0.8, 0.6) and (0.6, 0.8):
    #   a = 0.6 / 0.8 = 0.75; b^2 = 0.64 - 0.5625 * 0.36 = 0.4375 (= 1 - a^2, as on every VP schedule)
    ts = _t(2 / math.pi * math.acos(0.8), 2 / math.pi * math.acos(0.6))
    (a_s, a_t), (s_s, s_t) = Schedule("vp_cosine").alpha_sigma(ts)
    assert (a_s.item(), s_s.item(), a_t.item(), s_t.item()) == pytest.approx((0.8, 0.6, 0.6, 0.8))
    a, b = transition(a_s, s_s, a_t, s_t)
    assert a.item() == pytest.approx(0.75) and (b ** 2).item() == pytest.approx(0.4375)
    # composed with x_s = alpha_s x0 + sigma_s e it is the forward process from x0: a alpha_s = alpha_t and
    # a^2 sigma_s^2 + b^2 = sigma_t^2 (flow: 0.4 * 0.5 = 0.2, 0.16 * 0.25 + 0.6 = 0.64)
    assert 0.4 * 0.5 == pytest.approx(0.2) and 0.16 * 0.25 + 0.6 == pytest.approx(0.64)


def test_transition_samples_have_that_mean_and_variance():
    # x_s = 2 everywhere, flow s = 0.5 -> t = 0.8: x_t ~ N(0.4 * 2, 0.6) = N(0.8, 0.6)
    g = torch.Generator().manual_seed(0)
    x_s = torch.full((200_000, 1), 2.0, dtype=torch.float64)
    eps = torch.randn(x_s.shape, generator=g, dtype=torch.float64)
    x_t, _, _ = subinterval_targets(x_s, eps, _t(0.5), _t(0.5), _t(0.2), _t(0.8))
    assert x_t.mean().item() == pytest.approx(0.8, abs=0.01)
    assert x_t.var().item() == pytest.approx(0.6, abs=0.01)


def test_score_matching_targets_by_hand():
    # flow s = 0.5 -> t = 0.8, x_s = 1, eps = 0.5; b = sqrt(0.6) = 0.7745967
    #   x_t = 0.4 * 1 + 0.5 b                              = 0.7872983
    #   eps_hat = sigma_t eps / b = 0.4 / b                = 0.5163978
    #   x0_hat = (x_s - a sigma_s^2 eps / b) / alpha_s = (1 - 0.05 / b) / 0.5 = 1.8709005
    #   check: alpha_t x0_hat + sigma_t eps_hat = 0.3741801 + 0.4131182 = 0.7872983 = x_t
    b = math.sqrt(0.6)
    x_t, x0_hat, eps_hat = subinterval_targets(_t(1.0), _t(0.5), _t(0.5), _t(0.5), _t(0.2), _t(0.8))
    assert x_t.item() == pytest.approx(0.4 + 0.5 * b)
    assert eps_hat.item() == pytest.approx(0.4 / b) and x0_hat.item() == pytest.approx((1 - 0.05 / b) / 0.5)
    assert (0.2 * x0_hat + 0.8 * eps_hat).item() == pytest.approx(x_t.item())
    # the flow network's target eps_hat - x0_hat = the LightX2V code's phased_velocity_target:
    #   -x_s / (1 - s) + (t + (1 - t) s^2 / (1 - s)^2) eps / b = -2 + (0.8 + 0.2) * 0.5 / b = -1.3545027
    v = combine(x0_hat, eps_hat, _t(0.8), "flow", Schedule("flow"))
    assert v.item() == pytest.approx(-2 + 0.5 / b) and v.item() == pytest.approx(-1.3545027, abs=1e-6)
    # the data end (s = 0: alpha_s = 1, sigma_s = 0) is ordinary denoising: x0_hat = x_s, eps_hat = eps
    x_t, x0_hat, eps_hat = subinterval_targets(_t(1.0), _t(0.5), _t(1.0), _t(0.0), _t(0.2), _t(0.8))
    assert (x_t.item(), x0_hat.item(), eps_hat.item()) == pytest.approx((0.2 + 0.4, 1.0, 0.5))


def test_score_matching_target_is_unbiased_for_the_true_denoiser():
    # x0 ~ N(0, 1), flow: x_s = 0.5 x0 + 0.5 e1 (s = 0.5), x_t from x_s by the transition (t = 0.8). The exact
    # denoiser is E[x0 | x_t] = alpha_t x_t / (alpha_t^2 + sigma_t^2) = 0.2 / 0.68 x_t = 0.2941 x_t; the target
    # regressed on x_t has that slope. (The naive x_s / alpha_s would give cov(x0 + e1, x_t) / var(x_t) = 0.4 / 0.68.)
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0, e1, e2 = (torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(3))
    x_s = 0.5 * x0 + 0.5 * e1
    x_t, x0_hat, _ = subinterval_targets(x_s, e2, _t(0.5), _t(0.5), _t(0.2), _t(0.8))
    slope = ((x0_hat * x_t).mean() / (x_t * x_t).mean()).item()
    assert slope == pytest.approx(0.2 / 0.68, abs=0.01)
    naive = ((x_s / 0.5 * x_t).mean() / (x_t * x_t).mean()).item()
    assert naive == pytest.approx(0.4 / 0.68, abs=0.01)


# --------------------------------------------------------------------------------------------------
# The DMD gradient
# --------------------------------------------------------------------------------------------------


def _img(*values):
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, 2)


def test_dm_gradient_and_loss_by_hand():
    # sample 1: x0 = (1, -2), D_real = (0.5, -1), D_fake = (0, -3): mean|x0 - D_real| = 0.75
    #   grad = (D_fake - D_real) / 0.75 = (-0.5, -2) / 0.75 = (-2/3, -8/3)
    # sample 2: x0 = D_real = (1, 1): the normaliser 0 is clamped at 1e-4; D_fake = (0, 1): grad = (-1e4, 0)
    x0 = _img((1.0, -2.0), (1.0, 1.0)).requires_grad_(True)
    d_real = _img((0.5, -1.0), (1.0, 1.0))
    d_fake = _img((0.0, -3.0), (0.0, 1.0))
    grad = phased_dm_gradient(x0.detach(), d_real, d_fake, 1e-4)
    expected = _img((-2 / 3, -8 / 3), (-1e4, 0.0))
    assert torch.allclose(grad, expected)
    loss = dm_loss(x0, grad)  # 0.5 mean(grad^2) over 4 elements; d/dx0 = grad / 4
    assert loss.item() == pytest.approx(0.5 * (4 / 9 + 64 / 9 + 1e8) / 4)
    loss.backward()
    assert torch.allclose(x0.grad, expected / 4)


# --------------------------------------------------------------------------------------------------
# The phase schedule
# --------------------------------------------------------------------------------------------------


def test_phase_times_and_the_t_each_phase_draws():
    m = PhasedDMD(PhasedDMD.Params())  # 4 steps, 2 phases: t = 1, 0.75 | 0.5, 0.25 | 0
    assert m.grid == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert m.phase_times(0) == (1.0, 0.5) and m.phase_times(1) == (0.5, 0.0)
    # to_noise (the code): phase 1 from its end 500 + margin 20 to 999; phase 2 (data end, no margin) 1..999
    assert m.score_steps(0) == (520, 999) and m.score_steps(1) == (1, 999)
    torch.manual_seed(3)
    t = m.draw_t(0, 50_000)
    assert t.min().item() == pytest.approx(0.52) and t.max().item() == pytest.approx(0.999)
    t = m.draw_t(1, 50_000)
    assert t.min().item() == pytest.approx(0.001) and t.max().item() == pytest.approx(0.999)
    # phase: only inside (t_end, t_start]
    m = PhasedDMD(PhasedDMD.Params(dmd_range="phase"))
    assert m.score_steps(0) == (520, 999) and m.score_steps(1) == (1, 500)
    t = m.draw_t(1, 50_000)
    assert t.max().item() == pytest.approx(0.5)
    # 4 phases of one step each: ends 0.75, 0.5, 0.25, 0
    m = PhasedDMD(PhasedDMD.Params(phases=4))
    assert [m.score_steps(k) for k in range(4)] == [(770, 999), (520, 999), (270, 999), (1, 999)]
    m = PhasedDMD(PhasedDMD.Params(phases=4, dmd_range="phase"))
    assert [m.score_steps(k) for k in range(4)] == [(770, 999), (520, 750), (270, 500), (1, 250)]


def test_which_phase_trains_at_which_harness_step():
    # progressive: 20 harness steps -> generations of 10 and 10; the generator steps every 5th harness step, so
    # expert 1 gets the updates at steps 0 and 5, expert 2 those at 10 and 15
    m = PhasedDMD(PhasedDMD.Params())
    plan = m.generations(20)
    assert [g.steps for g in plan] == [10, 10] and not any(g.fresh_student for g in plan)
    assert plan[0].name == "phase 1/2: expert 1, sampler steps 1-2 of 4"
    assert [g.steps for g in m.generations(7)] == [4, 3]
    starts = [0, 10]
    phase = [m.phase_at(s, max(i for i, s0 in enumerate(starts) if s0 <= s)) for s in range(20)]
    assert phase == [0] * 10 + [1] * 10
    assert [phase[s] for s in range(0, 20, 5)] == [0, 0, 1, 1]
    # alternating (the code's trainer): the phase flips with every generator update: steps 0-4 -> 1, 5-9 -> 2, ...
    m = PhasedDMD(PhasedDMD.Params(schedule="alternating"))
    assert [g.steps for g in m.generations(20)] == [20]
    assert [m.phase_at(s, 0) for s in range(20)] == ([0] * 5 + [1] * 5) * 2


def test_invalid_phase_splits_are_refused():
    with pytest.raises(ValueError, match="must divide steps"):
        PhasedDMD.Params(steps=4, phases=3)
    with pytest.raises(ValueError, match="leaves no t above"):  # phase 1 of 4 ends at 750; 750 + 300 > 999
        PhasedDMD.Params(steps=4, phases=4, score_margin=300)
    from bench.tasks.coco_fid import CocoFID

    msg = PhasedDMD.check_task(PhasedDMD.Params(steps=2, phases=2), "coco_fid", CocoFID.Params(nfe=[1, 4]))
    assert msg and "steps`=2" in msg
    assert PhasedDMD.check_task(PhasedDMD.Params(), "coco_fid", CocoFID.Params(nfe=[1, 4])) is None


# --------------------------------------------------------------------------------------------------
# Experts and rollouts
# --------------------------------------------------------------------------------------------------


class _Const(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x, timestep, cond):
        return torch.full_like(x, self.value)

    def null_condition(self, cond):
        return cond * 0 - 1


def test_experts_are_routed_by_time():
    net = PhasedNet([_Const(1.0), _Const(2.0)], [500.0])  # phase end t = 0.5 in model time 1000 t
    x = torch.zeros(4, 1, 1, 1)
    out = net(x, torch.tensor([1000.0, 750.0, 500.0, 250.0]), torch.zeros(4))
    assert out.flatten().tolist() == [1.0, 1.0, 2.0, 2.0]  # a step at the boundary starts the next phase
    assert net(x, torch.full((4,), 750.0), torch.zeros(4)).flatten().tolist() == [1.0] * 4
    assert net.null_condition(torch.ones(2)).tolist() == [-1.0, -1.0]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("phased-dmd-cache")))


def test_training_rollout_is_the_evaluation_sampler(task):
    m = PhasedDMD(PhasedDMD.Params())
    teacher = task.teacher()
    student = m.init_student(teacher, task.student(0), None)
    assert student.sampler.kind == "ode" and student.sampler.timesteps == (1.0, 0.75, 0.5, 0.25)
    assert student.net.expert_index(student.schedule.model_time(torch.tensor(m.times))).tolist() == [0, 0, 1, 1]
    for e in student.net.experts:  # every expert starts as the teacher
        assert all(torch.equal(a, b) for a, b in zip(e.state_dict().values(), teacher.net.state_dict().values()))
    z, cond = torch.randn(3, 3, task.image_size, task.image_size), torch.tensor([0, 1, 2])
    states = m.rollout(student, z, cond, 4)
    with torch.no_grad():
        assert torch.allclose(states[-1], student.sample(z, cond), atol=1e-5)
        # truncation at phase 1's first step: its prediction jumps from t = 1 to the phase end t = 0.5:
        # x = 0.5 x0 + 0.5 eps of the step-0 prediction (flow: alpha = sigma = 0.5)
        torch.manual_seed(0)
        while True:
            anchor, x0, j = m.generator_output(student, states, 0, cond)
            if j == 0:
                break
        x0_0, eps_0 = student.x0_eps(states[0], torch.ones(3), cond)
        assert torch.allclose(anchor, 0.5 * x0_0 + 0.5 * eps_0, atol=1e-5) and torch.allclose(x0, x0_0)
        # at phase 1's last step the jump is the sampler's own step: the stored phase end
        while j != 1:
            anchor, x0, j = m.generator_output(student, states, 0, cond)
        assert torch.allclose(anchor, states[2], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def test_progressive_phases_step_only_their_own_expert_and_fake(task):
    method = PhasedDMD(PhasedDMD.Params())
    student = task.student(0)
    snaps = []

    def snapshot(step, total, losses):
        nets = [*student.net.experts, *method.fakes]
        snaps.append((step, sorted(losses), [_params(n) for n in nets]))

    cfg = replace(task.training(), steps=12, batch_size=4)
    model, result = train(method, task, student, task.teacher(), cfg, seed=0, on_step=snapshot)
    assert [g["steps"] for g in result.generations] == [6, 6]
    assert result.updates == {"student": 3, "fake": 12}  # generator at harness steps 0, 5 (phase 1) and 10 (2)
    assert [e["phase"] for e in result.loss_log] == [1.0] * 6 + [2.0] * 6
    assert [s for s, keys, _ in snaps if "student" in keys] == [1, 6, 11]
    for (step, keys, before), (_, _, after) in zip(snaps, snaps[1:]):
        # after harness step `step` (1-based), step step+1 runs: phase 1 for steps 1..6, phase 2 for 7..12
        moved = [_changed(b, a) for b, a in zip(before, after)]  # expert 1, expert 2, fake 1, fake 2
        phase = 0 if step + 1 <= 6 else 1
        assert moved[2 + phase] and not moved[3 - phase], f"fake networks at step {step + 1}: {moved}"
        assert not moved[1 - phase], f"the other phase's expert moved at step {step + 1}: {moved}"
        assert moved[phase] == (step % 5 == 0), f"expert {phase + 1} at step {step + 1}: {moved}"
    # evaluation samples with the trained chain: 4 deterministic steps through both experts
    assert model is student and model.sampler.kind == "ode" and model.steps_options == (4,)
    assert model.sampler.timesteps == (1.0, 0.75, 0.5, 0.25) and model.sampler.nfe == 4
    assert result.teacher_examples == 3 * 4 * 2  # the guided teacher runs only on generator steps


def test_resume_across_the_phase_boundary_is_exact(task, tmp_path):
    cfg = replace(task.training(), steps=12, batch_size=4)
    full_model, full = train(PhasedDMD(PhasedDMD.Params()), task, task.student(0), task.teacher(), cfg, seed=0)
    ckpt = tmp_path / "state.pt"

    def stop_after_7(step, total, losses):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the last checkpoint is at step 6: the start of phase 2
        train(PhasedDMD(PhasedDMD.Params()), task, task.student(0), task.teacher(), cfg, seed=0,
              checkpoint_path=ckpt, checkpoint_every=2, on_step=stop_after_7)
    method = PhasedDMD(PhasedDMD.Params())
    model, resumed = train(method, task, task.student(0), task.teacher(), cfg, seed=0, checkpoint_path=ckpt,
                           checkpoint_every=2)
    assert resumed.resumed_from_step == 6 and resumed.updates == full.updates
    assert method.times == (1.0, 0.75, 0.5, 0.25)
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_alternating_schedule_without_truncation_runs_on_geneval(tmp_path_factory):
    # GenEval's prompts are token-id conditions [B, L]; the code's alternating schedule flips the phase with every
    # generator update: harness steps 0-4 train phase 1 (generator at step 0), step 5 phase 2 (generator at 5)
    from bench.tasks.geneval import GenEval

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1, 4]),
                   TaskEnv("smoke", GenEval.subtasks[0], None, tmp_path_factory.mktemp("phased-dmd-geneval")))
    cfg = replace(task.training(), steps=6, batch_size=4)
    method = PhasedDMD(PhasedDMD.Params(schedule="alternating", truncation=False))
    model, result = train(method, task, task.student(0), task.teacher(), cfg, seed=0)
    assert result.updates == {"student": 2, "fake": 6} and len(result.generations) == 1
    assert [e["phase"] for e in result.loss_log] == [1.0] * 5 + [2.0]
    assert [e["gradient_step"] for e in result.loss_log if "student" in e] == [0.0, 2.0]  # each phase's first step
    assert model.sampler.timesteps == (1.0, 0.75, 0.5, 0.25)
