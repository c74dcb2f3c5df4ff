"""Reverse KL (DistiLLM ``reverse_kl``) and DistiLLM's skew KL divergences (``skewed_forward_kl``/
``skewed_reverse_kl``) as methods: the losses they return on hand-worked logits."""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods.rkl import RKL, reverse_kl
from bench.methods.skew_kl import SkewKL, skew_forward_kl, skew_reverse_kl
from pydantic import ValidationError

from bench.api import Outputs

ZT = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]])
ZS = torch.tensor([[math.log(0.2), math.log(0.4), math.log(0.4)]])
RKL_VALUE = 0.4498681  # KL(q||p), worked out in tests/unit/test_lm_losses.py


class _Ctx:
    def student_outputs(self, batch):
        return Outputs(logits=ZS)

    def teacher_outputs(self, batch):
        return Outputs(logits=ZT)

    def label_loss(self, out, batch):
        return torch.tensor(2.0)


def test_method_is_pure_reverse_kl_by_default():
    assert RKL.Params().kd_ratio == 1.0
    assert RKL(RKL.Params()).training_step({}, _Ctx())["student"].item() == pytest.approx(RKL_VALUE, abs=1e-6)


def test_kd_ratio_mixes_the_label_loss():
    # (1 - 0.75) * 2.0 + 0.75 * 0.4498681 = 0.5 + 0.3374011 = 0.8374011
    loss = RKL(RKL.Params(kd_ratio=0.75)).training_step({}, _Ctx())["student"]
    assert loss.item() == pytest.approx(0.8374011, abs=1e-6)


def test_infinite_logits_contribute_nothing():
    # A padded vocabulary entry (-inf in both) is masked as in the reference's inf_mask.
    s = torch.tensor([[math.log(0.2), math.log(0.4), math.log(0.4), -math.inf]])
    t = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1), -math.inf]])
    assert reverse_kl(s, t).item() == pytest.approx(RKL_VALUE, abs=1e-6)


def test_identical_distributions_give_zero():
    assert reverse_kl(ZT, ZT).item() == pytest.approx(0.0, abs=1e-7)


def test_forward_and_reverse_by_hand():
    # Worked out in tests/unit/test_lm_losses.py: SKL (as DistiLLM's CE) 1.2381776, SRKL 0.3456051.
    assert SkewKL(SkewKL.Params()).training_step({}, _Ctx())["student"].item() == pytest.approx(1.2381776, abs=1e-6)
    rev = SkewKL(SkewKL.Params(direction="reverse")).training_step({}, _Ctx())["student"]
    assert rev.item() == pytest.approx(0.3456051, abs=1e-6)


def test_other_skew_by_hand():
    # a = 0.5: mix = [0.4, 0.35, 0.25]; -(0.6 ln 0.4 + 0.3 ln 0.35 + 0.1 ln 0.25)
    #   = 0.6 * 0.9162907 + 0.3 * 1.0498221 + 0.1 * 1.3862944 = 0.5497744 + 0.3149466 + 0.1386294 = 1.0033504
    assert skew_forward_kl(ZS, ZT, 0.5).item() == pytest.approx(1.0033504, abs=1e-6)
    # reverse at a = 0.5: KL(q || [0.4, 0.35, 0.25]) = 0.1027845 (the JSD's second term, test_lm_losses.py)
    assert skew_reverse_kl(ZS, ZT, 0.5).item() == pytest.approx(0.1027845, abs=1e-6)


def test_skew_stays_finite_where_the_student_has_no_mass():
    s = torch.tensor([[0.0, 0.0, -1e4]])  # q ~ [0.5, 0.5, 0]
    t = torch.tensor([[0.0, 0.0, 0.0]])
    assert math.isfinite(skew_forward_kl(s, t, 0.1).item())


def test_alpha_bounds():
    with pytest.raises(ValidationError):
        SkewKL.Params(alpha=1.0)
    with pytest.raises(ValidationError):
        SkewKL.Params(direction="sideways")
