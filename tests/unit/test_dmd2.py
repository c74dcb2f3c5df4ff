"""DMD2 (methods/diffusion/dmd2.py): the normalised DM gradient and its loss on tiny tensors worked out by hand,
the GAN's softplus losses, the generator's times, the nfe check, and TTUR in the real training loop (the
student gets a loss every 5th step, the fake network and GAN head every step)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bench.api import TaskEnv
from bench.methods.diffusion.dmd2 import DMD2, dm_gradient, dm_loss, gan_d_loss, gan_g_loss, gan_head
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(*values):
    """[B, 1, 1, 2] tensors: each inner pair is one 2-pixel image."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, 2)


def test_dm_gradient_and_loss_by_hand():
    # sample 1: x = (1, -2), D_real = (0.5, -1), D_fake = (0, -3)
    #   p_real = (0.5, -1), p_fake = (1, 1), mean|p_real| = 0.75 -> grad = (-0.5, -2) / 0.75 = (-2/3, -8/3)
    # sample 2: x = (0, 0), D_real = (1, -3), D_fake = (0, 0)
    #   p_real = (-1, 3), p_fake = (0, 0), mean|p_real| = 2 -> grad = (-0.5, 1.5)
    x = _img((1.0, -2.0), (0.0, 0.0)).requires_grad_(True)
    d_real = _img((0.5, -1.0), (1.0, -3.0))
    d_fake = _img((0.0, -3.0), (0.0, 0.0))
    grad = dm_gradient(x.detach(), d_real, d_fake)
    expected = _img((-2 / 3, -8 / 3), (-0.5, 1.5))
    assert torch.allclose(grad, expected)
    # loss = 0.5 * mean((x - sg(x - grad))^2) = 0.5 * mean(grad^2) over the 4 elements
    loss = dm_loss(x, grad)
    assert loss.item() == pytest.approx(0.5 * (4 / 9 + 64 / 9 + 0.25 + 2.25) / 4)
    # d loss / dx = grad / numel: the DM gradient itself, scaled by the code's mean reduction
    loss.backward()
    assert torch.allclose(x.grad, expected / 4)


def test_dm_gradient_is_zero_where_the_normaliser_is_zero():
    # x = D_real = D_fake: p_real = p_fake = 0, 0 / 0 -> NaN -> 0 (nan_to_num, as the code)
    x = _img((1.0, 1.0))
    assert torch.equal(dm_gradient(x, x.clone(), x.clone()), torch.zeros_like(x))


def test_gan_softplus_losses_by_hand():
    fake, real = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [-1.0]])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 - softplus by hand
    d = (sp(0.0) + sp(2.0)) / 2 + (sp(-1.0) + sp(1.0)) / 2  # softplus(D(fake)) + softplus(-D(real))
    g = (sp(-0.0) + sp(-2.0)) / 2  # softplus(-D(fake))
    assert gan_d_loss(fake, real).item() == pytest.approx(d)
    assert gan_g_loss(fake).item() == pytest.approx(g)
    assert d == pytest.approx(2.223300, abs=1e-6) and g == pytest.approx(0.410038, abs=1e-6)


def test_gan_head_maps_an_8x8_bottleneck_to_one_logit():
    head = gan_head(32, 8)
    assert head(torch.randn(3, 32, 8, 8)).shape == (3, 1, 1, 1)
    convs = [m for m in head if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(4, 4), (4, 4), (1, 1)]  # 8 -> 4 -> 1 -> logit
    assert [c.stride for c in convs] == [(2, 2), (4, 4), (1, 1)]


def test_generator_times_and_nfe_check():
    assert DMD2(DMD2.Params()).times == (0.999,)
    assert DMD2(DMD2.Params(steps=4)).times == (0.999, 0.749, 0.499, 0.249)  # SDXL's 999, 749, 499, 249
    from bench.tasks.coco_fid import CocoFID

    msg = DMD2.check_task(DMD2.Params(steps=2), "coco_fid", CocoFID.Params(nfe=[1, 4]))
    assert msg and "dmd2 samples at exactly its trained `steps`=2" in msg and "coco_fid.nfe" in msg
    assert DMD2.check_task(DMD2.Params(steps=4), "coco_fid", CocoFID.Params(nfe=[1, 4])) is None


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("dmd2-cache")))


def _run(task, method, steps):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0)


def test_ttur_student_every_fifth_step_fake_and_head_every_step(task):
    method = DMD2(DMD2.Params())
    model, result = _run(task, method, 6)
    assert result.updates == {"student": 2, "fake": 6}  # student at harness steps 0 and 5
    with_student = [e["step"] for e in result.loss_log if "student" in e]
    assert with_student == [1, 6] and all("fake" in e and "guidance_cls_loss" in e for e in result.loss_log)
    # the teacher runs only on generator turns: B examples x 2 (guided) per student step
    assert result.teacher_forward_passes == 2 and result.teacher_examples == 2 * 4 * 2
    assert set(method.fake) == {"score", "head"}  # one optimiser for the fake score and the GAN head
    assert model.sampler.kind == "consistency" and model.sampler.timesteps == (0.999,)
    assert model.steps_options == (1,)


def test_four_step_generator_trains_with_backward_simulation(task):
    model, result = _run(task, DMD2(DMD2.Params(steps=4)), 1)
    assert result.updates == {"student": 1, "fake": 1}
    assert model.sampler.timesteps == (0.999, 0.749, 0.499, 0.249) and model.steps_options == (4,)


def test_resume_restores_fake_score_and_gan_head(task, tmp_path):
    # the student's step-5 update goes through the fake network and the GAN head trained on steps 0..4
    full_model, full = _run(task, DMD2(DMD2.Params()), 6)
    ckpt = tmp_path / "state.pt"

    def stop_after_4(step, total, losses):
        if step == 4:
            raise KeyboardInterrupt

    cfg = replace(task.training(), steps=6, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        train(DMD2(DMD2.Params()), task, task.student(0), task.teacher(), cfg, seed=0, checkpoint_path=ckpt,
              checkpoint_every=2, on_step=stop_after_4)
    model, resumed = train(DMD2(DMD2.Params()), task, task.student(0), task.teacher(), cfg, seed=0,
                           checkpoint_path=ckpt, checkpoint_every=2)
    assert resumed.resumed_from_step == 2 and resumed.updates == full.updates
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
