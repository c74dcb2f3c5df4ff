"""PSO (methods/diffusion/pso.py): the offline pairwise margin loss, the transition log-ratio, the reward signs and
the clipped online loss on tiny tensors worked out by hand; which images are targets and which are references; and,
in the real training loop, the DMD2 -> PSO budget split, the frozen reference model (exactly the DMD2 student of
the first stage), exact resume inside the PSO stage, and the online variant on geneval."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench.api import TaskEnv
from bench.methods.diffusion.dmd2 import DMD2
from bench.methods.diffusion.pso import (PSO, offline_logits, online_pso_loss, pairwise_loss, per_sample_error,
                                         preference_signs, transition_log_ratio)
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(*values):
    """[B, 1, 1, 2] tensors: each inner pair is one 2-pixel image."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, 2)


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------------------------------
# Hand-worked losses
# --------------------------------------------------------------------------------------------------


def test_offline_margin_loss_by_hand():
    # one pair, laid out [target; reference]; every regression goal is 0, so e = mean(pred^2) over the 2 pixels
    goal = _img((0.0, 0.0), (0.0, 0.0))
    student = _img((1.0, 0.0), (0.0, 2.0)).requires_grad_(True)  # e_theta(x^w) = 1/2, e_theta(x^l) = 4/2 = 2
    ref = _img((1.0, 1.0), (0.0, 1.0))  # e_ref(x^w) = 2/2 = 1, e_ref(x^l) = 1/2
    err_theta, err_ref = per_sample_error(student, goal), per_sample_error(ref, goal)
    assert err_theta.tolist() == [0.5, 2.0] and err_ref.tolist() == [1.0, 0.5]
    # logit = [e_ref(w) - e_ref(l)] - [e_theta(w) - e_theta(l)] = (1 - 0.5) - (0.5 - 2) = 2
    logits = offline_logits(err_theta, err_ref)
    assert logits.tolist() == [2.0]
    # beta = 0.5: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    loss = pairwise_loss(logits, 0.5)
    assert loss.item() == pytest.approx(0.31326168751822286)
    # lambda = 0.1 (the code's neg_defactor): (1 - 0.05) - (0.5 - 0.2) = 0.65
    assert offline_logits(err_theta, err_ref, 0.1).item() == pytest.approx(0.65)
    # d loss / d logit = -beta (1 - sigmoid(beta logit)) = -0.5 (1 - sigmoid(1)) = -0.1344707; the logit falls with the
    # student's target error and rises with its reference error: the update lowers e_theta(x^w), raises e_theta(x^l)
    loss.backward()
    g = 0.5 * (1 - _sigmoid(1.0))
    # d e_theta / d pred = 2 pred / 2 = pred: target pixels (1, 0) get +g * (1, 0), reference pixels (0, 2) get -g * (0, 2)
    assert torch.allclose(student.grad, _img((g, 0.0), (0.0, -2 * g)))


def test_transition_log_ratio_by_hand():
    # x' = (1, 1), mu_theta = (0, 1), mu_ref = (1, 3), sigma = 0.5
    # (x' - mu_theta)^2 = (1, 0), (x' - mu_ref)^2 = (0, 4): mean difference -1.5 -> -(-1.5) / (2 * 0.25) = 3
    x, mt, mr = _img((1.0, 1.0)), _img((0.0, 1.0)), _img((1.0, 3.0))
    sigma = torch.tensor([0.5])
    lr = transition_log_ratio(x, mt, mr, sigma)
    assert lr.tolist() == [3.0]
    # the same from Gaussian log-densities averaged over elements (distilled_step_with_logprob's .mean)
    normal = torch.distributions.Normal
    direct = (normal(mt, 0.5).log_prob(x) - normal(mr, 0.5).log_prob(x)).mean()
    assert lr.item() == pytest.approx(direct.item())


def test_preference_signs_follow_the_rewards():
    # sample 0 wins, sample 1 wins, tie (the code's compare: (+1, -1), (-1, +1), (0, 0))
    signs = preference_signs(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, 1.0]))
    assert signs.tolist() == [[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]]


def test_online_loss_by_hand_with_ratio_clipping():
    signs = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])
    lr0 = torch.tensor([0.05, 0.3, 0.7], requires_grad=True)
    lr1 = torch.tensor([-0.5, -0.02, 0.1], requires_grad=True)
    # eps = 0.1 clips each log-ratio to [log 0.9, log 1.1] = [-0.1053605, 0.0953102]; beta = 10
    # pair 0: 10 (0.05 - log 0.9) = 1.5536052 -> log(1 + e^-1.5536052) = 0.1918462
    # pair 1: 10 (-log 1.1 - 0.02) = -1.1531018 -> log(1 + e^1.1531018) = 1.4274373
    # pair 2: a tie, logit 0 -> log 2
    loss = online_pso_loss(lr0, lr1, signs, beta=10.0, clip=0.1)
    assert loss.item() == pytest.approx((0.19184619003872616 + 1.4274373108620964 + math.log(2)) / 3)
    loss.backward()
    # gradients reach only unclipped ratios of non-tied pairs; raising the winner's ratio lowers the loss:
    # d/d lr0[0] = -(10 / 3) sigmoid(-1.5536052), d/d lr1[1] = -(10 / 3) sigmoid(1.1531018)
    assert lr0.grad[0].item() == pytest.approx(-10 / 3 * _sigmoid(-1.5536051565782627))
    assert lr1.grad[1].item() == pytest.approx(-10 / 3 * _sigmoid(1.1531017980432494))
    assert lr0.grad[1].item() == 0.0 and lr1.grad[0].item() == 0.0  # clipped
    assert lr0.grad[2].item() == 0.0 and lr1.grad[2].item() == 0.0  # tie
    # [B, K] log-ratios (K transitions per trajectory) average over transitions too
    two = online_pso_loss(torch.stack([lr0, lr0], 1).detach(), torch.stack([lr1, lr1], 1).detach(), signs, 10.0, 0.1)
    assert two.item() == pytest.approx(loss.item())


def test_defaults_and_checks():
    assert PSO(PSO.Params()).beta == 200.0  # offline: --beta_pso default
    assert PSO(PSO.Params(variant="online", steps=4)).beta == 50.0  # online: train.beta
    assert PSO(PSO.Params(steps=4)).times == (0.999, 0.749, 0.499, 0.249)
    from bench.tasks.coco_fid import CocoFID

    msg = PSO.check_task(PSO.Params(variant="online"), "coco_fid", CocoFID.Params(nfe=[1, 4]))
    assert msg and "multi-step student" in msg and "pso.steps" in msg
    msg = PSO.check_task(PSO.Params(steps=2), "coco_fid", CocoFID.Params(nfe=[1, 4]))
    assert msg and "pso samples at exactly its trained `steps`=2" in msg
    assert PSO.check_task(PSO.Params(steps=4, variant="online"), "coco_fid", CocoFID.Params(nfe=[1, 4])) is None
    assert [g.steps for g in PSO(PSO.Params()).generations(20)] == [16, 4]
    assert [g.steps for g in PSO(PSO.Params()).generations(1)] == [1]


# --------------------------------------------------------------------------------------------------
# Targets vs references
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    params = CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4])
    return CocoFID(params, TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("pso-cache")))


def _generator(task, seed, method):
    return method.init_student(task.teacher(), task.student(seed), None)


def test_targets_are_the_batch_images_and_references_the_students_samples(task):
    method = PSO(PSO.Params())
    student = _generator(task, 0, method)
    batch = task.train_data().batch([0, 1, 2])
    torch.manual_seed(5)
    target, reference, cond = method.offline_pair(batch, SimpleNamespace(student=student))
    assert torch.equal(target, batch["x0"]) and torch.equal(cond, batch["cond"])
    torch.manual_seed(5)
    with torch.no_grad():
        own = student.sample(torch.randn_like(batch["x0"]), batch["cond"])
    assert torch.equal(reference, own) and not reference.requires_grad
    # reference_source="initial": the frozen reference model samples them, not the current student
    initial = PSO(PSO.Params(reference_source="initial"))
    initial.ref = _generator(task, 1, initial)  # both start as the teacher (DMD2's init): make the reference differ
    with torch.no_grad():
        for prm in initial.ref.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    torch.manual_seed(5)
    _, reference_init, _ = initial.offline_pair(batch, SimpleNamespace(student=student))
    torch.manual_seed(5)
    with torch.no_grad():
        assert torch.equal(reference_init, initial.ref.sample(torch.randn_like(batch["x0"]), batch["cond"]))
    assert not torch.equal(reference_init, reference)
    # target="teacher": the teacher's pair images with their conditions
    pairs = {"image": torch.full_like(batch["x0"], 0.25), "cond": batch["cond"].flip(0)}
    teach = PSO(PSO.Params(target="teacher"))
    tgt, _, c = teach.offline_pair(batch, SimpleNamespace(student=student, teacher_pairs=lambda n: pairs))
    assert torch.equal(tgt, pairs["image"]) and torch.equal(c, pairs["cond"])


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------


def _run(task, method, steps, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_dmd2_stage_then_pso_against_the_frozen_dmd2_student(task):
    dmd2 = DMD2(DMD2.Params())
    distilled, _ = _run(task, dmd2, 6)
    method = PSO(PSO.Params(pso_fraction=0.25))
    model, result = _run(task, method, 8)  # stages of 6 and 2 steps
    assert [g["steps"] for g in result.generations] == [6, 2]
    # DMD2's TTUR in its stage (student at stage steps 0 and 5, fake every step), then the student alone every step
    assert result.updates == {"student": 2 + 2, "fake": 6}
    pso_log = [e for e in result.loss_log if e.get("generation") == 1]
    assert pso_log and all("fake" not in e and "loss_pso" in e for e in pso_log)
    # the reference model is exactly the DMD2 student of the first stage, frozen; the fake network rested
    assert all(not p.requires_grad for p in method.ref.parameters())
    for a, b in zip(distilled.state_dict().values(), method.ref.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(dmd2.fake.state_dict().values(), method.dmd2.fake.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(distilled.state_dict().values(), model.state_dict().values()))
    # evaluated as DMD2's one-step consistency generator; the teacher ran only on DMD2's generator turns
    assert model.sampler.kind == "consistency" and model.sampler.timesteps == (0.999,) and model.steps_options == (1,)
    assert result.teacher_forward_passes == 2


def test_resume_inside_the_pso_stage_is_exact(task, tmp_path):
    full_model, full = _run(task, PSO(PSO.Params(pso_fraction=0.25)), 8)
    ckpt = tmp_path / "state.pt"

    def stop_at_end(step, total, losses):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the checkpoint of step 7 is inside the PSO stage (steps 6, 7)
        _run(task, PSO(PSO.Params(pso_fraction=0.25)), 8, checkpoint_path=ckpt, checkpoint_every=7,
             on_step=stop_at_end)
    model, resumed = _run(task, PSO(PSO.Params(pso_fraction=0.25)), 8, checkpoint_path=ckpt, checkpoint_every=7)
    assert resumed.resumed_from_step == 7 and resumed.updates == full.updates
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_online_variant_on_geneval_with_a_two_step_student(tmp_path_factory):
    from bench.tasks.geneval import GenEval

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1, 2]),
                   TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("pso-geneval")))
    method = PSO(PSO.Params(steps=2, variant="online", pso_fraction=0.25))
    model, result = _run(task, method, 8)
    assert result.updates == {"student": 4, "fake": 6}
    pso_log = [e for e in result.loss_log if e.get("generation") == 1]
    assert pso_log and all("reward" in e and "loss_pso" in e for e in pso_log)
    # teacher calls: 2 DMD2 generator turns (4 images, guided: x2) + 2 rewards (2 x 4 trajectories, guided: x2)
    assert result.teacher_forward_passes == 4 and result.teacher_examples == 2 * 8 + 2 * 16
    assert model.sampler.timesteps == (0.999, 0.499) and model.steps_options == (2,)
