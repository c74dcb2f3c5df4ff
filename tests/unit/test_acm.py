"""ACM (Wójcik et al. 2023): the gate's per-token choices and the executed learners, the straight-through Gumbel
gate, the phase-1 representation loss (with its detach mode), the phase-2 labels and loss, the phase-3 compute
penalty and its entropy/diversity terms — each against numbers worked out by hand or the formula written out in
plain torch here; plus the ACMization of a timm ViT (q/k/v targets), the phase plan and the full-width FLOPs claim.

Breaks tried (each made the named test fail, then was restored):
* ``executed_mask`` without the flips (prefix instead of suffix sums) -> test_hand_made_choices_execute_the_first_k_learners
* ``GateNet.forward`` eval branch without ``pad_min_choice`` -> test_eval_gate_is_the_argmax_with_the_minimum_choice_padding
* ``st_gumbel`` returning the soft sample -> test_straight_through_gumbel_forward_is_one_hot_backward_is_the_relaxation;
  returning the hard one-hot only (no gradient) -> the same test
* ``combine`` ignoring ``gate_task_gradient`` (never detaching) -> test_task_gradient_reaches_the_gate_only_when_asked
* ``cumulative_outputs`` with ``detach`` ignored (plain cumsum) -> test_representation_loss_and_its_detach_mode_by_hand
* ``gate_labels`` returning ``first`` instead of ``first + 1`` -> test_gate_labels_by_hand
* ``gate_loss`` without the ``- min_choice`` shift -> test_gate_loss_by_hand
* ``budget_loss`` dividing by sum(costs) without N -> test_budget_penalty_by_hand
* ``entropy_loss`` normalising by log N instead of log(N + 1) -> test_entropy_and_diversity_terms_by_hand;
  ``diversity_loss`` without the factor 2 -> the same test
* ``acmize_vit`` giving q the part index 1 -> test_acmized_vit_targets_are_the_teachers_q_k_v_chunks
* ``phase_plan`` without the max(1, .) -> test_phase_plan_follows_the_official_step_shares
* ``set_trainable`` training the learners in phase 2 -> test_trainable_parameters_per_phase
* ``learner_flops`` without the factor 2 -> test_full_width_flops_are_counted_and_the_learner_cost_is_right
* the width report summing mean_k instead of mean_k x tokens -> test_width_report_and_expected_executed_flops_by_hand
* phase 1 summing the ACMs' losses instead of averaging -> test_phase_one_step_regresses_every_acm_on_the_teachers_layers
* phase 3 adding the budget term unweighted -> test_end_to_end_step_is_the_label_loss_plus_the_weighted_budget_penalty
* ``unsupported`` accepting non-ViT teachers -> test_runs_on_vit_teachers_only
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from bench.methods import _acm
from bench.methods.acm import ACM, phase_plan, set_trainable
from torch import nn


class _FixedGate(nn.Module):
    """Stands in for the gating network: returns a hand-made choice tensor."""

    def __init__(self, choice):
        super().__init__()
        self.choice = choice

    def forward(self, x):
        return self.choice


def _layer(d_in=2, d_out=2, n=3, width=2, act=None, min_choice=0, **kw):
    torch.manual_seed(0)
    return _acm.ACMLayer(d_in, d_out, n, width, act or nn.ReLU(), min_choice=min_choice, gate_hidden=4,
                         gate_depth=2, tau=0.8, **kw)


def _learner(layer, x, i):
    """Learner i (0-based) in plain torch: relu(x W1[:, i] + b1[i]) W2[i]."""
    w = layer.width
    h = torch.relu(x @ layer.w1[:, i * w:(i + 1) * w] + layer.b1[i * w:(i + 1) * w])
    return h @ layer.w2[i * w:(i + 1) * w]


def test_hand_made_choices_execute_the_first_k_learners():
    layer = _layer().eval()
    x = torch.tensor([[[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0], [2.0, 1.0]]])  # 1 example, 4 tokens
    # Hand-made gate output over 0..3 learners: token 0 -> 2, token 1 -> 0, token 2 -> 3, token 3 -> 1.
    choice = torch.tensor([[[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]], dtype=torch.float32)
    executed = {0: [0, 1], 1: [], 2: [0, 1, 2], 3: [0]}
    assert _acm.executed_mask(choice)[0].tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]
    layer.gate = _FixedGate(choice)
    with torch.no_grad():
        y = layer(x)
        for t, run in executed.items():
            expected = sum((_learner(layer, x[0, t], i) for i in run), torch.zeros(2))
            assert torch.allclose(y[0, t], expected, atol=1e-6), t
        assert torch.equal(y[0, 1], torch.zeros(2))  # no learner: the ACM outputs zero (no output bias)


def test_eval_gate_is_the_argmax_with_the_minimum_choice_padding():
    gate = _acm.GateNet(2, num_choices=4, min_choice=1, hidden=4, depth=1, tau=0.8).eval()
    with torch.no_grad():  # one linear layer: logits = x W^T + b over the choices 1, 2, 3
        gate.net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        gate.net[0].bias.zero_()
        out = gate(torch.tensor([[2.0, 1.0], [0.0, 3.0], [-2.0, -1.0]]))
    # logits (2, 1, -3) -> choice 1; (0, 3, -3) -> choice 2; (-2, -1, 3) -> choice 3; column 0 is never chosen.
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_straight_through_gumbel_forward_is_one_hot_backward_is_the_relaxation():
    logits = torch.tensor([[0.2, 1.0, -0.5], [2.0, 0.0, 0.1]], requires_grad=True)
    g = torch.tensor([[1.5, 0.0, 0.3], [-0.4, 0.9, 2.5]])
    tau = 0.8
    out = _acm.st_gumbel(logits, tau, g)
    # logits + g = (1.7, 1.0, -0.2) -> 0; (1.6, 0.9, 2.6) -> 2.
    assert torch.allclose(out.detach(), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), atol=1e-6)
    w = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]])
    (out * w).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    (torch.softmax((ref + g) / tau, -1) * w).sum().backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6)
    # In training mode the gate draws g as torch does (-log Exp(1)) and pads the minimum choice.
    gate = _acm.GateNet(2, num_choices=3, min_choice=1, hidden=4, depth=2, tau=tau).train()
    x = torch.randn(5, 2)
    torch.manual_seed(3)
    sample = gate(x)
    z = gate.logits(x).detach()
    torch.manual_seed(3)
    noise = -torch.empty_like(z).exponential_().log()
    expected = F.one_hot((z + noise).argmax(-1), 2).float()
    assert torch.allclose(sample.detach(), torch.cat([torch.zeros(5, 1), expected], -1), atol=1e-6)


def test_task_gradient_reaches_the_gate_only_when_asked():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    g = torch.tensor([[0.1, 0.2, 0.0, 0.4], [0.3, 0.0, 0.2, 0.1]])
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    for on in (False, True):
        layer = _layer(gate_task_gradient=on)
        logits.grad = None
        choice = _acm.st_gumbel(logits, 0.8, g)
        y = layer.combine(layer.hidden(x), choice)
        (y * w).sum().backward()
        if not on:  # the official code: the choice is used as an index, the task loss never reaches the gate
            assert logits.grad is None or torch.count_nonzero(logits.grad) == 0
            continue
        # d y / d choice_k = output at k learners: the gradient is that of sum_k soft_k (w . Y_k).
        with torch.no_grad():
            cum = torch.stack([sum((_learner(layer, x, i) for i in range(k)), torch.zeros(2, 2)) for k in range(4)], 1)
        ref = logits.detach().clone().requires_grad_(True)
        soft = torch.softmax((ref + g) / 0.8, -1)
        (soft * (cum * w[:, None, :]).sum(-1)).sum().backward()
        assert torch.allclose(logits.grad, ref.grad, atol=1e-5)


def test_representation_loss_and_its_detach_mode_by_hand():
    # One token, N = 2 learners of width 2 outputs o1 = (1, 2), o2 = (3, -1); target t = (2, 2).
    # Outputs at 0, 1, 2 learners: (0, 0), (1, 2), (4, 1). Squared errors: 8, 1, 5 -> MSE over 6 values = 14 / 6.
    outs = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], requires_grad=True)
    t = torch.tensor([[2.0, 2.0]])
    for detach in (True, False):
        outs.grad = None
        loss = _acm.representation_loss(_acm.cumulative_outputs(outs, detach), t)
        assert loss.item() == pytest.approx(14 / 6)
        loss.backward()
        # d/d o1: term k=1 gives 2 (y1 - t) / 6 = (-2, 0) / 6; term k=2 (without detach) adds 2 (y2 - t) / 6 = (4, -2) / 6.
        # d/d o2: term k=2 only: (4, -2) / 6.
        g1 = torch.tensor([-2.0, 0.0]) / 6 + (0 if detach else torch.tensor([4.0, -2.0]) / 6)
        assert torch.allclose(outs.grad[0, 0], g1, atol=1e-6), detach
        assert torch.allclose(outs.grad[0, 1], torch.tensor([4.0, -2.0]) / 6, atol=1e-6)


def test_gate_labels_by_hand():
    # Errors e_0..e_4 per token (N = 4), factor 1.2; the cumulative outputs are target + e_k * (1, 0).
    errs = torch.tensor([[10.0, 4.0, 3.5, 1.0, 0.9],    # e_j/e_{j+1} = 2.5, 1.14, 3.5, 1.11: first < 1.2 at j=1 -> 2
                         [10.0, 1.0, 0.5, 0.25, 0.125],  # 10, 2, 2, 2: never -> N = 4
                         [1.0, 0.9, 0.1, 0.05, 0.01],    # first ratio 1.11 < 1.2 at j = 0 -> N (official quirk)
                         [8.0, 4.0, 2.0, 1.9, 0.1]])     # 2, 2, 1.05: j = 2 -> 3
    target = torch.tensor([[1.0, -1.0]] * 4)
    cum = target[:, None, :] + errs[..., None] * torch.tensor([1.0, 0.0])
    assert _acm.gate_labels(cum, target, 1.2).tolist() == [2, 4, 4, 3]


def test_gate_loss_by_hand():
    # A gate over choices 1..3 (min choice 1): logits (0, ln 3, ln 6) -> p = (.1, .3, .6) for choices 1, 2, 3.
    # Labels 2 and 1 -> -log .3, -log .1.
    logits = torch.tensor([[0.0, math.log(3.0), math.log(6.0)]] * 2)
    loss = _acm.gate_loss(logits, torch.tensor([2, 1]), min_choice=1)
    assert loss.item() == pytest.approx((-math.log(0.3) - math.log(0.1)) / 2, rel=1e-6)


def test_budget_penalty_by_hand():
    # B = 1, T = 2 tokens, A = 2 ACMs, N = 2 (choices 0..2); one learner costs 1 (ACM 0) and 3 (ACM 1).
    # ACM 0: tokens choose 2 and 0 -> mean 1 learner -> 1 x 1; ACM 1: 1 and 1 -> 1 x 3. Executed 4 of 2 x (1 + 3) = 8.
    eye = torch.eye(3)
    choices = torch.stack([torch.stack([eye[2], eye[1]]), torch.stack([eye[0], eye[1]])])[None]  # [1, T, A, 3]
    costs = torch.tensor([1.0, 3.0])
    assert _acm.budget_loss(choices, costs, 0.6).item() == pytest.approx(0.1)
    assert _acm.budget_loss(choices, costs, 0.25).item() == pytest.approx(0.25)
    # The gradient reaches the choices (the straight-through samples): d/d choice[t, a, k] = sign * k c_a / (T * 8).
    c = choices.clone().requires_grad_(True)
    _acm.budget_loss(c, costs, 0.6).backward()  # executed fraction .5 < .6: sign -1
    assert c.grad[0, 0, 1, 2].item() == pytest.approx(-2 * 3.0 / (2 * 8))


def test_entropy_and_diversity_terms_by_hand():
    eye = torch.eye(3)  # N = 2, choices 0..2
    # Example 0, one ACM, 2 tokens choosing 0 and 2: histogram (.5, 0, .5), entropy ln 2; example 1: both choose 1:
    # entropy 0. Loss = -(ln 2 / ln 3 + 0) / 2.
    choices = torch.stack([torch.stack([eye[0], eye[2]]), torch.stack([eye[1], eye[1]])])[:, :, None, :]  # [2, 2, 1, 3]
    assert _acm.entropy_loss(choices).item() == pytest.approx(-(math.log(2) / math.log(3)) / 2, rel=1e-5)
    # s_b = mean over tokens, ACMs and the 3 choices of choice_k * k: example 0: (0 + 2) / (2 * 3) = 1/3; example 1:
    # (1 + 1) / 6 = 1/3 -> equal, loss 0. Make example 1 choose (1, 0): s = 1/6; |s0 - s1| = 1/6 for the 2 off-diagonal
    # pairs of 4 -> mean 1/12 -> loss -2/12.
    assert _acm.diversity_loss(choices).item() == pytest.approx(0.0, abs=1e-7)
    choices[1, 1, 0] = eye[0]
    assert _acm.diversity_loss(choices).item() == pytest.approx(-2.0 / 12, rel=1e-5)


def test_full_width_flops_are_counted_and_the_learner_cost_is_right():
    from bench.measure.flops import count_flops

    layer = _acm.ACMLayer(8, 6, 4, 3, nn.GELU(), min_choice=1, gate_hidden=5, gate_depth=3, tau=0.8).eval()
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        flops = count_flops(lambda: layer(x)).flops
    tokens = 2 * 7
    learners = tokens * 4 * 2 * 3 * (8 + 6)  # every learner runs: 2 x width x (d_in + d_out) per token each
    gate = tokens * 2 * (8 * 5 + 5 * 5 + 5 * 4)  # 8 -> 5 -> 5 -> 4 choices (1..4)
    assert layer.learner_flops == 2 * 3 * (8 + 6) and layer.gate_flops * tokens == gate
    assert flops == learners + gate


def test_learner_widths_follow_acmize_vit():
    # ViT-B: d = 768, mlp 3072, N = 4, factor 1: FFN learners 768 wide, projections round(.25 * 590592 / 1537) = 96.
    assert _acm.learner_width("ffn", 768, 768, 3072, 4, 1.0) == 768
    assert _acm.learner_width("proj", 768, 768, 0, 4, 1.0) == round(0.25 * (768 ** 2 + 768) / 1537) == 96


def test_acmized_vit_targets_are_the_teachers_q_k_v_chunks():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=1, mlp_ratio=2.0,
                            num_classes=3, qkv_bias=True).eval()
    teacher_attn = vit.blocks[0].attn
    import copy

    student = copy.deepcopy(vit)
    layers = _acm.acmize_vit(student, num_learners=2, flops_factor=1.0, ffn=True, attention=True,
                             attention_min_choice=1, gate_hidden=4, gate_depth=3, tau=0.8, gate_task_gradient=False)
    assert [l.kind for l in layers] == ["q", "k", "v", "o", "ffn"]
    assert [l.width for l in layers] == [4, 4, 4, 4, 16]  # round(.5 * 272 / 33) = 4; 32 / 2
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        acts = _acm.capture(vit, lambda m: m(x), [l.site for l in layers])
        for layer in layers[:3]:
            inp, out = acts[layer.site]
            target = out.chunk(layer.parts, -1)[layer.part]
            j = ("q", "k", "v").index(layer.kind)  # timm splits qkv's output as (q, k, v), 16 channels each
            w, b = teacher_attn.qkv.weight[16 * j:16 * (j + 1)], teacher_attn.qkv.bias[16 * j:16 * (j + 1)]
            assert torch.allclose(target, F.linear(inp, w, b), atol=1e-6)
        student.eval()
        assert student(x).shape == (2, 3)


def test_phase_plan_follows_the_official_step_shares():
    ratio = (16.0, 8.0, 97.0)
    assert phase_plan(100, ratio) == [("distill", 13), ("gates", 7), ("end_to_end", 80)]
    assert phase_plan(3, ratio) == [("distill", 1), ("gates", 1), ("end_to_end", 1)]
    assert phase_plan(2, ratio) == [("distill", 1), ("end_to_end", 1)]
    assert phase_plan(1, ratio) == [("end_to_end", 1)]
    plan = ACM(ACM.Params()).generations(121)
    assert [g.steps for g in plan] == [16, 8, 97] and not any(g.fresh_student for g in plan)


def test_trainable_parameters_per_phase():
    model = nn.Sequential(nn.Linear(2, 2), _layer())
    set_trainable(model, "distill")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"1.w1", "1.b1", "1.w2"}
    set_trainable(model, "gates")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                           if n.startswith("1.gate.")}
    set_trainable(model, "end_to_end")
    assert all(p.requires_grad for p in model.parameters())


def test_defaults_are_the_official_recipes():
    p = ACM.Params()
    assert (p.num_learners, p.flops_factor, p.gate_hidden, p.gate_depth, p.gumbel_tau) == (4, 1.0, 16, 3, 0.8)
    assert (p.gate_error_factor, p.budget_weight, p.entropy_weight, p.diversity_weight) == (1.2, 0.1, 0.05, 0.05)
    assert p.attention_min_learners == 1 and p.detach_learners and not p.gate_task_gradient
    assert ACM.optim_overrides == {"weight_decay": 0.0, "grad_clip": 1.0}


def test_width_report_and_expected_executed_flops_by_hand():
    from types import SimpleNamespace

    # N = 2. ACM "q" (a learner costs 10 FLOPs per token): 4 tokens choose 1, 1, 1, 2 -> 5 learners run of 8;
    # ACM "ffn" (30 per token): choices 0, 0, 2, 2 -> 4 of 8. Over 2 examples.
    layers = [SimpleNamespace(kind="q", learner_flops=10, gate_flops=1),
              SimpleNamespace(kind="ffn", learner_flops=30, gate_flops=2)]
    tallies = [torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64)]
    model = nn.Linear(4, 100)  # the counter sees 2 x 4 x 100 = 800 FLOPs per example
    task = SimpleNamespace(example_inputs=lambda n: {"x": torch.ones(n, 4)}, forward=lambda m, b: m(b["x"]))
    method = ACM(ACM.Params(num_learners=2))
    r = method._width_report(layers, tallies, 2, model, task)
    assert r["average_width"] == pytest.approx(9 / 16)
    assert r["flops_weighted_width"] == pytest.approx((5 * 10 + 4 * 30) / (8 * 10 + 8 * 30))
    assert r["width_by_kind"] == {"q": pytest.approx(5 / 8), "ffn": pytest.approx(4 / 8)}
    assert r["choice_histogram_by_kind"]["ffn"] == [0.5, 0.0, 0.5]
    assert r["tokens_per_example"] == 2 and r["gate_flops_per_example"] == (4 * 1 + 4 * 2) / 2
    assert r["flops_saved_per_example"] == (320 - 170) / 2
    assert r["counted_flops_per_example"] == 800 and r["expected_executed_flops_per_example"] == 800 - 75


def test_runs_on_vit_teachers_only():
    from types import SimpleNamespace

    m = ACM(ACM.Params())
    assert "text encoders (GLUE) are not implemented" in m.unsupported(SimpleNamespace())  # no ViT teacher at all
    assert "not a ViT" in m.unsupported(SimpleNamespace(teacher_is_vit=lambda: False))  # e.g. the small tier's ResNets
    assert m.unsupported(SimpleNamespace(teacher_is_vit=lambda: True)) is None


def _classifier(seed=0):
    from bench.tasks.imagenet.nets import ImageClassifier
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=1, mlp_ratio=2.0, num_classes=3)
    cfg = {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return ImageClassifier(vit, cfg, "tiny-vit").eval()


class _Ctx:
    def __init__(self, teacher, generation):
        from bench.api import Outputs

        self.teacher, self.generation, self.seed = teacher, generation, 0
        self.task = type("T", (), {"forward": staticmethod(lambda m, b: Outputs(logits=m(b["pixels"])))})()
        self.passes = 0

    def run_teacher(self, fn, n_examples, index=0):
        self.passes += 1
        with torch.no_grad():
            return fn(self.teacher)

    def student_outputs(self, batch):
        return self.task.forward(self.student, batch)

    def label_loss(self, outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"])


def test_phase_one_step_regresses_every_acm_on_the_teachers_layers():
    teacher = _classifier()
    method = ACM(ACM.Params(num_learners=2))
    method.generations(121)
    ctx = _Ctx(teacher, generation=0)
    ctx.student = method.init_student(teacher, None, ctx)
    batch = {"pixels": torch.rand(2, 3, 8, 8), "labels": torch.tensor([0, 2]), "index": torch.arange(2)}
    loss = method.training_step(batch, ctx)["student"]
    assert ctx.passes == 1
    # By hand: hooks on the teacher's mlp / qkv / proj give each replaced layer's input and output; the ACM's outputs
    # at 0, 1, 2 learners (plain torch) against that output (q, k, v: thirds of qkv's), MSE, mean over the 10 ACMs.
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=n: seen.__setitem__(name, (i[0], o)))
             for n, m in teacher.named_modules() if n.endswith(("mlp", "attn.qkv", "attn.proj"))]
    with torch.no_grad():
        teacher(batch["pixels"])
    for h in hooks:
        h.remove()
    terms = []
    with torch.no_grad():
        for i, blk in enumerate(ctx.student.net.blocks):
            acms = [*blk.attn.qkv.parts, blk.attn.proj, blk.mlp]
            io = [seen[f"net.blocks.{i}.attn.qkv"]] * 3 + [seen[f"net.blocks.{i}.attn.proj"], seen[f"net.blocks.{i}.mlp"]]
            targets = [*io[0][1].chunk(3, -1), io[3][1], io[4][1]]
            for acm, (x, _), t in zip(acms, io, targets):
                w = acm.width
                outs = [acm.act(x @ acm.w1[:, j * w:(j + 1) * w] + acm.b1[j * w:(j + 1) * w]) @ acm.w2[j * w:(j + 1) * w]
                        for j in range(2)]
                ys = [torch.zeros_like(t), outs[0], outs[0] + outs[1]]
                terms.append(sum(((y - t) ** 2).mean() for y in ys) / 3)
    assert len(terms) == 10
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # Only the learners train in phase 1.
    assert {n.split(".")[-1] for n, p in ctx.student.named_parameters() if p.requires_grad} == {"w1", "b1", "w2"}


def test_end_to_end_step_is_the_label_loss_plus_the_weighted_budget_penalty():
    teacher = _classifier()
    method = ACM(ACM.Params(num_learners=2, entropy_weight=0.0, diversity_weight=0.0))
    method.generations(3)
    ctx = _Ctx(teacher, generation=2)
    ctx.student = method.init_student(teacher, None, ctx)
    set_trainable(ctx.student, "end_to_end")
    ctx.student.train()
    batch = {"pixels": torch.rand(2, 3, 8, 8), "labels": torch.tensor([0, 2]), "index": torch.arange(2)}
    torch.manual_seed(5)
    loss = method.training_step(batch, ctx)["student"]
    assert ctx.passes == 0  # the teacher is not run (kd_weight 0)
    layers = _acm.acm_layers(ctx.student)
    # Replay the same Gumbel draws: the executed fraction from the sampled choices, then CE + 0.1 |fraction - .6|.
    torch.manual_seed(5)
    logits = ctx.student(batch["pixels"])
    num = sum(float((l.last_choice.detach() * torch.arange(3.0)).sum(-1).mean()) * 2 * l.width * (16 + 16)
              for l in layers)
    den = sum(2 * 2 * l.width * (16 + 16) for l in layers)
    expected = F.cross_entropy(logits, batch["labels"]) + 0.1 * abs(num / den - 0.6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
