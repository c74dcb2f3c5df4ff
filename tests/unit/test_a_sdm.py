"""A-SDM (Zhu et al. 2024): CondConv mixing by hand, the function-preserving expert initialisation, the layer-wise
UNet forward against diffusers', the pruned architecture's parameter count from the layer formulas, the
DeepCache-style inheritance schedule and the inherited feature, BK-SDM's loss by hand, and end-to-end runs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.api import TaskEnv
from bench.diffusion import Sampler
from bench.methods.diffusion.a_sdm import (
    ASDM, ASDMGenerator, CondConv2d, assemble, distillation_loss, teacher_skips, unet_forward,
)
from bench.tasks.generative.nets import CondUNet
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed: int = 0, channels=(16, 32)) -> CondUNet:
    torch.manual_seed(seed)
    net = CondUNet(size=16, channels=channels, num_classes=10, norm_groups=8)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight non-trivial anyway
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net


def inputs(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.tensor([100.0, 500.0, 900.0][:n]), torch.arange(n) % 10


# --- ME-CondConv -----------------------------------------------------------------------------------


def test_condconv_1x1_mixing_by_hand():
    m = CondConv2d(1, 1, (1, 1), experts=2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1, 1))  # W_1 = 2, W_2 = -1
        m.bias.copy_(torch.tensor([[0.5], [1.0]]))  # b_1 = 0.5, b_2 = 1
        m.route.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        m.route.bias.zero_()
    ln3 = math.log(3.0)
    x = torch.tensor([[[[ln3, ln3]]], [[[1.0, -1.0]]]])  # GAP: ln 3 and 0
    y = m(x)
    # sample 0: r = sigmoid(+-ln 3) = (3/4, 1/4): kernel 0.75*2 - 0.25 = 1.25, bias 0.75*0.5 + 0.25*1 = 0.625
    assert torch.allclose(y[0], torch.tensor([[[1.25 * ln3 + 0.625] * 2]]), atol=1e-6)
    # sample 1: r = (1/2, 1/2): kernel 0.5, bias 0.75 -> 0.5 x + 0.75
    assert torch.allclose(y[1], torch.tensor([[[1.25, 0.25]]]), atol=1e-6)
    assert torch.allclose(m.routing(x), torch.tensor([[0.75, 0.25], [0.5, 0.5]]), atol=1e-6)


def test_condconv_3x3_output_is_the_conv_with_the_weighted_sum_of_experts():
    torch.manual_seed(0)
    m = CondConv2d(3, 4, (3, 3), experts=3, padding=(1, 1))
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
        m.route.weight.normal_()
    x = torch.randn(2, 3, 5, 5)
    y = m(x)
    for b in range(2):
        r = torch.sigmoid(m.route.weight @ x[b].mean((1, 2)) + m.route.bias)  # by the formula, per sample
        kernel = r[0] * m.weight[0] + r[1] * m.weight[1] + r[2] * m.weight[2]
        bias = r[0] * m.bias[0] + r[1] * m.bias[1] + r[2] * m.bias[2]
        assert torch.allclose(y[b], F.conv2d(x[b:b + 1], kernel, bias, padding=1)[0], atol=1e-5)


def test_condconv_from_conv_starts_as_the_teachers_conv_with_distinct_experts():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    m = CondConv2d.from_conv(conv, experts=4, noise=0.01)
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(m(x), conv(x), atol=1e-5)  # zero routing: r = 1/2, sum_k (1/2) W_k = W
    assert torch.allclose(m.weight.sum(0), 2 * conv.weight, atol=1e-6)  # the perturbation is centred
    assert not torch.allclose(m.weight[0], m.weight[1])  # symmetry broken


# --- the layer-wise forward and the assembly -----------------------------------------------------


def test_skip_indices_of_diffusers_up_blocks():
    # (16, 32): skips conv_in 0, down0.resnet 1, down0.downsample 2, down1.resnet 3; up0 takes 3, 2; up1 takes 1, 0
    assert teacher_skips(tiny_net().unet) == [[3, 2], [1, 0]]
    assert teacher_skips(tiny_net(channels=(16, 32, 32)).unet) == [[5, 4], [3, 2], [1, 0]]


def test_layerwise_forward_equals_diffusers_forward():
    net = tiny_net()
    x, t, c = inputs()
    ours, _ = unet_forward(net.unet, teacher_skips(net.unet), x, t, net.condition_vector(c))
    assert torch.equal(ours, net(x, t, c))


def _resnet_params(cin: int, cout: int, temb: int = 64) -> int:
    """diffusers ResnetBlock2D: norm1, conv1 3x3, time_emb_proj, norm2, conv2 3x3, 1x1 shortcut when cin != cout."""
    n = 2 * cin + (9 * cin * cout + cout) + (temb * cout + cout) + 2 * cout + (9 * cout * cout + cout)
    return n + (cin * cout + cout if cin != cout else 0)


def _condconv_extra(cin: int, cout: int, k: int) -> int:
    """K - 1 more 3x3 kernels and biases, plus the routing layer GAP(cin) -> K."""
    return (k - 1) * (9 * cin * cout + cout) + (cin * k + k)


def test_pruned_parameter_count_by_hand():
    net = tiny_net()
    teacher = sum(p.numel() for p in net.parameters())
    # removed: the mid block (2 resnets 32 -> 32), up0's last resnet (32 + skip 16 -> 32), up1's (16 + skip 16 -> 16)
    removed = 2 * _resnet_params(32, 32) + _resnet_params(48, 32) + _resnet_params(32, 16)
    plain = assemble(net, drop_mid_block=True, drop_up_layers=1, condconv="none", experts=4, expert_noise=0.0,
                     branch=0)
    assert sum(p.numel() for p in plain.parameters()) == teacher - removed
    assert plain.base.unet.mid_block is None and [len(b.resnets) for b in plain.base.unet.up_blocks] == [1, 1]
    assert plain.skips_of == [[3], [1]]
    # kept up resnets: up0.r0 (64 -> 32: conv1 64x32, conv2 32x32), up1.r0 (48 -> 16: conv1 48x16, conv2 16x16)
    cc = assemble(net, drop_mid_block=True, drop_up_layers=1, condconv="up", experts=4, expert_noise=0.01, branch=0)
    extra = sum(_condconv_extra(i, o, 4) for i, o in ((64, 32), (32, 32), (48, 16), (16, 16)))
    assert sum(p.numel() for p in cc.parameters()) == teacher - removed + extra
    # assembled from the teacher: a kept layer holds the teacher's weights, the teacher is untouched
    assert torch.equal(plain.base.unet.up_blocks[1].resnets[0].conv1.weight, net.unet.up_blocks[1].resnets[0].conv1.weight)
    assert net.unet.mid_block is not None and len(net.unet.up_blocks[0].resnets) == 2


# --- feature inheritance -------------------------------------------------------------------------


def _student(net: CondUNet, interval: int, steps: int) -> ASDMGenerator:
    from bench.diffusion import Schedule

    pruned = assemble(net, drop_mid_block=True, drop_up_layers=1, condconv="up", experts=4, expert_noise=0.01,
                      branch=0)
    return ASDMGenerator(pruned, schedule=Schedule("flow"), prediction="flow", sampler=Sampler("ode", steps=steps),
                         inherit_interval=interval)


def test_inheritance_schedule_computes_deep_blocks_every_interval_steps():
    g = _student(tiny_net(), interval=3, steps=7)
    unet = g.net.base.unet
    calls = {"deep_down": 0, "deep_up": 0, "shallow_up": 0}

    def count(key):
        return lambda *a: calls.__setitem__(key, calls[key] + 1)

    unet.down_blocks[1].resnets[0].register_forward_hook(count("deep_down"))
    unet.up_blocks[0].resnets[0].register_forward_hook(count("deep_up"))
    unet.up_blocks[1].resnets[0].register_forward_hook(count("shallow_up"))
    x, _, c = inputs(2)
    with torch.no_grad():
        g.sample(x, c)
    # steps 0..6, uniform mode: steps 0, 3, 6 compute everything; 1, 2, 4, 5 inherit
    assert g.net.computed == [True, False, False, True, False, False, True]
    assert calls == {"deep_down": 3, "deep_up": 3, "shallow_up": 7}
    with torch.no_grad():
        inherited = g.sample(x, c)
        one_inherited = g.sample(x, c, Sampler("ode", steps=1))
        g.inherit_interval = 1  # no inheritance: every step computes everything
        plain = g.sample(x, c)
        assert g.net.computed == [] and not torch.equal(inherited, plain)
        assert torch.equal(g.sample(x, c, Sampler("ode", steps=1)), one_inherited)  # 1 step: nothing to inherit
        assert g.net._deep is None  # no cache survives a sampling run


def test_inherited_feature_equals_the_earlier_steps_and_the_output_by_hand():
    g = _student(tiny_net(), interval=2, steps=2)
    net, unet = g.net, g.net.base.unet
    seen = []
    unet.up_blocks[1].resnets[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x1, t1, c1 = inputs(2, seed=1)
    x2, c2 = inputs(2, seed=2)[0], torch.tensor([7, 8])
    t2 = torch.tensor([250.0, 250.0])
    t1 = t1[:2]
    net.begin_inheritance(2)
    with torch.no_grad():
        net(x1, t1, c1)
        out2 = net(x2, t2, c2)
        # by hand, module by module (mid block removed; up0 keeps resnet 0, which takes down1's output)
        e1 = unet.time_embedding(unet.time_proj(t1)) + net.base.cond_embed(c1)
        s0 = unet.conv_in(x1)
        s1 = unet.down_blocks[0].resnets[0](s0, e1)
        s3 = unet.down_blocks[1].resnets[0](unet.down_blocks[0].downsamplers[0](s1), e1)
        deep = unet.up_blocks[0].upsamplers[0](unet.up_blocks[0].resnets[0](torch.cat([s3, s3], 1), e1))
        e2 = unet.time_embedding(unet.time_proj(t2)) + net.base.cond_embed(c2)
        skip2 = unet.down_blocks[0].resnets[0](unet.conv_in(x2), e2)
        h = unet.up_blocks[1].resnets[0](torch.cat([deep, skip2], 1), e2)
        by_hand = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    net.end_inheritance()
    assert net.computed == [True, False]
    assert torch.equal(seen[1][:, :32], seen[0][:, :32])  # step 2 inherits step 1's deep feature ...
    assert torch.allclose(seen[0][:, :32], deep, atol=1e-6)  # ... which is the deep path of step 1
    assert torch.allclose(seen[1][:, 32:], skip2, atol=1e-6)  # the shallow skip is fresh
    assert torch.allclose(out2, by_hand, atol=1e-5)


# --- the loss ------------------------------------------------------------------------------------


def test_distillation_loss_by_hand():
    s, y, t = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    feats = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])}
    t_feats = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}
    out = distillation_loss(s, y, t, feats, t_feats, (1.0, 0.5, 2.0))
    # task (1 + 4) / 2 = 2.5; out (0 + 4) / 2 = 2; feat 1/2 + 4 = 4.5; total 2.5 + 0.5 * 2 + 2 * 4.5 = 12.5
    assert [float(out[k]) for k in ("task", "out", "feat", "total")] == [2.5, 2.0, 4.5, 12.5]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, Path(tmp_path_factory.mktemp("a-sdm-cache"))))


def _ctx(task, student, teacher):
    from bench.train import HarnessContext

    ctx = HarnessContext(task=task, student=student, teacher=teacher, total_steps=1, seed=0, device="cpu",
                         train_split=task.train_data(), batch_size=4)
    return ctx


def test_training_step_on_an_unpruned_copy_and_which_features_count(task):
    teacher = task.teacher()
    method = ASDM(ASDM.Params(drop_mid_block=False, drop_up_layers=0, condconv="none"))
    student = method.init_student(teacher, None, None)
    batch = task.train_data().batch(range(4))
    ctx = _ctx(task, student, teacher)
    torch.manual_seed(3)
    method.training_step(batch, ctx)
    losses = method.info["last_losses"]
    assert losses["out"] == 0.0 and losses["feat"] == 0.0  # the student is the teacher's copy
    # by hand with diffusers' own forward: the same draws (t, eps, condition dropout 0.1) in the same order
    torch.manual_seed(3)
    x0, cond = batch["x0"], batch["cond"]
    t, eps = torch.rand(4), torch.randn_like(x0)
    drop = torch.rand(4) < 0.1
    cond = torch.where(drop, torch.full_like(cond, 10), cond)
    x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v = teacher.net(x_t, 1000.0 * t, cond)
    assert losses["task"] == pytest.approx(float(((v - (eps - x0)) ** 2).mean()), rel=1e-5)
    # the feature loss is over block outputs: conv_out is in none, the last up block's resnet is
    with torch.no_grad():
        student.net.base.unet.conv_out.weight.add_(0.1)
    method.training_step(batch, ctx)
    assert method.info["last_losses"]["out"] > 0 and method.info["last_losses"]["feat"] == 0.0
    with torch.no_grad():
        student.net.base.unet.up_blocks[1].resnets[1].conv2.weight.add_(0.1)
    method.training_step(batch, ctx)
    assert method.info["last_losses"]["feat"] > 0


def test_unsupported_full_tier():
    msg = ASDM(ASDM.Params()).unsupported(SimpleNamespace(env=SimpleNamespace(tier="full"), make_generator=1))
    assert msg and "full tier" in msg


# --- end to end ----------------------------------------------------------------------------------


def _run(task, steps, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    method = ASDM(ASDM.Params())
    model, result = train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)
    return method, model, result


def test_train_assembles_distils_and_records_both_speedups(task):
    method, model, result = _run(task, 2)
    teacher = task.teacher()
    assert isinstance(model, ASDMGenerator) and model.net.base.unet.mid_block is None
    assert isinstance(model.net.base.unet.up_blocks[0].resnets[0].conv1, CondConv2d)
    # the evaluation sampler is the teacher's reference sampler (8 Euler steps, guidance 2), inheriting every 2nd
    assert model.sampler.kind == "ode" and model.sampler.steps == teacher.sampler.steps == 8
    assert model.sampler.guidance == 2.0 and model.steps_options is None and model.inherit_interval == 2
    assert result.teacher_forward_passes == 2 and result.updates == {"student": 2}
    assert all({"task", "out", "feat"} <= set(e) for e in result.loss_log)
    fl = method.record_info()["flops"]
    calls = fl["per_call"]
    assert calls["teacher"] > calls["student"] > calls["student_inheriting"] > 0
    assert fl["pruning_speedup"] == pytest.approx(calls["teacher"] / calls["student"])
    per = fl["per_image"]
    assert set(per) == {"1", "4", "8"} and per["1"]["inheritance_speedup"] == 1.0
    # 4 guided steps: 2 full + 2 inheriting calls, each twice (conditional and null)
    assert per["4"]["no_inheritance"] == 2 * 4 * calls["student"]
    assert per["4"]["inheritance"] == 2 * (2 * calls["student"] + 2 * calls["student_inheriting"])
    metrics = task.evaluate(model)
    assert metrics["steps"] == 8 and metrics["nfe"] == 16 and math.isfinite(metrics["fd_smoke@4"])


def test_resume_is_exact(task, tmp_path):
    _, full_model, _ = _run(task, 4)
    ckpt = tmp_path / "state.pt"

    def stop_after_3(step, total, losses):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(task, 4, checkpoint_path=ckpt, checkpoint_every=2, on_step=stop_after_3)
    _, model, resumed = _run(task, 4, checkpoint_path=ckpt, checkpoint_every=2)
    assert resumed.resumed_from_step == 2
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_runs_on_geneval_prompts(tmp_path_factory):
    from bench.tasks.geneval import GenEval

    gtask = GenEval(GenEval.Params(teacher_steps=2, nfe=[1, 4]),
                    TaskEnv("smoke", GenEval.subtasks[0], None, Path(tmp_path_factory.mktemp("a-sdm-geneval"))))
    cfg = replace(gtask.training(), steps=1, batch_size=4)
    method = ASDM(ASDM.Params())
    model, result = train(method, gtask, gtask.student(0), gtask.teacher(), cfg, seed=0)
    assert result.updates == {"student": 1} and model.net.base.unet.mid_block is None
    assert method.record_info()["flops"]["per_image"]["4"]["inheritance_speedup"] > 1.0
