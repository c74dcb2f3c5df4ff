"""The harness additions the vision methods need, on the imagenet smoke task: teacher ensembles, training
generations (fresh students, new optimisers and schedules, the previous generation as teacher), exact
resume across a generation boundary, uncached teachers for augmented batches, method optimiser overrides."""

from __future__ import annotations

import pytest
import torch

from bench import registry
from bench.api import Generation, Method, Params, TaskEnv
from bench.train import TrainingError, generation_seed, train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    cls = registry.tasks.get("imagenet")
    return cls(cls.Params(smoke_train_size=128, smoke_eval_size=32),
               TaskEnv(tier="smoke", subtask="val", data_root=None, cache_dir=tmp_path_factory.mktemp("cache")))


def cfg(steps: int):
    from bench.api import TrainConfig

    return TrainConfig(steps=steps, batch_size=16, eval_batch_size=32, optim=type(task_optim())(**task_optim().__dict__))


def task_optim():
    from bench.tasks.imagenet import SMOKE_OPTIM

    return SMOKE_OPTIM


class Recorder(Method):
    """Two generations: generation 0 on labels, generation 1 distilled from generation 0; records what it saw."""

    name = "recorder"
    domains = frozenset({"classification"})

    def __init__(self, fresh: bool = True, crash_at: int | None = None) -> None:
        super().__init__(Params())
        self.fresh, self.crash_at, self.seen = fresh, crash_at, []

    def generations(self, total_steps):
        return [Generation(total_steps // 2, self.fresh), Generation(total_steps - total_steps // 2, self.fresh)]

    def on_generation_start(self, index, ctx):
        self.seen.append(("start", index, ctx.step, ctx.previous is not None))

    def training_step(self, batch, ctx):
        if self.crash_at is not None and ctx.step == self.crash_at:
            raise KeyboardInterrupt
        out = ctx.student_outputs(batch)
        loss = ctx.label_loss(out, batch)
        if ctx.generation == 1:
            prev = ctx.previous_outputs(batch).logits if self.fresh else ctx.teacher_outputs(batch).logits
            loss = loss + (out.logits - prev).pow(2).mean()
        self.seen.append((ctx.generation, ctx.generation_step, batch["index"][:3].tolist()))
        return {"student": loss}


def test_generations_restart_data_and_freeze_the_previous_student(task):
    method = Recorder()
    _, result = train(method, task, task.student(0), None, cfg(6), seed=0)
    steps = [s for s in method.seen if s[0] != "start"]
    assert [s[:2] for s in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert steps[0][2] == steps[3][2], "every generation starts the data order again"
    assert [g["steps"] for g in result.generations] == [3, 3]
    assert result.previous_forward_passes == 3 and result.teacher_forward_passes == 0
    starts = [s for s in method.seen if s[0] == "start"]
    assert [(s[1], s[2], s[3]) for s in starts] == [(0, 0, False), (1, 3, True)]


def test_a_fresh_generation_gets_a_new_initialisation(task):
    a, b = task.student(generation_seed(0, 0)), task.student(generation_seed(0, 1))
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    assert generation_seed(0, 0) == 0


def test_resume_across_a_generation_boundary_is_exact(task, tmp_path):
    full, _ = train(Recorder(), task, task.student(0), None, cfg(6), seed=0)
    ckpt = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train(Recorder(crash_at=4), task, task.student(0), None, cfg(6), seed=0, checkpoint_path=ckpt, checkpoint_every=1)
    assert ckpt.exists()
    resumed, result = train(Recorder(), task, task.student(0), None, cfg(6), seed=0, checkpoint_path=ckpt, checkpoint_every=1)
    assert result.resumed_from_step == 4
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


class Switcher(Method):
    """Two generations on labels, one student; at the last step of generation 0 it freezes everything but the
    last parameter tensor, so generation 1's optimiser covers fewer parameters (MobileSAM's decoder fine-tuning,
    ESP-MedSAM's controller stage)."""

    name = "switcher"
    domains = frozenset({"classification"})

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(Params())
        self.crash_at = crash_at

    def generations(self, total_steps):
        return [Generation(total_steps // 2, False), Generation(total_steps - total_steps // 2, False)]

    def training_step(self, batch, ctx):
        if self.crash_at is not None and ctx.step == self.crash_at:
            raise KeyboardInterrupt
        return {"student": ctx.label_loss(ctx.student_outputs(batch), batch)}

    def on_step_end(self, ctx):
        if ctx.generation == 0 and ctx.generation_step + 1 == ctx.generation_steps:
            for p in list(ctx.student.parameters())[:-1]:
                p.requires_grad_(False)
        return {}


def test_resume_exactly_at_a_generation_boundary_where_the_trained_parameters_change(task, tmp_path):
    full, _ = train(Switcher(), task, task.student(0), None, cfg(6), seed=0)
    ckpt = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):  # dies at generation 1's first step: the checkpoint is generation 0's end
        train(Switcher(crash_at=3), task, task.student(0), None, cfg(6), seed=0, checkpoint_path=ckpt,
              checkpoint_every=1)
    resumed, result = train(Switcher(), task, task.student(0), None, cfg(6), seed=0, checkpoint_path=ckpt,
                            checkpoint_every=1)
    assert result.resumed_from_step == 3
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


class Ensemble(Method):
    name = "ensemble-probe"
    domains = frozenset({"classification"})

    def training_step(self, batch, ctx):
        out = ctx.student_outputs(batch)
        logits = [ctx.teacher_outputs(batch, index=k).logits for k in range(len(ctx.teachers))]
        self.logits = logits
        return {"student": sum((out.logits - z).pow(2).mean() for z in logits)}


def test_teacher_ensemble_outputs_by_index_and_cached_per_teacher(task):
    t1, t2 = task.student(11).eval(), task.student(12).eval()
    method = Ensemble(Params())
    _, result = train(method, task, task.student(0), [t1, t2], cfg(16), seed=0)  # 16 x 16 > 128 examples: epoch 2
    batch = task.train_data().batch(range(4))
    with torch.no_grad():
        assert not torch.allclose(t1(batch["pixels"]), t2(batch["pixels"]))
    # 128 examples x 2 teachers ran once each; the second epoch came from the caches.
    assert result.teacher_examples == 2 * 128


def test_teacher_outputs_are_not_cached_when_batches_are_augmented(task, monkeypatch):
    teacher = task.student(11).eval()
    monkeypatch.setattr(type(task), "teacher_outputs_cacheable", lambda self: False)
    method = Ensemble(Params())
    _, result = train(method, task, task.student(0), teacher, cfg(16), seed=0)
    assert result.teacher_examples == 16 * 16 and result.teacher_forward_passes == 16


def test_a_plan_that_does_not_add_up_is_refused(task):
    class Bad(Recorder):
        def generations(self, total_steps):
            return [Generation(1), Generation(1)]

    with pytest.raises(TrainingError, match="add up"):
        train(Bad(), task, task.student(0), None, cfg(6), seed=0)
