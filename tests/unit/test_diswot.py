"""DisWOT (Dong et al. 2023): the classifier gradient, the semantic and relation matrices, the combined score on
tiny matrices worked out by hand, the aging evolution, the search on the smoke family and the distillation loss,
against hand-worked values and plain-torch formulas."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.api import Outputs
from bench.methods.diswot import (
    DisWOT,
    arch_seed,
    capture_classifier,
    classifier_grad,
    diswot_score,
    family_space,
    gaussian_init,
    matrix_distance,
    mutate,
    regularized_evolution,
    relation_matrix,
    semantic_matrix,
)

R2 = 1.0 / math.sqrt(2.0)
LN2 = math.log(2.0)


def test_classifier_grad_by_hand_and_against_autograd():
    # z = [0, 0] -> p = [.5, .5]; y = 0 -> p - onehot = [-.5, .5]; g = (p - y)^T h with h = [1, 2].
    g = classifier_grad(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(g, torch.tensor([[-0.5, -1.0], [0.5, 1.0]]))
    # What fc.weight.grad holds after CE(fc(h), y).backward() (the official "Grad-CAM of fc layer").
    gen = torch.Generator().manual_seed(0)
    h, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    fc = nn.Linear(4, 3)
    F.cross_entropy(fc(h), y).backward()
    assert torch.allclose(classifier_grad(fc(h).detach(), y, h), fc.weight.grad, atol=1e-6)


def test_relation_distance_by_hand():
    # Teacher features orthonormal -> h h^T = I; student rows equal -> h h^T = [[2, 2], [2, 2]] -> rows [1, 1]/sqrt2.
    r_t = relation_matrix(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    r_s = relation_matrix(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert torch.allclose(r_t, torch.eye(2)) and torch.allclose(r_s, torch.full((2, 2), R2))
    # mean of (1 - 1/sqrt2)^2, (1/sqrt2)^2, (1/sqrt2)^2, (1 - 1/sqrt2)^2 = (4 - 2 sqrt2) / 4
    assert matrix_distance(r_t, r_s).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_semantic_matrix_by_hand():
    # g = [[-.5, -1], [.5, 1]]: g g^T = [[1.25, -1.25], [-1.25, 1.25]] -> rows [1, -1]/sqrt2 and [-1, 1]/sqrt2.
    a = semantic_matrix(torch.tensor([[-0.5, -1.0], [0.5, 1.0]]))
    assert torch.allclose(a, torch.tensor([[R2, -R2], [-R2, R2]]))


def test_diswot_score_by_hand():
    """B = 2, K = 3. Teacher: orthonormal features, logits 0, labels 0 -> every error row e_t = [-2/3, 1/3, 1/3],
    g_t = e_t (x) mean(h_t) (rank one), so the class correlation has rows +-e_t/|e_t|: row 0 = -e_t/|e_t| (e_t0 < 0),
    rows 1, 2 = +e_t/|e_t|. Student: features [1, 1] twice, logits [0, ln 2, 0] -> p = [.25, .5, .25],
    e_s = [-.75, .5, .25]; the same sign pattern. With u = e/|e|: the three row differences have squared norm
    |u_t - u_s|^2 = 2 - 2 u_t.u_s each, u_t.u_s = (2 * .75 + .5 + .25) / sqrt(6 * .875) = 2.25 / sqrt(5.25), so
    M_s = 3 (2 - 2 u_t.u_s) / 9. Relation: I against all-1/sqrt2, M_r = 1 - sqrt2 / 2."""
    labels = torch.tensor([0, 0])
    t_feats, t_logits = torch.eye(2), torch.zeros(2, 3)
    s_feats, s_logits = torch.ones(2, 2), torch.tensor([[0.0, LN2, 0.0]] * 2)
    out = diswot_score(t_logits, t_feats, s_logits, s_feats, labels)
    cos = 2.25 / math.sqrt(5.25)
    m_s = 3 * (2 - 2 * cos) / 9
    m_r = 1 - math.sqrt(2) / 2
    assert out["semantic"] == pytest.approx(m_s, rel=1e-6)  # 0.0120130
    assert out["relation"] == pytest.approx(m_r, rel=1e-6)  # 0.2928932
    assert out["score"] == pytest.approx(-(m_s + m_r), rel=1e-6)
    # Identical networks score 0, the maximum.
    same = diswot_score(t_logits, t_feats, t_logits, t_feats, labels)
    assert same["score"] == 0.0


def test_capture_finds_the_classifier_input():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(2, 4)
    with capture_classifier(model, 3) as seen:
        logits = model(x)
    assert torch.equal(seen["features"], model[1](model[0](x))) and seen["logits"] is logits
    assert not model[2]._forward_hooks, "the hook is removed afterwards"


def test_gaussian_init_is_the_official_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 64, 3), nn.BatchNorm2d(64), nn.Flatten(), nn.Linear(256, 256))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
        net[1].bias.fill_(2.0)
    gaussian_init(net)
    for layer in (net[0], net[3]):
        assert abs(layer.weight.std().item() - 1.0) < 0.05 and abs(layer.weight.mean().item()) < 0.05
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.all(net[1].weight == 1) and torch.all(net[1].bias == 0)


def test_family_spaces_name_the_tasks_architectures():
    cifar = family_space("cifar_resnet8", None)
    assert cifar.name((1, 1)) == "cifar_resnet8" and cifar.name((3, 2)) == "cifar_resnet20x2"
    assert len(cifar.genomes()) == 9 * 4
    vit = family_space("vit_smoke_32d4", None)
    assert vit.name((32, 4)) == "vit_smoke_32d4" and len(vit.genomes()) == 6 * 12
    listed = family_space("resnet18", ["resnet18", "resnet34"])
    assert [listed.name(g) for g in listed.genomes()] == ["resnet18", "resnet34"]
    assert [family_space("resnet18", None).name(g) for g in family_space("resnet18", None).genomes()] == ["resnet18"]


def test_mutation_changes_exactly_one_gene():
    genes = ((0, 1, 2), (0, 1), (7,))
    rng = random.Random(0)
    for _ in range(200):
        child = mutate((1, 0, 7), genes, rng)
        assert sum(a != b for a, b in zip(child, (1, 0, 7))) == 1 and child[2] == 7


def test_evolution_finds_the_best_feasible_genome():
    genes = ((0, 1, 2, 3), (0, 1, 2, 3))
    feasible = [g for g in itertools.product(*genes) if g != (2, 1)]  # the unconstrained optimum is excluded by the budget

    def score(g):
        return -((g[0] - 2) ** 2 + (g[1] - 1) ** 2)

    history = regularized_evolution(feasible, genes, score, population=4, sample_size=3, cycles=60,
                                    rng=random.Random(1))
    assert len(history) == 4 + 60
    assert all(g in feasible for g, _ in history), "no child outside the budget"
    best = max(history, key=lambda m: m[1])
    assert best[1] == -1  # a neighbour of (2, 1): the best that the budget allows
    assert regularized_evolution(feasible, genes, score, 4, 3, 0, random.Random(1))[4:] == []


def test_parent_is_the_best_of_the_sample():
    # Feasible: (0, 0), (4, 4) and (4, 3). (0, 0) has no feasible mutation (its child is itself), (4, 4)'s only one is
    # (4, 3): the child of a population {(0, 0), (4, 4)} shows which member was the parent.
    genes = (tuple(range(5)), tuple(range(5)))
    feasible = [(0, 0), (4, 4), (4, 3)]
    history = regularized_evolution(feasible, genes, lambda g: float(sum(g)), population=2, sample_size=50, cycles=1,
                                    rng=random.Random(4))
    (a, _), (b, _), (child, _) = history
    assert {a, b} == {(0, 0), (4, 4)}  # this seed's initial population
    # 50 draws hold both members (up to 2^-49); the best of them, (4, 4), is the parent.
    assert child == (4, 3)


# --------------------------------------------------------------------------------------------------
# The search on the smoke family (the imagenet task's tiny ViTs)
# --------------------------------------------------------------------------------------------------


class _SearchCtx:
    def __init__(self, task, batch):
        self.task, self.batch, self.seed, self.device = task, batch, 0, "cpu"

    def calibration_batches(self, n):
        return [self.batch]


def _plain_score(task, teacher, model, batch):
    """-(M_s + M_r) in plain torch: autograd for the fc gradient, explicit row normalisation."""
    def parts(m):
        fc = [x for x in m.modules() if isinstance(x, nn.Linear) and x.out_features == 10][-1]
        feats = {}

        def keep(mod, args, out):
            feats["h"] = args[0].detach()

        handle = fc.register_forward_hook(keep)
        m.zero_grad()
        logits = task.forward(m, batch).logits
        handle.remove()
        F.cross_entropy(logits, batch["labels"]).backward()
        g = fc.weight.grad.double()
        h = feats["h"].double().flatten(1)
        norm = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
        return norm(g @ g.T), norm(h @ h.T)

    a_t, r_t = parts(teacher)
    a_s, r_s = parts(model)
    return -float(((a_t - a_s) ** 2).mean() + ((r_t - r_s) ** 2).mean())


def test_search_picks_the_best_scoring_student_under_the_budget(tmp_path):
    import copy

    from bench.api import TaskEnv
    from bench.tasks.imagenet import ImageNet
    from bench.tasks.imagenet import models as imodels

    torch.set_num_threads(1)
    task = ImageNet(ImageNet.Params(), TaskEnv("smoke", "val", None, tmp_path))
    spec = lambda a: imodels.ModelSpec(a, a, input_size=16)  # noqa: E731
    teacher = imodels.build(spec("vit_smoke_64d4"), 10, seed=0).eval()
    student = task.student(0)
    budget = sum(p.numel() for p in student.parameters())
    batch = task.train_data().batch(list(range(32)))
    method = DisWOT(DisWOT.Params(cycles=200))
    chosen = method.init_student(teacher, student, _SearchCtx(task, batch))
    info = method.record_info()
    name = info["chosen_student"]
    assert sum(p.numel() for p in chosen.parameters()) <= budget
    reference = imodels.build(spec(name), 10, seed=0)
    assert {k: v.shape for k, v in chosen.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}

    # The scores of every candidate under the budget, recomputed independently (same random teacher and inits).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rand_teacher = gaussian_init(copy.deepcopy(teacher)).train()
    scores = {}
    for dim in (16, 32, 48, 64, 96, 128):
        for depth in range(1, 13):
            arch = f"vit_smoke_{dim}d{depth}"
            model = imodels.build(spec(arch), 10, seed=arch_seed(arch))
            if sum(p.numel() for p in model.parameters()) > budget:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(arch_seed(arch))
                gaussian_init(model)
            scores[arch] = _plain_score(task, rand_teacher, model.train(), batch)
    assert info["feasible"] == len(scores) and info["evaluated"] <= len(scores)
    assert name == max(scores, key=scores.get)
    assert info["score"]["score"] == pytest.approx(scores[name], rel=1e-6)


def test_a_budget_below_every_candidate_is_a_clear_error(tmp_path):
    from bench import BenchError
    from bench.api import TaskEnv
    from bench.tasks.imagenet import ImageNet

    task = ImageNet(ImageNet.Params(), TaskEnv("smoke", "val", None, tmp_path))
    method = DisWOT(DisWOT.Params(param_budget=0.01))
    ctx = _SearchCtx(task, task.train_data().batch(list(range(8))))
    with pytest.raises(BenchError, match="no candidate"):
        method.init_student(task.student(0), task.student(0), ctx)


def test_unsupported_outside_the_imagenet_models():
    class Other:
        def problem(self):
            return "classification"

    class Regression(Other):
        def problem(self):
            return "regression"

    assert "regression" in DisWOT(DisWOT.Params()).unsupported(Regression())
    assert "imagenet" in DisWOT(DisWOT.Params()).unsupported(Other())


# --------------------------------------------------------------------------------------------------
# Distillation loss
# --------------------------------------------------------------------------------------------------


class _Task:
    def forward(self, model, batch):
        return Outputs(logits=model(batch["x"]))


class _TrainCtx:
    def __init__(self, student, teacher):
        self.task, self.student, self.teacher = _Task(), student, teacher
        self.teacher_passes = 0

    def label_loss(self, out, batch):
        return F.cross_entropy(out.logits, batch["labels"])

    def run_teacher(self, fn, n):
        self.teacher_passes += 1
        with torch.no_grad():
            return fn(self.teacher)

    def teacher_outputs(self, batch):
        with torch.no_grad():
            return Outputs(logits=self.teacher(batch["x"]))


def test_training_loss_is_kd_plus_the_weighted_distances():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    teacher = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3))
    batch = {"x": torch.randn(5, 3), "labels": torch.tensor([0, 1, 2, 1, 0]), "index": torch.arange(5)}
    method = DisWOT(DisWOT.Params(temperature=2.0, alpha=0.7, relation_weight=10.0, semantic_weight=4.0))
    method.num_classes = 3
    ctx = _TrainCtx(student, teacher)
    loss = method.training_step(batch, ctx)["student"]

    z_s, z_t = student(batch["x"]), teacher(batch["x"]).detach()
    h_s, h_t = student[1](student[0](batch["x"])), teacher[1](teacher[0](batch["x"])).detach()
    ce = F.cross_entropy(z_s, batch["labels"])
    p_t = torch.softmax(z_t / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z_s / 2, -1))).sum(-1).mean()
    onehot = F.one_hot(batch["labels"], 3).float()
    g_s = (torch.softmax(z_s, -1) - onehot).T @ h_s / 5
    g_t = (torch.softmax(z_t, -1) - onehot).T @ h_t / 5
    rows = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
    m_s = ((rows(g_t @ g_t.T) - rows(g_s @ g_s.T)) ** 2).mean()
    m_r = ((rows(h_t @ h_t.T) - rows(h_s @ h_s.T)) ** 2).mean()
    expected = 0.3 * ce + 0.7 * 4 * kl + 10 * m_r + 4 * m_s
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ctx.teacher_passes == 1
    g1 = torch.autograd.grad(loss, student[0].weight)[0]
    g2 = torch.autograd.grad(expected, student[0].weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5), "the distances train the student's features too"
