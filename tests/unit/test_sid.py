"""SiD (methods/diffusion/sid.py): the generator loss at alpha = 1 and 1.2 worked out by hand, its per-sample
normalisation, that at alpha = 1 its gradient is DMD's direction, the EDM fake-score loss, the EDM sigma <->
flow time mapping, few-step generation equal to the evaluation sampler, and an exact resume with the EMA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.api import TaskEnv
from bench.methods.diffusion.sid import SiD, edm_fake_loss, karras_sigma, sid_generator_loss, sigma_to_t
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(*values):
    """[B, 1, 1, 2] tensors: each inner pair is one 2-pixel image."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, 2)


# sample 1: x_g = (0, 1), y_real = (1, 1.5), y_fake = (0.5, 2); w = mean|x_g - y_real| = (1 + 0.5) / 2 = 0.75
#   d = y_real - y_fake = (0.5, -0.5), y_real - x_g = (1, 0.5)
#   alpha = 1.2: d * ((1, 0.5) - 1.2 d) = (0.5 * 0.4, -0.5 * 1.1) = (0.2, -0.55) -> sum / w = -0.35 / 0.75 = -7/15
#   alpha = 1:   d * (y_fake - x_g) = (0.5 * 0.5, -0.5 * 1) = (0.25, -0.5)   -> sum / w = -0.25 / 0.75 = -1/3
# sample 2: x_g = (0, 0), y_real = (2, 0), y_fake = (0, 0); w = 1, d = (2, 0)
#   alpha = 1.2: (2 * (2 - 2.4), 0) -> -0.8;  alpha = 1: d * (y_fake - x_g) = 0
X_G = _img((0.0, 1.0), (0.0, 0.0))
Y_REAL = _img((1.0, 1.5), (2.0, 0.0))
Y_FAKE = _img((0.5, 2.0), (0.0, 0.0))


def test_generator_loss_by_hand_alpha_1_2_and_1():
    # summed over pixels and samples, divided by the batch (2)
    assert sid_generator_loss(X_G, Y_REAL, Y_FAKE, 1.2).item() == pytest.approx((-7 / 15 - 0.8) / 2)
    assert sid_generator_loss(X_G, Y_REAL, Y_FAKE, 1.0).item() == pytest.approx((-1 / 3 + 0.0) / 2)


def test_normaliser_is_per_sample_and_clipped():
    # sample 1 alone: its own w = 0.75 (not the batch's), batch of 1
    assert sid_generator_loss(X_G[:1], Y_REAL[:1], Y_FAKE[:1], 1.2).item() == pytest.approx(-7 / 15)
    # x_g = y_real: w = 0 is clipped at 1e-5; (y_real - y_fake)(0 - alpha (y_real - y_fake)) / 1e-5
    x = _img((1.0, 1.0))
    assert sid_generator_loss(x, x.clone(), _img((0.0, 1.0)), 1.2).item() == pytest.approx(-1.2 / 1e-5)


def test_alpha_1_gradient_at_fixed_scores_is_the_dmd_direction():
    # with the scores held fixed, d/dx_g [(y_r - y_f)(y_f - x_g) / w] = (y_f - y_r) / w, and DMD2's
    # grad = (p_real - p_fake) / mean|p_real| with p = x - D is the same (y_f - y_r) / mean|x - y_r|
    x = X_G[:1].clone().requires_grad_(True)
    sid_generator_loss(x, Y_REAL[:1], Y_FAKE[:1], 1.0).backward()
    dmd = ((x.detach() - Y_REAL[:1]) - (x.detach() - Y_FAKE[:1])) / 0.75
    assert torch.allclose(x.grad, _img((-2 / 3, 2 / 3))) and torch.allclose(x.grad, dmd)
    # at fixed scores alpha only adds a constant: the gradient is the same at alpha = 1.2
    x12 = X_G[:1].clone().requires_grad_(True)
    sid_generator_loss(x12, Y_REAL[:1], Y_FAKE[:1], 1.2).backward()
    assert torch.allclose(x12.grad, x.grad)


def test_alpha_acts_through_the_scores_input_gradients():
    # one pixel, scores depending on x: y_real = 2x, y_fake = x, so w = sg|x - 2x| = |x| = 1 at x = 1 and
    # loss = x (x - alpha x) / w = (1 - alpha) x^2 / w -> d/dx = 2 (1 - alpha) x / w: 0 at alpha 1, -0.4 at 1.2
    for alpha, value, grad in ((1.0, 0.0, 0.0), (1.2, -0.2, -0.4)):
        x = torch.ones(1, 1, 1, 1, requires_grad=True)
        loss = sid_generator_loss(x, 2 * x, x, alpha)
        loss.backward()
        assert loss.item() == pytest.approx(value) and x.grad.item() == pytest.approx(grad)


def test_fake_score_loss_by_hand():
    # sample 1: sigma = 1, weight (1 + 0.25) / (1 * 0.5)^2 = 5, |D - x|^2 = 0.25 + 0.25 -> 2.5
    # sample 2: sigma = 0.5, weight (0.25 + 0.25) / (0.25)^2 = 8, |D - x|^2 = 1 -> 8; mean over the batch 5.25
    d, x = _img((1.0, 0.0), (0.0, 0.0)), _img((0.5, 0.5), (1.0, 0.0))
    assert edm_fake_loss(d, x, torch.tensor([1.0, 0.5])).item() == pytest.approx(5.25)


def test_edm_sigma_maps_onto_the_flow_time():
    from bench.diffusion import Schedule

    assert karras_sigma(torch.tensor(0.0)).item() == pytest.approx(0.002)
    assert karras_sigma(torch.tensor(1.0), tmax=1000).item() == pytest.approx(80.0)
    hi = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # u = 1 with tmax 800: about 24.4
    assert karras_sigma(torch.tensor(1.0)).item() == pytest.approx(hi) and 24 < hi < 25
    # x_sigma = x0 + sigma eps, scaled by 1 / (1 + sigma), is the flow's x_t at t = sigma / (1 + sigma)
    x0, eps, sigma = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([2.5, 0.3])
    x_t = Schedule("flow").add_noise(x0, eps, sigma_to_t(sigma))
    assert torch.allclose(x_t, (x0 + sigma.view(-1, 1, 1, 1) * eps) / (1 + sigma.view(-1, 1, 1, 1)), atol=1e-6)
    assert SiD(SiD.Params()).t_init == pytest.approx(2.5 / 3.5)
    assert SiD(SiD.Params(steps=4)).times == pytest.approx(tuple(2.5 / 3.5 * f for f in (1, 0.75, 0.5, 0.25)))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("sid-cache")))


def test_few_step_generation_is_the_evaluation_sampler(task):
    method = SiD(SiD.Params(steps=4))
    student = method.init_student(task.teacher(), task.student(0), None)
    z, cond = torch.randn(3, 3, task.image_size, task.image_size), torch.tensor([0, 1, 2])
    torch.manual_seed(5)
    with torch.no_grad():
        trained = method.generate(student, z, cond, 4, grad=False)
    torch.manual_seed(5)
    with torch.no_grad():
        sampled = student.sample(z, cond)  # consistency sampler at t_init (1 - i/4): the same fresh noises
    assert torch.allclose(trained, sampled, atol=1e-5)


def _run(task, method, steps, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_both_networks_step_every_step_and_resume_is_exact_with_the_ema(task, tmp_path):
    # a 10-image half-life without ramp-up: beta = 0.5^(4/10), so the EMA is far from G's last weights and a
    # resume that lost it would differ
    params = SiD.Params(ema_halflife_kimg=0.01, ema_rampup_ratio=None)
    full_model, full = _run(task, SiD(params), 4)
    assert full.updates == {"student": 4, "fake": 4}
    ckpt = tmp_path / "state.pt"

    def stop_after_3(step, total, losses):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(task, SiD(params), 4, checkpoint_path=ckpt, checkpoint_every=2, on_step=stop_after_3)
    model, resumed = _run(task, SiD(params), 4, checkpoint_path=ckpt, checkpoint_every=2)
    assert resumed.resumed_from_step == 2
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # the evaluated model is the EMA of G: restored from the method's state


def test_cfg_modes_and_gan_run(task):
    for params in (SiD.Params(cfg="zero"), SiD.Params(cfg="anti", steps=4), SiD.Params(gan_weight=0.01)):
        method = SiD(params)
        _, result = _run(task, method, 1)
        assert result.updates == {"student": 1, "fake": 1}
    assert method.kappa == {"train_fake": 2.0, "eval_fake": 2.0, "real": 2.0}  # lsg at the task's guidance 2
    assert "loss_D" in result.loss_log[0] and "loss_G_gan" in result.loss_log[0]
