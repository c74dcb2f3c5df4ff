"""LoRA-enhanced guidance distillation (methods/diffusion/lora_distill.py; Golnari 2023, Meng et al. 2023): the
guided target and the step's loss on tiny tensors by hand, the LoRA forward W x + (alpha / r) B A x by hand (linear
and conv), that only A and B get gradients, the trainable-parameter and AdamW-state counts by hand, merging, and
end-to-end runs on the smoke tasks (which parameters step, the base weights are the teacher's, the evaluated
sampler is the teacher's at half the NFE, exact resume)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.api import TaskEnv
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.lora_distill import (LoRAConv2d, LoRADistill, LoRALinear, add_lora, distill_loss,
                                                  guided_target, memory_accounting, merge_lora, share_copy)
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

NULL = 2
E = [[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]  # class 0, class 1, null


class LinearNet(torch.nn.Module):
    """u(x, tau, c, w) = a x + e[c] (+ w g with a guidance input): a flow-velocity net with class offsets."""

    def __init__(self, a: float, g=(0.0, 0.0)) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.register_buffer("e", torch.tensor(E))
        self.register_buffer("g", torch.tensor(g))

    def null_condition(self, cond):
        return torch.full_like(cond, NULL)

    def forward(self, x, timestep, cond, guidance=None):
        out = self.a * x + self.e[cond]
        return out if guidance is None else out + guidance[:, None] * self.g


def _gen(net):
    return Generator(net, schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode", steps=8, guidance=2.0))


def test_guided_target_by_hand():
    # a = 0.5, x = [[2, 4], [-2, 0]], c = [0, 1], s = [3, 1.5]
    # D(c)    = 0.5 x + e[c] = [[1 + 1, 2 + 0], [-1 + 0, 0 + 2]] = [[2, 2], [-1, 2]]
    # D(null) = 0.5 x + e[2] = [[1 - 1, 2 + 1], [-1 - 1, 0 + 1]] = [[0, 3], [-2, 1]]
    # D(null) + s (D(c) - D(null)): [0 + 3 * 2, 3 + 3 * (-1)] = [6, 0];  [-2 + 1.5 * 1, 1 + 1.5 * 1] = [-0.5, 2.5]
    teacher = _gen(LinearNet(0.5))
    x, c = torch.tensor([[2.0, 4.0], [-2.0, 0.0]]), torch.tensor([0, 1])
    out = guided_target(teacher, x, torch.tensor([0.3, 0.9]), c, torch.tensor([3.0, 1.5]))
    assert torch.allclose(out, torch.tensor([[6.0, 0.0], [-0.5, 2.5]]))
    # one scalar scale for the fixed-scale student: s = 1 is the conditional prediction alone
    assert torch.allclose(guided_target(teacher, x, torch.tensor([0.3, 0.9]), c, 1.0), torch.tensor([[2.0, 2.0], [-1.0, 2.0]]))
    # the loss: mean of squared differences, (1 + 4 + 0 + 9) / 4
    assert distill_loss(torch.tensor([[1.0, 2.0], [0.0, 3.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])).item() == 3.5


class FakeCtx(SimpleNamespace):
    def run_teacher(self, fn, n_examples):
        self.examples.append(n_examples)
        with torch.no_grad():
            return fn(self.teacher)


def test_training_step_loss_by_hand():
    teacher = _gen(LinearNet(0.5))
    student = _gen(LinearNet(-0.25, g=(0.1, -0.2)))
    m = LoRADistill(LoRADistill.Params())  # s ~ U[1, 5]
    ctx = FakeCtx(student=student, teacher=teacher, examples=[])
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1, 1, 0, 1])
    torch.manual_seed(3)
    loss = m.training_step({"x0": x0, "cond": c}, ctx)["student"]
    torch.manual_seed(3)  # the same draws, in the step's order: t, noise, s
    t = 1.0 - torch.rand(5)
    noise = torch.randn(5, 2)
    s = 1.0 + 4.0 * torch.rand(5)
    z = (1 - t[:, None]) * x0 + t[:, None] * noise
    e = torch.tensor(E)
    u_c, u_n = 0.5 * z + e[c], 0.5 * z + e[NULL]
    target = u_n + s[:, None] * (u_c - u_n)
    pred = -0.25 * z + e[c] + s[:, None] * torch.tensor([0.1, -0.2])  # the student is given s as its input
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)
    assert ctx.examples == [10]  # the guided teacher: conditional and null halves

    fixed = LoRADistill(LoRADistill.Params(w_conditioning=False))  # s = the teacher's guidance 2, no input
    torch.manual_seed(3)
    loss = fixed.training_step({"x0": x0, "cond": c}, ctx)["student"]
    pred = -0.25 * z + e[c]
    target = u_n + 2.0 * (u_c - u_n)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)


def test_lora_linear_forward_by_hand_and_only_a_b_get_gradients():
    base = torch.nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]]))
        base.bias.copy_(torch.tensor([0.5, -1.0]))
    base.requires_grad_(False)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # B = 0 at the start: the base layer's output W x + b = [1 - 3, 2 + 2] + [0.5, -1] = [-1.5, 3]
    assert torch.allclose(lora(x), torch.tensor([[-1.5, 3.0]]))
    with torch.no_grad():
        lora.lora_A.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]))
        lora.lora_B.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    # A x = [3, -1]; B A x = [3, 6 - 1] = [3, 5]; alpha / r = 2 -> [6, 10]; y = [-1.5 + 6, 3 + 10]
    y = lora(x)
    assert torch.allclose(y, torch.tensor([[4.5, 13.0]]))
    y.sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    # d sum(y) / dB = scale * 1 (A x)^T = 2 [[3, -1], [3, -1]];  d / dA = scale * B^T 1 x^T = 2 [[3], [1]] [1, 2, 3]
    assert torch.allclose(lora.lora_B.weight.grad, torch.tensor([[6.0, -2.0], [6.0, -2.0]]))
    assert torch.allclose(lora.lora_A.weight.grad, torch.tensor([[6.0, 12.0, 18.0], [2.0, 4.0, 6.0]]))


def test_lora_conv_forward_by_hand_and_against_the_merged_kernel():
    base = torch.nn.Conv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        base.weight.fill_(1.0)
    lora = LoRAConv2d(base, rank=1, alpha=1.0)
    with torch.no_grad():
        lora.lora_A.weight.fill_(0.5)
        lora.lora_B.weight.fill_(2.0)
    # a 3 x 3 input of ones, no padding: W x = 9, A x = 4.5, B A x = 9, scale 1 -> 18
    assert lora(torch.ones(1, 1, 3, 3)).item() == pytest.approx(18.0)
    # a padded, strided conv: equal to the conv with kernel W + (alpha / r) sum_r B[o, r] A[r] (plain torch)
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    lora = LoRAConv2d(base, rank=2, alpha=3.0)
    with torch.no_grad():
        lora.lora_B.weight.copy_(torch.randn(4, 2, 1, 1, generator=g))
    x = torch.randn(2, 3, 7, 7, generator=g)
    kernel = base.weight + 1.5 * (lora.lora_B.weight[:, :, 0, 0] @ lora.lora_A.weight.flatten(1)).reshape(4, 3, 3, 3)
    assert torch.allclose(lora(x), F.conv2d(x, kernel, base.bias, stride=2, padding=1), atol=1e-5)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.emb = torch.nn.Embedding(4, 2)


def test_trainable_parameter_and_optimiser_state_counts_by_hand():
    net = Small()
    wrapped = add_lora(net, rank=2, alpha=2.0)
    assert sorted(wrapped) == ["conv", "lin"]
    # adapters, rank 2: lin A 2 x 8 = 16, B 6 x 2 = 12 -> 28; conv A 2 x 3 x 3 x 3 = 54, B 5 x 2 = 10 -> 64; 92
    # full copy: lin 8 x 6 + 6 = 54, conv 5 x 3 x 9 + 5 = 140, embedding 4 x 2 = 8 -> 202
    acc = memory_accounting(net)
    assert acc["trainable_params"] == 92 and acc["adapter_params"] == 92 and acc["frozen_params"] == 202
    assert acc["full_copy_trainable_params"] == 202
    assert acc["adamw_state_bytes"] == 2 * 4 * 92 and acc["full_copy_adamw_state_bytes"] == 2 * 4 * 202
    assert acc["gradient_bytes"] == 4 * 92 and acc["adamw_state_bytes_saved"] == 8 * (202 - 92)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 92
    lin_only = Small()
    add_lora(lin_only, rank=2, alpha=2.0, convs=False)
    assert memory_accounting(lin_only)["trainable_params"] == 28


def test_shared_base_and_merge_leave_the_teacher_untouched():
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 3, 1))
    before = [p.detach().clone() for p in teacher.parameters()]
    student = share_copy(teacher)
    add_lora(student, rank=2, alpha=4.0)
    assert all(type(m) is not LoRAConv2d for m in teacher.modules())  # the teacher's tree is not wrapped
    assert student[0].base.weight is teacher[0].weight  # the same tensor: no second copy
    with torch.no_grad():
        for m in (student[0], student[2]):
            m.lora_B.weight.normal_()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = student(x)
        assert merge_lora(student) == 2
        assert torch.allclose(student(x), adapted, atol=1e-5)  # folding B A changes nothing
    assert type(student[0]) is torch.nn.Conv2d and not student[0].weight.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_check_task_refuses_a_sampling_scale_outside_the_trained_range():
    m = LoRADistill.Params()
    assert LoRADistill.check_task(m, "coco_fid", SimpleNamespace(guidance=2.0)) is None
    msg = LoRADistill.check_task(m, "coco_fid", SimpleNamespace(guidance=7.5))
    assert msg and "outside" in msg and "[1, 5]" in msg
    assert LoRADistill.check_task(LoRADistill.Params(w_conditioning=False), "geneval", SimpleNamespace(guidance=7.5)) is None


# --------------------------------------------------------------------------------------------------
# End to end on the smoke tasks
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("lora-cache")))


def _run(task, method, steps, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_student_starts_as_teacher_only_adapters_and_w_embedding_step_and_samples_at_half_nfe(coco):
    teacher = coco.teacher()
    t_before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    method = LoRADistill(LoRADistill.Params())
    start = method.init_student(teacher, coco.student(0), SimpleNamespace(task=coco, seed=0))
    x = torch.randn(3, 3, coco.image_size, coco.image_size, generator=torch.Generator().manual_seed(0))
    t, c = torch.tensor([0.9, 0.5, 0.1]), coco.eval_conditions(3)
    with torch.no_grad():  # B = 0 and a zeroed w-embedding: the teacher's conditional prediction at any w
        assert torch.allclose(start.predict(x, t, c, guidance_input=torch.tensor([1.0, 3.0, 5.0])),
                              teacher.predict(x, t, c), atol=1e-6)
    init = {k: v.clone() for k, v in start.net.state_dict().items()}

    method = LoRADistill(LoRADistill.Params())
    model, result = _run(coco, method, 2)
    assert result.updates == {"student": 2} and result.teacher_forward_passes == 2
    changed = {k for k, v in model.net.state_dict().items() if not torch.equal(v, init[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k or k.startswith("guidance_proj.") for k in changed)
    assert any(".lora_B." in k for k in changed) and any(k.startswith("guidance_proj.") for k in changed)
    # the base weights are the teacher's own tensors, untouched
    conv = model.net.unet.conv_in
    assert isinstance(conv, LoRAConv2d) and conv.base.weight is teacher.net.unet.conv_in.weight
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.net.state_dict().items())
    # evaluation: the teacher's Euler sampler at its 8 steps, unguided passes with the scale as an input
    sp = model.sampler
    assert (sp.kind, sp.steps, sp.guidance, sp.guidance_input) == ("ode", teacher.sampler.steps, 1.0, 2.0)
    assert teacher.sampler.nfe == 16 and sp.nfe == 8 and model.steps_options is None
    metrics = coco.evaluate(model)
    primary = next(m.name for m in coco.quality_metrics() if m.primary)
    assert metrics["nfe"] == 8 and metrics["steps"] == 8
    assert all(metrics[f"{primary}@{n}"] == metrics[f"{primary}@{n}"] for n in (1, 4))  # offered: not NaN
    info = method.record_info()["memory"]
    assert 0 < info["trainable_params"] < info["full_copy_trainable_params"]
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_resume_is_exact(coco, tmp_path):
    full_model, _ = _run(coco, LoRADistill(LoRADistill.Params()), 4)
    ckpt = tmp_path / "state.pt"

    def stop_after_3(step, total, losses):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(coco, LoRADistill(LoRADistill.Params()), 4, checkpoint_path=ckpt, checkpoint_every=2, on_step=stop_after_3)
    model, resumed = _run(coco, LoRADistill(LoRADistill.Params()), 4, checkpoint_path=ckpt, checkpoint_every=2)
    assert resumed.resumed_from_step == 2
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_geneval_fixed_scale_and_merged(tmp_path):
    from bench.tasks.geneval import GenEval

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1, 4]), TaskEnv("smoke", "val", None, tmp_path))
    method = LoRADistill(LoRADistill.Params(w_conditioning=False, merge=True))
    model, result = _run(task, method, 1)
    assert result.updates == {"student": 1}
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in model.modules())  # merged
    assert not any(p.requires_grad for p in model.parameters())  # no w-embedding: only adapters trained
    assert model.sampler.guidance == 1.0 and model.sampler.guidance_input is None and model.sampler.nfe == 8
    assert method.record_info()["memory"]["other_trainable_params"] == 0
