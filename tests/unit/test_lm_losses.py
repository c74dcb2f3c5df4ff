"""Token-level distillation losses on the lm domain against hand-worked values.

Fixed distributions (teacher p, student q) over a 3-token vocabulary, given as logits z = log(prob) so
that softmax(z) is exactly the distribution:

    p = [0.6, 0.3, 0.1]      q = [0.2, 0.4, 0.4]

Every expected number below is worked out in the comment next to it (natural logarithms), not taken
from the implementation. The lm task flattens outputs to one row per scored token, so a loss over
several rows is the mean of the per-token values (the token average of DistiLLM/TAID's code).
"""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods.gkd import generalized_jsd
from bench.methods.kd import KD, kd_loss
from bench.methods.rkl import reverse_kl
from bench.methods.skew_kl import skew_forward_kl, skew_reverse_kl
from bench.methods.taid import taid_loss, taid_target

P = [0.6, 0.3, 0.1]
Q = [0.2, 0.4, 0.4]
ZT = torch.tensor([[math.log(x) for x in P]])
ZS = torch.tensor([[math.log(x) for x in Q]])

# KL(p || q) = 0.6 ln(0.6/0.2) + 0.3 ln(0.3/0.4) + 0.1 ln(0.1/0.4)
#            = 0.6 * 1.0986123 - 0.3 * 0.2876821 - 0.1 * 1.3862944 = 0.4342333
FKL = 0.4342333
# KL(q || p) = 0.2 ln(0.2/0.6) + 0.4 ln(0.4/0.3) + 0.4 ln(0.4/0.1)
#            = -0.2 * 1.0986123 + 0.4 * 0.2876821 + 0.4 * 1.3862944 = 0.4498681
RKL = 0.4498681


def test_forward_kl_kd_on_lm_is_pure_kl_at_t1():
    method = KD(KD.Params())
    assert method.resolve("lm") == (1.0, 1.0)  # DistiLLM/TAID KD baseline: T = 1, pure distillation
    total, soft = kd_loss(ZS, ZT, torch.tensor(5.0), 1.0, 1.0)
    assert soft.item() == pytest.approx(FKL, abs=1e-6)
    assert total.item() == pytest.approx(FKL, abs=1e-6)  # (1 - alpha) * CE vanishes at alpha = 1
    assert method.record_info() == {"temperature": 1.0, "alpha": 1.0, "domain": "lm",
                                    "defaults_used": ["temperature", "alpha"]}


def test_kd_domain_defaults_yield_to_explicit_values():
    assert KD(KD.Params()).resolve("classification") == (4.0, 0.9)
    assert KD(KD.Params(temperature=2.0)).resolve("lm") == (2.0, 1.0)
    assert KD(KD.Params(alpha=0.5)).resolve("classification") == (4.0, 0.5)


def test_reverse_kl():
    assert reverse_kl(ZS, ZT).item() == pytest.approx(RKL, abs=1e-6)


def test_skew_forward_kl_is_distillm_cross_entropy():
    # mixture a p + (1 - a) q at a = 0.1: [0.06 + 0.18, 0.03 + 0.36, 0.01 + 0.36] = [0.24, 0.39, 0.37];
    # DistiLLM logs -sum p log(mix) = -(0.6 ln 0.24 + 0.3 ln 0.39 + 0.1 ln 0.37)
    #   = 0.6 * 1.4271164 + 0.3 * 0.9416085 + 0.1 * 0.9942523 = 1.2381776
    assert skew_forward_kl(ZS, ZT, 0.1).item() == pytest.approx(1.2381776, abs=1e-6)
    # ... which is the skew KL(p || mix) = 0.3402319 plus the teacher entropy
    # H(p) = -(0.6 ln 0.6 + 0.3 ln 0.3 + 0.1 ln 0.1) = 0.8979457 (same gradient in the student).
    assert skew_forward_kl(ZS, ZT, 0.1).item() - 0.8979457 == pytest.approx(0.3402319, abs=1e-6)


def test_skew_reverse_kl():
    # mixture (1 - a) p + a q at a = 0.1: [0.54 + 0.02, 0.27 + 0.04, 0.09 + 0.04] = [0.56, 0.31, 0.13];
    # KL(q || mix) = 0.2 ln(0.2/0.56) + 0.4 ln(0.4/0.31) + 0.4 ln(0.4/0.13)
    #   = -0.2 * 1.0296194 + 0.4 * 0.2548922 + 0.4 * 1.1239300 = 0.3456051
    assert skew_reverse_kl(ZS, ZT, 0.1).item() == pytest.approx(0.3456051, abs=1e-6)


def test_generalized_jsd_at_two_betas_and_its_limits():
    # beta = 0.5: m = [0.4, 0.35, 0.25];
    # KL(p||m) = 0.6 ln 1.5 + 0.3 ln(0.3/0.35) + 0.1 ln 0.4 = 0.2432790 - 0.0462452 - 0.0916291 = 0.1054048
    # KL(q||m) = 0.2 ln 0.5 + 0.4 ln(0.4/0.35) + 0.4 ln 1.6 = -0.1386294 + 0.0534128 + 0.1880011 = 0.1027845
    # JSD = 0.5 * 0.1054048 + 0.5 * 0.1027845 = 0.1040947
    assert generalized_jsd(ZS, ZT, 0.5).item() == pytest.approx(0.1040947, abs=1e-6)
    # beta = 0.1: m = 0.1 p + 0.9 q = [0.24, 0.39, 0.37];
    # KL(p||m) = 0.6 ln 2.5 + 0.3 ln(0.3/0.39) + 0.1 ln(0.1/0.37) = 0.5497744 - 0.0787093 - 0.1308333 = 0.3402318
    # KL(q||m) = 0.2 ln(0.2/0.24) + 0.4 ln(0.4/0.39) + 0.4 ln(0.4/0.37)
    #          = -0.0364643 + 0.0101271 + 0.0311875 = 0.0048503
    # JSD = 0.1 * 0.3402318 + 0.9 * 0.0048503 = 0.0383859
    assert generalized_jsd(ZS, ZT, 0.1).item() == pytest.approx(0.0383859, abs=1e-6)
    # TRL's convention: beta = 0 is exactly the forward KL, beta = 1 exactly the reverse KL.
    assert generalized_jsd(ZS, ZT, 0.0).item() == pytest.approx(FKL, abs=1e-6)
    assert generalized_jsd(ZS, ZT, 1.0).item() == pytest.approx(RKL, abs=1e-6)


def test_taid_target_on_token_rows():
    # t = 0.4: (1 - t) z_s + t z_t = 0.6 ln q + 0.4 ln p, i.e. the normalised geometric mixture q^0.6 p^0.4:
    # [0.2^0.6 0.6^0.4, 0.4^0.6 0.3^0.4, 0.4^0.6 0.1^0.4] = [0.3807861, 0.4374074, 0.2818553], sum 1.1000488
    # -> [0.3461510, 0.3976231, 0.2562259]
    pt = taid_target(ZS, ZT, 0.4)
    assert pt[0].tolist() == pytest.approx([0.3461510, 0.3976231, 0.2562259], abs=1e-6)
    # J = -sum p_t ln q = 0.3461510 * 1.6094379 + 0.3976231 * 0.9162907 + 0.2562259 * 0.9162907 = 1.1562243
    assert taid_loss(ZS, ZT, 0.4).item() == pytest.approx(1.1562243, abs=1e-6)


def test_losses_average_over_token_rows():
    # Two scored tokens: the hand-worked pair and an identical-distribution row (divergence 0): mean = half.
    s = torch.cat([ZS, ZT])
    t = torch.cat([ZT, ZT])
    assert reverse_kl(s, t).item() == pytest.approx(RKL / 2, abs=1e-6)
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(0.1040947 / 2, abs=1e-6)
    assert kd_loss(s, t, torch.tensor(0.0), 1.0, 1.0)[1].item() == pytest.approx(FKL / 2, abs=1e-6)


def test_gradients_flow_to_the_student_only():
    s = ZS.clone().requires_grad_(True)
    t = ZT.clone().requires_grad_(True)
    for fn in (lambda: reverse_kl(s, t), lambda: generalized_jsd(s, t, 0.5), lambda: skew_forward_kl(s, t, 0.1),
               lambda: skew_reverse_kl(s, t, 0.1)):
        s.grad = t.grad = None
        fn().backward()
        assert s.grad is not None and t.grad is None
    # Forward KL's gradient in the student logits is q - p (DistiLLM's CE and the KL agree):
    s.grad = None
    kd_loss(s, t, torch.tensor(0.0), 1.0, 1.0)[1].backward()
    assert s.grad[0].tolist() == pytest.approx([0.2 - 0.6, 0.4 - 0.3, 0.4 - 0.1], abs=1e-6)
