"""The geneval task's own plumbing: the prompt tokenizer, the evaluation slots (4 images per prompt, in
order) and its scoring path end to end on ground-truth renders and on blank images."""

from __future__ import annotations

import numpy as np
import pytest

from bench import BenchError
from bench.api import TaskEnv


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.geneval import GenEval

    return GenEval(GenEval.Params(), TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("geneval")))


def test_every_prompt_encodes_and_word_order_matters(task):
    from bench.tasks.geneval import prompts as P

    rng = np.random.default_rng(0)
    for meta in P.train_prompts(rng, 500) + P.shape_prompts():
        ids = task.tokenizer.encode(meta["prompt"])
        assert len(ids) == task.tokenizer.max_len and max(ids) < len(task.tokenizer.vocab)
    a = task.tokenizer.encode("a photo of a red circle and a blue square")
    b = task.tokenizer.encode("a photo of a blue square and a red circle")
    assert a != b
    with pytest.raises(BenchError, match="outside the task's vocabulary"):
        task.tokenizer.encode("a photo of a dog")


def test_evaluation_slots_are_four_images_per_prompt_in_order(task):
    from bench.tasks.geneval import IMAGES_PER_PROMPT

    prompts = [m["prompt"] for m in task._eval_prompts]
    conds = task.eval_conditions(task.eval_images)
    assert task.eval_images == IMAGES_PER_PROMPT * len(prompts)
    for i in (0, 1, IMAGES_PER_PROMPT, len(conds) - 1):
        assert conds[i].tolist() == task.tokenizer.encode(prompts[i // IMAGES_PER_PROMPT])


def test_scoring_ground_truth_renders_and_blank_images(task):
    from bench.tasks.geneval import IMAGES_PER_PROMPT, render

    rng = np.random.default_rng(1)
    metas = [m for m in task._eval_prompts for _ in range(IMAGES_PER_PROMPT)]
    truth = render.render_batch(metas, rng)
    conds = task.eval_conditions(len(metas))
    scores = task.score_images(truth, conds)
    assert scores["overall"] == 1.0 and scores["correct_prompts"] == 1.0
    blank = np.full_like(truth, 153)
    assert task.score_images(blank, conds)["overall"] == 0.0
    # a wrong number of images for the prompt slots is refused, not silently mis-assigned
    with pytest.raises(BenchError, match="prompt slots"):
        task.score_images(truth[:-1], conds[:-1])
