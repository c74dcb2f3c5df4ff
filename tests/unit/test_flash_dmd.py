"""Flash-DMD (methods/diffusion/flash_dmd.py): the timestep-aware split of the 4-step generator's times, the stage
plan and the RL : distillation alternation, by hand; the step-level DPO term (value, gradient sign, clipping, pair
mask) and the EMA injection on tiny tensors by hand; one distillation step recomputed in plain torch on tiny
linear networks (DM loss at a high-noise step only); one RL step recomputed likewise (candidates, pair, loss);
then the real loop on the smoke tasks: which times the generator is trained at, which networks step in each
stage, the evaluated sampler, the geneval detector reward, and an exact resume inside the joint stage."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench.api import TaskEnv
from bench.methods.diffusion.flash_dmd import (FlashDMD, ema_inject, gaussian_log_ratio, is_distill_step,
                                               preference_pairs, split_generator_steps, stage_plan, step_dpo_loss)
from bench.train import train
from _flow_nets import NULL, flow_gen, hand_u  # tests/unit/_flow_nets.py

pytestmark = pytest.mark.usefixtures("one_thread")

TIMES4 = (0.999, 0.749, 0.499, 0.249)


# --------------------------------------------------------------------------------------------------
# Which generator steps, which stage, which update — by hand
# --------------------------------------------------------------------------------------------------


def test_timestep_aware_split_of_the_four_step_generator():
    m = FlashDMD(FlashDMD.Params())
    assert m.times == TIMES4  # DMD2's 999, 749, 499, 249
    # split at t = 0.5 (SNR 1 of the flow schedule): DM loss at 0.999, 0.749; Pixel-GAN at 0.499, 0.249
    assert (m.high, m.low) == ([0, 1], [2, 3])
    assert split_generator_steps(TIMES4, 0.75) == ([0], [1, 2, 3])  # 0.749 < 0.75
    assert split_generator_steps(TIMES4, 0.749) == ([0, 1], [2, 3])  # a step on the boundary is high-noise
    assert split_generator_steps(TIMES4, 0.3) == ([0, 1, 2], [3])
    assert FlashDMD(FlashDMD.Params(steps=2)).times == (0.999, 0.499)  # 2 steps: one of each
    with pytest.raises(ValueError, match="no low-noise"):
        FlashDMD.Params(split_time=0.1)
    with pytest.raises(ValueError, match="no high-noise"):
        FlashDMD.Params(split_time=0.9995)
    with pytest.raises(ValueError):
        FlashDMD.Params(steps=1)  # one step has no low-noise step to decouple to


def test_stage_plan_and_the_five_to_one_alternation():
    # the ablation's 1k distillation + 2k joint: a third of the budget, then the rest
    assert stage_plan(30) == [("distillation", 10), ("joint RL + distillation", 20)]
    assert stage_plan(9) == [("distillation", 3), ("joint RL + distillation", 6)]
    assert stage_plan(2) == [("distillation", 1), ("joint RL + distillation", 1)]  # round(2/3) = 1
    assert stage_plan(1) == [("distillation", 1)]
    assert stage_plan(30, rl=False) == [("distillation", 30)]
    # stage 1: every update distils; stage 2 (ratio 5): D R R R R R D R R R R R D ...
    assert all(is_distill_step(0, s, 5) for s in range(12))
    assert [is_distill_step(1, s, 5) for s in range(13)] == [True] + [False] * 5 + [True] + [False] * 5 + [True]
    assert [is_distill_step(1, s, 1) for s in range(4)] == [True, False, True, False]  # 1 : 1


# --------------------------------------------------------------------------------------------------
# The RL term on tiny tensors — by hand
# --------------------------------------------------------------------------------------------------


def _img(*values):
    """[B, 1, 1, 2] tensors: each inner pair is one 2-pixel image."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, 2)


def test_step_dpo_value_and_gradient_sign_by_hand():
    # sigma = 1 (2 sigma^2 = 2); the policy mean m = (0.1, 0), the reference mean (0, 0)
    # winner z_w = (0.2, 0): h_w = mean[((0.2 - 0)^2 - (0.2 - 0.1)^2) / 2, 0] = mean[0.015, 0] = 0.0075
    # loser  z_l = (-0.2, 0): h_l = mean[((-0.2)^2 - (-0.3)^2) / 2, 0] = mean[-0.025, 0] = -0.0125
    m = _img((0.1, 0.0)).requires_grad_(True)
    ref = _img((0.0, 0.0))
    std = torch.ones(1)
    h_w = gaussian_log_ratio(_img((0.2, 0.0)), m, ref, std)
    h_l = gaussian_log_ratio(_img((-0.2, 0.0)), m, ref, std)
    assert h_w.item() == pytest.approx(0.0075) and h_l.item() == pytest.approx(-0.0125)
    # beta = 10: beta (h_w - h_l) = 0.2 (inside the clip [log 0.1, log 1.9]); loss = log(1 + e^-0.2) = 0.598139
    loss = step_dpo_loss(h_w, h_l, beta=10.0, clip=0.9)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2))) and loss.item() == pytest.approx(0.598139, abs=1e-6)
    loss.backward()
    # d h_w / d m_1 = (z_w - m) / sigma^2 / 2 elements = 0.05; d h_l / d m_1 = (-0.3) / 2 = -0.15
    # d loss / d H = -beta sigmoid(-0.2) = -4.501660; d loss / d m_1 = -4.501660 * 0.2 = -0.900332
    assert m.grad[0, 0, 0, 0].item() == pytest.approx(-10 * 0.2 / (1 + math.exp(0.2)), abs=1e-6)
    assert m.grad[0, 0, 0, 0].item() == pytest.approx(-0.900332, abs=1e-6)
    assert m.grad[0, 0, 0, 1].item() == 0.0
    # negative gradient: descent moves the mean up, towards the winner (0.2) and away from the loser (-0.2)


def test_step_dpo_clip_and_pair_mask_by_hand():
    # LPO's ratio clamp [1 - 0.1, 1 + 0.1]: h_w = 0.5 -> log 1.1, h_l = -0.5 -> log 0.9; no gradient through it
    h_w = torch.tensor([0.5], requires_grad=True)
    h_l = torch.tensor([-0.5], requires_grad=True)
    loss = step_dpo_loss(h_w, h_l, beta=2.0, clip=0.1)
    z = 2.0 * (math.log(1.1) - math.log(0.9))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-z)))
    loss.backward()
    assert h_w.grad.item() == 0.0 and h_l.grad.item() == 0.0
    # two pairs, the second invalid: the mean is over the first only; H = 0 gives log 2
    h_w = torch.tensor([0.0, 0.05], requires_grad=True)
    h_l = torch.tensor([0.0, 0.0])
    loss = step_dpo_loss(h_w, h_l, beta=1.0, clip=0.1, valid=torch.tensor([True, False]))
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    assert h_w.grad.tolist() == pytest.approx([-0.5, 0.0])  # -beta sigmoid(0) on the valid pair only
    # no valid pair: zero, with a graph
    h = torch.tensor([0.3], requires_grad=True)
    zero = step_dpo_loss(h, h * 0, beta=1.0, clip=0.5, valid=torch.tensor([False]))
    zero.backward()
    assert zero.item() == 0.0 and h.grad.item() == 0.0


def test_preference_pairs_take_best_and_worst_and_drop_ties():
    # k = 3 candidates (rows) for B = 3 samples (columns)
    rewards = torch.tensor([[0.1, 1.0, 0.5],
                            [0.7, 1.0, 0.2],
                            [0.3, 1.0, 0.9]])
    i_w, i_l, valid = preference_pairs(rewards)
    assert i_w.tolist() == [1, 0, 2] and i_l.tolist() == [0, 0, 1]
    assert valid.tolist() == [True, False, True]  # sample 2: all tied (a 0/1 geneval reward often is)
    assert preference_pairs(rewards, margin=0.65)[2].tolist() == [False, False, True]  # 0.6 and 0.7 gaps


def test_ema_injects_generator_weights_into_the_fake_score():
    fake, gen = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        fake.weight.fill_(1.0), fake.bias.fill_(-2.0), gen.weight.fill_(3.0), gen.bias.fill_(0.0)
    ema_inject(fake, gen, 0.9)
    # psi <- 0.9 psi + 0.1 theta: 0.9 + 0.3 = 1.2; -1.8 + 0 = -1.8
    assert fake.weight.item() == pytest.approx(1.2) and fake.bias.item() == pytest.approx(-1.8)
    assert gen.weight.item() == 3.0  # the generator is untouched


# --------------------------------------------------------------------------------------------------
# One training step on tiny linear flow networks, recomputed in plain torch
# --------------------------------------------------------------------------------------------------


def x0_of(z, t, c, a):
    """Flow schedule, velocity prediction: x0 = z - t u."""
    return z - t.view(-1, 1, 1, 1) * hand_u(z, t, c, a)


def col(v):
    return v.view(-1, 1, 1, 1)


class FakeCtx(SimpleNamespace):
    def run_teacher(self, fn, n_examples):
        self.examples.append(n_examples)
        with torch.no_grad():
            return fn(self.teacher)


def _method(a_fake=0.1, **kw):
    m = FlashDMD(FlashDMD.Params(gan=False, **kw))
    ctx = FakeCtx(student=flow_gen(-0.2), teacher=flow_gen(0.3), examples=[], generation=0, generation_step=0,
                  task=SimpleNamespace(params=SimpleNamespace(guidance=2.0)))
    m.generations(9)
    m.create_modules(ctx)
    with torch.no_grad():
        m.fake.net.a.fill_(a_fake)  # a fake score that has drifted from the teacher
    return m, ctx


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_distillation_step_is_the_dm_loss_at_one_high_noise_step_by_hand(seed):
    m, ctx = _method(rl=False)
    m.setup(ctx)
    x0 = torch.randn(4, 1, 1, 2, generator=torch.Generator().manual_seed(7))
    c = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(seed)
    losses = m.training_step({"x0": x0, "cond": c, "index": torch.arange(4)}, ctx)
    losses["student"].backward()
    torch.manual_seed(seed)  # the same draws, in the module's order
    noise = torch.randn_like(x0)
    k = int(torch.randint(0, 2, (1,)).item())  # backward simulation over the 2 high-noise steps only
    z = noise
    if k == 1:  # one step of the student's own chain: x0 at 0.999, re-noised to 0.749
        z = 0.251 * x0_of(noise, torch.full((4,), 0.999), c, -0.2) + 0.749 * torch.randn_like(noise)
    t = torch.full((4,), TIMES4[k])
    x = x0_of(z, t, c, -0.2)
    tau = torch.randint(20, 981, (4,)).float() / 1000  # DM noise levels U{20..980} / 1000
    x_t = (1 - col(tau)) * x + col(tau) * torch.randn_like(x)
    d_fake = x0_of(x_t, tau, c, 0.1)
    u_c, u_n = hand_u(x_t, tau, c, 0.3), hand_u(x_t, tau, torch.full_like(c, NULL), 0.3)
    d_real = x_t - col(tau) * (u_n + 2.0 * (u_c - u_n))  # the teacher guided at w = 2
    p_real, p_fake = x - d_real, x - d_fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert losses["student"].item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-5)
    # d loss / d a = sum(grad / numel * dx/da), dx/da = -t z (x = z - t (a z + ...))
    assert ctx.student.net.a.grad.item() == pytest.approx((grad * (-col(t) * z)).sum().item() / 8, rel=1e-4)
    # the fake score's denoising loss on sg(x): flow target eps - x at k / 1000, k ~ U{0..999}
    tf = torch.randint(0, 1000, (4,)).float() / 1000
    e2 = torch.randn_like(x)
    pred = hand_u((1 - col(tf)) * x + col(tf) * e2, tf, c, 0.1)
    assert losses["fake"].item() == pytest.approx((pred - (e2 - x)).pow(2).mean().item(), rel=1e-5)
    assert set(losses) == {"student", "fake"}  # gan=False: no discriminator
    assert m._last["dm_step"] == TIMES4[k] and m._last["distill_update"] == 1.0
    assert ctx.examples == [8]  # the guided real score: conditional and null halves


def test_rl_step_recomputed_by_hand():
    m, ctx = _method(rl_candidates=3, rl_beta=50.0, rl_clip=0.5)
    # rewards by candidate (rows) for each of 2 samples: sample 0 prefers candidate 2 over 0, sample 1 ties
    table = torch.tensor([[0.1, 0.5], [0.4, 0.5], [0.9, 0.5]])
    m.reward_fn = lambda x, batch, c: table.reshape(-1)
    m.setup(ctx)
    ctx.generation, ctx.generation_step = 1, 1  # stage 2, an RL update
    m.on_generation_start(1, ctx)  # the reference: the generator at the start of stage 2 ...
    with torch.no_grad():
        ctx.student.net.a.fill_(-0.25)  # ... which has since moved
    x0 = torch.randn(2, 1, 1, 2, generator=torch.Generator().manual_seed(3))
    c = torch.tensor([1, 0])
    torch.manual_seed(11)
    losses = m.training_step({"x0": x0, "cond": c, "index": torch.arange(2)}, ctx)
    assert set(losses) == {"student"}  # RL updates step only the generator
    losses["student"].backward()
    torch.manual_seed(11)
    noise = torch.randn_like(x0)
    j = int(torch.randint(0, 2, (1,)).item())  # a high-noise step
    z = noise
    if j == 1:
        z = 0.251 * x0_of(noise, torch.full((2,), 0.999), c, -0.25) + 0.749 * torch.randn_like(noise)
    t = torch.full((2,), TIMES4[j])
    s = TIMES4[j + 1]
    a_s, sig = 1 - s, s
    mu, mu_ref = x0_of(z, t, c, -0.25), x0_of(z, t, c, -0.2)
    eps = torch.randn(3, 2, 1, 1, 2)
    cands = a_s * mu.unsqueeze(0) + sig * eps
    # pair: sample 0 -> (w, l) = (2, 0); sample 1 -> tie, dropped
    z_w, z_l = cands[2, 0], cands[0, 0]

    def h(zz):  # log p_theta - log p_ref, mean over the 2 elements
        return (((zz - a_s * mu_ref[0]) ** 2 - (zz - a_s * mu[0]) ** 2) / (2 * sig ** 2)).mean()

    hw, hl = h(z_w).clamp(math.log(0.5), math.log(1.5)), h(z_l).clamp(math.log(0.5), math.log(1.5))
    expected = -torch.nn.functional.logsigmoid(50.0 * (hw - hl))
    assert losses["student"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert m._last["rl_pairs"] == 1.0 and m._last["rl_step"] == TIMES4[j]
    assert m._last["reward"] == pytest.approx(table.mean().item())
    assert ctx.examples == []  # an RL update runs no teacher (the reward stub here neither)


# --------------------------------------------------------------------------------------------------
# The real loop on the smoke tasks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("flash-dmd-coco")))


def _run(task, method, steps, student=None, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, student or task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_joint_schedule_networks_and_trained_times_in_the_loop(coco):
    student = coco.student(0)
    calls: list[tuple[float, bool]] = []  # (t, with gradient) of every student-network call

    def spy(module, args, output):
        calls.append((round(float(args[1][0]) / 1000, 3), torch.is_grad_enabled()))

    student.net.register_forward_hook(spy)
    method = FlashDMD(FlashDMD.Params())
    model, result = _run(coco, method, 9, student=student)  # 3 distillation steps, then 6 joint
    assert [g["name"] for g in result.generations] == ["distillation", "joint RL + distillation"]
    assert [e["distill_update"] for e in result.loss_log] == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # D | D R R R R R
    # TTUR 1: the fake score and the discriminator step with every distillation update, never on RL updates
    assert result.updates == {"student": 9, "fake": 4, "disc": 4}
    distill = [e for e in result.loss_log if e["distill_update"]]
    rl = [e for e in result.loss_log if not e["distill_update"]]
    assert all(e["dm_step"] in (0.999, 0.749) and e["gan_step"] in (0.499, 0.249) for e in distill)
    assert all("loss_rl" not in e for e in distill) and all("loss_dm" not in e and "disc" not in e for e in rl)
    assert all(e["rl_step"] in (0.999, 0.749) for e in rl) and any(e["rl_pairs"] > 0 for e in rl)
    # the generator is trained (with gradient) at exactly one high- and one low-noise time per distillation
    # update and at one high-noise time per RL update; everything else it runs is the no-gradient chain
    assert len(calls) > 0 and all(t in TIMES4 for t, _ in calls)
    trained = [t for t, g in calls if g]
    assert len(trained) == 4 * 2 + 5
    assert sorted(set(trained)) == [0.249, 0.499, 0.749, 0.999]
    # the teacher runs only as the real score (guided: B x 2) and the coco stand-in reward (10 classes x 4 x 4)
    assert result.teacher_forward_passes == 4 + 5
    assert result.teacher_examples == 4 * 8 + 5 * 10 * 16
    # the Pixel-GAN: trainable heads only (one per encoder level: 2 down blocks + the mid block), frozen encoder
    assert {k.split(".")[0] for k in method.disc.state_dict()} == {"heads"} and len(method.disc.heads) == 3
    assert all(not q.requires_grad for q in method.disc._enc[0].parameters())
    info = method.record_info()
    assert info["reward"] == "classifier" and info["high_noise_steps"] == [0.999, 0.749]
    # the reference policy is frozen at stage 2's start; the generator has moved on
    assert any(not torch.equal(a, b) for a, b in zip(method.ref.net.state_dict().values(),
                                                     model.net.state_dict().values()))
    assert all(not q.requires_grad for q in method.ref.net.parameters())
    # evaluated as trained: 4 consistency jumps at DMD2's times, no guidance
    assert model.sampler.kind == "consistency" and model.sampler.timesteps == TIMES4 and model.sampler.nfe == 4
    assert model.steps_options == (4,)
    images, _ = coco.generate(model, 4, n=8)
    assert images.shape == (8, 16, 16, 3)


def test_resume_inside_the_joint_stage_is_exact(coco, tmp_path):
    # 9 steps; the checkpoint at step 7 is inside stage 2 (reference policy, fake score, heads, optimisers)
    full_model, full = _run(coco, FlashDMD(FlashDMD.Params()), 9)
    ckpt = tmp_path / "state.pt"
    _run(coco, FlashDMD(FlashDMD.Params()), 9, checkpoint_path=ckpt, checkpoint_every=7)
    assert torch.load(ckpt, weights_only=False)["step"] == 7
    model, resumed = _run(coco, FlashDMD(FlashDMD.Params()), 9, checkpoint_path=ckpt, checkpoint_every=7)
    assert resumed.resumed_from_step == 7 and resumed.updates == full.updates
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_geneval_reward_is_the_detector_and_full_tier_is_refused(tmp_path_factory):
    from bench.tasks.geneval import GenEval

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1, 4]),
                   TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("flash-dmd-ge")))
    method = FlashDMD(FlashDMD.Params(rl_ratio=1))
    _, result = _run(task, method, 3)  # 1 distillation step, then D R
    assert method.record_info()["reward"] == "geneval"
    rl = [e for e in result.loss_log if not e["distill_update"]]
    assert len(rl) == 1 and 0.0 <= rl[0]["reward"] <= 1.0
    assert FlashDMD(FlashDMD.Params()).unsupported(SimpleNamespace(tier="full", name="geneval"))
    assert FlashDMD(FlashDMD.Params(rl=False)).unsupported(SimpleNamespace(tier="full", name="geneval")) is None
    from bench.tasks.coco_fid import CocoFID

    msg = FlashDMD.check_task(FlashDMD.Params(), "coco_fid", CocoFID.Params(nfe=[1, 2]))
    assert msg and "`steps`=4" in msg
