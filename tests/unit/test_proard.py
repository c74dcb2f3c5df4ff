"""ProARD (Mousavi et al. 2025): the RSLAD and ARD losses on fixed logits by hand, the training attack (KL-PGD) on a
linear model by hand, the dynamic network's sub-networks as slices of the full weights, the channel sort before the
expansion stages, batch-norm recalibration by hand, the progressive schedule, and the sampled sizes evaluated with
the task's metrics.

Breaks tried (each made the named test fail, then was undone):
* rslad_loss: the 5/6 weight on the natural term instead of the adversarial one; a sum over classes (batchmean)
  instead of the mean over batch and classes -> test_rslad_loss_by_hand.
* ard_loss: T instead of T^2; reduction "batchmean" -> test_ard_loss_by_hand.
* kl_pgd: a descent step (-step_size); no projection on the eps-ball; no [0, 1] clamp; the noise not added
  -> test_kl_pgd_on_a_linear_model_by_hand.
* DynamicCifarResNet: the last channels kept (weight[-mid:]) in DynamicBasicBlock.forward and subnet; the last blocks
  of a stage kept instead of the first -> test_sub_network_weights_are_slices_of_the_full_ones.
* reorganize_middle: ascending sort; boundaries ignored -> test_middle_channels_sorted_within_segments;
  on_generation_start not sorting (``if cuts is not None`` -> ``if False``) -> test_expansion_stages_sort_the_middle_channels.
* recalibrate_bn: unbiased variance; an unweighted mean over batches -> test_bn_recalibration_by_hand.
* stage_steps / STAGES / training_step: floor without remainders; depth phase 1 taking every depth; one sub-network
  per step in every stage -> test_progressive_schedule, test_each_stage_samples_its_choices.
* finalize_student: robustness skipped; min/max grid replaced by the max only -> test_sizes_are_evaluated_by_the_task.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.api import Outputs, TaskEnv, TeacherCandidate
from bench.methods._proard_dynamic import DynamicCifarResNet, recalibrate_bn, reorganize_middle
from bench.methods.proard import (
    STAGES, ProARD, ard_loss, expand_boundaries, kl_pgd, rslad_loss, stage_choices, stage_steps)
from bench.tasks.imagenet.models import wrap
from bench.tasks.imagenet.nets import CifarResNet

LN3 = math.log(3.0)
CFG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
       "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


# --------------------------------------------------------------------------------------------------
# Losses and the training attack
# --------------------------------------------------------------------------------------------------


def test_rslad_loss_by_hand():
    # Row 0: teacher [ln 3, 0] -> t = (.75, .25); adversarial student [0, 0] -> q = (.5, .5); natural [0, ln 3]
    # -> q = (.25, .75). Row 1: teacher [0, 0] -> t = (.5, .5); both students [0, 0]. Elementwise
    # t (ln(t + 1e-5) - ln q), averaged over the 2 x 2 entries; 5/6 adversarial + 1/6 natural.
    teacher = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    adv = torch.zeros(2, 2)
    nat = torch.tensor([[0.0, LN3], [0.0, 0.0]])

    def term(t: float, q: float) -> float:
        return t * (math.log(t + 1e-5) - math.log(q))

    kl_adv = (term(.75, .5) + term(.25, .5) + term(.5, .5) + term(.5, .5)) / 4
    kl_nat = (term(.75, .25) + term(.25, .75) + term(.5, .5) + term(.5, .5)) / 4
    expected = 5 / 6 * kl_adv + 1 / 6 * kl_nat
    assert rslad_loss(adv, nat, teacher, 5 / 6).item() == pytest.approx(expected, abs=1e-7)
    assert rslad_loss(adv, nat, teacher, 1.0).item() == pytest.approx(kl_adv, abs=1e-7)


def test_ard_loss_by_hand():
    # T = 2: teacher [2 ln 3, 0] / T -> p = (.75, .25); adversarial student [0, 0] -> q = (.5, .5). KLDivLoss's mean
    # over the 2 entries: (.75 ln 1.5 + .25 ln .5) / 2, times T^2 = 4 and alpha = .7; CE of the natural logits
    # [0, ln 3] at label 0: ln 4, times .3.
    kl = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    expected = 0.7 * 4 * kl + 0.3 * math.log(4)
    got = ard_loss(torch.zeros(1, 2), torch.tensor([[0.0, LN3]]), torch.tensor([[2 * LN3, 0.0]]), torch.tensor([0]),
                   2.0, 0.7)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kl_pgd_on_a_linear_model_by_hand():
    # f(x) = x (2 inputs = 2 logits). d/dx KL(t || softmax(x)) = softmax(x) - t. Teacher t = softmax([ln 3, 0])
    # = (.75, .25) for both examples (the teacher's logits on the natural image, fixed).
    # Example 0, x = (.5, .5): softmax = (.5, .5), gradient (-.25, +.25), sign (-1, +1); steps of .1 in an eps = .15
    # ball: (.4, .6), then (.3, .7) -> projected (.35, .65); softmax(.35, .65) still puts < .75 on class 0, so the
    # third step pushes out again and is projected back: (.35, .65).
    # Example 1, x = (.05, .95): (-.05, 1.05) -> clamped to [0, 1]: (0, 1); again (-.1, 1.1) -> ball [-.1, .2] x
    # [.8, 1.1] -> (-.1, 1.1) -> clamp (0, 1).
    x = torch.tensor([[0.5, 0.5], [0.05, 0.95]])
    teacher = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    adv = kl_pgd(lambda v: v, x, teacher, eps=0.15, step_size=0.1, steps=3, noise=torch.zeros_like(x))
    assert adv.flatten().tolist() == pytest.approx([0.35, 0.65, 0.0, 1.0], abs=1e-6)
    # One step: (.4, .6) and (0, 1).
    one = kl_pgd(lambda v: v, x, teacher, eps=0.15, step_size=0.1, steps=1, noise=torch.zeros_like(x))
    assert one.flatten().tolist() == pytest.approx([0.4, 0.6, 0.0, 1.0], abs=1e-6)
    # The random start is where the first gradient is taken: from (.5, .5) + (.3, -.3) = (.8, .2), softmax puts
    # .646 < .75 on class 0, so the step is (-.1, +.1) from (.8, .2): (.7, .3), projected onto [.35, .65]: (.65, .35).
    start = kl_pgd(lambda v: v, x[:1], teacher[:1], eps=0.15, step_size=0.1, steps=1, noise=torch.tensor([[0.3, -0.3]]))
    assert start.flatten().tolist() == pytest.approx([0.65, 0.35], abs=1e-6)
    # No steps: the start itself, in the pixel box.
    assert kl_pgd(lambda v: v, x, teacher, 0.15, 0.1, 0, torch.full_like(x, 0.02)).flatten().tolist() == pytest.approx(
        [0.52, 0.52, 0.07, 0.97], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The dynamic network
# --------------------------------------------------------------------------------------------------


def _teacher(depth: int = 20, seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    net = CifarResNet(depth, 1, 10)
    for m in net.modules():  # non-trivial batch-norm parameters and statistics, so slices are visible
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _dynamic(net: CifarResNet) -> DynamicCifarResNet:
    return DynamicCifarResNet.from_cifar_resnet(net, [0.65, 0.8, 1.0], [0.2, 0.25, 0.35], [0, 1, 2]).eval()


def test_sub_network_weights_are_slices_of_the_full_ones():
    net = _teacher()
    dyn = _dynamic(net)
    x = torch.rand(3, 3, 8, 8)
    # The largest sub-network is the teacher.
    assert torch.allclose(dyn(x), net(x), atol=1e-6)
    # Widths round(16 x (.65, .8, 1)) = 10, 13, 16; 32 -> 21, 26, 32; 64 -> 42, 51, 64. Depths 1..3 blocks.
    assert dyn.width_options == [[10, 13, 16], [21, 26, 32], [42, 51, 64]] and dyn.depth_options == [1, 2, 3]
    # Stage 0 at width 13 with 2 blocks, stage 1 at 21 with 1 block, stage 2 at 64 with 3; expansions per block.
    cfg = {"w": [1, 0, 2], "d": [2, 1, 3], "e": [0.2, 0.25, 0.35, 0.35, 0.2, 0.2, 0.25, 0.35, 0.2]}
    dyn.set_active(cfg)
    sub = dyn.subnet().eval()
    # Middle channels round(width x e / .35): block 0: 13 x .2 / .35 = 7.43 -> 7; block 1: 9.29 -> 9;
    # block 3: 21; blocks 6, 7, 8 at 64: 45.71 -> 46, 64, 36.57 -> 37.
    kept = [(0, 3, 7, 13), (1, 13, 9, 13), (3, 13, 21, 21), (6, 21, 46, 64), (7, 64, 64, 64), (8, 64, 37, 64)]
    assert len(sub.blocks) == len(kept)
    assert torch.equal(sub.stem[0].weight, net.stem[0].weight[:13])
    assert torch.equal(sub.stem[1].running_var, net.stem[1].running_var[:13])
    for blk, (i, _, mid, out) in zip(sub.blocks, kept):
        src = net.blocks[i]  # the first blocks of each stage are kept: indices 0, 1 | 3 | 6, 7, 8
        cin = blk.conv1.weight.shape[1]
        assert blk.conv1.weight.shape[0] == mid and blk.conv2.weight.shape[0] == out
        assert torch.equal(blk.conv1.weight, src.conv1.weight[:mid, :cin])
        assert torch.equal(blk.bn1.weight, src.bn1.weight[:mid]) and torch.equal(blk.bn1.running_mean,
                                                                                  src.bn1.running_mean[:mid])
        assert torch.equal(blk.conv2.weight, src.conv2.weight[:out, :mid])
        assert torch.equal(blk.bn2.bias, src.bn2.bias[:out])
        if not isinstance(blk.shortcut, nn.Identity):
            assert torch.equal(blk.shortcut[0].weight, src.shortcut[0].weight[:out, :cin])
    assert [b.conv1.weight.shape[1] for b in sub.blocks] == [13, 13, 13, 21, 64, 64]
    assert torch.equal(sub.fc.weight, net.fc.weight[:, :64]) and torch.equal(sub.fc.bias, net.fc.bias)
    # The dynamic network at that config computes the plain sub-network.
    assert torch.allclose(dyn(x), sub(x), atol=1e-5)
    # A narrower last stage reads the first classifier inputs.
    dyn.set_active({"w": [0, 0, 0], "d": [1, 1, 1], "e": [0.2] * 9})
    assert torch.equal(dyn.subnet().fc.weight, net.fc.weight[:, :42])
    with pytest.raises(ValueError):
        dyn.set_active({"w": [0, 0, 0], "d": [4, 1, 1], "e": [0.2] * 9})


def test_middle_channels_sorted_within_segments():
    dyn = _dynamic(_teacher(8))
    blk = dyn.blocks[0]  # 16 middle channels
    imp = torch.tensor([1.0, 4, 2, 3] + [0.01 + 0.05 * i for i in range(12)])
    with torch.no_grad():
        blk.conv2.weight.copy_(blk.conv2.weight.sign() * imp[None, :, None, None] / (16 * 9))  # L1 per input = imp
    x = torch.rand(2, 3, 8, 8)
    before = dyn(x)
    w1 = blk.conv1.weight.clone()
    # Importances 1, 4, 2, 3, then .01, .06, ..., .56 for channels 4..15. Boundary at 2: channels 0, 1 stay in
    # front, 1 (4) before 0 (1); then 3 (3), 2 (2), then 15, 14, ..., 4.
    order = reorganize_middle(blk, [2])
    assert order == [1, 0, 3, 2] + list(range(15, 3, -1))
    assert torch.equal(blk.conv1.weight, w1[order])
    assert torch.allclose(dyn(x), before, atol=1e-5)  # a permutation: the largest network is unchanged
    # No boundary: one sort over all positions (importances now 4, 1, 3, 2, .56, .51, ..., .01): 0, 2, 3, 1, 4, ...
    assert reorganize_middle(blk, []) == [0, 2, 3, 1] + list(range(4, 16))


def test_bn_recalibration_by_hand():
    bn = nn.BatchNorm2d(1)
    # Batch 1: two images of one pixel, values 0 and 2 -> mean 1, biased var 1. Batch 2: one image, 4 pixels
    # (1, 1, 3, 3) -> mean 2, biased var 1. Weighted by images: mean (2 x 1 + 1 x 2) / 3 = 4/3; var 1.
    b1 = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)
    b2 = torch.tensor([1.0, 1, 3, 3]).view(1, 1, 2, 2)
    model = nn.Sequential(bn)
    assert recalibrate_bn(model, [b1, b2]) == 3
    assert bn.running_mean.item() == pytest.approx(4 / 3) and bn.running_var.item() == pytest.approx(1.0)
    assert model.training  # the mode it had


# --------------------------------------------------------------------------------------------------
# The progressive schedule
# --------------------------------------------------------------------------------------------------


def test_progressive_schedule():
    # 100 steps in proportion 125 : 25 : 125 : 25 : 125 = 29.41, 5.88, 29.41, 5.88, 29.41; floors 97, the 3 steps
    # left to the largest remainders (.88, .88, then the first .41).
    assert stage_steps(100, [125, 25, 125, 25, 125]) == [30, 6, 29, 6, 29]
    # 5 steps: 1.47, .29, 1.47, .29, 1.47 -> [2, 0, 2, 0, 1]; each empty stage takes a step from the largest.
    assert stage_steps(5, [125, 25, 125, 25, 125]) == [1, 1, 1, 1, 1]
    assert stage_steps(3, [125, 25, 125, 25, 125]) == [1, 1, 1]
    method = ProARD(ProARD.Params())
    plan = method.generations(100)
    assert [g.steps for g in plan] == [30, 6, 29, 6, 29] and not any(g.fresh_student for g in plan)
    assert [g.name for g in plan] == ["width", "depth, phase 1", "depth, phase 2", "expand, phase 1", "expand, phase 2"]
    # train_ofa_net.py's lists for the ResNet: depth {2}, {1, 2}, {0, 1, 2}; expansion {.35}, ..., {.25, .35}, all.
    depths, expands = [1, 2, 3], [0.2, 0.25, 0.35]
    assert [stage_choices(i, depths, expands) for i in range(5)] == [
        ([3], [0.35]), ([2, 3], [0.35]), ([1, 2, 3], [0.35]), ([1, 2, 3], [0.25, 0.35]), ([1, 2, 3], expands)]
    assert method.params.subnets_per_stage == [1, 2, 2, 4, 4]
    # Middle channels are sorted before the expansion stages only; phase 2 keeps the .25 channels in front:
    # 16 x .25 / .35 = 11.43 -> 11.
    width = lambda r: round(16 * r / 0.35)  # noqa: E731
    assert [expand_boundaries(i, width, expands) for i in range(5)] == [None, None, None, [], [11]]
    assert len(STAGES) == 5


class _Task:
    name = "imagenet"

    def __init__(self, n: int = 12, robust_in_evaluate: bool = False):
        self.pixels = torch.rand(n, 3, 8, 8)
        self.evaluated, self.attacked, self.robust_in_evaluate = [], [], robust_in_evaluate

    def forward(self, model, batch):
        return Outputs(logits=model(batch["pixels"]))

    def train_data(self):
        task = self

        class Split:
            def __len__(self):
                return len(task.pixels)

            def batch(self, idx):
                return {"pixels": task.pixels[list(idx)]}

        return Split()

    def evaluate(self, model):
        self.evaluated.append(model)
        out = {"top1": 0.5}
        return {**out, "pgd_top1": 0.1} if self.robust_in_evaluate else out

    def robustness(self, model):
        self.attacked.append(model)
        return {"pgd_top1": 0.2, "fgsm_top1": 0.3}


class _Ctx:
    def __init__(self, task, student, generation=0, step=0):
        self.task, self.student, self.generation, self.step, self.seed, self.device = task, student, generation, step, 0, "cpu"
        self.teacher_logits = torch.randn(4, 10)

    def teacher_outputs(self, batch):
        return Outputs(logits=self.teacher_logits[:len(batch["pixels"])])


def _method_and_student(task, **params):
    method = ProARD(ProARD.Params(num_steps=1, bn_images=8, bn_batch=5, **params))
    method.select_teacher([TeacherCandidate("vit_smoke_64d4", 10), TeacherCandidate("cifar_resnet20", 20)], 60_000)
    teacher = wrap(_teacher(), CFG, "cifar_resnet20")
    student = method.init_student(teacher, nn.Linear(2, 2), _Ctx(task, None))
    return method, student


def test_expansion_stages_sort_the_middle_channels():
    task = _Task()
    method, student = _method_and_student(task)
    dyn = student.net.eval()  # eval: running statistics, no dropout
    x = torch.rand(2, 3, 8, 8)
    before, w_before = dyn(x), [b.conv1.weight.clone() for b in dyn.blocks]
    for stage in (0, 1, 2):  # width and depth stages leave the channels where they are
        method.on_generation_start(stage, _Ctx(task, student))
    assert all(torch.equal(b.conv1.weight, w) for b, w in zip(dyn.blocks, w_before))
    method.on_generation_start(4, _Ctx(task, student))  # expansion phase 2: the .25 channels stay in front
    for blk in dyn.blocks:
        imp = blk.conv2.weight.abs().sum((0, 2, 3)).tolist()
        cut = round(blk.cout * 0.25 / 0.35)  # 16 -> 11, 32 -> 23, 64 -> 46
        assert imp[:cut] == sorted(imp[:cut], reverse=True) and imp[cut:] == sorted(imp[cut:], reverse=True)
    assert not all(torch.equal(b.conv1.weight, w) for b, w in zip(dyn.blocks, w_before))
    assert torch.allclose(dyn(x), before, atol=1e-5)


@pytest.mark.parametrize("generation", [0, 1, 4])
def test_each_stage_samples_its_choices(generation):
    task = _Task()
    method, student = _method_and_student(task)
    assert method.info["teacher"] == "cifar_resnet20"
    dyn = student.net
    seen = []
    original = dyn.set_active
    dyn.set_active = lambda cfg: (seen.append(cfg), original(cfg))[1]
    batch = {"pixels": torch.rand(4, 3, 8, 8), "labels": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    losses = method.training_step(batch, _Ctx(task, student, generation=generation, step=7))
    assert set(losses) == {"student"} and losses["student"].requires_grad
    assert len(seen) == [1, 2, 2, 4, 4][generation]
    depths, expands = stage_choices(generation, [1, 2, 3], [0.2, 0.25, 0.35])
    for cfg in seen:
        assert set(cfg["d"]) <= set(depths) and set(cfg["e"]) <= set(expands)
    # The draw is a function of (seed, step, index): the same step draws the same sub-networks.
    again = []
    dyn.set_active = lambda cfg: (again.append(cfg), original(cfg))[1]
    method.training_step(batch, _Ctx(task, student, generation=generation, step=7))
    assert again == seen
    if generation == 4:  # with every choice open, four draws of nine blocks' expansions are not all the largest
        assert any(set(cfg["e"]) != {0.35} for cfg in seen)


def test_sizes_are_evaluated_by_the_task():
    task = _Task()
    method, student = _method_and_student(task)
    final = method.finalize_student(student, _Ctx(task, student))
    sizes = method.info["sizes"]
    # The code's validation grid: depth {1, 3} x expansion {.2, .35} x width {.65, 1}.
    assert [s["name"] for s in sizes] == ["D1-E0.2-W0.65", "D1-E0.2-W1", "D1-E0.35-W0.65", "D1-E0.35-W1",
                                          "D3-E0.2-W0.65", "D3-E0.2-W1", "D3-E0.35-W0.65", "D3-E0.35-W1"]
    assert len(task.evaluated) == 8 and len(task.attacked) == 8  # every size, with the task's attacks
    assert all(s["metrics"]["pgd_top1"] == 0.2 and s["bn_images"] == 8 for s in sizes)
    assert sizes[-1]["params"] == sum(p.numel() for p in _teacher().parameters())
    # The row: the largest size within the 60,000-parameter budget.
    row = max((s for s in sizes if s["params"] <= 60_000), key=lambda s: s["params"])
    assert method.info["row_student"] == row["name"] and sum(p.numel() for p in final.parameters()) == row["params"]
    assert any(row["name"] in n for n in method.table_notes(task))
    # A task that already reports robustness in evaluate is not attacked twice.
    task2 = _Task(robust_in_evaluate=True)
    method2, student2 = _method_and_student(task2)
    method2.finalize_student(student2, _Ctx(task2, student2))
    assert not task2.attacked and all(s["metrics"]["pgd_top1"] == 0.1 for s in method2.info["sizes"])


def test_row_choice_by_hand():
    sizes = [{"name": "a", "params": 50}, {"name": "b", "params": 10}, {"name": "c", "params": 30}]
    assert ProARD.choose_row(sizes, "budget", 40)["name"] == "c"
    assert ProARD.choose_row(sizes, "budget", 5)["name"] == "b"  # none fits: the smallest
    assert ProARD.choose_row(sizes, "smallest", 40)["name"] == "b"
    assert ProARD.choose_row(sizes, "largest", 40)["name"] == "a"


def test_runs_on_the_imagenet_task_with_a_cifar_resnet_teacher_only(tmp_path):
    from bench.tasks.imagenet import ImageNet

    env = TaskEnv(tier="smoke", subtask="val", data_root=None, cache_dir=tmp_path)
    method = ProARD(ProARD.Params())
    assert method.unsupported(ImageNet(ImageNet.Params(), env)) is None  # the pool holds cifar_resnet8
    reason = method.unsupported(ImageNet(ImageNet.Params(teacher="vit_smoke_64d4"), env))
    assert reason and "CIFAR ResNets" in reason

    class Glue:
        def problem(self):
            return "classification"

    assert "imagenet task" in method.unsupported(Glue())
    with pytest.raises(ValueError):
        ProARD.Params(width_mults=[0.5, 0.8])  # the largest width must be the teacher's
