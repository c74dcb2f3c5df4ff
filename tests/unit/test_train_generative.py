"""What the training loop gives generative methods: update ratios (TTUR), extra networks built from the
models (and restored on resume), and the on-disk teacher pairs shared between cells."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.api import Method, Params, TaskEnv
from bench.train import TrainingError, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, teacher_pairs=24, nfe=[1])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("gen-cache")))


class _TTUR(Method):
    """A fake-score-style method: an extra network copied from the teacher, stepped every step; the student
    stepped every third step."""

    name = "ttur-test"
    domains = frozenset({"diffusion"})
    update_every = {"student": 3}

    def __init__(self, params: Params, cheat: bool = False) -> None:
        super().__init__(params)
        self.fake = None
        self.cheat = cheat

    def create_modules(self, ctx) -> None:
        self.fake = copy.deepcopy(ctx.teacher.net).requires_grad_(True)

    def extra_modules(self):
        return {"fake": self.fake}

    def training_step(self, batch, ctx):
        x0, cond = batch["x0"], batch["cond"]
        t = torch.rand(x0.shape[0])
        x_t = ctx.student.add_noise(x0, torch.randn_like(x0), t)
        losses = {"fake": self.fake(x_t, t * 1000, cond).pow(2).mean()}
        if ctx.updating("student") or self.cheat:
            losses["student"] = ctx.student.predict(x_t, t, cond).pow(2).mean()
        return losses


def _run(task, method, steps, **kw):
    cfg = task.training()
    from dataclasses import replace

    cfg = replace(cfg, steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_update_ratios_step_each_optimiser_on_its_own_schedule(task):
    model, result = _run(task, _TTUR(Params()), 7)
    assert result.updates == {"student": 3, "fake": 7}  # student at steps 0, 3, 6


def test_a_loss_for_an_optimiser_that_is_not_due_is_refused(task):
    with pytest.raises(TrainingError, match="update ratios"):
        _run(task, _TTUR(Params(), cheat=True), 3)


def test_resume_restores_extra_networks_built_from_the_teacher(task, tmp_path):
    full_model, full = _run(task, _TTUR(Params()), 6)
    ckpt = tmp_path / "state.pt"

    def stop_after_4(step, total, losses):  # killed before the step-4 checkpoint: resumes from step 2
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(task, _TTUR(Params()), 6, checkpoint_path=ckpt, checkpoint_every=2, on_step=stop_after_4)
    resumed = _TTUR(Params())
    model, result = _run(task, resumed, 6, checkpoint_path=ckpt, checkpoint_every=2)
    assert result.resumed_from_step == 2 and result.updates == full.updates
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


class _Pairs(Method):
    name = "pairs-test"
    domains = frozenset({"diffusion"})

    def training_step(self, batch, ctx):
        pairs = ctx.teacher_pairs(4)
        self.seen = pairs
        pred = ctx.student.denoise(pairs["noise"], torch.ones(4), pairs["cond"])
        return {"student": (pred - pairs["image"]).pow(2).mean()}


def test_teacher_pairs_are_built_once_and_are_the_teachers_samples(task):
    teacher = task.teacher()
    first, r1 = _run(task, _Pairs(Params()), 2)
    store = task.teacher_pairs(teacher)
    # built by the first cell: n pairs x the reference sampler's network evaluations
    assert r1.teacher_forward_passes == 24 * teacher.sampler.nfe
    assert r1.teacher_cache["built_by_this_cell"] and r1.teacher_cache["n"] == 24
    # a second cell of the matrix (a new task object, as in another process) reads them from disk
    from bench.tasks.coco_fid import CocoFID

    again = CocoFID(task.params, task.env)
    again._teachers = task._teachers
    method = _Pairs(Params())
    _, r2 = _run(again, method, 2)
    assert r2.teacher_forward_passes == 0 and not r2.teacher_cache["built_by_this_cell"]
    # the stored images are the teacher's reference sampler applied to the stored noise
    data, _ = store.load()
    with torch.no_grad():
        direct = teacher.sample(data["noise"][:3], data["cond"][:3])
    assert torch.allclose(direct, data["image"][:3], atol=1e-5)


def test_generator_flops_are_per_image_through_the_whole_sampler(task):
    from bench.measure.efficiency import forward_flops
    from bench.measure.flops import count_flops

    teacher = task.teacher()
    per_image = forward_flops(teacher, task).flops
    x = torch.randn(2, 3, task.image_size, task.image_size)
    one_call = count_flops(lambda: teacher.net(x, torch.full((2,), 500.0), torch.tensor([1, 2]))).flops // 2
    assert teacher.sampler.nfe == 2 * teacher.sampler.steps  # guided: conditional + null per step
    assert per_image == pytest.approx(one_call * teacher.sampler.nfe, rel=0.01)
