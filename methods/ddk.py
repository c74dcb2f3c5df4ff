"""DDK — Distilling Domain Knowledge for Efficient Large Language Models (Liu et al., NeurIPS 2024,
arXiv 2407.16154).

Official code: none was released (the authors built on DeepSpeed-Chat); implemented from the paper's
section 3 ("domain discrepancy factor", "factor smooth updating", "domain knowledge guided sampling").

What is implemented (p teacher, q student; domains declared by the task, ``Task.data_domains``):

* **Domain discrepancy factor** (paper section 3.2): on each domain's held-out text, the student's and the
  teacher's perplexities l_S[i] = exp(CE_S(V_i)) and l_T[i] = exp(CE_T(V_i)); then
  r[i] = exp(l_S[i] / l_T[i]) / sum_j exp(l_S[j] / l_T[j]) (a softmax of the perplexity ratios): a larger
  r[i] means a larger student deficit in domain i. r_0 is computed before the first step and is this
  softmax alone, with no uniform mixing: the paper defines the factor by the softmax (section 3.2) and
  brings in the (1 - alpha)/N term only in its smooth-updating equation for r_{t+1} (section 3.3), to
  steady successive updates; it gives r_0 no other form. That is our reading of the text (no code exists).
* **Factor smooth updating** (section 3.3), every K steps (t indexes intervals):
  psi_{t+1}[i] = r_t[i] * exp(l_S^{t+1}[i] / l_T^{t+1}[i]),
  r_{t+1}[i] = alpha * psi_{t+1}[i] / sum_j psi_{t+1}[j] + (1 - alpha) / N, alpha = 0.5.
  The update is multiplicative (it carries the history) and mixed with the uniform distribution (every
  domain keeps at least (1 - alpha)/N of the data).
* **Sampling** (section 3.3): at the start of each interval, a sub-dataset supporting K steps is drawn
  with domain proportions r_t (counts by largest remainder) from each domain's examples in a seeded
  order, cycled when a domain runs out, and shuffled; the interval's steps read it in order. The
  harness's own batch is not used (every example is still a training example, so teacher outputs come
  from the task's cache by example id).
* **Loss** (section 3.4): L = CE(student, next tokens) + gamma * KL(softmax(z_T / T) || softmax(z_S / T)),
  gamma = 0.2, T = 1.0, averaged over scored tokens.

Defaults (paper section 4.1 and the ablations): K = 1000 steps out of about 30k (15B tokens), alpha = 0.5,
gamma = 0.2 (chosen from {0, 0.1, 0.2, 0.3, 0.5}), T = 1.0, 500 validation samples per domain.

**The premise, and when it fails** (``weight_report``, in ``record_info()`` and ``table_notes``). The paper's
students are pretrained LLMs whose perplexities are within a small factor of the teacher's (ratios
l_S/l_T near 1-3), so the softmax of the ratios is smooth. A student that starts far from the teacher
(the lm task's smoke and small tiers: a randomly initialised student against a trained teacher; at the
smoke tier the ratios are about 95-270 and differ by tens between domains) makes r_0 one-hot, and the
multiplicative update keeps the data-driven part one-hot until the largest ratios come within a few
units of each other (smoke tier, seeds 0-2: the first 4-5 of 34 updates, steps 0-12 of 100; by the end
the ratios are 1.7-3.4 and the weights smooth). Every update is checked: its *adaptive part* a_t -- r_0 itself, and for t >= 1
(r_t - (1 - alpha)/N) / alpha = psi_t / sum psi_t, the part the uniform term does not fix -- is
degenerate when max a_t > 0.9 (``DEGENERATE_SHARE``). Why the adaptive part: after an update
r <= alpha + (1 - alpha)/N (0.583 at alpha = 0.5, N = 6), so a threshold on r itself can only ever fire
at r_0, while the later r sit at that corner (0.583 on one domain, the floor 0.083 elsewhere) whenever
psi is one-hot. Why 0.9: it leaves the other N - 1 domains 0.1 of the adaptive mass together (about 1/8
of their uniform share at N = 5-6), and a softmax reaches it only when one ratio exceeds the others by
ln(0.9 (N - 1) / 0.1) = 3.8 (N = 6, the others equal); ratios within the paper's range 1-3 cannot
differ by that much (the most a spread of 2 gives is e^2 / (e^2 + N - 1) = 0.6 at N = 6). The record
keeps r, max r, the entropy (nats, and over ln N) and max a_t of every update, and a flag ``degenerate``
with the reason in plain words; the leaderboard prints the reason under the row (``table_notes``). No
option changes the premise: a warm-up of the student on the natural data mix before r_0 would replace the
degenerate first intervals by steps that are not DDK's, so it is not implemented.

Deviations: K is unset by default and resolved to the paper's *fraction* of the budget, K = max(1,
round(steps / 30)) (1000 of ~30,000): a cell's budget here is hundreds of steps, and K = 1000 would never
update. Teacher perplexities per domain are computed once (the teacher is frozen), counted as teacher
forward passes; the student's are recomputed at each update (no gradient). The per-domain held-out sets
are the task's (e.g. 64 documents per domain at the lm small tier instead of 500). The stopping rule on
the discrepancy is not used: the harness fixes the budget. The harness's optimiser applies (the paper
warms up to 3e-5 over 1000 steps, then cosine to 3e-6).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench.api import Method, Params, Task

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext


def discrepancy(student_ppl: list[float], teacher_ppl: list[float]) -> list[float]:
    """r = softmax(l_S / l_T) over domains (paper section 3.2)."""
    ratios = [s / t for s, t in zip(student_ppl, teacher_ppl)]
    m = max(ratios)
    e = [math.exp(x - m) for x in ratios]
    z = sum(e)
    return [x / z for x in e]


def smooth_update(r: list[float], student_ppl: list[float], teacher_ppl: list[float], alpha: float) -> list[float]:
    """Factor smooth updating: psi = r * exp(l_S / l_T); r' = alpha psi / sum psi + (1 - alpha) / N."""
    ratios = [s / t for s, t in zip(student_ppl, teacher_ppl)]
    m = max(ratios)
    psi = [ri * math.exp(x - m) for ri, x in zip(r, ratios)]  # a common factor exp(-m) cancels
    z = sum(psi)
    n = len(r)
    return [alpha * p / z + (1.0 - alpha) / n for p in psi]


#: An update's weights are degenerate when their adaptive part puts more than this on one domain (see
#: the module docstring for why 0.9 and why the adaptive part).
DEGENERATE_SHARE = 0.9


def entropy(r: list[float]) -> float:
    """Shannon entropy of the weights, in nats (ln N for uniform weights, 0 for one-hot)."""
    return -sum(x * math.log(x) for x in r if x > 0)


def adaptive_part(r: list[float], alpha: float, initial: bool) -> list[float] | None:
    """The part of ``r`` the data decide: r_0 itself; after an update, psi / sum psi =
    (r - (1 - alpha)/N) / alpha (None at alpha = 0, where r is uniform)."""
    if initial:
        return list(r)
    if alpha <= 0:
        return None
    n = len(r)
    return [(x - (1.0 - alpha) / n) / alpha for x in r]


def weight_report(history: list[dict[str, Any]], names: list[str], teacher_ppl: list[float] | None, alpha: float,
                  threshold: float = DEGENERATE_SHARE) -> dict[str, Any]:
    """Per update: r, max r and its domain, entropy (nats and over ln N), the adaptive part's max and the
    perplexity ratios l_S/l_T; overall: the largest weight, ``degenerate`` and its reason in plain words."""
    rows = []
    for u, h in enumerate(history):
        r = list(h["r"])
        n = len(r)
        a = adaptive_part(r, alpha, initial=u == 0)
        top = max(range(n), key=lambda i: r[i])
        t_ppl = h.get("teacher_ppl") or teacher_ppl
        ratios = [s / t for s, t in zip(h["student_ppl"], t_ppl)] if t_ppl else None
        rows.append({"update": u, "step": h["step"], "r": r, "max_r": r[top],
                     "max_domain": names[top] if top < len(names) else top, "entropy": entropy(r),
                     "normalized_entropy": entropy(r) / math.log(n) if n > 1 else 0.0,
                     "adaptive_max": None if a is None else max(a), "ratios": ratios})
    bad = [x for x in rows if x["adaptive_max"] is not None and x["adaptive_max"] > threshold]
    reason = None
    if bad:
        first = bad[0]
        ratio = (f"the student's perplexity ratios l_S/l_T were {min(first['ratios']):.3g}-{max(first['ratios']):.3g} "
                 f"at update {first['update']} (a pretrained student, the paper's premise, has ratios near 1-3), so "
                 if first["ratios"] else "")
        reason = (f"{ratio}the domain weights were near one-hot at {len(bad)} of {len(rows)} updates (steps "
                  f"{first['step']} to {bad[-1]['step']}): more than {threshold} of the data-driven part of r "
                  f"(r_0 itself; after an update, the part above the uniform floor (1 - alpha)/N) went to one "
                  f"domain (first at update {first['update']}: max r = {first['max_r']:.3g} on "
                  f"{first['max_domain']}), so those intervals drew most of their samples from one domain "
                  f"instead of the paper's smooth re-weighting")
    return {"updates": rows, "max_r": max((x["max_r"] for x in rows), default=None), "threshold": threshold,
            "degenerate": bool(bad), "degenerate_updates": [x["update"] for x in bad], "reason": reason}


def allocate(weights: list[float], total: int) -> list[int]:
    """``total`` slots split by ``weights`` with the largest-remainder rule (ties: lower index first)."""
    raw = [w * total / sum(weights) for w in weights]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def ddk_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_loss: torch.Tensor, gamma: float,
             temperature: float) -> torch.Tensor:
    """CE + gamma * KL(softmax(z_T / T) || softmax(z_S / T)), the KL averaged over rows (tokens)."""
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()
    return label_loss + gamma * kl


class DDK(Method):
    """Liu et al. 2024 (DDK): domain-discrepancy-guided resampling with factor smoothing; CE + 0.2 KL."""

    name = "ddk"
    version = "1"
    domains = frozenset({"lm"})

    class Params(Params):
        # Paper section 4.1: K = 1000, alpha = 0.5, gamma = 0.2, T = 1.0 (see the module docstring for K).
        interval: int | None = Field(None, ge=1, description="K, steps between updates of the domain weights "
                                                            "(unset: round(steps / 30), the paper's 1000 of ~30k)")
        smooth_alpha: float = Field(0.5, ge=0, le=1, description="factor-smoothing alpha (1: no uniform floor)")
        gamma: float = Field(0.2, ge=0, description="weight of the KL term")
        temperature: float = Field(1.0, gt=0, description="softmax temperature T of the KL term")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.r: list[float] | None = None
        self.teacher_ppl: list[float] | None = None
        self.history: list[dict[str, Any]] = []
        self.interval_index = -1
        self.plan: list[int] = []
        self.pointers: list[int] = []
        self.cycles: list[int] = []
        self.K = 1

    def unsupported(self, task) -> str | None:
        if type(task).data_domains is Task.data_domains:
            return f"DDK resamples by data domain; task {task.name} declares none (Task.data_domains)"
        return None

    # --- perplexities --------------------------------------------------------------------------
    def _ppl(self, model, ctx: StepContext, teacher: bool) -> list[float]:
        import torch

        from bench.train import to_device

        out = []
        for name in self.names:
            split = self.validation[name]
            total = tokens = 0.0
            bs = ctx.task.training().eval_batch_size
            for start in range(0, len(split), bs):
                b = to_device(split.batch(range(start, min(len(split), start + bs))), ctx.device)
                n = float((b["labels"][:, 1:] != -100).sum())
                if teacher:
                    ce = ctx.run_teacher(lambda t, b=b: ctx.task.label_loss(ctx.task.forward(t, b), b),
                                         len(b["index"]))
                else:
                    with torch.no_grad():
                        ce = ctx.task.label_loss(ctx.task.forward(model, b), b)
                total += float(ce) * n
                tokens += n
            out.append(math.exp(total / max(tokens, 1.0)))
        return out

    def _student_ppl(self, ctx: StepContext) -> list[float]:
        was = ctx.student.training
        ctx.student.eval()
        try:
            return self._ppl(ctx.student, ctx, teacher=False)
        finally:
            ctx.student.train(was)

    # --- the method ----------------------------------------------------------------------------
    def setup(self, ctx: StepContext) -> None:
        dom = ctx.task.data_domains()
        self.names = list(dom.names)
        self.validation = dom.validation
        self.by_domain = [[i for i, d in enumerate(dom.train_domain) if d == k] for k in range(len(self.names))]
        empty = [self.names[k] for k, ids in enumerate(self.by_domain) if not ids]
        if empty:
            from bench import BenchError

            raise BenchError(f"DDK: domains {empty} have no training examples")
        self.K = self.params.interval or max(1, round(ctx.total_steps / 30))
        if self.r is None:  # a fresh cell (a resumed one restored r and the plan from its checkpoint)
            self.teacher_ppl = self._ppl(None, ctx, teacher=True)
            student_ppl = self._student_ppl(ctx)
            self.r = discrepancy(student_ppl, self.teacher_ppl)
            self.pointers = [0] * len(self.names)
            self.cycles = [0] * len(self.names)
            self.history.append({"step": 0, "student_ppl": student_ppl, "teacher_ppl": self.teacher_ppl, "r": self.r})

    def _order(self, seed: int, k: int, cycle: int) -> list[int]:
        ids = list(self.by_domain[k])
        random.Random(f"ddk:{seed}:{k}:{cycle}").shuffle(ids)
        return ids

    def _draw(self, seed: int, k: int, n: int) -> list[int]:
        """The next ``n`` examples of domain ``k`` in its seeded order, cycling when it runs out."""
        out: list[int] = []
        while len(out) < n:
            order = self._order(seed, k, self.cycles[k])
            take = order[self.pointers[k]: self.pointers[k] + n - len(out)]
            out += take
            self.pointers[k] += len(take)
            if self.pointers[k] >= len(order):
                self.pointers[k], self.cycles[k] = 0, self.cycles[k] + 1
        return out

    def _start_interval(self, t: int, ctx: StepContext, batch_size: int) -> None:
        if t > 0:
            student_ppl = self._student_ppl(ctx)
            self.r = smooth_update(self.r, student_ppl, self.teacher_ppl, self.params.smooth_alpha)
            self.history.append({"step": ctx.step, "student_ppl": student_ppl, "r": self.r})
        counts = allocate(self.r, self.K * batch_size)
        plan = [i for k, c in enumerate(counts) for i in self._draw(ctx.seed, k, c)]
        random.Random(f"ddk-plan:{ctx.seed}:{t}").shuffle(plan)
        self.plan, self.interval_index = plan, t

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        from bench.train import to_device

        bs = len(batch["index"])
        t = ctx.step // self.K
        if t != self.interval_index:
            self._start_interval(t, ctx, bs)
        pos = (ctx.step - t * self.K) * bs
        b = to_device(ctx.task.train_data().batch(self.plan[pos:pos + bs]), ctx.device)
        out = ctx.student_outputs(b)
        teacher = ctx.teacher_outputs(b)
        loss = ddk_loss(out.logits, teacher.logits, ctx.label_loss(out, b), self.params.gamma, self.params.temperature)
        return {"student": loss}

    def state_dict(self) -> dict[str, Any]:
        import copy

        return copy.deepcopy({"r": self.r, "teacher_ppl": self.teacher_ppl, "history": self.history,
                              "plan": self.plan, "interval_index": self.interval_index, "pointers": self.pointers,
                              "cycles": self.cycles})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import copy

        for k, v in copy.deepcopy(state).items():
            setattr(self, k, v)

    def weights(self) -> dict[str, Any]:
        """The domain-weight history and its degeneracy check (``weight_report``)."""
        return weight_report(self.history, getattr(self, "names", []), self.teacher_ppl, self.params.smooth_alpha)

    def record_info(self) -> dict[str, Any]:
        w = self.weights()
        return {"interval": self.K, "domains": getattr(self, "names", []), "final_r": self.r,
                "teacher_ppl": self.teacher_ppl, "updates": self.history,
                "r_history": [x["r"] for x in w["updates"]], "max_r": [x["max_r"] for x in w["updates"]],
                "entropy": [x["entropy"] for x in w["updates"]],
                "normalized_entropy": [x["normalized_entropy"] for x in w["updates"]],
                "adaptive_max": [x["adaptive_max"] for x in w["updates"]], "max_weight": w["max_r"],
                "degenerate": w["degenerate"], "degenerate_updates": w["degenerate_updates"],
                "degenerate_threshold": w["threshold"], "degenerate_reason": w["reason"]}

    def table_notes(self, task: Task) -> list[str]:
        """One sentence when the weights were degenerate. It leaves out the per-seed perplexity ratios (they
        are in ``record_info()["degenerate_reason"]``) so that seeds with the same pattern share one note."""
        w = self.weights()
        if not w["degenerate"]:
            return []
        bad = [w["updates"][u] for u in w["degenerate_updates"]]
        top = max(bad, key=lambda x: x["max_r"])
        return [f"the student started far from the teacher (perplexity ratios l_S/l_T far above a pretrained "
                f"student's 1-3, DDK's premise), so its domain weights were near one-hot at {len(bad)} of "
                f"{len(w['updates'])} updates (steps {bad[0]['step']} to {bad[-1]['step']}; max r = "
                f"{top['max_r']:.2g} at update {top['update']}): more than {w['threshold']} of the data-driven "
                f"part of r on one domain, so those intervals drew most of their samples from one domain instead "
                f"of the paper's smooth re-weighting"]
