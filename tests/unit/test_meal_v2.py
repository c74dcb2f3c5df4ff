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
    assert (d(torch.randn(5, 1000)) >= 0).all(), "a ReLU follows the last layer, as in the official code"


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 2)


def test_discriminator_loss_by_hand():
    # D outputs 0 everywhere: BCE-with-logits(0, t) = ln 2 for every entry, whatever the label.
    loss = discriminator_loss(_Zero(), torch.randn(3, 4), torch.randn(3, 4))
    assert loss.item() == pytest.approx(math.log(2))


class _Ctx:
    def __init__(self, student_logits, teacher_logits):
        self.s, self.t = student_logits, teacher_logits
        self.teachers = [None] * len(teacher_logits)

    def student_outputs(self, batch):
        return Outputs(logits=self.s)

    def teacher_outputs(self, batch, index=0):
        return Outputs(logits=self.t[index])


def test_training_step_minimises_similarity_and_discriminator_jointly():
    method = MEALV2(MEALV2.Params())
    method._build_discriminator(2, seed=0)
    z_s = torch.tensor([[0.3, -0.2]], requires_grad=True)
    ctx = _Ctx(z_s, [torch.tensor([[0.0, LN3]]), torch.tensor([[LN3, 0.0]])])
    losses = method.training_step({"labels": torch.tensor([1])}, ctx)
    sim = similarity_loss(z_s, torch.tensor([[0.5, 0.5]]))
    d = discriminator_loss(method.disc, z_s, torch.tensor([[LN3 / 2, LN3 / 2]]))
    assert set(losses) == {"student", "discriminator"}
    assert losses["student"].item() == pytest.approx((sim + d).item(), rel=1e-6)
    assert losses["discriminator"].item() == pytest.approx(d.item(), rel=1e-6)
    assert "labels" not in MEALV2.training_step.__code__.co_names, "no hard label enters the loss"


def test_weight_decay_is_zero_for_every_optimiser():
    cfg = TrainConfig(steps=10, batch_size=4, eval_batch_size=4, optim=OptimConfig(weight_decay=0.05))
    assert method_train_config(cfg, MEALV2(MEALV2.Params())).optim.weight_decay == 0.0


def test_ensemble_is_the_whole_pool_by_default():
    from bench.api import TeacherCandidate

    pool = [TeacherCandidate("a", 10), TeacherCandidate("b", 20)]
    assert MEALV2(MEALV2.Params()).select_teachers(pool, 5) == ["a", "b"]
    assert MEALV2(MEALV2.Params(teachers=["b"])).select_teachers(pool, 5) == ["b"]
