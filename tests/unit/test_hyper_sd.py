"""Hyper-SD (methods/diffusion/hyper_sd.py): the TSCD segment boundaries and target times at k = 8, 4, 2, 1 by
hand, the stage schedule over the budget, the reward-weighted term on tiny tensors, the teacher-classifier
stand-in reward, the TSCD and feedback-stage losses of one training step recomputed in plain torch on tiny linear
networks; then the real loop on the smoke tasks: which stages and networks step, the teacher accounting, the
evaluated sampler (one student at 1/2/4/8 steps), the geneval detector reward, and an exact resume."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench.api import TaskEnv
from bench.methods.diffusion.hyper_sd import (HyperSD, geneval_reward, geneval_train_metadata,
                                              reward_weighted_loss, segment_boundaries, segment_end, stage_plan,
                                              teacher_class_posterior, tscd_times)
from bench.train import train
from _flow_nets import NULL, flow_gen, hand_u  # tests/unit/_flow_nets.py

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# Segments, target times, stages
# --------------------------------------------------------------------------------------------------


def test_segment_boundaries_by_hand():
    assert segment_boundaries(8) == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    assert segment_boundaries(4) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert segment_boundaries(2) == pytest.approx([0, 0.5, 1.0])
    assert segment_boundaries(1) == pytest.approx([0, 1.0])


@pytest.mark.parametrize("k, ts, ends", [
    # each t maps to the lower boundary of the segment (b_j, b_j+1] that holds it; a boundary maps one down
    (8, [1.0, 0.5, 0.14, 0.125, 0.02], [0.875, 0.375, 0.125, 0.0, 0.0]),
    (4, [1.0, 0.76, 0.75, 0.5, 0.26, 0.02], [0.75, 0.75, 0.5, 0.25, 0.25, 0.0]),
    (2, [1.0, 0.52, 0.5, 0.1], [0.5, 0.5, 0.0, 0.0]),
    (1, [1.0, 0.5, 0.02], [0.0, 0.0, 0.0]),  # one segment: ordinary consistency distillation to x0
])
def test_target_time_is_the_segment_lower_boundary(k, ts, ends):
    assert segment_end(torch.tensor(ts), k).tolist() == pytest.approx(ends)


def test_grid_times_and_the_teacher_step_stays_in_its_segment():
    # N = 50: t = (index + 1) / 50, the teacher steps to t - 0.02 unless that leaves the segment
    t, prev, end = tscd_times(torch.tensor([49, 37, 6, 0]), 50, 4)
    assert t.tolist() == pytest.approx([1.0, 0.76, 0.14, 0.02])
    assert end.tolist() == pytest.approx([0.75, 0.75, 0.0, 0.0])
    assert prev.tolist() == pytest.approx([0.98, 0.75, 0.12, 0.0])  # 0.76 - 0.02 = 0.74 < 0.75: clipped
    t, prev, end = tscd_times(torch.tensor([6]), 50, 8)  # t = 0.14 in (0.125, 0.25]: prev = max(0.12, 0.125)
    assert end.item() == pytest.approx(0.125) and prev.item() == pytest.approx(0.125)


def test_stage_schedule_over_the_budget():
    # 6 stages share 20 steps equally, the earlier ones taking the remainder: 4 4 3 3 3 3
    plan, dropped = stage_plan(20)
    assert [(s.kind, s.k, s.steps) for s in plan] == [("tscd", 8, 4), ("tscd", 4, 4), ("tscd", 2, 3),
                                                       ("tscd", 1, 3), ("feedback", 1, 3), ("score", 1, 3)]
    assert dropped == []
    assert [s.steps for s in stage_plan(300)[0]] == [50] * 6
    # a budget shorter than the stages keeps the last ones
    plan, dropped = stage_plan(4)
    assert [(s.kind, s.k, s.steps) for s in plan] == [("tscd", 2, 1), ("tscd", 1, 1), ("feedback", 1, 1),
                                                       ("score", 1, 1)]
    assert dropped == ["TSCD k=8", "TSCD k=4"]
    plan, _ = stage_plan(7, (4, 2, 1), feedback=False, score=True)  # 7 = 2 + 2 + 2 + 1
    assert [(s.kind, s.k, s.steps) for s in plan] == [("tscd", 4, 2), ("tscd", 2, 2), ("tscd", 1, 2), ("score", 1, 1)]
    gens = HyperSD(HyperSD.Params()).generations(20)
    assert [g.steps for g in gens] == [4, 4, 3, 3, 3, 3] and not any(g.fresh_student for g in gens)
    assert gens[0].name == "TSCD k=8" and gens[-1].name.startswith("score distillation")


def test_params_refuse_bad_segments_and_step_counts():
    with pytest.raises(ValueError):
        HyperSD.Params(segments=(4, 8, 1))
    with pytest.raises(ValueError):
        HyperSD.Params(segments=(8, 4, 2))  # must end with global consistency (k = 1)
    with pytest.raises(ValueError):
        HyperSD.Params(sample_steps=3)
    assert HyperSD.check_task(HyperSD.Params(), "coco_fid", SimpleNamespace(nfe=[16]))
    assert HyperSD.check_task(HyperSD.Params(), "coco_fid", SimpleNamespace(nfe=[1, 4])) is None
    full = SimpleNamespace(name="coco_fid", tier="full", net_condition=lambda: {})
    assert "reward_weight=0" in HyperSD(HyperSD.Params()).unsupported(full)
    assert HyperSD(HyperSD.Params(reward_weight=0)).unsupported(full) is None


# --------------------------------------------------------------------------------------------------
# Reward terms on tiny tensors
# --------------------------------------------------------------------------------------------------


def _img(*values):
    """[B, 1, 1, 2] tensors: each inner pair is one 2-pixel image."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, 2)


def test_reward_weighted_loss_by_hand():
    # sample 1: pred - target = (1, -1) -> mean square 1, reward 1; sample 2: (2, 0) -> 2, reward 0.5
    # loss = (1 * 1 + 0.5 * 2) / 2 = 1
    pred = _img((1.0, 0.0), (3.0, 1.0)).requires_grad_(True)
    target = _img((0.0, 1.0), (1.0, 1.0)).requires_grad_(True)
    loss = reward_weighted_loss(pred, target, torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    # d/dpred = r_i * 2 (pred - target) / 2 pixels / 2 samples: (0.5, -0.5) and 0.5 * (1, 0)
    assert torch.allclose(pred.grad, _img((0.5, -0.5), (0.5, 0.0)))
    assert target.grad is None  # the sample is a fixed regression target
    assert reward_weighted_loss(pred, target, torch.zeros(2)).item() == 0.0  # reward 0: no pull


def test_teacher_class_posterior_by_hand():
    teacher = flow_gen(0.3)
    x = _img((1.0, -1.0), (0.0, 0.5))
    noise = _img((0.2, 0.4), (-1.0, 0.0))
    c = torch.tensor([1, 0])
    p = teacher_class_posterior(teacher, x, c, 2, t=0.5, noise=noise)
    # by hand: x_t = 0.5 x + 0.5 noise; D_c' = x_t - 0.5 u(x_t, 0.5, c'); error_c' = sum (D_c' - x)^2
    x_t = 0.5 * x + 0.5 * noise
    half = torch.full((2,), 0.5)
    errs = torch.stack([((x_t - 0.5 * hand_u(x_t, half, torch.full((2,), k), 0.3)) - x).pow(2).flatten(1).sum(1)
                        for k in range(2)])
    expected = torch.softmax(-errs, 0)[c, torch.arange(2)]
    assert torch.allclose(p, expected, atol=1e-6)
    assert 0 < p.min() and p.max() < 1


# --------------------------------------------------------------------------------------------------
# One training step, recomputed by hand
# --------------------------------------------------------------------------------------------------


class FakeCtx(SimpleNamespace):
    def run_teacher(self, fn, n_examples):
        self.examples.append(n_examples)
        with torch.no_grad():
            return fn(self.teacher)


def hand_tscd(x0, c, index, noise, a_s, a_t, a_e, n, k, w):
    """The TSCD loss in plain torch: flow x0 = z - t u, eps = z + (1 - t) u; DDIM to t_end: (1 - t_end) x0 + t_end eps."""
    t = (index + 1).float() / n
    end = torch.floor((t - 1e-9) * k).clamp(min=0) / k  # the segment's lower boundary, written with floor
    prev = torch.maximum(t - 1.0 / n, end)
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    z = (1 - col(t)) * x0 + col(t) * noise
    u_s = hand_u(z, t, c, a_s)
    pred = (1 - col(end)) * (z - col(t) * u_s) + col(end) * (z + (1 - col(t)) * u_s)
    u_c, u_n = hand_u(z, t, c, a_t), hand_u(z, t, torch.full_like(c, NULL), a_t)
    u = u_n + w * (u_c - u_n)
    x_prev = (1 - col(prev)) * (z - col(t) * u) + col(prev) * (z + (1 - col(t)) * u)
    u_e = hand_u(x_prev, prev, c, a_e)
    target = (1 - col(end)) * (x_prev - col(prev) * u_e) + col(end) * (x_prev + (1 - col(prev)) * u_e)
    target = torch.where(col(prev) <= col(end), x_prev, target)  # the step reached the boundary: x_prev itself
    return (pred - target).pow(2).mean(), (prev <= end).any()


def _method(**kw):
    m = HyperSD(HyperSD.Params(num_ddim_timesteps=10, **kw))
    student, teacher = flow_gen(-0.2), flow_gen(0.3)
    ctx = FakeCtx(student=student, teacher=teacher, examples=[], generation=0,
                  task=SimpleNamespace(params=SimpleNamespace(guidance=2.0)))
    m.generations(6)  # one step per stage: k = 8, 4, 2, 1, feedback, score
    m.create_modules(ctx)
    with torch.no_grad():
        m.target.net.a.fill_(-0.5)  # an EMA target that has drifted from the student
    return m, ctx


def test_tscd_step_loss_by_hand_at_k_4():
    m, ctx = _method()
    m.reward_fn = lambda x, batch, c: torch.ones(x.shape[0])  # not used in a TSCD stage
    m.setup(ctx)
    ctx.generation = 1  # the k = 4 stage
    x0 = torch.randn(8, 1, 1, 2, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    torch.manual_seed(3)
    losses = m.training_step({"x0": x0, "cond": c, "index": torch.arange(8)}, ctx)
    torch.manual_seed(3)  # the same draws: grid index, then noise
    index = torch.randint(0, 10, (8,))
    noise = torch.randn_like(x0)
    expected, at_boundary = hand_tscd(x0, c, index, noise, -0.2, 0.3, -0.5, 10, 4, 2.0)
    assert set(losses) == {"student"}  # no fake-score loss outside the score stage
    assert losses["student"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert at_boundary  # these draws include a teacher step clipped at a segment boundary
    assert ctx.examples == [16]  # the guided teacher: conditional and null halves
    assert m._last["stage_k"] == 4.0


def test_feedback_step_adds_the_reward_weighted_term_by_hand():
    m, ctx = _method(reward_weight=0.7)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    m.reward_fn = lambda x, batch, c: rewards
    m.setup(ctx)
    ctx.generation = 4  # the feedback stage (k = 1)
    x0 = torch.randn(4, 1, 1, 2, generator=torch.Generator().manual_seed(2))
    c = torch.tensor([1, 0, 1, 1])
    torch.manual_seed(4)
    loss = m.training_step({"x0": x0, "cond": c, "index": torch.arange(4)}, ctx)["student"]
    torch.manual_seed(4)  # draws: TSCD index and noise, the generator's noise, the re-noising index and noise
    index = torch.randint(0, 10, (4,))
    noise = torch.randn_like(x0)
    z = torch.randn_like(x0)
    index2 = torch.randint(0, 10, (4,))
    noise2 = torch.randn_like(x0)
    tscd, _ = hand_tscd(x0, c, index, noise, -0.2, 0.3, -0.5, 10, 1, 2.0)
    x_hat = z - hand_u(z, torch.ones(4), c, -0.2)  # the one-step sample from t = 1
    t2 = (index2 + 1).float() / 10
    z2 = (1 - t2.view(-1, 1, 1, 1)) * x_hat + t2.view(-1, 1, 1, 1) * noise2
    pred = z2 - t2.view(-1, 1, 1, 1) * hand_u(z2, t2, c, -0.2)
    rw = (rewards * (pred - x_hat).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx((tscd + 0.7 * rw).item(), rel=1e-5)
    assert m._last["reward"] == pytest.approx(rewards.mean().item())


# --------------------------------------------------------------------------------------------------
# The real loop on the smoke tasks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("hyper-sd-coco")))


def _run(task, method, steps, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_stages_networks_and_sampler_in_the_loop(coco):
    method = HyperSD(HyperSD.Params())
    model, result = _run(coco, method, 6)  # one step per stage
    assert [g["name"] for g in result.generations][:4] == ["TSCD k=8", "TSCD k=4", "TSCD k=2", "TSCD k=1"]
    assert [e["stage_k"] for e in result.loss_log] == [8, 4, 2, 1, 1, 1]
    assert ["reward" in e for e in result.loss_log] == [False] * 4 + [True, True]
    assert ["loss_dm" in e for e in result.loss_log] == [False] * 5 + [True]
    assert result.updates == {"student": 6, "fake": 1}  # the fake score trains in the score stage only
    # teacher passes: a guided TSCD step every step (6 x 4 x 2 examples), the classifier reward in the last two
    # stages (2 x 10 classes x 4), the guided real score once (4 x 2)
    assert result.teacher_forward_passes == 6 + 2 + 1
    assert result.teacher_examples == 48 + 80 + 8
    assert method.record_info()["reward"] == "classifier"
    # one student, evaluated at every offered step count: consistency jumps at the trailing grid, no guidance
    assert model.sampler.kind == "consistency" and model.sampler.steps == 1 and model.sampler.nfe == 1
    assert model.steps_options == (1, 2, 4, 8) and not model.supports_steps(3)
    assert model.sampler_at(4).timesteps == pytest.approx((1.0, 0.75, 0.5, 0.25))
    assert model.sampler_at(2).timesteps == pytest.approx((1.0, 0.5))
    images, _ = coco.generate(model, 4, n=8)
    assert images.shape == (8, 16, 16, 3)


def test_resume_inside_the_score_stage_is_exact(coco, tmp_path):
    # 12 steps: 2 per stage; the checkpoint at step 11 is inside the score stage (EMA, fake score, optimisers)
    full_model, full = _run(coco, HyperSD(HyperSD.Params()), 12)
    ckpt = tmp_path / "state.pt"
    # a run that leaves its step-11 checkpoint behind (as one killed during step 12 would), then the resumed run
    _run(coco, HyperSD(HyperSD.Params()), 12, checkpoint_path=ckpt, checkpoint_every=11)
    assert torch.load(ckpt, weights_only=False)["step"] == 11
    model, resumed = _run(coco, HyperSD(HyperSD.Params()), 12, checkpoint_path=ckpt, checkpoint_every=11)
    assert resumed.resumed_from_step == 11 and resumed.updates == full.updates == {"student": 12, "fake": 2}
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_geneval_reward_is_the_detector_on_the_training_prompt(tmp_path_factory):
    from bench.tasks.geneval import GenEval, render

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1, 4]), TaskEnv("smoke", "val", None,
                                                                          tmp_path_factory.mktemp("hyper-sd-ge")))
    metas = geneval_train_metadata(task)
    assert [m["prompt"] for m in metas[:3]] and len(metas) == len(task.train_data())
    # ground-truth renders of four training prompts are correct (reward 1); a blank grey canvas is not
    import numpy as np

    imgs = render.render_batch(metas[:4], np.random.default_rng(0), 32)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert geneval_reward(x, metas[:4]).tolist() == [1.0] * 4
    blank = torch.full((1, 3, 32, 32), 0.6 * 2 - 1)
    assert geneval_reward(blank, metas[:1]).tolist() == [0.0]
    # and the loop runs with it: the reward of each feedback/score step is a fraction of correct images
    method = HyperSD(HyperSD.Params())
    _, result = _run(task, method, 6)
    assert method.record_info()["reward"] == "geneval"
    assert all(0.0 <= e["reward"] <= 1.0 for e in result.loss_log if "reward" in e)
