"""MSD (methods/diffusion/msd.py): the partition worked out by hand (class blocks, prompt orthants, the bag of
words), routing of each condition to its group's student, Teacher Score Matching and the per-group DM loss on
tiny tensors recomputed from the formulas in plain torch with stub networks, the unfiltered regression, and two
short runs through the real training loop (stages, TTUR, the routed model's sampler, FLOPs of one image = one
student, the record's parameter counts and partition) on both generative smoke tasks."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.api import TaskEnv
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.msd import MSD, Router, RoutedNet, class_groups, pooled_features, tsm_loss
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


class Scaled(nn.Module):
    """Flow velocity v = a x (a learnable scalar); records the conditions it is called with."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.seen: list[list[int]] = []

    def forward(self, x, timestep, cond, guidance=None):
        self.seen.append(cond.tolist())
        return self.a * x

    def null_condition(self, cond):
        return torch.full_like(cond, 4)  # 4 classes: the null id is 4


def flow_gen(net: nn.Module) -> Generator:
    return Generator(net, schedule=Schedule("flow"), prediction="flow",
                     sampler=Sampler("consistency", steps=1, timesteps=(0.999,)))


# --- partition and routing, by hand ---------------------------------------------------------------------


def test_class_partition_by_hand():
    # 10 classes, 4 students: blocks of 3, 3, 2, 2 consecutive classes (10 mod 4 = 2 blocks one larger)
    assert class_groups(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert class_groups(4, 4) == [[0], [1], [2], [3]]
    assert class_groups(5, 1) == [[0, 1, 2, 3, 4]]
    r = Router.for_classes(10, 4)
    # classes 0 2 3 5 6 7 8 9 and the null id 10 (-> group 0)
    assert r(torch.tensor([0, 2, 3, 5, 6, 7, 8, 9, 10])).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]
    assert r.describe()["groups"] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert not list(r.parameters())  # routing adds no parameters


def test_prompt_quadrants_by_hand():
    # pooled embeddings (one token each): (3, 2), (3, 0), (-1, 2), (-1, 0); mean (1, 1), centred (+-2, +-1):
    # covariance diag(4, 1) -> principal axes e1 then e2 (signed +). group = [x > 0] + 2 [y > 0]
    feats = torch.tensor([[[3.0, 2.0]], [[3.0, 0.0]], [[-1.0, 2.0]], [[-1.0, 0.0]]])
    r = Router.for_prompts(pooled_features(feats, None), 4, None)
    assert torch.allclose(r.mean, torch.tensor([1.0, 1.0]))
    assert torch.allclose(r.axes.abs(), torch.eye(2), atol=1e-6) and (r.axes.diagonal() > 0).all()
    assert r(feats).tolist() == [3, 1, 2, 0]
    # a new prompt at (5, 0.5): centred (4, -0.5) -> x > 0, y < 0 -> group 1
    assert r(torch.tensor([[[5.0, 0.5]]])).tolist() == [1]
    # K = 2: the sign of the first principal coordinate only
    assert Router.for_prompts(pooled_features(feats, None), 2, None)(feats).tolist() == [1, 1, 0, 0]
    with pytest.raises(Exception, match="power of two"):
        Router.for_prompts(pooled_features(feats, None), 3, None)


def test_bag_of_words_of_token_ids_by_hand():
    # ids 0 pad, 1..3 words; [1, 2, pad] -> counts over ids 1..3 = (1, 1, 0) / 2; [2, 2, 3] -> (0, 2, 1) / 3
    f = pooled_features(torch.tensor([[1, 2, 0], [2, 2, 3]]), 4)
    assert torch.allclose(f, torch.tensor([[0.5, 0.5, 0.0], [0.0, 2 / 3, 1 / 3]]))


def test_routed_net_sends_each_row_to_its_groups_student():
    nets = [Scaled(10.0 * (k + 1)) for k in range(2)]  # student 0: v = 10 x, student 1: v = 20 x
    routed = RoutedNet(nets, Router.for_classes(4, 2))  # classes {0, 1} -> 0, {2, 3} -> 1
    x = torch.ones(4, 1, 1, 1)
    out = routed(x, torch.zeros(4), torch.tensor([3, 0, 2, 1]))
    assert out.flatten().tolist() == [20.0, 10.0, 20.0, 10.0]
    assert nets[0].seen == [[0, 1]] and nets[1].seen == [[3, 2]]  # each student sees its own group only
    out.sum().backward()
    assert nets[0].a.grad.item() == 2.0 and nets[1].a.grad.item() == 2.0
    # one image: only its student runs (what the FLOPs/latency probes measure)
    nets[0].seen.clear(), nets[1].seen.clear()
    routed(torch.ones(1, 1, 1, 1), torch.zeros(1), torch.tensor([2]))
    assert nets[0].seen == [] and nets[1].seen == [[2]]


# --- Teacher Score Matching, by hand ----------------------------------------------------------------------


def test_tsm_loss_on_tiny_tensors():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    # group 0 (rows 0, 1): (1 + 4 + 4 + 9) / 4 = 4.5; group 1 (row 2): (4 + 4) / 2 = 4
    parts = tsm_loss(pred, target, torch.tensor([0, 0, 1]), 2)
    assert [p.item() for p in parts] == [4.5, 4.0]


def _stub_ctx(student, teacher, generation=0, generation_step=0, pairs=None):
    def run_teacher(fn, n_examples, index=0):
        with torch.no_grad():
            return fn(teacher)

    return SimpleNamespace(student=student, teacher=teacher, generation=generation, generation_step=generation_step,
                           run_teacher=run_teacher, teacher_pairs=lambda n: pairs)


def test_tsm_step_regresses_each_student_on_the_teacher_for_its_group():
    m = MSD(MSD.Params(students=2, student_size="compact"))
    m.stages = ["teacher score matching", "distribution matching"]
    nets = [Scaled(0.5), Scaled(-1.0)]
    student = flow_gen(RoutedNet(nets, Router.for_classes(4, 2)))
    teacher = flow_gen(Scaled(2.0))
    real = torch.tensor([1.0, -1.0, 0.5, 2.0]).reshape(4, 1, 1, 1)
    cond = torch.tensor([0, 2, 3, 1])  # groups 0, 1, 1, 0
    torch.manual_seed(3)
    loss = m.training_step({"x0": real, "cond": cond}, _stub_ctx(student, teacher))["student"]
    torch.manual_seed(3)  # the same draws: t ~ U(0, 1), eps ~ N(0, 1); x_t = (1 - t) x0 + t eps
    t = torch.rand(4).view(4, 1, 1, 1)
    x_t = (1 - t) * real + t * torch.randn(4, 1, 1, 1)
    a = torch.tensor([0.5, -1.0, -1.0, 0.5]).view(4, 1, 1, 1)  # each row's student
    sq = ((a - 2.0) * x_t) ** 2  # student velocity a x_t vs the teacher's (unguided) 2 x_t
    expected = sq[[0, 3]].mean() + sq[[1, 2]].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert nets[0].seen == [[0, 1]] and nets[1].seen == [[2, 3]]


# --- distribution matching per group, by hand --------------------------------------------------------------


def test_dm_step_each_student_sees_only_its_group():
    m = MSD(MSD.Params(students=2, regression_weight=0.0))
    m.w = 2.0
    nets = [Scaled(0.5), Scaled(-0.5)]
    student = flow_gen(RoutedNet(nets, Router.for_classes(4, 2)))
    teacher = flow_gen(Scaled(0.8))
    fakes = [Scaled(0.3), Scaled(1.2)]
    m.fake = nn.ModuleList([flow_gen(f) for f in fakes])
    real = torch.zeros(4, 1, 1, 2)
    cond = torch.tensor([0, 2, 1, 3])  # groups 0, 1, 0, 1
    torch.manual_seed(7)
    losses = m.training_step({"x0": real, "cond": cond}, _stub_ctx(student, teacher, generation_step=0))
    assert set(losses) == {"student", "fake"}
    # by hand with the same draws: the generator's noise, then the DM step k ~ U{20..980} and its noise
    torch.manual_seed(7)
    z = torch.randn(4, 1, 1, 2)
    a = torch.tensor([0.5, -0.5, 0.5, -0.5]).view(4, 1, 1, 1)
    x = z - 0.999 * a * z  # one flow step at t = 0.999: x0 = x_t - t v, v = a x_t
    t = (torch.randint(20, 981, (4,)).float() / 1000).view(4, 1, 1, 1)
    x_t = (1 - t) * x + t * torch.randn(4, 1, 1, 2)
    d_real = x_t - t * 0.8 * x_t  # guided teacher: cond and null both 0.8 x_t
    c = torch.tensor([0.3, 1.2, 0.3, 1.2]).view(4, 1, 1, 1)  # each row's OWN student's fake score
    d_fake = x_t - t * c * x_t
    p_real, p_fake = x - d_real, x - d_fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    per_group = [0.5 * grad[[0, 2]].pow(2).mean(), 0.5 * grad[[1, 3]].pow(2).mean()]
    assert losses["student"].item() == pytest.approx(sum(per_group).item(), rel=1e-5)
    assert m._last["loss_dm_0"] == pytest.approx(per_group[0].item(), rel=1e-5)
    # the students and the fake scores were each called on their own group's rows only
    assert nets[0].seen == [[0, 1]] and nets[1].seen == [[2, 3]]
    assert fakes[0].seen == [[0, 1], [0, 1]] and fakes[1].seen == [[2, 3], [2, 3]]  # DM grad, then fake loss
    # each student's gradient is that of its own group's mean: d/da_k of 0.5 mean_k (x - sg(x - g))^2
    # = sum over group k's 4 elements of g / 4 * dx/da_k, dx/da_k = -0.999 z
    losses["student"].backward()
    for k, rows in ((0, [0, 2]), (1, [1, 3])):
        expect = (grad[rows] / 4 * (-0.999 * z[rows])).sum()
        assert nets[k].a.grad.item() == pytest.approx(expect.item(), rel=1e-5)


def test_ttur_no_student_loss_off_turn():
    m = MSD(MSD.Params(students=2, regression_weight=0.0))
    student = flow_gen(RoutedNet([Scaled(0.5), Scaled(-0.5)], Router.for_classes(4, 2)))
    m.fake = nn.ModuleList([flow_gen(Scaled(0.3)), flow_gen(Scaled(1.2))])
    batch = {"x0": torch.zeros(2, 1, 1, 2), "cond": torch.tensor([0, 3])}
    out = m.training_step(batch, _stub_ctx(student, flow_gen(Scaled(0.8)), generation_step=3))
    assert set(out) == {"fake"}  # generation step 3 of ratio 5: the fake scores only


def test_regression_is_not_filtered_by_group():
    m = MSD(MSD.Params(students=2))
    nets = [Scaled(0.5), Scaled(-0.5)]
    student = flow_gen(RoutedNet(nets, Router.for_classes(4, 2)))
    # four pairs, all of group 0's classes: still dealt round-robin, pair i -> student i mod 2
    z = torch.tensor([1.0, 2.0, -1.0, 0.5]).reshape(4, 1, 1, 1)
    y = torch.tensor([0.0, 1.0, 1.0, -1.0]).reshape(4, 1, 1, 1)
    pairs = {"noise": z, "image": y, "cond": torch.tensor([0, 1, 0, 1])}
    reg = m.regression(student, _stub_ctx(student, None, pairs=pairs), 4)
    # student 0 on pairs 0, 2: x = (1 - 0.999 * 0.5) z; student 1 on pairs 1, 3: x = (1 + 0.999 * 0.5) z
    x0 = (1 - 0.4995) * z[[0, 2]]
    x1 = (1 + 0.4995) * z[[1, 3]]
    expected = (x0 - y[[0, 2]]).pow(2).mean() + (x1 - y[[1, 3]]).pow(2).mean()
    assert reg.item() == pytest.approx(expected.item(), rel=1e-6)
    assert nets[0].seen == [[0, 0]] and nets[1].seen == [[1, 1]]


def test_generations_and_checks():
    assert [g.steps for g in MSD(MSD.Params(student_size="compact")).generations(20)] == [10, 10]
    same = MSD(MSD.Params())
    assert [g.steps for g in same.generations(20)] == [20] and same.stages == ["distribution matching"]
    from bench.tasks.coco_fid import CocoFID
    from bench.tasks.geneval import GenEval

    msg = MSD.check_task(MSD.Params(), "coco_fid", CocoFID.Params(nfe=[2, 4]))
    assert msg and "coco_fid.nfe" in msg and "one-step" in msg
    assert MSD.check_task(MSD.Params(), "coco_fid", CocoFID.Params(nfe=[1, 4])) is None
    assert "power of two" in MSD.check_task(MSD.Params(students=3), "geneval", GenEval.Params(nfe=[1]))
    assert MSD.check_task(MSD.Params(students=3), "coco_fid", CocoFID.Params(nfe=[1])) is None  # class blocks


# --- the real training loop ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("msd-cache")


def _run(task, method, steps, bs=8):
    cfg = replace(task.training(), steps=steps, batch_size=bs)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0)


def test_compact_students_tsm_then_dm_on_coco_fid(cache):
    from bench.measure.efficiency import forward_flops
    from bench.methods.diffusion.msd import student_view
    from bench.tasks.coco_fid import CocoFID

    task = CocoFID(CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4]), TaskEnv("smoke", "val", None, cache))
    method = MSD(MSD.Params(students=2, student_size="compact"))
    model, result = _run(task, method, 8)
    # TSM 4 steps (students every step, no fake loss), then DM 4 steps: students at DM steps 0 only (ratio 5)
    assert [g["name"] for g in result.generations] == ["teacher score matching", "distribution matching"]
    assert result.updates == {"student": 4 + 1, "fake": 4}
    # TTUR counts DM-stage steps: the generators step on the stage's first step (harness step 5 of 8)
    assert [e["step"] for e in result.loss_log if e.get("generation") == 1 and "student" in e] == [5]
    info = method.record_info()
    per = info["params_per_student"]
    assert len(per) == 2 and info["params_total"] == sum(per) == sum(p.numel() for p in model.parameters())
    assert per[0] < info["teacher_params"]  # compact students
    assert info["partition"]["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # the evaluated model: one one-step generator routing each class to its student
    assert isinstance(model, Generator) and model.sampler.kind == "consistency" and model.steps_options == (1,)
    noise, cond = torch.randn(2, 3, 16, 16), torch.tensor([7, 8])
    with torch.no_grad():
        routed = model.sample(noise, cond)
        alone = student_view(model, 1).sample(noise, cond)
        other = student_view(model, 0).sample(noise, cond)
    assert torch.equal(routed, alone) and not torch.allclose(routed, other)
    # FLOPs of one image = one student's network, not K of them
    flops = forward_flops(model, task).flops
    assert flops == forward_flops(student_view(model, 0), task).flops


def test_same_size_students_on_geneval(cache):
    from bench.tasks.geneval import GenEval

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1]), TaskEnv("smoke", "val", None, cache))
    method = MSD(MSD.Params(students=4))
    model, result = _run(task, method, 2)
    assert result.updates == {"student": 1, "fake": 2}
    info = method.record_info()
    assert info["partition"]["kind"] == "prompt" and info["partition"]["axes"] == 2
    assert sum(info["partition"]["training_conditions_per_group"]) == len(task.train_data())
    teacher = task.teacher()
    assert info["params_per_student"] == [sum(p.numel() for p in teacher.parameters())] * 4
    assert len(method.fake) == 4  # one fake score per student


def test_resume_is_exact_across_the_stage_boundary(cache, tmp_path):
    # interrupted in the DM stage (TSM 3 steps, DM 3 with the generators at DM steps 0 and 2): the pickled routed
    # student, its router and the K fake scores come back, and the result equals the uninterrupted run's
    from bench.tasks.coco_fid import CocoFID

    task = CocoFID(CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4]), TaskEnv("smoke", "val", None, cache))
    make = lambda: MSD(MSD.Params(students=2, student_size="compact", gen_update_ratio=2))  # noqa: E731
    cfg = replace(task.training(), steps=6, batch_size=8)
    full_model, full = train(make(), task, task.student(0), task.teacher(), cfg, seed=0)
    ckpt = tmp_path / "state.pt"

    def stop_at_5(step, total, losses):  # on_step runs before the checkpoint of its step: the last one is 4
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make(), task, task.student(0), task.teacher(), cfg, seed=0, checkpoint_path=ckpt, checkpoint_every=2,
              on_step=stop_at_5)
    method = make()
    model, resumed = train(method, task, task.student(0), task.teacher(), cfg, seed=0, checkpoint_path=ckpt)
    assert resumed.resumed_from_step == 4 and resumed.updates == full.updates == {"student": 3 + 2, "fake": 3}
    assert method.record_info()["partition"]["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
