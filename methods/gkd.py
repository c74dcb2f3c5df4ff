"""GKD — Generalized Knowledge Distillation (Agarwal et al., "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", ICLR 2024, arXiv 2306.13649).

Official implementation followed: Hugging Face TRL's ``GKDTrainer`` (huggingface/trl @ f2cd577,
``trl/experimental/gkd/gkd_trainer.py``: ``generalized_jsd_loss``, ``training_step``,
``generate_on_policy_outputs``; defaults in ``gkd_config.py``). The paper's own code is not public.

What is implemented:

* **Divergence** (paper Eq. 1; TRL ``generalized_jsd_loss``), per scored token with p the teacher's and q
  the student's softmax at temperature 1 (TRL calls the loss with its default temperature 1.0):
  m = beta p + (1 - beta) q and JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m). As in TRL, beta = 0
  is exactly the forward KL(p || q) and beta = 1 exactly the reverse KL(q || p) (special-cased: the
  formula itself tends to 0 at both ends). Averaged over scored tokens (TRL's ``batchmean`` over tokens
  with label != -100).
* **On-policy data** (TRL ``training_step``): at each step, with probability ``lmbda`` the batch's
  sequences are replaced by the *student's own samples*: the student continues the prompt of each
  example, sampling at ``temperature`` 0.9 with top-k 0 and top-p 1 under no_grad, and the divergence is
  taken on the generated tokens only (prompt positions masked, TRL ``new_labels[:, :prompt_length] =
  -100``). The teacher runs on those samples; those passes are counted (they cannot come from the
  teacher-output cache). Otherwise the batch is the dataset's (off-policy, supervised KD), whose teacher
  outputs come from the task's cache.
* **One teacher distribution for both step kinds.** Where the task keeps its teacher outputs in a top-k
  store (``Task.teacher_store``; the lm task's ``bench.teacher_cache.TopKTeacherStore``, k =
  ``teacher_topk``), the dataset steps read the store's rebuilt distribution, not the exact teacher. The
  on-policy steps' live teacher logits are put through the store's own rule (``store_distribution``, which
  calls the store's ``topk_compress`` and ``dense_log_probs``): p = softmax(z_T); the k largest log p
  are kept (rounded to the store's value dtype, float16 below k = V), the mass left outside them is
  1 - sum of the kept (rounded) probabilities, and it is spread uniformly over the other V - k tokens,
  p~(v) = (1 - sum_topk p) / (V - k) (log floored at ``TAIL_FLOOR``); p~ sums to 1, nothing is
  renormalised. So on-policy and dataset steps distil from the same p~ (the numbers the store would
  hold for those sequences, up to the float noise of running the teacher on other batch shapes). With k = V (the lm smoke tier) or a task/teacher without a store
  (live outputs, ``lm.teacher_cache=false``, a teacher that is not the task's) p~ is the teacher's exact
  ``log_softmax`` and nothing changes. The rule in use is in ``record_info()["teacher_distribution"]``.
* Defaults: TRL ``GKDConfig``: lmbda 0.5, beta 0.5, temperature 0.9; ``max_new_tokens`` defaults to the
  rest of the task's block (the lm task: a block's first half is the prompt, the student writes the
  second half).

Deviations: the corpus has no prompt/response split. Off-policy steps score every token of a block, like
every other method on the task; on-policy steps use the block's first half as the prompt (the task's
``generate``). Sampled continuations are not cut at an end-of-text token (TRL masks after the first EOS):
the lm task's corpus is packed documents separated by end-of-text, so text after it is a new document.
The coin for on-policy steps is drawn from a generator seeded by (seed, step), so a resumed cell draws
the same coins. Below k = V, TRL's on-policy steps use the exact teacher; here they use the store's
top-k distribution p~ (above), so that the two step kinds share one teacher distribution; the row's
footnote says so (``table_notes``). ``seq_kd`` (teacher-generated sequences) is not implemented. The
harness's optimiser and budget apply (TRL's examples use its own learning rate).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench.api import Method, Params, Task

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """mean over rows of JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
    beta = 0: KL(p || q); beta = 1: KL(q || p) (TRL ``generalized_jsd_loss``)."""
    import math

    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    if beta == 0.0:
        per = F.kl_div(log_q, log_p, reduction="none", log_target=True)  # p (log p - log q)
    elif beta == 1.0:
        per = F.kl_div(log_p, log_q, reduction="none", log_target=True)  # q (log q - log p)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]), dim=0)
        kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)  # KL(p || m) terms
        kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)  # KL(q || m) terms
        per = beta * kl_p + (1.0 - beta) * kl_q
    return per.sum(-1).mean()


def store_rule(store: Any) -> tuple[int, Any] | None:
    """(k, value dtype) of a task's top-k teacher store (``bench.teacher_cache.TopKTeacherStore``), or None
    when the store is exact (k = V) or there is none (live teacher outputs): nothing to apply then."""
    k, vocab = getattr(store, "k", None), getattr(store, "vocab_size", None)
    if k is None or vocab is None or int(k) >= int(vocab):
        return None
    return int(k), store.values_dtype


def store_distribution(teacher_logits: torch.Tensor, k: int, dtype: Any = None) -> torch.Tensor:
    """The top-k store's rebuilt log-probabilities of ``teacher_logits`` [R, V]: the store's own
    ``topk_compress`` (top k of log_softmax, values rounded to ``dtype``, log of the remaining mass) then
    ``dense_log_probs`` (that mass spread uniformly over the other V - k tokens), exactly as
    ``TopKTeacherStore.build`` and ``.outputs`` do for the dataset's sequences."""
    import torch

    from bench import teacher_cache as tc

    vocab = teacher_logits.shape[-1]
    values, indices, log_rest = tc.topk_compress(torch.log_softmax(teacher_logits.detach().float(), dim=-1), k, dtype)
    return tc.dense_log_probs(values, indices, log_rest, vocab).to(teacher_logits.device)


class GKD(Method):
    """Agarwal et al. 2024 (GKD): generalized JSD(beta) on student samples with probability lambda (TRL)."""

    name = "gkd"
    version = "2"
    domains = frozenset({"lm"})

    class Params(Params):
        # TRL gkd_config.py: lmbda 0.5 ("student data fraction"), beta 0.5, temperature 0.9 (sampling).
        lmbda: float = Field(0.5, ge=0, le=1, description="probability of an on-policy (student-sampled) step")
        beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation: 0 forward KL, 1 reverse KL")
        temperature: float = Field(0.9, gt=0, description="sampling temperature of the student's outputs")
        max_new_tokens: int | None = Field(None, ge=1, description="tokens sampled per prompt (unset: the rest of "
                                                                   "the task's block)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.on_policy_steps = 0
        self.steps = 0
        self.rule: tuple[int, Any] | None = None  # the task's top-k store rule (store_rule), set in setup
        self.vocab: int | None = None
        self.resolved = False

    def unsupported(self, task) -> str | None:
        if type(task).generate is Task.generate:
            return f"GKD samples from the student; task {task.name} has no generate()"
        return None

    def setup(self, ctx: StepContext) -> None:
        self._resolve_rule(ctx)

    def _resolve_rule(self, ctx: StepContext) -> None:
        """The rule of the store the harness reads the dataset steps' teacher outputs from
        (``ctx.teacher_outputs`` asks ``task.teacher_store`` for teacher 0, a pure function of the task and
        the teacher; building the store object reads nothing)."""
        store = ctx.task.teacher_store(ctx.teacher) if ctx.teacher is not None else None
        self.rule = store_rule(store)
        self.vocab = getattr(store, "vocab_size", None)
        self.resolved = True

    def on_policy(self, seed: int, step: int) -> bool:
        """TRL: ``random.random() <= lmbda``; here from a generator seeded by (seed, step)."""
        return random.Random(1_000_003 * seed + step).random() < self.params.lmbda

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        self.steps += 1
        if self.on_policy(ctx.seed, ctx.step):
            self.on_policy_steps += 1
            if not self.resolved:  # setup resolves it; a caller that skipped setup gets it here
                self._resolve_rule(ctx)
            n_new = self.params.max_new_tokens or (batch["input_ids"].shape[1] - getattr(ctx.task, "prompt_tokens", 0))
            sampled = ctx.task.generate(ctx.student, batch, max_new_tokens=max(1, n_new),
                                        temperature=self.params.temperature)
            out = ctx.task.forward(ctx.student, sampled)
            teacher_logits = ctx.run_teacher(lambda t: ctx.task.forward(t, sampled).logits, len(batch["index"]))
            if self.rule is not None:  # the store's top-k distribution, as the dataset steps read it
                teacher_logits = store_distribution(teacher_logits, *self.rule)
        else:
            out = ctx.student_outputs(batch)
            teacher_logits = ctx.teacher_outputs(batch).logits
        return {"student": generalized_jsd(out.logits, teacher_logits, self.params.beta)}

    def state_dict(self) -> dict[str, Any]:
        return {"on_policy_steps": self.on_policy_steps, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on_policy_steps, self.steps = state["on_policy_steps"], state["steps"]

    def record_info(self) -> dict[str, Any]:
        return {"on_policy_steps": self.on_policy_steps, "steps": self.steps, "lmbda": self.params.lmbda,
                "beta": self.params.beta, "temperature": self.params.temperature,
                "off_policy_data": "the task's training sequences (teacher outputs from its cache)",
                "teacher_distribution": self._distribution_text()}

    def _distribution_text(self) -> str:
        if self.rule is None:
            return "exact teacher softmax on both step kinds (no top-k store, or k = V)"
        k, dtype = self.rule
        return (f"top-{k} store rule on both step kinds: the {k} largest teacher probabilities kept ({dtype}), the "
                f"remaining mass spread uniformly over the other {self.vocab - k} tokens; on-policy teacher logits "
                f"are put through the same rule")

    def table_notes(self, task: Task) -> list[str]:
        if self.rule is None or self.on_policy_steps == 0:
            return []
        k = self.rule[0]
        return [f"on-policy (student-sampled) steps distil from the teacher truncated by the same top-{k} rule as "
                f"the teacher-output cache (top-{k} probabilities kept, the rest spread uniformly), not from the "
                f"exact teacher as in TRL, so both step kinds share one teacher distribution"]
