"""GKD (Agarwal et al. 2024, TRL GKDTrainer): the generalized JSD by hand (beta 0, 0.5, 0.9, 1), the
top-k store's rule on a four-token vocabulary, the on-policy coin, the on-policy step's data (student
samples, prompt masked, teacher passes counted) and one teacher distribution for both step kinds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bench.methods.gkd import GKD, generalized_jsd, store_distribution, store_rule

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


def test_jsd_at_beta_0_half_1_by_hand():
    # p = [0.6, 0.3, 0.1] (teacher), q = [0.2, 0.4, 0.4] (student).
    # beta = 0: forward KL(p || q) = 0.6 ln 3 + 0.3 ln 0.75 + 0.1 ln 0.25
    #   = 0.6591674 - 0.0863046 - 0.1386294 = 0.4342333
    fwd = 0.6 * math.log(3) + 0.3 * math.log(0.75) + 0.1 * math.log(0.25)
    assert fwd == pytest.approx(0.4342333, abs=1e-7)
    assert generalized_jsd(ZS, ZT, 0.0).item() == pytest.approx(0.4342333, abs=1e-6)
    # beta = 1: reverse KL(q || p) = 0.2 ln(1/3) + 0.4 ln(4/3) + 0.4 ln 4
    #   = -0.2197225 + 0.1150728 + 0.5545177 = 0.4498681
    rev = 0.2 * math.log(1 / 3) + 0.4 * math.log(4 / 3) + 0.4 * math.log(4)
    assert rev == pytest.approx(0.4498681, abs=1e-7)
    assert generalized_jsd(ZS, ZT, 1.0).item() == pytest.approx(0.4498681, abs=1e-6)
    # beta = 0.5: m = [0.4, 0.35, 0.25];
    # KL(p || m) = 0.6 ln 1.5 + 0.3 ln(0.3/0.35) + 0.1 ln 0.4 = 0.2432791 - 0.0462452 - 0.0916291 = 0.1054048
    # KL(q || m) = 0.2 ln 0.5 + 0.4 ln(0.4/0.35) + 0.4 ln 1.6 = -0.1386294 + 0.0534126 + 0.1880015 = 0.1027846
    # JSD = 0.5 * 0.1054048 + 0.5 * 0.1027846 = 0.1040947
    kl_pm = 0.6 * math.log(1.5) + 0.3 * math.log(0.3 / 0.35) + 0.1 * math.log(0.4)
    kl_qm = 0.2 * math.log(0.5) + 0.4 * math.log(0.4 / 0.35) + 0.4 * math.log(1.6)
    assert (kl_pm, kl_qm) == pytest.approx((0.1054048, 0.1027846), abs=1e-7)
    assert generalized_jsd(ZS, ZT, 0.5).item() == pytest.approx(0.1040947, abs=1e-6)
    # Two rows (the second with teacher and student swapped) are averaged: at beta = 0 the mean of
    # KL(p || q) and KL(q || p) = (0.4342333 + 0.4498681) / 2 = 0.4420507.
    rows_s, rows_t = torch.cat([ZS, ZT]), torch.cat([ZT, ZS])
    assert generalized_jsd(rows_s, rows_t, 0.0).item() == pytest.approx(0.4420507, abs=1e-6)
    # Logits, not probabilities: a per-row constant added to either side changes nothing.
    assert generalized_jsd(ZS + 3.0, ZT - 1.0, 0.5).item() == pytest.approx(0.1040947, abs=1e-6)


def test_store_distribution_by_hand_on_a_four_token_vocabulary():
    # Teacher p = [0.05, 0.5, 0.15, 0.3] (logits = log p + 2, any offset), store k = 2: the top two
    # (tokens 1 and 3: 0.5, 0.3) are kept, the mass left, 1 - 0.8 = 0.2, is spread uniformly over the
    # other V - k = 2 tokens: p~ = [0.1, 0.5, 0.1, 0.3]. No renormalisation: p~ already sums to 1.
    z = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log() + 2.0
    exact = store_distribution(z, 2).exp()  # float32 values (no rounding)
    assert exact.tolist()[0] == pytest.approx([0.1, 0.5, 0.1, 0.3], abs=1e-6)
    # The store's own dtype below k = V is float16: log 0.5 and log 0.3 are rounded to the nearest float16
    # (ulp 2^-11 near 0.69, 2^-10 near 1.2) and the tail takes what they leave, so p~ is within 1e-3.
    rounded = store_distribution(z, 2, torch.float16).exp()
    assert rounded.tolist()[0] == pytest.approx([0.1, 0.5, 0.1, 0.3], abs=1e-3)
    assert rounded.sum().item() == pytest.approx(1.0, abs=1e-6)
    # k = V: the teacher's exact distribution.
    assert store_distribution(z, 4).exp().tolist()[0] == pytest.approx([0.05, 0.5, 0.15, 0.3], abs=1e-6)


def test_store_rule_reads_k_and_dtype_of_a_top_k_store_only(tmp_path):
    from bench.teacher_cache import LiveTeacherOutputs, TopKTeacherStore

    task = _task(tmp_path)
    teacher = task.student(1).eval()

    def store(k):
        return TopKTeacherStore(folder=tmp_path / "store", key=f"k{k}", teacher=teacher, forward=task.forward,
                                split=task.train_data(), rows=task.scored_rows, k=k, vocab_size=task.vocab,
                                batch_size=32)

    assert store_rule(store(8)) == (8, torch.float16)
    assert store_rule(store(task.vocab)) is None  # k = V: exact, nothing to apply
    assert store_rule(LiveTeacherOutputs(teacher, task.forward, reason="test")) is None
    assert store_rule(None) is None


def _by_hand_store_probs(teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The store's rule in plain torch: keep the top-k probabilities, spread the rest uniformly."""
    p = torch.softmax(teacher_logits.double(), dim=-1)
    top, idx = p.topk(k, dim=-1)
    tail = (1.0 - top.sum(-1, keepdim=True)) / (p.shape[-1] - k)
    return tail.expand_as(p).clone().scatter_(1, idx, top)


def test_on_policy_and_dataset_steps_distil_from_the_same_top_k_distribution(tmp_path, monkeypatch):
    import bench.methods.gkd as gkd
    from bench.teacher_cache import TopKTeacherStore

    task = _task(tmp_path)
    ctx = _ctx(task)
    k = 8
    store = TopKTeacherStore(folder=tmp_path / "store", key="gkd-test", teacher=ctx.teacher, forward=task.forward,
                             split=task.train_data(), rows=task.scored_rows, k=k, vocab_size=task.vocab,
                             batch_size=task.training().eval_batch_size)
    monkeypatch.setattr(task, "teacher_store", lambda teacher: store)  # the task keeps a top-8 store
    seen: list[torch.Tensor] = []
    real = gkd.generalized_jsd
    monkeypatch.setattr(gkd, "generalized_jsd", lambda s, t, b: (seen.append(t.detach()), real(s, t, b))[1])
    samples: list[dict] = []
    real_generate = task.generate
    monkeypatch.setattr(task, "generate", lambda *a, **kw: samples.append(real_generate(*a, **kw)) or samples[-1])
    batch = task.train_data().batch(list(range(4)))

    on = GKD(GKD.Params(lmbda=1.0))
    on.setup(ctx)
    assert on.rule == (k, torch.float16)
    torch.manual_seed(0)
    on.training_step(batch, ctx)
    with torch.no_grad():
        live = task.forward(ctx.teacher, samples[0]).logits
    want = _by_hand_store_probs(live, k)
    got = seen[0].double().exp()
    # float16 rounding of the kept log-probabilities (|log p| ~ 6 here: ulp 2^-8, under 0.4% of p ~ 0.005).
    assert torch.allclose(got, want, rtol=4e-3, atol=1e-6)
    # The tail is uniform: each row holds at most k + 1 distinct values (the exact teacher's has V).
    assert max(len(set(r.tolist())) for r in seen[0]) <= k + 1
    assert "top-8" in on.record_info()["teacher_distribution"] and "top-8" in on.table_notes(task)[0]

    # A dataset step reads the store; applied to the live teacher on the same blocks, the on-policy rule
    # gives the store's numbers (up to one float16 step of a kept value: the store ran other batch shapes).
    off = GKD(GKD.Params(lmbda=0.0))
    off.setup(ctx)
    off.training_step(batch, ctx)
    with torch.no_grad():
        live = task.forward(ctx.teacher, batch).logits
    assert torch.allclose(seen[1].exp(), store_distribution(live, k, torch.float16).exp(), rtol=4e-3, atol=1e-7)
    assert torch.allclose(seen[1].double().exp(), _by_hand_store_probs(live, k), rtol=4e-3, atol=1e-6)


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
    method = GKD(GKD.Params(lmbda=0.0, beta=0.5))
    method.setup(ctx)  # the stand-in teacher is not the task's: live outputs, the exact teacher
    loss = method.training_step(batch, ctx)["student"]
    with torch.no_grad():  # JSD(0.5) written out in plain torch, on the dataset's blocks
        q = torch.softmax(task.forward(ctx.student, batch).logits.double(), -1)
        p = torch.softmax(task.forward(ctx.teacher, batch).logits.double(), -1)
        m = 0.5 * p + 0.5 * q
        expected = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert method.table_notes(task) == [] and "exact" in method.record_info()["teacher_distribution"]


def test_unsupported_without_generate(tmp_path):
    from bench.tasks.glue import Glue

    glue = Glue(Glue.Params(), TaskEnv(tier="smoke", subtask="rte", data_root=None, cache_dir=tmp_path))
    assert "generate" in GKD(GKD.Params()).unsupported(glue)
