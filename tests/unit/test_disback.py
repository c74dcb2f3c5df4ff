"""DisBack (methods/diffusion/disback.py): the budget split, the degradation path (how many checkpoints, saved after
which updates) and the backtracking schedule (which checkpoint is the real score at which step) worked out by hand;
the DM loss against the moving target on tiny tensors; and, in the real training loop, the frozen generator of
the degradation stage, the recorded path and the targets actually used, and exact resume before, at and after the
stage boundary; plus a run on geneval."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.api import TaskEnv
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.disback import DisBack, disback_plan
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# The budget split and the schedule, by hand
# --------------------------------------------------------------------------------------------------


def test_default_plan_at_the_full_tier_by_hand():
    # S = 2000: D = round(0.01 * 2000) = 20 degradation steps; n = min(10, 20, 1980) = 10 checkpoints, saved after
    # updates round(i * 20 / 10) = 2, 4, ..., 20; B = 1980; I = round(0.01 * 1980) = round(19.8) = 20
    p = DisBack.Params()
    plan = disback_plan(2000, p.degradation_fraction, p.path_checkpoints, p.interval_fraction)
    assert plan.degradation_steps == 20 and plan.backtracking_steps == 1980
    assert plan.save_at == (2, 4, 6, 8, 10, 12, 14, 16, 18, 20) and plan.interval == 20
    # the fake starts as s'_10; targets s'_9 (steps 0..19), s'_8 (20..39), ..., s'_1 (160..179), then the teacher
    assert [plan.target_at(k) for k in (0, 19, 20, 39, 40, 159, 160, 179, 180, 1979)] == [9, 9, 8, 8, 7, 2, 1, 1, 0, 0]
    assert plan.schedule()[0] == {"target": 9, "from": 0, "to": 19}
    assert plan.schedule()[-1] == {"target": 0, "from": 180, "to": 1979}


def test_default_plan_at_the_small_and_smoke_tiers_by_hand():
    p = DisBack.Params()
    # S = 300: D = round(3.0) = 3, n = min(10, 3, 297) = 3 checkpoints after updates 1, 2, 3; I = round(2.97) = 3:
    # s'_2 for steps 0..2, s'_1 for 3..5, the teacher from 6
    plan = disback_plan(300, p.degradation_fraction, p.path_checkpoints, p.interval_fraction)
    assert (plan.degradation_steps, plan.save_at, plan.interval) == (3, (1, 2, 3), 3)
    assert [plan.target_at(k) for k in range(8)] == [2, 2, 2, 1, 1, 1, 0, 0]
    # S = 20: D = max(1, round(0.2)) = 1, one checkpoint (the fake itself), the teacher from the first step
    plan = disback_plan(20, p.degradation_fraction, p.path_checkpoints, p.interval_fraction)
    assert (plan.degradation_steps, plan.save_at, plan.backtracking_steps) == (1, (1,), 19)
    assert plan.target_at(0) == 0
    # S = 1: no degradation stage at all
    assert disback_plan(1, 0.01, 10, 0.01).degradation_steps == 0
    assert [g.steps for g in DisBack(p).generations(1)] == [1]
    assert [g.steps for g in DisBack(p).generations(300)] == [3, 297]


def test_plan_clamps_by_hand():
    # S = 8, 50% degradation: D = 4, B = 4, n = 2 (saved after updates 2, 4); I = round(0.9 * 4) = 4 would leave the
    # teacher no step ((n - 1) * I = 4 >= B), so I = (B - 1) // (n - 1) = 3: s'_1 for steps 0..2, the teacher at 3
    plan = disback_plan(8, 0.5, 2, 0.9)
    assert (plan.degradation_steps, plan.save_at, plan.interval) == (4, (2, 4), 3)
    assert [plan.target_at(k) for k in range(4)] == [1, 1, 1, 0]
    # S = 4, 75% degradation: D = 3 but B = 1, so n = min(10, 3, 1) = 1: straight to the teacher
    plan = disback_plan(4, 0.75, 10, 0.01)
    assert (plan.degradation_steps, plan.save_at, plan.backtracking_steps) == (3, (3,), 1)
    assert plan.target_at(0) == 0


def test_params_refuse_a_walk_that_never_reaches_the_teacher_and_unsampled_steps():
    with pytest.raises(ValueError, match="must reach the teacher"):
        DisBack.Params(path_checkpoints=11, interval_fraction=0.1)  # 10 targets x 10% = the whole stage
    DisBack.Params(path_checkpoints=10, interval_fraction=0.1)  # 9 x 10%: the teacher gets the last 10%
    from bench.tasks.coco_fid import CocoFID

    msg = DisBack.check_task(DisBack.Params(steps=2), "coco_fid", CocoFID.Params(nfe=[1, 4]))
    assert msg and "disback samples at exactly its trained `steps`=2" in msg
    assert DisBack.check_task(DisBack.Params(), "coco_fid", CocoFID.Params(nfe=[1, 4])) is None


# --------------------------------------------------------------------------------------------------
# The DM loss against the moving target, on tiny tensors
# --------------------------------------------------------------------------------------------------


class _Affine(nn.Module):
    """x0-prediction net a + b * cond, whatever x_t and t are; the null condition is 0 (so CFG at w gives a + w b c)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a).reshape(1, 1, 1, 2), requires_grad=False)
        self.b = nn.Parameter(torch.tensor(b).reshape(1, 1, 1, 2), requires_grad=False)

    def forward(self, x, t, cond):
        return (self.a + self.b * cond.reshape(-1, 1, 1, 1)).expand_as(x)

    def null_condition(self, cond):
        return torch.zeros_like(cond)


def _gen(a, b):
    return Generator(_Affine(a, b), schedule=Schedule("flow"), prediction="x0", sampler=Sampler())


def test_dm_loss_follows_the_path_target_then_the_teacher_by_hand():
    method = DisBack(DisBack.Params(degradation_fraction=0.25, path_checkpoints=3, interval_fraction=0.2))
    method.generations(12)  # D = 3, checkpoints after 1, 2, 3; I = round(0.2 * 9) = 2: s'_2, s'_2, s'_1, s'_1, teacher
    method.dmd2.fake = nn.ModuleDict({"score": _gen((0.0, -3.0), (0.0, 0.0))})  # D_fake = (0, -3)
    method.dmd2.w = 2.0
    method.path = [(1, _gen((0.5, -1.0), (0.0, 0.0)).state_dict()),  # s'_1: D = (0.5, -1) at any guidance
                   (2, _gen((0.0, 0.0), (0.5, -2.0)).state_dict())]  # s'_2: a + 2 b = (1, -4) guided
    method.target = _gen((9.0, 9.0), (9.0, 9.0))  # the holder; its own weights must never be used
    teacher = _gen((0.0, 0.0), (1.0, -1.0))  # guided at 2: (2, -2)
    passes = []

    def run_teacher(fn, n_examples, index=0):
        passes.append(n_examples)
        return fn(teacher)

    cond = torch.tensor([1.0])

    def grad_at(k):
        x = torch.tensor([[[[1.0, -2.0]]]], requires_grad=True)
        loss = method.dm_step_loss(x, cond, SimpleNamespace(generation_step=k, run_teacher=run_teacher))
        loss.backward()
        return loss.item(), x.grad.flatten().tolist()

    # grad = (p_target - p_fake) / mean|p_target|, p = x - D; p_fake = (1, -2) - (0, -3) = (1, 1); d loss/dx = grad / 2
    # k = 0, 1 -> s'_2: p = (0, 2), mean 1 -> grad (-1, 1); loss = 0.5 * mean(grad^2) = 0.5
    for k in (0, 1):
        loss, g = grad_at(k)
        assert loss == pytest.approx(0.5) and g == pytest.approx([-0.5, 0.5])
    # k = 2, 3 -> s'_1: p = (0.5, -1), mean 0.75 -> grad (-0.5, -2) / 0.75 = (-2/3, -8/3)
    loss, g = grad_at(2)
    assert g == pytest.approx([-1 / 3, -4 / 3]) and loss == pytest.approx(0.5 * (4 / 9 + 64 / 9) / 2)
    # k = 4 -> the teacher: p = (-1, 0), mean 0.5 -> grad (-4, -2); loss = 0.5 * (16 + 4) / 2 = 5
    loss, g = grad_at(4)
    assert loss == pytest.approx(5.0) and g == pytest.approx([-2.0, -1.0])
    # every target is guided (2 examples per sample) and counted as a teacher pass
    assert passes == [2, 2, 2, 2]
    assert method.switches == [(0, 2), (2, 1), (4, 0)]


# --------------------------------------------------------------------------------------------------
# The real training loop
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("disback-cache")))


# D = 3 (checkpoints after updates 1, 2, 3), B = 9, I = 2: targets s'_2 (stage steps 0, 1), s'_1 (2, 3), the teacher
# (4..8); the generator every 2nd stage step: stage steps 0, 2, 4, 6, 8 (harness steps 3, 5, 7, 9, 11)
SMALL = dict(degradation_fraction=0.25, path_checkpoints=3, interval_fraction=0.2, dfake_gen_update_ratio=2)


def _run(task, method, steps=12, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


class _Spy(DisBack):
    """DisBack that keeps a copy of the fake score network after every degradation update."""

    def on_step_end(self, ctx):
        out = super().on_step_end(ctx)
        if ctx.generation == 0:
            self.after = getattr(self, "after", [])
            self.after.append({k: v.detach().cpu().clone() for k, v in self.dmd2.fake["score"].state_dict().items()})
        return out


def test_degradation_then_backtracking_in_the_training_loop(task):
    method = _Spy(DisBack.Params(**SMALL))
    model, result = _run(task, method)
    assert [(g["steps"], g["fresh_student"]) for g in result.generations] == [(3, False), (9, False)]
    # stage 1: the generator is frozen (no student loss), only the fake network (+ GAN head) trains
    stage1 = [e for e in result.loss_log if e["generation"] == 0]
    assert len(stage1) == 3 and all("student" not in e and "fake" in e and "guidance_cls_loss" in e for e in stage1)
    assert [e["step"] for e in result.loss_log if "student" in e] == [4, 6, 8, 10, 12]
    assert result.updates == {"student": 5, "fake": 12}
    # the path: s'_1 and s'_2 kept (s'_3 is the fake network itself), each a step further from the teacher
    assert [u for u, _ in method.path] == [1, 2]
    teacher = task.teacher().state_dict()
    s1, s2 = method.path[0][1], method.path[1][1]
    assert not all(torch.equal(s1[k], teacher[k].cpu()) for k in teacher)
    assert not all(torch.equal(s1[k], s2[k]) for k in s1)
    # ... and each is the fake network exactly after its update: s'_1 after the 1st, s'_2 after the 2nd
    assert len(method.after) == 3
    assert all(torch.equal(s1[k], method.after[0][k]) for k in s1)
    assert all(torch.equal(s2[k], method.after[1][k]) for k in s2)
    # the targets used: s'_2 from stage step 0, s'_1 from 2, the teacher from 4; the holder keeps s'_1's weights
    assert method.switches == [(0, 2), (2, 1), (4, 0)]
    assert all(torch.equal(v.cpu(), s1[k]) for k, v in method.target.state_dict().items())
    # real-score passes on the 5 generator turns (two guided ones on path targets), B = 4 x 2 each
    assert result.teacher_forward_passes == 5 and result.teacher_examples == 5 * 4 * 2
    assert model.sampler.kind == "consistency" and model.sampler.timesteps == (0.999,) and model.steps_options == (1,)
    info = method.record_info()
    assert info["saved_after_updates"] == [1, 2, 3] and info["interval"] == 2 and info["real_guidance"] == 2.0


# the generator every stage step here, so that a resume at stage step 1 needs s'_2 back in the target network
EVERY_STEP = {**SMALL, "dfake_gen_update_ratio": 1}


@pytest.mark.parametrize("every, stop", [(2, 3), (3, 4), (4, 5)],
                         ids=["inside-degradation", "at-the-boundary", "inside-backtracking"])
def test_resume_is_exact_around_the_stage_boundary(task, tmp_path, every, stop):
    full_method = DisBack(DisBack.Params(**EVERY_STEP))
    full_model, full = _run(task, full_method)
    assert full.updates == {"student": 9, "fake": 12}
    ckpt = tmp_path / "state.pt"

    def interrupt(step, total, losses):
        if step == stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(task, DisBack(DisBack.Params(**EVERY_STEP)), checkpoint_path=ckpt, checkpoint_every=every,
             on_step=interrupt)
    method = DisBack(DisBack.Params(**EVERY_STEP))
    model, resumed = _run(task, method, checkpoint_path=ckpt, checkpoint_every=every)
    assert resumed.resumed_from_step == every and resumed.updates == full.updates
    assert resumed.loss_log == full.loss_log and method.switches == full_method.switches
    assert [u for u, _ in method.path] == [1, 2]
    for (_, a), (_, b) in zip(full_method.path, method.path):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(full_method.dmd2.fake.state_dict().values(), method.dmd2.fake.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_runs_on_geneval_prompts(tmp_path_factory):
    from bench.tasks.geneval import GenEval

    gtask = GenEval(GenEval.Params(teacher_steps=2, nfe=[1, 4]),
                    TaskEnv("smoke", GenEval.subtasks[0], None, Path(tmp_path_factory.mktemp("disback-geneval"))))
    # S = 4: D = 2 (checkpoints after 1, 2), B = 2, I = max(1, round(0.5)) = 1: s'_1 at stage step 0, teacher at 1
    method = DisBack(DisBack.Params(degradation_fraction=0.5, path_checkpoints=2, interval_fraction=0.25))
    cfg = replace(gtask.training(), steps=4, batch_size=4)
    model, result = train(method, gtask, gtask.student(0), gtask.teacher(), cfg, seed=0)
    assert result.updates == {"student": 1, "fake": 4}  # the generator at stage step 0 only (every 5th)
    assert [u for u, _ in method.path] == [1] and method.switches == [(0, 1), (1, 0)]
    assert model.sampler.timesteps == (0.999,)
