"""Hinton KD and MiniMA losses, MiniMA's teacher choice and its pruned initialisation, checked against
plain-torch formulas and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from bench.api import TeacherCandidate
from bench.methods import _bert_pruning as bp
from bench.methods.kd import KD, kd_loss
from bench.methods.minima import choose_teacher, minima_loss

# --------------------------------------------------------------------------------------------------
# KD
# --------------------------------------------------------------------------------------------------


def test_kd_by_hand_at_t1():
    # p = softmax([ln 3, 0]) = [0.75, 0.25], q = [0.5, 0.5]:
    # KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.3040988 - 0.1732868 = 0.1308120
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    total, soft = kd_loss(s, t, torch.tensor(1.0), temperature=1.0, alpha=0.9)
    assert soft.item() == pytest.approx(0.1308120, abs=1e-6)
    assert total.item() == pytest.approx(0.1 * 1.0 + 0.9 * 0.1308120, abs=1e-6)


def test_kd_by_hand_at_t2_has_the_t_squared_factor():
    # p = softmax([ln 3 / 2, 0]) = [sqrt3/(sqrt3+1), 1/(sqrt3+1)] = [0.6339746, 0.3660254]
    # KL = 0.6339746 ln(1.2679492) + 0.3660254 ln(0.7320508) = 0.0363408; x T^2 = 0.1453631
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    _, soft = kd_loss(s, t, torch.tensor(0.0), temperature=2.0, alpha=1.0)
    assert soft.item() == pytest.approx(0.1453631, abs=1e-6)


def test_kd_matches_plain_torch_formula_on_random_logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 5, generator=g, requires_grad=True)
    t = torch.randn(7, 5, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    T, a = 4.0, 0.9
    ce = F.cross_entropy(s, y)
    total, _ = kd_loss(s, t, ce, T, a)
    p = torch.softmax(t / T, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum() / 7
    reference = (1 - a) * ce + a * T * T * kl
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    g1 = torch.autograd.grad(total, s, retain_graph=True)[0]
    g2 = torch.autograd.grad(reference, s)[0]
    assert torch.allclose(g1, g2, atol=1e-7)


def test_kd_regression_adaptation():
    # 0.5 * mean((s - t)^2) = 0.5 * (1 + 4) / 2 = 1.25
    s = torch.tensor([[1.0], [0.0]])
    t = torch.tensor([[2.0], [2.0]])
    _, soft = kd_loss(s, t, torch.tensor(0.0), 4.0, 1.0, regression=True)
    assert soft.item() == pytest.approx(1.25)


def test_kd_defaults_cite_the_crd_benchmark():
    # Unset parameters resolve per task domain (methods/kd.py DOMAIN_DEFAULTS); classification keeps CRD's.
    p = KD.Params()
    assert (p.temperature, p.alpha) == (None, None)
    assert KD(p).resolve("classification") == (4.0, 0.9)


# --------------------------------------------------------------------------------------------------
# MiniMA
# --------------------------------------------------------------------------------------------------


def test_minima_loss_by_hand():
    # soft CE(softmax([ln 3, 0]), softmax([0, 0])) = -(0.75 ln 0.5 + 0.25 ln 0.5) = ln 2
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    loss = minima_loss(s, t, torch.tensor(1.0), 0.5, 0.5)
    assert loss.item() == pytest.approx(0.5 + 0.5 * math.log(2.0), abs=1e-6)


def test_minima_teacher_choice_follows_the_2_5x_law():
    pool = [TeacherCandidate("small", 100), TeacherCandidate("mid", 240), TeacherCandidate("big", 1000)]
    assert choose_teacher(pool, 100, 2.5).name == "mid"  # target 250
    assert choose_teacher(pool, 400, 2.5).name == "big"  # target 1000
    # in log scale: target 250 is 1.25x above 200 and 1.6x below 400 -> 200
    assert choose_teacher([TeacherCandidate("a", 200), TeacherCandidate("b", 400)], 100, 2.5).name == "a"


def test_middle_layers_drop_symmetrically():
    assert bp.middle_layers(32, 24) == list(range(4, 28))  # MiniMA: LLaMA-2-7B 32 -> 24 layers, d = 4
    assert bp.middle_layers(4, 2) == [1, 2]
    assert bp.middle_layers(6, 3) == [1, 2, 3]


def _bert(layers, hidden, heads, ffn, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg).eval()


def _batch(n=4, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "token_type_ids": torch.zeros(n, length, dtype=torch.long),
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    return F.cross_entropy(out.logits, batch["labels"])


def test_importance_equals_explicit_mask_gradients():
    """The Euler-identity shortcut must equal |dL/dmask| of real masks inserted into the network."""
    teacher = _bert(2, 16, 4, 32)
    batch = _batch()
    fast = bp.importance(teacher, [batch], _loss)

    model = _bert(2, 16, 4, 32)
    model.load_state_dict(teacher.state_dict())
    heads = torch.ones(2, 4, requires_grad=True)
    neurons = torch.ones(2, 32, requires_grad=True)
    hidden = torch.ones(16, requires_grad=True)
    hooks = []
    for i, layer in enumerate(model.bert.encoder.layer):
        def head_hook(mod, args, i=i):  # input of attention.output.dense: per-head context vectors
            (x,) = args
            b, n, _ = x.shape
            return (x.view(b, n, 4, 4) * heads[i].view(1, 1, 4, 1)).view(b, n, 16),
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(head_hook))
        hooks.append(layer.output.dense.register_forward_pre_hook(lambda m, a, i=i: (a[0] * neurons[i],)))
    for name, mod in model.named_modules():
        if name.endswith("LayerNorm"):
            hooks.append(mod.register_forward_hook(lambda m, a, out: out * hidden))
    _loss(model, batch).backward()
    for h in hooks:
        h.remove()
    assert torch.allclose(fast["heads"], heads.grad.abs(), rtol=1e-4, atol=1e-7)
    assert torch.allclose(fast["neurons"], neurons.grad.abs(), rtol=1e-4, atol=1e-7)
    assert torch.allclose(fast["hidden"], hidden.grad.abs(), rtol=1e-4, atol=1e-7)


def test_pruning_to_the_same_shape_is_the_identity():
    teacher = _bert(2, 16, 4, 32)
    student = _bert(2, 16, 4, 32, seed=5)
    scores = bp.importance(teacher, [_batch()], _loss)
    student.load_state_dict(bp.pruned_state_dict(teacher, student, scores), strict=True)
    for (k, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), k


def test_head_and_neuron_pruning_equals_masking_the_dropped_units():
    """Keeping heads/neurons (same width, same depth) gives exactly the teacher with the others zeroed."""
    teacher = _bert(2, 16, 4, 32)
    student = _bert(2, 16, 2, 12)  # head_dim 8 != 4: not prunable
    assert "head_dim" in bp.why_not_prunable(teacher, student)
    teacher = _bert(2, 32, 4, 64)  # head_dim 8
    student = _bert(2, 32, 4, 24)  # keep 24 of 64 neurons per layer
    cfg = student.config
    batch = _batch()
    scores = bp.importance(teacher, [batch], _loss)
    student.load_state_dict(bp.pruned_state_dict(teacher, student, scores), strict=True)
    keep = [torch.topk(scores["neurons"][i], 24).indices for i in range(2)]
    hooks = []
    for i, layer in enumerate(teacher.bert.encoder.layer):
        mask = torch.zeros(64)
        mask[keep[i]] = 1.0
        hooks.append(layer.output.dense.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    with torch.no_grad():
        masked = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        pruned = student(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    for h in hooks:
        h.remove()
    assert cfg.intermediate_size == 24
    assert torch.allclose(masked, pruned, atol=1e-5)


def test_width_and_depth_pruning_produce_a_loadable_student():
    teacher = _bert(6, 32, 4, 64)  # head_dim 8
    student = _bert(2, 16, 2, 24)  # head_dim 8
    assert bp.why_not_prunable(teacher, student) is None
    scores = bp.importance(teacher, [_batch()], _loss)
    sd = bp.pruned_state_dict(teacher, student, scores)
    student.load_state_dict(sd, strict=True)
    keep_d = torch.sort(torch.topk(scores["hidden"], 16).indices).values
    # the student's first layer is the teacher's layer 2 (middle block of 6 -> 2)
    t_w = teacher.bert.encoder.layer[2].output.LayerNorm.weight[keep_d]
    assert torch.equal(student.bert.encoder.layer[0].output.LayerNorm.weight, t_w)
    assert torch.isfinite(_loss(student, _batch())).item()


def test_families_that_do_not_match_are_reported():
    teacher = _bert(2, 16, 4, 32)
    assert "not both" in bp.why_not_prunable(teacher, torch.nn.Linear(2, 2))
    bigger = _bert(3, 16, 4, 32)
    assert "more layers" in bp.why_not_prunable(teacher, bigger)
