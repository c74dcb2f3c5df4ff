"""RAD (Baykal et al., ICLR 2023): the max-min query probabilities on a hand-made pool, checked against an
independent LP solver, the sampling of the query set, the loss mixing soft and hard labels by hand, and a run in
the harness that counts every teacher query and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from bench.api import TaskEnv, TrainConfig
from bench.methods.rad import RAD, margin_gain, rad_loss, robust_probabilities, select_queries, systematic_sample

# Six points, two classes: student probabilities of class 0, and so gains g = 1 - |q_0 - q_1| = 2 (1 - q_0) for
# q_0 >= .5: .75 -> .5, .55 -> .9, .9 -> .2, .6 -> .8, .8 -> .4, .7 -> .6.
Q0 = [0.75, 0.55, 0.9, 0.6, 0.8, 0.7]
GAINS = [0.5, 0.9, 0.2, 0.8, 0.4, 0.6]


def pool_logits() -> torch.Tensor:
    q = torch.tensor([[a, 1 - a] for a in Q0], dtype=torch.float64)
    return q.log()


def test_gain_is_one_minus_the_student_margin():
    assert margin_gain(pool_logits()).tolist() == pytest.approx(GAINS, abs=1e-6)
    # Three classes: q = (.5, .3, .2) -> margin .2 -> gain .8.
    assert margin_gain(torch.tensor([[0.5, 0.3, 0.2]]).log()).item() == pytest.approx(0.8)


def test_query_probabilities_on_the_hand_made_pool():
    g = torch.tensor(GAINS, dtype=torch.float64)
    # b = 2 queries, k = 1 expected teacher mistake. Sorted gains .9, .8, .6, .5, .4, .2; H_m = sum of 1/g over the
    # top m: 1.111, 2.361, 4.028, 6.028, 8.528, 13.528. With no p capped at 1 the value of support m is
    # (m - k) b / H_m: m = 2: .847 (but m = 2 <= b: p = 1, 1 minus the adversary's .9 is worth .8), m = 3: .9931,
    # m = 4: .9954, m = 5: .9381, m = 6: .7392. So m = 4, p_i = tau / g_i with tau = 2 / H_4: the most informative
    # point is the least likely query.
    tau = 2 / (1 / 0.9 + 1 / 0.8 + 1 / 0.6 + 1 / 0.5)
    expected = [tau / 0.5, tau / 0.9, 0.0, tau / 0.8, 0.0, tau / 0.6]
    p = robust_probabilities(g, 2, 1.0)
    assert p.tolist() == pytest.approx(expected, abs=1e-9) and p.sum().item() == pytest.approx(2.0)
    # A perfect teacher (k = 0): margin selection, the two largest gains (points 1 and 3) for sure.
    assert robust_probabilities(g, 2, 0.0).tolist() == pytest.approx([0, 1, 0, 1, 0, 0], abs=1e-9)
    # b = 4, k = 1.5: tau = .5 = g of point 0; the three points above it get tau / g (.556, .625, .833), point 0
    # gets 1, and the budget left, 4 - 2.0139 - 1 = .9861, goes to the next point (g = .4) as a partial p.
    # (Slope of the value in tau: +1.29 just below .5, -.11 just above.)
    h3 = 1 / 0.9 + 1 / 0.8 + 1 / 0.6
    expected = [1.0, 0.5 / 0.9, 0.0, 0.5 / 0.8, 4 - 0.5 * h3 - 1, 0.5 / 0.6]
    assert robust_probabilities(g, 4, 1.5).tolist() == pytest.approx(expected, abs=1e-9)


def test_the_chosen_set_by_hand():
    g = torch.tensor(GAINS, dtype=torch.float64)
    # In decreasing gain (points 1, 3, 5, 0) the cumulative p are .369, .783, 1.336, 2.0. Offset .5 hits .5 and
    # 1.5: points 3 and 0; offset .1 hits .1 and 1.1: points 1 and 5.
    assert select_queries(g, 2, 1.0, 0.5)[0] == [0, 3]
    assert select_queries(g, 2, 1.0, 0.1)[0] == [1, 5]
    assert select_queries(g, 2, 0.0, 0.73)[0] == [1, 3]


def test_systematic_sampling_realises_the_probabilities():
    p = torch.tensor([0.25, 1.0, 0.5, 0.0, 0.75, 0.5], dtype=torch.float64)  # sums to 3
    counts = torch.zeros(6)
    for j in range(1000):
        chosen = systematic_sample(p, (j + 0.5) / 1000)
        assert len(chosen) == 3
        counts[chosen] += 1
    assert (counts / 1000).tolist() == pytest.approx(p.tolist(), abs=1e-3)


def adversary_value(u: list[float], k: float) -> float:
    """sum u minus the (fractional) k largest u: what is left after the adversary spoils k points."""
    s = sorted(u, reverse=True)
    K = int(math.floor(k))
    return sum(u) - sum(s[:K]) - (k - K) * (s[K] if K < len(s) else 0.0)


def test_probabilities_solve_the_max_min_problem_like_an_lp_solver():
    optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    rng = np.random.default_rng(0)
    for t in range(60):
        n = int(rng.integers(2, 25))
        g = rng.uniform(0.05, 1.0, n)
        if t % 3 == 0:
            g = np.round(g, 1).clip(0.1)  # ties
        b = float(rng.integers(1, n + 1)) if t % 2 else float(rng.uniform(0.5, n))
        k = float(rng.integers(0, n)) if t % 4 == 0 else float(rng.uniform(0, n / 2))
        # max over (p, tau) of sum g p - k tau, g_i p_i <= tau, sum p <= b, 0 <= p <= 1 (the dual form of the value).
        A = np.zeros((n + 1, n + 1))
        A[:n, :n], A[:n, n], A[n, :n] = np.diag(g), -1.0, 1.0
        res = optimize.linprog(np.concatenate([-g, [k]]), A_ub=A, b_ub=np.concatenate([np.zeros(n), [b]]),
                               bounds=[(0, 1)] * n + [(0, None)], method="highs")
        p = robust_probabilities(torch.tensor(g), b, k).numpy()
        assert p.min() >= 0 and p.max() <= 1 + 1e-12 and p.sum() <= b + 1e-9
        assert adversary_value(list(p * g), k) == pytest.approx(-res.fun, abs=1e-7), (n, b, k)


def test_loss_mixes_soft_and_hard_labels_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])  # the student predicts (.75, .25)
    soft = torch.tensor([[0.8, 0.2], [0.5, 0.5]])  # row 1's soft label must be ignored: it was not queried
    loss = rad_loss(logits, torch.tensor([0, 1]), soft, torch.tensor([True, False]))
    expected = (-(0.8 * math.log(0.75) + 0.2 * math.log(0.25)) - math.log(0.25)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# --- in the harness ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench import registry

    cls = registry.tasks.get("imagenet")
    return cls(cls.Params(smoke_train_size=128, smoke_eval_size=32),
               TaskEnv(tier="smoke", subtask="val", data_root=None, cache_dir=tmp_path_factory.mktemp("cache")))


def cfg(steps: int) -> TrainConfig:
    from bench.tasks.imagenet import SMOKE_OPTIM

    return TrainConfig(steps=steps, batch_size=16, eval_batch_size=32, optim=SMOKE_OPTIM)


class LookupTeacher(torch.nn.Module):
    """Knows every training image's label and answers it confidently, except on the examples in ``wrong``, where
    it answers the next class: a teacher whose errors are known exactly."""

    def __init__(self, task, wrong: set[int]) -> None:
        super().__init__()
        split = task.train_data()
        batch = split.batch(list(range(len(split))))
        labels = batch["labels"].clone()
        for i in wrong:
            labels[i] = (labels[i] + 1) % task.num_classes
        self.register_buffer("images", batch["pixels"].flatten(1))
        self.register_buffer("answers", labels)
        self.classes = task.num_classes

    def forward(self, pixels):
        nearest = torch.cdist(pixels.flatten(1), self.images).argmin(1)
        return 5.0 * torch.nn.functional.one_hot(self.answers[nearest], self.classes).float()


WRONG = set(range(0, 128, 4))  # the teacher is wrong on a quarter of the examples


class Crash(RAD):
    def __init__(self, params, crash_at: int) -> None:
        super().__init__(params)
        self.crash_at = crash_at

    def training_step(self, batch, ctx):
        if ctx.step == self.crash_at:
            raise KeyboardInterrupt
        return super().training_step(batch, ctx)


def test_queries_are_counted_as_teacher_passes_and_used_as_soft_labels(task):
    from bench.train import batch_indices, train

    method = RAD(RAD.Params(budget=0.25, rounds=2))
    _, result = train(method, task, task.student(0), LookupTeacher(task, WRONG), cfg(10), seed=0)
    info = method.record_info()
    # 10 steps of 16 from 128 examples visit all 128: a quarter is 32 queries, 16 per round (steps 0-4 and 5-9).
    r0, r1 = info["rounds"]
    assert [r0["budget"], r1["budget"]] == [16, 16] and [r0["queries"], r1["queries"]] == [16, 16]
    assert [r0["selection"], r1["selection"]] == ["uniform", "rad"] and [r0["step"], r1["step"]] == [0, 5]
    assert info["teacher_queries"] == 32 == result.teacher_examples and result.teacher_forward_passes == 2
    assert info["pool"] == "examples of each round's steps"
    # The pools are the round's examples: steps 0-4 are 80 distinct examples of epoch 0; steps 5-9 are the rest of
    # epoch 0 (48) and two batches of epoch 1, less round 0's queries.
    steps = [batch_indices(128, 16, 0, s) for s in range(10)]
    queried = list(method.row)  # in query order
    first, second = set(queried[:16]), set(queried[16:])
    assert r0["pool"] == len({i for s in steps[:5] for i in s}) == 80
    assert r1["pool"] == len({i for s in steps[5:] for i in s} - first)
    # The teacher's errors among the queries, and round 1's k: the uniform round's error rate times the pool.
    assert r0["teacher_wrong"] == len(first & WRONG) and r1["teacher_wrong"] == len(second & WRONG)
    assert r1["teacher_error_used"] == pytest.approx(len(first & WRONG) / 16, abs=1e-6)
    assert r1["k"] == pytest.approx(len(first & WRONG) / 16 * r1["pool"], abs=1e-3)
    # The kept soft labels are the teacher's outputs on the queried examples.
    answers = LookupTeacher(task, WRONG).answers
    assert all(int(method.soft[method.row[i]].argmax()) == int(answers[i]) for i in queried)
    assert first <= {i for s in steps[:5] for i in s} and second <= {i for s in steps[5:] for i in s}
    # Rows trained on soft labels: those queried at or before their step.
    soft = sum(1 for s in range(10) for i in steps[s] if i in first or (s >= 5 and i in second))
    assert info["training_rows"] == {"soft": soft, "hard": 160 - soft}


@pytest.mark.parametrize("crash_at", [5, 6])  # inside round 1; at round 2's first step
def test_resume_is_exact(task, tmp_path, crash_at):
    from bench.train import train

    params = RAD.Params(budget=0.25, rounds=3)
    full_method = RAD(params)
    teacher = LookupTeacher(task, WRONG)
    full, _ = train(full_method, task, task.student(0), teacher, cfg(9), seed=0)
    ckpt = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train(Crash(params, crash_at=crash_at), task, task.student(0), teacher, cfg(9), seed=0, checkpoint_path=ckpt,
              checkpoint_every=1)
    method = RAD(params)
    resumed, result = train(method, task, task.student(0), teacher, cfg(9), seed=0, checkpoint_path=ckpt,
                            checkpoint_every=1)
    assert result.resumed_from_step == crash_at
    info = method.record_info()
    assert info == full_method.record_info() and [r["selection"] for r in info["rounds"]] == ["uniform", "rad", "rad"]
    assert result.teacher_examples == info["teacher_queries"] > 0
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_regression_subtasks_are_skipped():
    class Regression:
        def problem(self):
            return "regression"

    assert "regression" in RAD(RAD.Params()).unsupported(Regression())
    assert RAD.domains == frozenset({"classification"})
