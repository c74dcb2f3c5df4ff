"""MEAL V2 (Shen & Savvides 2020): the ensemble target, the similarity loss, the discriminator's labels,
shape and loss, and the joint minimisation, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods._modules import LogitDiscriminator
from bench.methods.meal_v2 import (
    MEALV2,
    discriminator_labels,
    discriminator_loss,
    ensemble_target,
    similarity_loss,
)
from torch import nn

from bench.api import OptimConfig, Outputs, TrainConfig
from bench.runner import method_train_config

LN3 = math.log(3.0)


def test_target_is_the_mean_of_softmaxes_not_the_softmax_of_the_mean():
    # softmax([0, ln 3]) = [.25, .75]; softmax([ln 3, 0]) = [.75, .25]; their mean is [.5, .5].
    probs, mean_logits = ensemble_target([torch.tensor([[0.0, LN3]]), torch.tensor([[LN3, 0.0]])])
    assert torch.allclose(probs, torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(mean_logits, torch.tensor([[LN3 / 2, LN3 / 2]]))
    # With unequal teachers the two differ: softmax([0, ln 3]) and softmax([0, 0]) average to [.375, .625],
    # while the softmax of their mean logits [0, ln 3 / 2] is [1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3)].
    probs, _ = ensemble_target([torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]])])
    assert torch.allclose(probs, torch.tensor([[0.375, 0.625]]))


def test_similarity_loss_is_the_cross_entropy_to_the_target():
    # Target [.5, .5], student [0, 0] -> -(.5 ln .5 + .5 ln .5) = ln 2; student [ln 3, 0] -> -(.5 ln .75 + .5 ln .25).
    target = torch.tensor([[0.5, 0.5]])
    assert similarity_loss(torch.zeros(1, 2), target).item() == pytest.approx(math.log(2))
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert similarity_loss(torch.tensor([[LN3, 0.0]]), target).item() == pytest.approx(expected, rel=1e-6)


def test_discriminator_labels_student_first_then_teacher():
    assert discriminator_labels(2).tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]


def test_discriminator_shape_of_the_official_code():
    d = LogitDiscriminator(1000, k=8)
    assert [(c.in_channels, c.out_channels) for c in (d.conv1, d.conv2, d.conv3)] == [(1000, 125), (125, 15), (15, 2)]
    small = LogitDiscriminator(10, k=8, min_width=8)  # 10 // 8 = 1 would leave no width: floored at 8
    assert [(c.in_channels, c.out_channels) for c in (small.conv1, small.conv2, small.conv3)] == [(10, 8), (8, 8), (8, 2)]
    # The floor also widens the second layer of every label space below 512 = 8 K^2 classes: 100 classes give
    # 100 -> 12 -> 8 here where the official code's 100 // 8 // 8 would give 100 -> 12 -> 1 (documented deviation).
    mid = LogitDiscriminator(100, k=8, min_width=8)
    assert [(c.in_channels, c.out_channels) for c in (mid.conv1, mid.conv2, mid.conv3)] == [(100, 12), (12, 8), (8, 2)]
    wide = LogitDiscriminator(512, k=8, min_width=8)
    assert [(c.in_channels, c.out_channels) for c in (wide.conv1, wide.conv2, wide.conv3)] == [(512, 64), (64, 8), (8, 2)]
    assert (d(torch.randn(5, 1000)) >= 0).all(), "a ReLU follows the last layer, as in the official code"


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 2)


def test_discriminator_loss_by_hand():
    # D outputs 0 everywhere: BCE-with-logits(0, t) = ln 2 for every entry, whatever the label.
    loss = discriminator_loss(_Zero(), torch.randn(3, 4), torch.randn(3, 4))
    assert loss.item() == pytest.approx(math.log(2))


class _Ctx:
    """A step context whose student and teachers are linear maps of ``batch["x"]``: the losses can only see
    the batch through them (the harness's ``teacher_outputs`` / ``student_outputs``)."""

    def __init__(self, student: nn.Module, teachers: list[nn.Module]):
        self.student_net, self.teacher_nets = student, teachers
        self.teachers = teachers

    def student_outputs(self, batch):
        return Outputs(logits=self.student_net(batch["x"]))

    def teacher_outputs(self, batch, index=0):
        with torch.no_grad():
            return Outputs(logits=self.teacher_nets[index](batch["x"]))


def _linear(weight: list[list[float]]) -> nn.Linear:
    lin = nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
    return lin


def _set_discriminator(disc: LogitDiscriminator) -> None:
    """Fixed, hand-chosen weights (C = 3 -> 8 -> 8 -> 2 at the floor), so D's output can be written out below."""
    g = torch.Generator().manual_seed(0)  # D outputs non-zero on 7 of the 8 entries below
    with torch.no_grad():
        for conv in (disc.conv1, disc.conv2, disc.conv3):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.7)
            conv.bias.copy_(torch.rand(conv.bias.shape, generator=g) * 0.5)  # positive: ReLUs mostly open


def _meal_with_fixed_disc() -> MEALV2:
    method = MEALV2(MEALV2.Params())
    method._build_discriminator(3, seed=0)
    _set_discriminator(method.disc)
    return method


X = torch.tensor([[1.0, 0.0], [0.5, -1.0]])  # two examples, two input features, three classes
STUDENT_W = [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]]
TEACHER_WS = [[[2.0, 0.0], [0.0, 1.0], [-1.0, 0.5]], [[0.0, 1.5], [1.0, -1.0], [0.5, 0.5]]]


def test_training_step_losses_by_hand():
    method = _meal_with_fixed_disc()
    student = _linear(STUDENT_W)
    ctx = _Ctx(student, [_linear(w) for w in TEACHER_WS])
    losses = method.training_step({"x": X, "labels": torch.tensor([0, 2]), "index": torch.arange(2)}, ctx)
    assert set(losses) == {"student", "discriminator"}

    # Written out from the formulas, independently of the module's helpers.
    z_s = X @ torch.tensor(STUDENT_W).T
    z_t = [X @ torch.tensor(w).T for w in TEACHER_WS]
    p_bar = sum(torch.exp(z) / torch.exp(z).sum(-1, keepdim=True) for z in z_t) / 2  # mean of the softmaxes
    log_q = z_s - torch.log(torch.exp(z_s).sum(-1, keepdim=True))
    sim = -(p_bar * log_q).sum(-1).mean()
    z_bar = (z_t[0] + z_t[1]) / 2  # D sees the teachers' mean *logits*
    d = method.disc

    def disc_out(v: torch.Tensor) -> torch.Tensor:
        h = v
        for conv in (d.conv1, d.conv2, d.conv3):
            h = torch.clamp(h @ conv.weight[:, :, 0, 0].T + conv.bias, min=0)
        return h

    o = disc_out(torch.cat([z_s, z_bar]))  # [4, 2]: two student rows, then two teacher rows
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    sig = 1 / (1 + torch.exp(-o))
    bce = -(t * torch.log(sig) + (1 - t) * torch.log(1 - sig)).mean()  # mean over the 2B x 2 entries
    assert losses["discriminator"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert losses["student"].item() == pytest.approx((sim + bce).item(), rel=1e-5)
    # The similarity term alone (without D) is the soft cross-entropy to the averaged softmax.
    no_d = MEALV2(MEALV2.Params(use_discriminator=False)).training_step({"x": X}, ctx)
    assert set(no_d) == {"student"} and no_d["student"].item() == pytest.approx(sim.item(), rel=1e-6)


def _step_and_grads(method: MEALV2, ctx: _Ctx, batch: dict) -> tuple[float, float, list[torch.Tensor]]:
    ctx.student_net.zero_grad(set_to_none=True)
    losses = method.training_step(batch, ctx)
    losses["student"].backward()
    return losses["student"].item(), losses["discriminator"].item(), [p.grad.clone() for p in ctx.student_net.parameters()]


def test_no_label_enters_the_loss_but_the_teachers_do():
    method = _meal_with_fixed_disc()
    ctx = _Ctx(_linear(STUDENT_W), [_linear(w) for w in TEACHER_WS])
    base = _step_and_grads(method, ctx, {"x": X, "labels": torch.tensor([0, 2]), "index": torch.arange(2)})
    # Other labels, or no labels at all: the same losses and the same student gradient.
    for batch in ({"x": X, "labels": torch.tensor([1, 1]), "index": torch.arange(2)}, {"x": X}):
        again = _step_and_grads(method, ctx, batch)
        assert again[:2] == base[:2]
        assert all(torch.equal(a, b) for a, b in zip(again[2], base[2]))
    # Other teachers: both losses move.
    ctx_other = _Ctx(ctx.student_net, [_linear(TEACHER_WS[0]), _linear([[0.0, 0.0], [3.0, 0.0], [0.0, -2.0]])])
    other = _step_and_grads(method, ctx_other, {"x": X, "labels": torch.tensor([0, 2])})
    assert other[0] != pytest.approx(base[0], rel=1e-4) and other[1] != pytest.approx(base[1], rel=1e-4)


def test_weight_decay_is_zero_for_every_optimiser():
    cfg = TrainConfig(steps=10, batch_size=4, eval_batch_size=4, optim=OptimConfig(weight_decay=0.05))
    assert method_train_config(cfg, MEALV2(MEALV2.Params())).optim.weight_decay == 0.0


def test_ensemble_is_the_whole_pool_by_default():
    from bench.api import TeacherCandidate

    pool = [TeacherCandidate("a", 10), TeacherCandidate("b", 20)]
    assert MEALV2(MEALV2.Params()).select_teachers(pool, 5) == ["a", "b"]
    assert MEALV2(MEALV2.Params(teachers=["b"])).select_teachers(pool, 5) == ["b"]
