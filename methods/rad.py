"""RAD — Robust Active Distillation (Baykal, Trinh, Iliopoulos, Menghani & Vee, Google Research; ICLR 2023,
arXiv 2210.01213).

The setting: the teacher's soft labels are expensive, so only a budget of them is queried, in rounds; the
points to query should be informative for the student, but the most informative points (those the student is
least sure of) are also the ones on which the teacher is most often wrong. RAD chooses the queries by a
zero-sum game between the learner and an adversary who decides where the teacher's labels are wrong, and
samples them from the learner's max-min strategy. No official code was found; this is implemented from the
paper as described below, and whatever in it could not be checked against the paper's text is listed under
"Unsure" and "Deviations".

**Selection (one round).** Over the round's candidate pool (unqueried points), with gains g_i > 0 and a
budget of b queries, the learner picks inclusion probabilities p in [0, 1]^n with sum p <= b; the adversary
then makes the teacher wrong on up to k points, which removes their gain. The learner's value is

    V(p) = min_{c in [0,1]^n, sum (1 - c_i) <= k}  sum_i p_i g_i c_i  =  sum_i u_i - (the k largest u_i),  u_i = p_i g_i

(fractional k by the LP relaxation of "k points"). ``robust_probabilities`` maximises V exactly. By LP duality
V(p) = max_tau sum_i min(u_i, tau) - k tau, so the learner solves max over (p, tau) of sum_i min(u_i, tau) - k tau:
for a fixed tau, a fractional knapsack filled in decreasing gain (point i takes p_i = min(1, tau / g_i)),
the last point taking what is left of the budget, the rest 0; the value is concave in tau and maximised
over it. When no p_i reaches 1 and no budget is left over this is the closed form p_i = b / (g_i H_m),
H_m = sum_{i <= m} 1 / g_i, over the m points of largest gain, m = argmax_m (m - k) / H_m: the adversary gains
least when every chosen point carries the same expected gain p_i g_i, so within the support the *more*
informative a point, the *less* likely it is queried, and the support widens as k grows. With k = 0 it is
plain margin selection (the b points of largest gain).
The b points are then drawn by systematic sampling in order of decreasing gain from one seeded uniform
offset, which realises the p_i exactly as inclusion probabilities and draws sum p_i points (rounded up or
down when not whole; ``systematic_sample``).

* Gain: g_i = 1 - (q_(1) - q_(2)), one minus the student's margin between its two most probable classes
  (the margin uncertainty the paper builds on), clamped at 1e-6.
* k: the expected number of points of the pool the teacher labels wrongly (arg max != the label),
  k = eps * |pool|. ``teacher_error`` fixes eps; unset, eps is estimated from the labels of the points queried
  so far, pooled over rounds: sum over queried points of [teacher wrong] / p_i (Horvitz-Thompson) over the sum
  of the rounds' support sizes (#{p_i > 0}; the whole pool in the uniform first round). Within a support this
  is unbiased although RAD draws high-gain points more often; as supports hold the high-gain points, where the
  teacher errs most, it over-states the pool's error rate, i.e. errs on the robust side. With k >= |pool| no
  strategy is worth anything against the adversary and the round queries nothing.

**Rounds.** The cell's steps are split into ``rounds`` near-equal rounds. At the first step of each, the
round's budget of new queries is chosen from the examples the harness will feed during that round that have
not been queried (the harness's data order is a fixed function of seed and step, `bench.train.batch_indices`;
checked against the batch it gives, else the whole training split is the pool), their teacher outputs are
computed once (``StepContext.run_teacher``: counted as teacher forward passes over exactly the queried
examples) and kept, with the points, in the method's state. The first round is a uniform random sample: the
student has not trained yet, so its margins carry no information (the paper's first round uses a student
trained on the labelled set), and it gives the first estimate of the teacher's error. The total budget is
``budget`` x the number of distinct examples the cell visits (min(n, steps x batch)), split evenly over rounds.

**Loss.** Every batch is the harness's. A queried example is trained on the teacher's soft label, an
unqueried one on its hard label, averaged over the batch:

    L = (1 / B) sum_i [ queried_i ? -sum_c softmax(z_t,i)_c log softmax(z_s,i)_c : -log softmax(z_s,i)_{y_i} ].

Domain: classification with per-example logits, i.e. the imagenet task (generated images, CIFAR-10, ImageNet)
and the GLUE classification subtasks; not regression subtasks (STS-B: no margin), not lm.

Unsure (could not be checked against the paper's text here): that the paper's game is exactly the one above
(an adversary corrupting k points anywhere, gains = one minus the student margin) and its solution the
1 / g_i water-filling above; how the paper estimates k (presumably from the teacher's accuracy) and turns p
into a query set (here systematic sampling); whether the paper uses a temperature (here T = 1) or re-trains
the student from scratch after each round (here training continues).

Deviations: the paper's setting is semi-supervised, with a small labelled set and unqueried unlabelled points
left out of training; here every training example has its label, so the unqueried ones are trained on it and
the queries replace hard labels by soft ones. The candidate pool of a round is the set of examples the student
will see during that round (budgets here are often under one epoch, so a query outside it would never be used).
The budget fraction and the number of rounds are this benchmark's choices, not the paper's. Where the task's
training batches are augmented at random (the imagenet full tier), a point's soft label and gain come from
one augmented view and the soft label is reused for every later view.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench.api import Method, Params, split_steps

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext, Task


# --------------------------------------------------------------------------------------------------
# The selection rule (module docstring)
# --------------------------------------------------------------------------------------------------


def margin_gain(logits: torch.Tensor) -> torch.Tensor:
    """g = 1 - (q_(1) - q_(2)) from the student's logits, clamped at 1e-6."""
    q = logits.float().softmax(-1)
    top = q.topk(2, dim=-1).values
    return (1.0 - (top[:, 0] - top[:, 1])).clamp(min=1e-6)


def robust_probabilities(gains: torch.Tensor, budget: float, k: float) -> torch.Tensor:
    """The learner's max-min inclusion probabilities p (same order as ``gains``; sum p <= budget).

    V(tau) = KNAP(tau) - k tau, KNAP(tau) = max sum_i u_i over 0 <= u_i <= min(tau, g_i), sum_i u_i / g_i <= b, is
    the value of a linear programme whose constraints move linearly with tau, hence concave on [0, g_max]. KNAP is
    a fractional knapsack (item i: weight up to min(1, tau / g_i) of value g_i per unit), filled in decreasing
    gain and evaluated exactly from prefix sums; tau is found by golden-section search (exact for a concave
    function up to float precision); p is the knapsack's filling at that tau."""
    import torch

    g = gains.detach().double().cpu()
    n = g.numel()
    if n == 0 or budget <= 0:
        return torch.zeros(n, dtype=torch.float64)
    if k >= n:  # the adversary can spoil every point: no strategy is worth anything, so nothing is queried
        return torch.zeros(n, dtype=torch.float64)
    b = float(min(budget, n))
    order = torch.sort(-g, stable=True).indices  # decreasing gain, ties by position
    gs = g[order]
    neg = -gs  # ascending, for searchsorted
    H = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1.0 / gs, 0)])  # H[j] = sum_{i <= j} 1 / g_i
    S = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(gs, 0)])  # S[j] = sum_{i <= j} g_i

    def fill(tau: float) -> tuple[float, int, int, float]:
        """KNAP(tau) and its filling: c items above tau (p = tau / g), m items full, the partial weight r."""
        c = int(torch.searchsorted(neg, torch.tensor([-tau], dtype=torch.float64), side="left"))  # #{g_i > tau}
        if tau * float(H[c]) >= b:  # the budget runs out among the items capped at tau
            m = int(torch.searchsorted(H[1:], torch.tensor([b / tau], dtype=torch.float64), side="right"))
            used, value = tau * float(H[m]), tau * m
        else:
            m = min(n, c + int(math.floor(b - tau * float(H[c]))))
            used, value = tau * float(H[c]) + (m - c), tau * c + float(S[m] - S[c])
        r = min(b - used, 1.0) if m < n else 0.0
        return value + (r * float(gs[m]) if m < n else 0.0), c, m, max(r, 0.0)

    lo, hi = 0.0, float(gs[0])
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
    f1, f2 = fill(x1)[0] - k * x1, fill(x2)[0] - k * x2
    for _ in range(200):
        if f1 < f2:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + phi * (hi - lo)
            f2 = fill(x2)[0] - k * x2
        else:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - phi * (hi - lo)
            f1 = fill(x1)[0] - k * x1
    candidates = [(fill(t)[0] - k * t, t) for t in (lo, hi, (lo + hi) / 2, float(gs[0]))]
    tau = max(candidates)[1]
    _, c, m, r = fill(tau)
    p_sorted = torch.zeros(n, dtype=torch.float64)
    p_sorted[:m] = torch.clamp(tau / gs[:m], max=1.0)
    if m < n:
        p_sorted[m] = min(r, float(torch.clamp(tau / gs[m], max=1.0)))
    p = torch.zeros(n, dtype=torch.float64)
    p[order] = p_sorted
    return p


def systematic_sample(p: torch.Tensor, offset: float) -> list[int]:
    """Positions i with C_{i-1} <= offset + t < C_i for some t = 0, 1, ... (C the cumulative sums of ``p``, each
    p_i <= 1): over a uniform offset in [0, 1) every i is drawn with probability p_i, and exactly
    ceil(sum p - offset) positions are drawn."""
    import torch

    c = torch.cumsum(p.double(), 0)
    before = torch.cat([torch.zeros(1, dtype=torch.float64), c[:-1]])
    hits = torch.ceil(c - offset) - torch.ceil(before - offset)
    return [int(i) for i in torch.nonzero(hits >= 1).flatten()]


def select_queries(gains: torch.Tensor, budget: float, k: float, offset: float) -> tuple[list[int], torch.Tensor]:
    """RAD's query set (positions into ``gains``, in increasing order) and the probabilities it was drawn with."""
    import torch

    p = robust_probabilities(gains, budget, k)
    order = torch.sort(-gains.detach().double().cpu(), stable=True).indices  # sampled in decreasing gain
    chosen = sorted(int(order[i]) for i in systematic_sample(p[order], offset))
    return chosen, p


def rad_loss(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor, queried: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the soft cross-entropy to the teacher's probabilities ``soft`` (queried rows) or the
    cross-entropy to the label (the others); ``soft``'s unqueried rows are ignored."""
    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(logits.float(), dim=-1)
    hard = -log_q.gather(1, labels.long()[:, None]).squeeze(1)
    soft_ce = -(soft.float() * log_q).sum(-1)
    return torch.where(queried, soft_ce, hard).mean()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class RAD(Method):
    """Baykal et al. 2023: a budget of teacher soft labels queried in rounds by a max-min (robust) selection."""

    name = "rad"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # Chosen here (the paper studies budgets as an axis): a fifth of the examples the cell visits.
        budget: float = Field(0.2, gt=0, le=1, description="teacher soft labels queried, as a fraction of the distinct "
                                                           "training examples the cell visits")
        # Chosen here: the paper queries in several rounds; five spreads the queries over the budget.
        rounds: int = Field(5, ge=1, le=1000, description="query rounds (the first is uniform random)")
        # Unset: estimated from the labels of the queried points (module docstring).
        teacher_error: float | None = Field(None, ge=0, le=1, description="the teacher's error rate on the pool, "
                                                                          "k = teacher_error x pool (unset: estimated)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.row: dict[int, int] = {}  # example id -> row of self.soft
        self.soft: Any = None  # teacher logits of the queried examples, on the CPU
        self.log: list[dict[str, Any]] = []
        self.err_sum = 0.0  # Horvitz-Thompson sum of teacher errors, and the support sizes it covers
        self.support_sum = 0
        self.rows = {"soft": 0, "hard": 0}
        self.order_ok: bool | None = None

    def unsupported(self, task: Task) -> str | None:
        if task.problem() != "classification":
            return "RAD selects by the student's class margin; this subtask is a regression"
        return None

    # --- rounds ---------------------------------------------------------------------------------
    def _starts(self, total: int) -> list[int]:
        plan = split_steps(total, self.params.rounds)
        return [sum(plan[:i]) for i in range(len(plan))] + [total]

    def _step_ids(self, ctx: StepContext, n: int, bs: int, step: int) -> list[int]:
        from bench.train import batch_indices

        return batch_indices(n, bs, ctx.seed, step)

    def _pool(self, ctx: StepContext, n: int, bs: int, s0: int, s1: int) -> list[int]:
        """Unqueried examples the harness feeds during steps [s0, s1) (the whole split if its order is unknown)."""
        if not self.order_ok or (s1 - s0) * bs >= n:
            ids = range(n)
        else:
            ids = sorted({i for s in range(s0, s1) for i in self._step_ids(ctx, n, bs, s)})
        return [i for i in ids if i not in self.row]

    def _batches(self, ctx: StepContext, ids: list[int]):
        from bench.train import to_device

        split = ctx.task.train_data()
        chunk = max(1, int(ctx.task.training().eval_batch_size))
        for i in range(0, len(ids), chunk):
            yield to_device(split.batch(ids[i:i + chunk]), ctx.device)

    def _gains(self, ctx: StepContext, pool: list[int]) -> torch.Tensor:
        import torch

        student = ctx.student
        was_training = student.training
        student.eval()
        out = []
        with torch.no_grad():
            for batch in self._batches(ctx, pool):
                out.append(margin_gain(ctx.task.forward(student, batch).logits).cpu())
        student.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def _query(self, ctx: StepContext, ids: list[int], probs: list[float]) -> tuple[int, float]:
        """Teacher outputs of ``ids`` (counted passes); returns the errors seen and their Horvitz-Thompson sum."""
        import torch

        logits, wrong = [], []
        for batch in self._batches(ctx, ids):
            z = ctx.run_teacher(lambda t, b=batch: ctx.task.forward(t, b).logits.detach(),
                                n_examples=len(batch["index"]))
            logits.append(z.float().cpu())
            wrong.append((z.argmax(-1) != batch["labels"]).cpu())
        new = torch.cat(logits)
        base = 0 if self.soft is None else self.soft.shape[0]
        self.soft = new if self.soft is None else torch.cat([self.soft, new])
        for r, i in enumerate(ids):
            self.row[i] = base + r
        err = torch.cat(wrong)
        ht = float(sum(1.0 / p for p, e in zip(probs, err.tolist()) if e))
        return int(err.sum()), ht

    def _round(self, ctx: StepContext, index: int, batch: Batch) -> None:
        import torch

        n = len(ctx.task.train_data())
        bs = len(batch["index"])
        step = ctx.generation_step
        if self.order_ok is None:
            self.order_ok = self._step_ids(ctx, n, bs, step) == batch["index"].tolist()
        starts = self._starts(ctx.generation_steps)
        visited = min(n, ctx.generation_steps * bs)
        budgets = split_steps(max(1, round(self.params.budget * visited)), len(starts) - 1)
        budgets += [0] * (len(starts) - 1 - len(budgets))
        pool = self._pool(ctx, n, bs, starts[index], starts[index + 1])
        b = min(budgets[index], len(pool))
        gen = torch.Generator().manual_seed(1_000_003 * ctx.seed + 7_919 * index + 17)
        entry: dict[str, Any] = {"round": index, "step": step, "pool": len(pool), "budget": budgets[index]}
        if self.params.teacher_error is not None:
            eps = float(self.params.teacher_error)
        else:
            eps = min(1.0, self.err_sum / self.support_sum) if self.support_sum else None
        if index == 0 or eps is None:
            chosen = sorted(torch.randperm(len(pool), generator=gen)[:b].tolist())
            probs = [b / len(pool)] * len(chosen) if pool else []
            entry.update(selection="uniform")
        else:
            k = eps * len(pool)
            offset = float(torch.rand((), generator=gen, dtype=torch.float64))
            gains = self._gains(ctx, pool)
            chosen, p = select_queries(gains, b, k, offset)
            probs = [float(p[i]) for i in chosen]
            entry.update(selection="rad", teacher_error_used=round(eps, 6), k=round(k, 3),
                         support=int((p > 0).sum()), mean_gain_queried=round(float(gains[chosen].mean()), 6)
                         if chosen else None, mean_gain_pool=round(float(gains.mean()), 6) if len(pool) else None)
        ids = [pool[i] for i in chosen]
        wrong, ht = self._query(ctx, ids, probs) if ids else (0, 0.0)
        if ids:  # Horvitz-Thompson over the round's support (module docstring)
            self.err_sum += ht
            self.support_sum += len(pool) if entry["selection"] == "uniform" else entry["support"]
        entry.update(queries=len(ids), teacher_wrong=wrong)
        self.log.append(entry)

    # --- training -------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        starts = self._starts(ctx.generation_steps)
        for index, s0 in enumerate(starts[:-1]):
            if ctx.generation_step == s0 and len(self.log) == index:
                self._round(ctx, index, batch)
        out = ctx.student_outputs(batch)
        rows = [self.row.get(i, -1) for i in batch["index"].tolist()]
        queried = torch.tensor([r >= 0 for r in rows], device=out.logits.device)
        soft = torch.zeros_like(out.logits, dtype=torch.float32)
        if self.soft is not None and bool(queried.any()):
            picked = self.soft[torch.tensor([max(r, 0) for r in rows])].to(out.logits.device)
            soft = torch.where(queried[:, None], picked.softmax(-1), soft)
        n_soft = int(queried.sum())
        self.rows["soft"] += n_soft
        self.rows["hard"] += len(rows) - n_soft
        return {"student": rad_loss(out.logits, batch["labels"], soft, queried)}

    def state_dict(self) -> dict[str, Any]:
        return {"row": dict(self.row), "soft": self.soft, "log": [dict(e) for e in self.log], "err_sum": self.err_sum,
                "support_sum": self.support_sum, "rows": dict(self.rows), "order_ok": self.order_ok}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.row = dict(state["row"])
        self.soft = state["soft"]
        self.log = [dict(e) for e in state["log"]]
        self.err_sum, self.support_sum = state["err_sum"], state["support_sum"]
        self.rows = dict(state["rows"])
        self.order_ok = state["order_ok"]

    def record_info(self) -> dict[str, Any]:
        budget = sum(e["budget"] for e in self.log)
        return {"budget_fraction": self.params.budget, "budget": budget, "teacher_queries": len(self.row),
                "rounds": [dict(e) for e in self.log], "training_rows": dict(self.rows),
                "teacher_error": self.params.teacher_error,
                "teacher_error_estimate": round(self.err_sum / self.support_sum, 6) if self.support_sum else None,
                "pool": "examples of each round's steps" if self.order_ok else "the whole training split"}
