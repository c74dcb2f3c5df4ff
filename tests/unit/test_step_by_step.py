"""Distilling step-by-step (Hsieh et al. 2023): the multi-task loss, the prefixes and targets each task
scores, rationales from the teacher (cached, counted), and the predict prefix at evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench.methods.step_by_step import StepByStep, first_line, multitask_loss

from bench.api import TaskEnv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_multitask_loss_by_hand():
    # TaskPrefixTrainer.compute_loss: alpha * pred + (1 - alpha) * expl
    assert multitask_loss(torch.tensor(2.0), torch.tensor(4.0), 0.5).item() == pytest.approx(3.0)
    assert multitask_loss(torch.tensor(2.0), torch.tensor(4.0), 0.8).item() == pytest.approx(2.4)


def test_defaults_are_the_code_s():
    p = StepByStep.Params()
    assert (p.alpha, p.predict_prefix, p.explain_prefix) == (0.5, "predict: ", "explain: ")


def test_rationale_is_the_first_line():
    assert first_line(" the cat is on the mat\nQuestion: x") == "the cat is on the mat"


def _task(tmp_path: Path):
    from bench.tasks.lm import LM

    return LM(LM.Params(teacher_steps=2), TaskEnv(tier="smoke", subtask="corpus", data_root=None, cache_dir=tmp_path))


def test_encode_targets_scores_only_the_target(tmp_path):
    task = _task(tmp_path)
    b = task.encode_targets(["predict: a b c", "predict: a"], [" positive", " no"])
    tok = task.tokenizer
    for row in range(2):
        target = tok([" positive", " no"][row], add_special_tokens=False)["input_ids"]
        scored = b["labels"][row][b["labels"][row] != -100].tolist()
        assert scored == target
    assert task.scored_rows(b) == [len(tok(" positive", add_special_tokens=False)["input_ids"]),
                                   len(tok(" no", add_special_tokens=False)["input_ids"])]


def test_setup_writes_the_rationales_once_and_the_eval_prefix_is_predict(tmp_path):
    from bench.train import HarnessContext

    task = _task(tmp_path)
    teacher = task.teacher().eval()  # the task's teacher: its rationales have a cache identity
    ctx = HarnessContext(task=task, student=task.student(0), teacher=teacher, total_steps=4, seed=0, device="cpu",
                         train_split=task.train_data(), batch_size=task.training().batch_size)
    m = StepByStep(StepByStep.Params(rationale_tokens=6))
    m.setup(ctx)
    n = len(task.labelled_prompts())
    assert len(m.rationales) == n and m.info["rationales_cached"] is False
    assert ctx.teacher_forward_passes > 0 and ctx.teacher_examples == n
    # The same rationales come from the task's disk cache for the next cell: no teacher work.
    ctx2 = HarnessContext(task=task, student=task.student(0), teacher=teacher, total_steps=4, seed=1, device="cpu",
                          train_split=task.train_data(), batch_size=task.training().batch_size)
    m2 = StepByStep(StepByStep.Params(rationale_tokens=6))
    m2.setup(ctx2)
    assert m2.rationales == m.rationales and ctx2.teacher_forward_passes == 0 and m2.info["rationales_cached"]
    final = m.finalize_student(ctx.student, ctx)
    assert final.bench_eval_prefix == "predict: "


class _TableTask:
    """A task whose per-row loss is looked up by (scored source, target): the step's value can be worked out by
    hand, and a pair the method should not score (a label after "explain: ", a rationale after "predict: ")
    raises KeyError."""

    name = "table"
    ROW_LOSS = {("predict: x0", " yes"): 1.0, ("predict: x1", " no"): 3.0,  # label task: mean 2
                ("explain: x0", " because a"): 5.0, ("explain: x1", " because bb"): 3.0}  # rationale task: mean 4

    def encode_targets(self, sources, targets):
        return {"pairs": list(zip(sources, targets))}

    def forward(self, model, batch):
        from bench.api import Outputs

        return Outputs(logits=model.w * torch.tensor([self.ROW_LOSS[p] for p in batch["pairs"]]))

    def label_loss(self, outputs, batch):
        return outputs.logits.mean()


class _Ctx:
    def __init__(self, task, student):
        self.task, self.student, self.seed, self.step, self.device = task, student, 0, 0, "cpu"


def _student_w():
    student = torch.nn.Module()
    student.w = torch.nn.Parameter(torch.tensor(1.0))
    return student


@pytest.mark.parametrize(("alpha", "expected"), [(0.5, 3.0), (0.8, 2.4), (1.0, 2.0), (0.0, 4.0)])
def test_step_loss_is_alpha_label_plus_one_minus_alpha_rationale_by_hand(alpha, expected):
    # L = alpha * mean(1, 3) + (1 - alpha) * mean(5, 3) = 2 alpha + 4 (1 - alpha), both passes through one student:
    # dL/dw = the same number (the student's scale w multiplies both).
    m = StepByStep(StepByStep.Params(alpha=alpha))
    m.examples = [("u0", "x0", "yes"), ("u1", "x1", "no")]
    m.rationales = ["because a", "because bb"]
    student = _student_w()
    loss = m.training_step({"index": torch.arange(2)}, _Ctx(_TableTask(), student))["student"]
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert student.w.grad.item() == pytest.approx(expected)


def test_step_loss_on_the_lm_task_is_the_weighted_target_token_cross_entropy(tmp_path):
    # The real task and student: each pair tokenised on its own, the student run on it unpadded, next-token
    # cross-entropy on the target tokens only, pooled over the tokens of both rows; then alpha-weighted.
    import torch.nn.functional as F

    task = _task(tmp_path)
    student = task.student(0)
    with torch.no_grad():  # sharper than a fresh init's near-uniform predictions (tied: the embeddings scale too)
        student.lm_head.weight.mul_(20.0)
    examples = task.labelled_prompts()[:2]
    rationales = ["the story is awful and dull", "a poor cast"]
    tok = task.tokenizer

    def pooled_ce(pairs):
        nll, count = 0.0, 0
        for source, target in pairs:
            s = tok(source, add_special_tokens=False)["input_ids"]
            t = tok(target, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = student(input_ids=torch.tensor([s + t])).logits[0]
            for j, token in enumerate(t):  # token j of the target is predicted at position len(s) + j - 1
                nll += -F.log_softmax(logits[len(s) + j - 1].double(), -1)[token].item()
                count += 1
        return nll / count

    pred = pooled_ce([("predict: " + x, " " + y) for _, x, y in examples])
    expl = pooled_ce([("explain: " + x, " " + r) for (_, x, _), r in zip(examples, rationales)])
    assert abs(pred - expl) > 0.5, "the two tasks must differ for the weighting to show"
    ctx = _Ctx(task, student)
    for alpha in (0.5, 0.8):
        m = StepByStep(StepByStep.Params(alpha=alpha))
        m.examples, m.rationales = examples, rationales
        loss = m.training_step({"index": torch.arange(2)}, ctx)["student"]
        assert loss.item() == pytest.approx(alpha * pred + (1 - alpha) * expl, rel=1e-5)


def test_eval_prefix_becomes_the_lm_eval_description(tmp_path):
    from bench.tasks.lm import evaluation

    folder, _ = evaluation.write_tasks(tmp_path, {"sst2": [{"sentence": "good", "label": 1}]}, [],
                                           description="predict: ")
    assert 'description: "predict: "' in (folder / "sst2.yaml").read_text()
    folder2, _ = evaluation.write_tasks(tmp_path, {"sst2": [{"sentence": "good", "label": 1}]}, [])
    assert folder2 != folder and "description" not in (folder2 / "sst2.yaml").read_text()


def test_teacher_generations_are_cached_for_the_task_s_teacher_only(tmp_path):
    task = _task(tmp_path)
    prompts = ["the movie was", "a fine day"]
    teacher = task.teacher()
    texts, passes, n, cached = task.teacher_generations(teacher, prompts, 3)
    assert (passes, n, cached) == (3 * 2, 2, False)  # two prompt lengths: one generate call each
    again = task.teacher_generations(teacher, prompts, 3)
    assert again == (texts, 0, 0, True)
    # A model the task did not load has no cache identity: generated every time, never read from disk.
    other = task.student(0)
    assert task.teacher_generations(other, prompts, 3)[3] is False
    assert task.teacher_generations(other, prompts, 3)[3] is False
