"""Polino et al. 2018 quantised distillation: the quantiser on fixed buckets, straight-through shadow
weights, the deployed size and Hinton's loss, each against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods._modules import QuantizedStudent, bucketize, uniform_quantize
from bench.methods.quant_distill import QuantDistill, hinton_loss
from torch import nn


def test_two_bit_quantiser_on_two_fixed_buckets():
    # Bucket 1 = [0, .1, .5, .9]: min 0, max .9; 2 bits = 4 levels {0, .3, .6, .9}; .1 -> 0, .5 -> .6 (1.667 -> 2).
    # Bucket 2 = [1, -1, 2, .3]: min -1, scale 3, levels {-1, 0, 1, 2}; .3 -> 0 (1.3 -> 1).
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, -1.0, 2.0, 0.3])
    q = uniform_quantize(t, bits=2, bucket_size=4)
    assert torch.allclose(q, torch.tensor([0.0, 0.0, 0.6, 0.9, 1.0, -1.0, 2.0, 0.0]), atol=1e-6)


def test_last_bucket_is_padded_with_the_last_value():
    # [0, 1, 2, 3 | 10, 4]: the second bucket is [10, 4, 4, 4] (min 4, max 10); 1 bit = levels {min, max}.
    t = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 4.0])
    assert bucketize(t, 4).tolist() == [[0.0, 1.0, 2.0, 3.0], [10.0, 4.0, 4.0, 4.0]]
    assert uniform_quantize(t, bits=1, bucket_size=4).tolist() == [0.0, 0.0, 3.0, 3.0, 10.0, 4.0]


def test_constant_bucket_and_whole_tensor_bucket():
    assert uniform_quantize(torch.full((3,), 5.0), 2, 256).tolist() == [5.0, 5.0, 5.0]
    # No bucketing: one scale for the tensor, [0, 3] at 2 bits -> levels {0, 1, 2, 3}.
    t = torch.tensor([[0.0, 0.4], [1.6, 3.0]])
    assert uniform_quantize(t, 2, None).tolist() == [[0.0, 0.0], [2.0, 3.0]]


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.0, 0.25, 1.0])  # 1 bit: .25 rounds up with probability .25
    draws = torch.stack([uniform_quantize(t, 1, None, stochastic=True, generator=g) for _ in range(4000)])
    assert abs(draws[:, 1].mean().item() - 0.25) < 0.03
    assert set(draws[:, 1].unique().tolist()) == {0.0, 1.0}


def test_straight_through_gradient_is_the_gradient_at_the_quantised_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    wrapped = QuantizedStudent(net, bits=2, bucket_size=4, stochastic=False, skip_first_last=False)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(wrapped(x), y).backward()
    shadow_grads = [p.grad.clone() for p in net.parameters()]
    baked = wrapped.bake()  # the same network with weights Q(w)
    nn.functional.cross_entropy(baked(x), y).backward()
    for g_shadow, p in zip(shadow_grads, baked.parameters()):
        assert torch.allclose(g_shadow, p.grad, atol=1e-6)
    # The shadow weights themselves stay full precision.
    assert not torch.equal(net[0].weight, baked[0].weight)


def test_first_and_last_parameter_tensors_can_be_left_in_full_precision():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    wrapped = QuantizedStudent(net, 2, 4, False, skip_first_last=True)
    assert wrapped.names == ["0.bias", "1.weight"]  # indices 0 (0.weight) and -1 (1.bias) are skipped, as the code does
    baked = wrapped.bake()
    assert torch.equal(baked[0].weight, net[0].weight) and torch.equal(baked[1].bias, net[1].bias)


def test_deployed_size_counts_bits_and_bucket_scales():
    net = nn.Linear(300, 1)  # weight: 300 values = 2 buckets of 256; bias: 1 value = 1 bucket
    wrapped = QuantizedStudent(net, bits=4, bucket_size=256, stochastic=False, skip_first_last=False)
    size = wrapped.size_bits()
    assert size["quantized_bits"] == 300 * 4 + 2 * 64 + 1 * 4 + 1 * 64
    assert size["other_bits"] == 0 and size["buckets"] == 3


def test_hinton_loss_by_hand():
    # z_s = [0, 0], z_t = [2, 0], y = 0, T = 2: p = softmax([1, 0]), q = [.5, .5].
    p0 = math.exp(1) / (math.exp(1) + 1)
    kl = p0 * math.log(p0 / 0.5) + (1 - p0) * math.log((1 - p0) / 0.5)
    expected = 0.7 * 4 * kl + 0.3 * math.log(2)
    got = hinton_loss(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 2.0, 0.7)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # PyTorch 0.3's KLDivLoss default averaged over classes too: the soft term is divided by C = 2.
    got = hinton_loss(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 2.0, 0.7, "elementwise")
    assert got.item() == pytest.approx(0.7 * 4 * kl / 2 + 0.3 * math.log(2), rel=1e-6)


def test_defaults_follow_the_paper_and_code():
    p = QuantDistill.Params()
    assert (p.bits, p.bucket_size, p.temperature, p.soft_weight, p.rounding) == (4, 256, 2.0, 0.7, "deterministic")


def test_finalize_returns_weights_on_the_grid_and_records_the_size():
    torch.manual_seed(0)
    method = QuantDistill(QuantDistill.Params(bits=2, bucket_size=8, quantize_first_last=True))
    student = method.init_student(None, nn.Linear(8, 1, bias=False), ctx=None)
    final = method.finalize_student(student, ctx=None)
    w = final.weight.detach().reshape(-1)
    lo, hi = student.net.weight.min(), student.net.weight.max()
    levels = lo + (hi - lo) * torch.arange(4) / 3
    assert all(torch.isclose(levels, v, atol=1e-6).any() for v in w)
    info = method.record_info()["quantization"]
    assert info["bits"] == 2 and info["size_bytes"] == (8 * 2 + 64) / 8 and info["float32_size_bytes"] == 32


def test_default_follows_the_official_experiments_first_and_last_tensors_full_precision():
    # antspy/quantized_distillation's CIFAR-10 wide-ResNet, CIFAR-100 and ImageNet scripts all pass
    # quantize_first_and_last_layer=False: the first (0.weight) and last (2.bias) tensors stay float.
    method = QuantDistill(QuantDistill.Params())
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapped = method.init_student(None, net, None)
    assert wrapped.names == ["0.bias", "2.weight"]
    notes = " ".join(method.table_notes(None))
    assert "1/C as large" in notes and "stay full precision" in notes
    every = QuantDistill(QuantDistill.Params(quantize_first_last=True, kl_reduction="elementwise"))
    assert every.init_student(None, net, None).names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "1/C" not in " ".join(every.table_notes(None))
