"""GKD (Agarwal et al. 2024, TRL GKDTrainer): the generalized JSD by hand, the on-policy coin and the
on-policy step's data (student samples, prompt masked, teacher passes counted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bench.methods.gkd import GKD, generalized_jsd

from bench.api import TaskEnv

pytestmark = pytest.mark.usefixtures("one_thread")

ZT = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]])
ZS = torch.tensor([[math.log(0.2), math.log(0.4), math.log(0.4)]])


def _task(tmp_path: Path):
    from bench.tasks.lm import LM

    return LM(LM.Params(), TaskEnv(tier="smoke", subtask="corpus", data_root=None, cache_dir=tmp_path))


def _ctx(task, steps=10):
    from bench.train import HarnessContext

    teacher = task.student(1).eval()  # an untrained stand-in teacher: its outputs are computed live
    return HarnessContext(task=task, student=task.student(0), teacher=teacher, total_steps=steps, seed=0,
                          device="cpu", train_split=task.train_data(), batch_size=task.training().batch_size)


def test_defaults_are_trl_s():
    p = GKD.Params()
    assert (p.lmbda, p.beta, p.temperature) == (0.5, 0.5, 0.9)


def test_jsd_beta_09_by_hand():
    # beta = 0.9: m = 0.9 p + 0.1 q = [0.56, 0.31, 0.13];
    # KL(p||m) = 0.6 ln(0.6/0.56) + 0.3 ln(0.3/0.31) + 0.1 ln(0.1/0.13) = 0.0413956 - 0.0098369 - 0.0262364 = 0.0053223
    # KL(q||m) = 0.3456051 (the skew reverse KL at a = 0.1, test_lm_losses.py)
    # JSD = 0.9 * 0.0053223 + 0.1 * 0.3456051 = 0.0047901 + 0.0345605 = 0.0393506
    assert generalized_jsd(ZS, ZT, 0.9).item() == pytest.approx(0.0393506, abs=1e-6)


def test_jsd_is_symmetric_in_the_swap_of_beta_and_roles():
    # JSD(beta)(p, q) with m = beta p + (1-beta) q equals JSD(1-beta)(q, p): swap the logits and beta.
    assert generalized_jsd(ZS, ZT, 0.3).item() == pytest.approx(generalized_jsd(ZT, ZS, 0.7).item(), abs=1e-6)


def test_on_policy_coin_is_deterministic_and_has_rate_lambda():
    m = GKD(GKD.Params(lmbda=0.3))
    coins = [m.on_policy(0, s) for s in range(2000)]
    assert coins == [GKD(GKD.Params(lmbda=0.3)).on_policy(0, s) for s in range(2000)]
    assert sum(coins) / len(coins) == pytest.approx(0.3, abs=0.04)
    assert not any(GKD(GKD.Params(lmbda=0.0)).on_policy(0, s) for s in range(100))
    assert all(GKD(GKD.Params(lmbda=1.0)).on_policy(0, s) for s in range(100))


def test_on_policy_step_scores_student_samples_and_counts_teacher_passes(tmp_path):
    task = _task(tmp_path)
    ctx = _ctx(task)
    batch = task.train_data().batch(list(range(4)))
    method = GKD(GKD.Params(lmbda=1.0))
    torch.manual_seed(0)
    loss = method.training_step(batch, ctx)["student"]
    assert torch.isfinite(loss) and loss.requires_grad
    assert ctx.teacher_forward_passes == 1 and ctx.teacher_examples == 4  # on-policy: never from a cache
    # The samples continue the block's first half; only the generated half is scored.
    sampled = task.generate(ctx.student, batch, max_new_tokens=task.max_length - task.prompt_tokens, temperature=0.9)
    assert sampled["input_ids"].shape == batch["input_ids"].shape
    assert torch.equal(sampled["input_ids"][:, :task.prompt_tokens], batch["input_ids"][:, :task.prompt_tokens])
    assert (sampled["labels"][:, :task.prompt_tokens] == -100).all()
    assert task.scored_rows(sampled) == [task.max_length - task.prompt_tokens] * 4
    assert method.record_info()["on_policy_steps"] == 1


def test_off_policy_step_is_the_jsd_on_the_dataset(tmp_path):
    task = _task(tmp_path)
    ctx = _ctx(task)
    batch = task.train_data().batch(list(range(4)))
    loss = GKD(GKD.Params(lmbda=0.0, beta=0.5)).training_step(batch, ctx)["student"]
    with torch.no_grad():
        expected = generalized_jsd(task.forward(ctx.student, batch).logits, task.forward(ctx.teacher, batch).logits, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_unsupported_without_generate(tmp_path):
    from bench.tasks.glue import Glue

    glue = Glue(Glue.Params(), TaskEnv(tier="smoke", subtask="rte", data_root=None, cache_dir=tmp_path))
    assert "generate" in GKD(GKD.Params()).unsupported(glue)
