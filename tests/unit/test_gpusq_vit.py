"""GPUSQ-ViT (Yu et al., CVPR 2023): the 2:4 and 4:8 pair-wise masks, mask persistence through optimiser steps,
the symmetric fake quantiser, the mixed distillation loss, the weight factors and the deployed size, each against
values worked out by hand or written out in plain torch here.

Breaks tried (each made the named test fail; the code was then restored):
* masks: groups taken along the output dimension (weight.t()); the two smallest kept instead of the largest;
  4:8 pairs scored per element (2:4) instead of per pair.
* persistence: effective_weights without the mask (dense forward: masked gradients are not zero); init_student
  without apply_masks_ (pruned weights not zeroed before training).
* quantiser: floor(x + 0.5) instead of torch.round (halves up, not to even); clamp at -2^(b-1) (no narrow range);
  straight-through gradient without the clip outside amax.
* loss: tau^2 dropped; the feature term averaged over the whole batch instead of the agreeing examples; KL
  reversed; the stage-2 factors ignored; the hard label taken from the ground truth by default.
* weight factors: proportional to the loss instead of inverse.
* size: index bits counted per group of 4 instead of per kept value; the per-channel scales dropped; INT4 pairs
  counted like 2:4.
* layers: the classifier sparsified too.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from bench.methods import _gpusq_modules as gm
from bench.methods.gpusq_vit import GPUSQViT, deployed_size_bits, gpusq_loss, weight_factors
from torch import nn


class TinyNet(nn.Module):
    """fc1 (K = 8: sparse) -> ReLU -> head (the classifier: dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc1(x)))


W_HAND = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, -1.0, 0.5, -6.0],
                       [-2.0, 0.0, 0.4, 1.5, 0.01, 0.02, -0.03, 0.04]])
# Per group of 4 along the input dimension, the two largest |w|: row 0: (.9, .3) and (5, -6); row 1: (-2, 1.5) and
# (-.03, .04).
M_HAND = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
                       [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]])


def test_the_2to4_mask_keeps_the_two_largest_of_every_four_along_the_input_dimension():
    assert torch.equal(gm.mask_2to4(W_HAND), M_HAND)
    # A convolution [out, cin, kh, kw] is the GEMM [out, cin*kh*kw] in (cin, kh, kw) order: row 0 as 1 x 2 x 1 x 4.
    conv_w = W_HAND[:1].reshape(1, 2, 1, 4)
    assert torch.equal(gm.mask_2to4(conv_w), M_HAND[:1].reshape(1, 2, 1, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        gm.mask_2to4(torch.ones(2, 6))


def test_the_int4_mask_keeps_two_of_four_pairs():
    # Pairs (1, 1), (.1, 3), (.5, .4), (2, .5): magnitudes 2, 3.1, .9, 2.5 -> pairs 1 and 3 kept. (Element-wise
    # 2:4 would keep 3 and a 1 in the first half instead.)
    w = torch.tensor([[1.0, 1.0, 0.1, 3.0, 0.5, 0.4, 2.0, 0.5]])
    assert gm.mask_4to8_pairs(w).tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def test_the_mask_persists_through_optimiser_steps():
    torch.manual_seed(0)
    net = TinyNet()
    w0 = net.fc1.weight.detach().clone()
    # The expected mask by plain torch: per group of 4, the indices of the two largest magnitudes.
    top = w0.abs().reshape(4, 2, 4).topk(2, dim=-1).indices
    expected = torch.zeros(4, 2, 4).scatter_(-1, top, 1.0).reshape(4, 8)
    method = GPUSQViT(GPUSQViT.Params())
    student = method.init_student(None, net, ctx=None)
    assert student.sparse == ["fc1"] and torch.equal(student.mask_0, expected)
    assert torch.all(net.fc1.weight[expected == 0] == 0)  # pruned at once
    ctx = SimpleNamespace(student=student)
    opt = torch.optim.AdamW(student.parameters(), lr=0.05, weight_decay=0.5)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(student(x), y).backward()
        assert torch.all(net.fc1.weight.grad[expected == 0] == 0)  # the forward runs on w * mask
        opt.step()
        method.on_step_end(ctx)
    w = net.fc1.weight.detach()
    assert torch.equal(student.mask_0, expected)
    assert torch.all(w[expected == 0] == 0) and torch.all(w[expected == 1] != w0[expected == 1])
    plain = F.linear(F.relu(F.linear(x, w * expected, net.fc1.bias)), net.head.weight, net.head.bias)
    assert torch.allclose(student(x), plain, atol=1e-6)


def test_the_quantiser_on_hand_picked_numbers():
    # amax 127 at 8 bits: scale 1. Halves round to even (torch.round, as pytorch-quantization); the range is
    # narrow, [-127, 127]; the straight-through gradient is 1 inside [-amax, amax] and 0 outside.
    x = torch.tensor([2.5, 3.5, -2.5, 200.0, -300.0, 0.4], requires_grad=True)
    q = gm.fake_quant(x, torch.tensor(127.0), 8)
    assert q.tolist() == [2.0, 4.0, -2.0, 127.0, -127.0, 0.0]
    q.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    # 4 bits, amax 7: levels -7..7.
    assert gm.fake_quant(torch.tensor([0.5, 1.5, 6.6, 9.0, -8.0]), torch.tensor(7.0), 4).tolist() == [0.0, 2.0, 7.0, 7.0, -7.0]
    # Weights: per output channel amax = max |w| of the row; 4 bits -> scale 7/amax. Row 0 (amax 1): .5 * 7 = 3.5 -> 4,
    # 1.75 -> 2, .875 -> 1; row 1 is all zero (amax 0 quantises to 0).
    w = torch.tensor([[0.5, -1.0, 0.25, 0.125], [0.0, 0.0, 0.0, 0.0]])
    qw = gm.fake_quant(w, gm.weight_amax(w), 4)
    assert torch.allclose(qw, torch.tensor([[4 / 7, -1.0, 2 / 7, 1 / 7], [0.0, 0.0, 0.0, 0.0]]))
    # 8 bits, amax 1.27: scale 100; .3333 -> 33.
    w8 = torch.tensor([[0.5, -1.27, 0.3333, 0.0]])
    assert torch.allclose(gm.fake_quant(w8, gm.weight_amax(w8), 8), torch.tensor([[0.5, -1.27, 0.33, 0.0]]), atol=1e-6)


def _loss_inputs():
    torch.manual_seed(3)
    s = torch.randn(4, 5)
    t = torch.randn(4, 5)
    # Teacher predicts class 1 everywhere; the student agrees on examples 0 and 2 only.
    t[:, 1] += 10
    s[[0, 2], 1] += 10
    s[[1, 3], 4] += 10
    feats_s = [torch.randn(4, 3, 2), torch.randn(4, 6)]
    feats_t = [torch.randn(4, 3, 2), torch.randn(4, 6)]
    return s, t, torch.tensor([0, 1, 2, 3]), feats_s, feats_t


def test_the_distillation_loss_composition_by_plain_torch():
    s, t, y, fs, ft = _loss_inputs()
    alpha, beta, gamma, tau, factors = 0.7, 2.0, 3.0, 2.0, [1.5, 0.5]
    got, parts = gpusq_loss(s, t, y, fs, ft, factors, alpha=alpha, beta=beta, gamma=gamma, temperature=tau)
    hard = -F.log_softmax(s, -1)[torch.arange(4), torch.ones(4, dtype=torch.long)].mean()  # teacher's arg-max: 1
    p = F.softmax(t / tau, -1)
    soft = tau ** 2 * (p * (p.log() - F.log_softmax(s / tau, -1))).sum() / 4
    layer = [((a - b) ** 2).flatten(1).mean(1)[[0, 2]].mean() for a, b in zip(fs, ft)]  # agreeing examples 0, 2
    expected = alpha * hard + beta * soft + gamma * (1.5 * layer[0] + 0.5 * layer[1])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["agree"] == 0.5 and parts["per_layer"] == pytest.approx([x.item() for x in layer], rel=1e-5)
    # Ground-truth hard labels, every example in the feature term, no factors.
    got2, _ = gpusq_loss(s, t, y, fs, ft, None, alpha=1.0, beta=0.0, gamma=1.0, temperature=1.0,
                         hard_label="ground_truth", agreement=False)
    hard_gt = F.cross_entropy(s, y)
    all_layers = sum(((a - b) ** 2).mean() for a, b in zip(fs, ft))
    assert got2.item() == pytest.approx((hard_gt + all_layers).item(), rel=1e-5)


def test_weight_factors_are_inverse_losses_with_mean_one():
    # 1/L = (1, 1/3), sum 4/3, J = 2: w = 2 * (1, 1/3) / (4/3) = (1.5, .5).
    assert weight_factors([1.0, 3.0]) == pytest.approx([1.5, 0.5])
    assert weight_factors([2.0, 2.0, 2.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_the_deployed_size_by_hand():
    method = GPUSQViT(GPUSQViT.Params())
    student = method.init_student(None, TinyNet(), ctx=None)
    student.quant_on.fill_(True)
    method.finalize_student(student, ctx=None)
    size = method.record_info()["gpusq"]["size"]
    # fc1 (sparse, 32 weights, 4 rows): 16 values x 8 bits + 16 indices x 2 bits + 4 scales x 32 + 1 input amax x 32
    # = 128 + 32 + 128 + 32 = 320. head (dense, 12 weights, 3 rows): 12 x 8 + 3 x 32 + 32 = 224. Biases: 7 x 32 = 224.
    assert size["total_bits"] == 320 + 224 + 224 and size["size_bytes"] == 96
    assert size["float32_size_bytes"] == (32 + 4 + 12 + 3) * 4
    # At INT4 the sparse pattern is 4:8 pairs: 16 values x 4 bits + (32 / 8 groups x 2 kept pairs) x 2 index bits
    # = 64 + 16, scales as above.
    bits4 = deployed_size_bits([{"n": 32, "out": 4, "sparse": True}, {"n": 12, "out": 3, "sparse": False}], 7,
                               bits=4, quantized=True, quantize_activations=True)
    assert bits4["total_bits"] == (64 + 16 + 128 + 32) + (48 + 96 + 32) + 224
    # No QAT stage: float32 values, 2 index bits per kept value, no scales.
    fp = deployed_size_bits([{"n": 32, "out": 4, "sparse": True}, {"n": 12, "out": 3, "sparse": False}], 7,
                            bits=8, quantized=False, quantize_activations=True)
    assert fp["total_bits"] == (16 * 32 + 16 * 2) + 12 * 32 + 224


def test_the_deployed_weights_are_sparse_and_on_the_grid():
    torch.manual_seed(1)
    method = GPUSQViT(GPUSQViT.Params())
    student = method.init_student(None, TinyNet(), ctx=None)
    mask = student.mask_0.clone()
    student.quant_on.fill_(True)
    w_before = student.model.fc1.weight.detach().clone()
    method.finalize_student(student, ctx=None)
    w = student.model.fc1.weight.detach()
    assert torch.all(w[mask == 0] == 0)
    scale = 127 / w_before.abs().amax(1, keepdim=True)
    assert torch.allclose(w, torch.round(w_before * scale) / scale, atol=1e-7)


def test_which_layers_are_sparsified_in_a_vit_and_a_cnn():
    from bench.tasks.imagenet import models as imodels

    vit = imodels.build(imodels.ModelSpec("vit_smoke_32d4", "vit_smoke_32d4", input_size=16), 10, seed=0)
    sparse, skipped = gm.sparse_candidates(vit, 4)
    per_block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert sparse == ["net.patch_embed.proj"] + [f"net.blocks.{b}.{n}" for b in range(4) for n in per_block]
    assert skipped == [("net.head", "classifier (kept dense)")]
    assert gm.feature_taps(vit) == ["net.blocks.2", "net.blocks.3"]
    cnn = imodels.build(imodels.ModelSpec("cifar_resnet8", "cifar_resnet8", input_size=32), 10, seed=0)
    sparse, skipped = gm.sparse_candidates(cnn, 4)
    assert ("net.stem.0", "K = 27 not divisible by 4") in skipped and ("net.fc", "classifier (kept dense)") in skipped
    assert all(n.startswith("net.blocks.") for n in sparse) and len(sparse) == 3 * 2 + 2  # 6 3x3 convs, 2 shortcuts
    assert gm.feature_taps(cnn) == ["net.blocks.1", "net.blocks.2"]


def test_unsupported_tasks_and_the_two_stages():
    method = GPUSQViT(GPUSQViT.Params())
    assert "image classifiers" in method.unsupported(SimpleNamespace(domain="lm"))
    assert method.unsupported(SimpleNamespace(domain="classification", student_is_vit=lambda: False)) is None
    assert [g.steps for g in method.generations(100)] == [50, 50]
    assert [g.steps for g in method.generations(1)] == [1]
    p = GPUSQViT.Params()
    assert (p.alpha, p.beta, p.gamma, p.bits, p.hard_label) == (1.0, 10.0, 5.0, 8, "teacher")
    assert math.isclose(p.prune_fraction, 0.5)
