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


def test_step_trains_on_label_and_rationale_and_sets_the_eval_prefix(tmp_path):
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
    batch = task.train_data().batch(list(range(task.training().batch_size)))
    loss = m.training_step(batch, ctx)["student"]
    assert torch.isfinite(loss) and loss.requires_grad
    final = m.finalize_student(ctx.student, ctx)
    assert final.bench_eval_prefix == "predict: "


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
