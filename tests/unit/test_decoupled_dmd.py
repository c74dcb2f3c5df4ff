"""Decoupled DMD (methods/diffusion/decoupled_dmd.py): the DM and CA terms worked out by hand, their sum is
DMD's direction when both use the same noise and equal weights, the CA-only ablation, and the CA term's
re-noising times stay below the step the generator denoises from."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.api import TaskEnv
from bench.methods.diffusion.decoupled_dmd import DecoupledDMD, decoupled_directions, direction_loss
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(*pixels):
    return torch.tensor(pixels, dtype=torch.float32).reshape(1, 1, 1, len(pixels))


# One 2-pixel sample with CFG scale a = 3 (worked by hand):
#   x = (1, 2), D_fake,c = (0.5, 1), D_real,c = (0, 1.5), D_real,u = (1, 1)
#   D^a_real = D_u + 3 (D_c - D_u) = (-2, 2.5); DMD's direction D_fake - D^a = (2.5, -1.5)
#   normaliser mean|D_real,c - x| = (1 + 0.5) / 2 = 0.75
#   g_DM = (D_fake,c - D_real,c) / 0.75 = (0.5, -0.5) / 0.75 = (2/3, -2/3)
#   g_CA = -(3 - 1)(D_c - D_u) / 0.75 = -2 (-1, 0.5) / 0.75 = (8/3, -4/3)
X, D_FAKE, D_C, D_U, A = _img(1.0, 2.0), _img(0.5, 1.0), _img(0.0, 1.5), _img(1.0, 1.0), 3.0


def test_dm_and_ca_terms_by_hand():
    g_dm, g_ca = decoupled_directions(X, D_FAKE, D_C, D_C, D_U, A)
    assert torch.allclose(g_dm, _img(2 / 3, -2 / 3))
    assert torch.allclose(g_ca, _img(8 / 3, -4 / 3))


def test_terms_sum_to_the_dmd_direction_at_the_same_tau_and_equal_weights():
    g_dm, g_ca = decoupled_directions(X, D_FAKE, D_C, D_C, D_U, A)
    d_guided = D_U + A * (D_C - D_U)
    assert torch.allclose(d_guided, _img(-2.0, 2.5))
    assert torch.allclose(g_dm + g_ca, (D_FAKE - d_guided) / 0.75)  # = (10/3, -2)
    assert torch.allclose(g_dm + g_ca, _img(10 / 3, -2.0))
    # the generator's loss (w_DM = w_CA = 1): d/dx [L_DM + L_CA] = (g_DM + g_CA) / numel
    x = X.clone().requires_grad_(True)
    (direction_loss(x, g_dm) + direction_loss(x, g_ca)).backward()
    assert torch.allclose(x.grad, _img(10 / 3, -2.0) / 2)


def test_ca_only_ablation_has_no_dm_term():
    g_dm, g_ca = decoupled_directions(X, None, None, D_C, D_U, A)
    assert g_dm is None and torch.allclose(g_ca, _img(8 / 3, -4 / 3))
    # a = 1: no CFG, so the CA term vanishes
    assert torch.equal(decoupled_directions(X, None, None, D_C, D_U, 1.0)[1], torch.zeros_like(X))


def test_defaults_times_and_nfe_check():
    method = DecoupledDMD(DecoupledDMD.Params())
    assert method.times == (0.999, 0.749, 0.499, 0.249) and (method.dm_min, method.dm_max) == (0, 1000)
    from bench.tasks.coco_fid import CocoFID

    msg = DecoupledDMD.check_task(DecoupledDMD.Params(steps=2), "coco_fid", CocoFID.Params(nfe=[1, 4]))
    assert msg and "`steps`=2" in msg
    assert DecoupledDMD.check_task(DecoupledDMD.Params(), "coco_fid", CocoFID.Params(nfe=[1, 4])) is None


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("ddmd-cache")))


class _Ctx:
    """What ``_generator_loss`` uses of the step context: the teacher and a counted teacher call."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def run_teacher(self, fn, n_examples):
        self.calls.append(n_examples)
        with torch.no_grad():
            return fn(self.teacher)


def test_ca_renoising_stays_below_the_generators_step_and_dm_uses_the_full_range(task, monkeypatch):
    teacher = task.teacher()
    method = DecoupledDMD(DecoupledDMD.Params())
    method.fake = teacher
    method.w = 2.0
    seen = {}
    real_denoise = type(teacher).denoise

    def spy(self, x, t, cond, *a, **k):  # the batched teacher call: [x_ca (cond), x_ca (null), x_dm (cond)]
        seen.setdefault("t", t.clone())
        return real_denoise(self, x, t, cond, *a, **k)

    monkeypatch.setattr(type(teacher), "denoise", spy)
    b = 64
    x = torch.randn(b, 3, task.image_size, task.image_size)
    cond = torch.arange(b) % 10
    ctx = _Ctx(teacher)
    method._generator_loss(x, cond, 249, ctx)
    t = seen["t"]
    t_ca, t_ca_null, t_dm = t[:b], t[b:2 * b], t[2 * b:]
    assert torch.equal(t_ca, t_ca_null)  # D_c and D_u of the CA term at the same tau'
    assert t_ca.min() >= 0 and t_ca.max() <= 0.248 + 1e-6  # tau' in {0..248} / 1000, below the step 249
    assert t_dm.max() > 0.249  # the DM term's tau covers the full range {0..999} / 1000
    assert ctx.calls == [3 * b]  # one batched teacher call: 3B network evaluations


def test_ca_only_runs_one_2b_teacher_call_per_student_step(task):
    cfg = replace(task.training(), steps=1, batch_size=4)
    _, full = train(DecoupledDMD(DecoupledDMD.Params()), task, task.student(0), task.teacher(), cfg, seed=0)
    _, ca = train(DecoupledDMD(DecoupledDMD.Params(use_dm=False)), task, task.student(0), task.teacher(), cfg,
                  seed=0)
    assert full.teacher_examples == 12 and ca.teacher_examples == 8
    assert "loss_dm" in full.loss_log[0] and "loss_dm" not in ca.loss_log[0] and "loss_ca" in ca.loss_log[0]
    assert full.updates == ca.updates == {"student": 1, "fake": 1}
