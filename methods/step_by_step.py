"""Distilling step-by-step (Hsieh et al., "Distilling Step-by-Step! Outperforming Larger Language Models with
Less Training Data and Smaller Model Sizes", Findings of ACL 2023, arXiv 2305.02301).

Official code: google-research/distilling-step-by-step @ ef94426: ``model_utils.py``
(``TaskPrefixDataCollator``, ``TaskPrefixTrainer.compute_loss``) and ``run.py`` (the task prefixes, the
defaults ``--alpha 0.5``, ``--label_type gt``).

What is implemented:

* **Rationales from the teacher**: for each labelled training input x the teacher writes a rationale
  r_hat: its greedy continuation of ``x`` followed by ``rationale_trigger`` (a chain-of-thought style cue),
  ``rationale_tokens`` tokens long, cut at the first line break. Rationales are generated once per
  (teacher, inputs, length) and cached on disk by the task (``teacher_generations``); the cell that
  generates them counts one teacher forward pass per generated position.
* **Multi-task training with task prefixes** (``compute_loss``): two passes of the *same* student per batch,
  L = alpha * CE(label | "predict: " + x) + (1 - alpha) * CE(r_hat | "explain: " + x), alpha = 0.5, the CE
  over the target tokens only. Labels are the ground truth (``--label_type gt``).
* **Inference** uses the "predict: " path only: the student is evaluated with the predict prefix in front
  of every prompt (the lm task passes it to lm-eval as the task description), so rationales cost nothing
  at test time.

The labelled inputs are the task's prompt-format training examples (``Task.labelled_prompts``; the lm
task: GLUE-style prompts with their gold answers). Each step takes a batch of them in an order that is a
pure function of (seed, step), the harness's batch size; the harness's corpus batch is not used.

Deviations: the paper's student is a seq2seq T5 and its rationales come from few-shot chain-of-thought
prompting of PaLM-540B. Here the student is the task's decoder-only student (scoring the target after the
prefixed input is the decoder-only form of the same two losses, and keeps the row comparable with the
other methods' students) and the teacher is the task's causal LM, prompted zero-shot with the rationale
cue: its rationales are what a small teacher writes, not PaLM's. Targets are truncated to
``rationale_tokens`` (the code truncates to 256 tokens). ``label_type llm`` (teacher labels) is not
implemented. The harness's optimiser and budget apply (the code uses AdamW 5e-5, batch 64, 10,000 steps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext

CAPABILITIES = ("labelled_prompts", "encode_targets", "teacher_generations")


def multitask_loss(pred_loss: torch.Tensor, expl_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * prediction loss + (1 - alpha) * explanation loss (``TaskPrefixTrainer.compute_loss``)."""
    return alpha * pred_loss + (1.0 - alpha) * expl_loss


def first_line(text: str) -> str:
    """The rationale: the generation up to its first line break (stripped)."""
    return text.split("\n", 1)[0].strip()


class StepByStep(Method):
    """Hsieh et al. 2023: label + teacher rationale, two task prefixes, one student, alpha = 0.5."""

    name = "step_by_step"
    version = "1"
    domains = frozenset({"lm"})

    class Params(Params):
        # run.py: --alpha 0.5; the prefixes 'predict: ' and 'explain: ' (tokenize_function).
        alpha: float = Field(0.5, ge=0, le=1, description="weight of the label (predict) loss")
        predict_prefix: str = Field("predict: ", description="task prefix of the label task")
        explain_prefix: str = Field("explain: ", description="task prefix of the rationale task")
        rationale_trigger: str = Field("\nExplanation:", description="cue after the input that asks the teacher "
                                                                     "for a rationale")
        rationale_tokens: int = Field(24, ge=1, le=256, description="tokens of rationale the teacher writes "
                                                                   "(the code truncates targets to 256)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}

    def unsupported(self, task) -> str | None:
        missing = [c for c in CAPABILITIES if not hasattr(task, c)]
        if missing:
            return f"step-by-step needs labelled prompts and teacher generations; task {task.name} lacks {missing}"
        return None

    def setup(self, ctx: StepContext) -> None:
        import torch

        examples = ctx.task.labelled_prompts()
        if not examples:
            from bench import BenchError

            raise BenchError(f"step-by-step: task {ctx.task.name} has no labelled prompts at this tier")
        self.examples = examples
        prompts = [prompt + self.params.rationale_trigger for _, prompt, _ in examples]
        with torch.no_grad():
            texts, passes, n, cached = ctx.task.teacher_generations(ctx.teacher, prompts, self.params.rationale_tokens)
        # Teacher work of this cell (0 when another cell generated them): one pass per generated position.
        # The harness's context keeps these counters (bench.train.HarnessContext).
        if hasattr(ctx, "teacher_forward_passes"):
            ctx.teacher_forward_passes += passes
            ctx.teacher_examples += n
        self.rationales = [first_line(t) for t in texts]
        self.info = {"labelled_examples": len(examples), "rationales_cached": cached,
                     "rationale_passes": passes, "empty_rationales": sum(not r for r in self.rationales),
                     "example_rationale": self.rationales[0][:200] if self.rationales else ""}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        from bench.train import batch_indices, to_device

        bs = len(batch["index"])
        idx = batch_indices(len(self.examples), min(bs, len(self.examples)), ctx.seed, ctx.step)
        p = self.params
        inputs = [self.examples[i][1] for i in idx]
        pred = to_device(ctx.task.encode_targets([p.predict_prefix + x for x in inputs],
                                                 [" " + self.examples[i][2] for i in idx]), ctx.device)
        expl = to_device(ctx.task.encode_targets([p.explain_prefix + x for x in inputs],
                                                 [" " + self.rationales[i] for i in idx]), ctx.device)
        pred_loss = ctx.task.label_loss(ctx.task.forward(ctx.student, pred), pred)
        expl_loss = ctx.task.label_loss(ctx.task.forward(ctx.student, expl), expl)
        return {"student": multitask_loss(pred_loss, expl_loss, p.alpha)}

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        # Inference takes the predict path: the task puts this prefix in front of every evaluation prompt.
        student.bench_eval_prefix = self.params.predict_prefix
        return student

    def state_dict(self) -> dict[str, Any]:
        return {"info": self.info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])

    def record_info(self) -> dict[str, Any]:
        return {**self.info, "eval_prefix": self.params.predict_prefix}
