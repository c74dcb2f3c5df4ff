"""EdgeFD (Mujtaba et al. 2025): the non-IID splits on a tiny label set (counts by hand), the KMeans
nearest-centroid filter on a hand-made 2-D pool (which points are kept, by hand), the aggregation of uploaded soft
labels and the distillation loss (plain torch), the communication accounting and the round schedule (by hand), and
one exchange + distillation step of the method on a fake task (plain torch).

Breaks tried, each seen to fail the test named (then restored):
* strong split dealing class c to client c // K instead of c mod K -> test_shard_splits_by_hand;
* weak window over clients k, k-1 instead of k, k+1 -> test_shard_splits_by_hand;
* iid split in fixed chunks of n // K (examples left over) instead of array_split -> test_iid_split_by_hand;
* dirichlet cuts with round() instead of floor -> test_dirichlet_cut_rule_by_hand;
* dirichlet without the min-size redraw -> test_dirichlet_split_properties;
* accept with d < t instead of d <= t -> test_kmeans_filter_on_a_2d_pool_by_hand;
* threshold from the fit points instead of the calibration points -> test_kmeans_filter_on_a_2d_pool_by_hand;
* holdout putting every point in both halves -> test_holdout_is_disjoint;
* aggregation dividing by K instead of by the uploading clients -> test_aggregation_is_the_mean_over_uploaders;
* distillation loss with log_softmax over the batch instead of the classes -> test_distill_loss_is_soft_cross_entropy;
* down bytes counted per upload instead of per client x batch -> test_round_traffic_by_hand;
* step_split giving the last partial round's remainder to distillation first -> test_schedule_and_split_by_hand;
* the exchange computing soft labels in train mode (dropout on) -> test_one_exchange_and_distill_step_in_plain_torch;
* the exchange uploading every client's prediction (mask ignored) -> test_one_exchange_and_distill_step_in_plain_torch;
* local batches drawn from the whole private split -> test_local_steps_use_only_the_clients_data;
* load_state_dict dropping the round's targets (re-exchange on resume) -> test_resume_keeps_the_rounds_targets and
  test_resume_through_the_harness_is_exact;
* uses_task_teacher = True -> test_budget_and_teacher_facts;
* the imagenet check requiring a submodule of bench.tasks.imagenet -> test_unsupported_is_none_on_the_imagenet_task.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import BenchError
from bench.api import OptimConfig, Outputs, TrainConfig
from bench.methods.edgefd import (
    EdgeFD,
    aggregate,
    carve_proxy,
    dirichlet_cuts,
    distill_loss,
    fit_selector,
    holdout,
    kmeans,
    partition,
    round_traffic,
    schedule_position,
    step_split,
)


def labels_of(labels, parts):
    return [sorted(labels[i] for i in p) for p in parts]


def assert_partition(parts, n):
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n)), "every position goes to exactly one client"


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def test_proxy_carve_sizes_and_disjoint():
    proxy, private = carve_proxy(20, 0.1, seed=3)
    assert len(proxy) == 2 and len(private) == 18  # round(0.1 x 20) = 2
    assert sorted(proxy + private) == list(range(20))


def test_shard_splits_by_hand():
    labels = [0] * 4 + [1] * 4 + [2] * 4  # C = 3 classes of 4
    # strong, K = C = 3: client k holds class k, all 4 of it.
    parts = partition(labels, 3, "strong", seed=0)
    assert_partition(parts, 12)
    assert labels_of(labels, parts) == [[0] * 4, [1] * 4, [2] * 4]
    # weak, window 2: client k holds classes k and k+1 mod 3; each class halved between its two holders.
    parts = partition(labels, 3, "weak", seed=0)
    assert_partition(parts, 12)
    assert labels_of(labels, parts) == [[0, 0, 1, 1], [1, 1, 2, 2], [0, 0, 2, 2]]
    # strong, K = 4 > C = 3: client k holds class k mod 3; class 0 is split between clients 0 and 3 (2 + 2).
    parts = partition(labels, 4, "strong", seed=0)
    assert [len(p) for p in parts] == [2, 4, 4, 2]
    assert labels_of(labels, parts) == [[0, 0], [1] * 4, [2] * 4, [0, 0]]
    # strong, K = 2 < C = 3: client 0 holds classes 0 and 2 (c mod 2 = 0), client 1 class 1.
    parts = partition(labels, 2, "strong", seed=0)
    assert labels_of(labels, parts) == [[0] * 4 + [2] * 4, [1] * 4]
    # Uneven class: 5 of class 0 between holders 0 and 2 -> 3 and 2 (the first holder takes the extra); class 1's
    # 2 between holders 1 and 3 -> 1 and 1.
    odd = [0] * 5 + [1] * 2
    parts = partition(odd, 4, "strong", seed=5)
    assert [len(p) for p in parts] == [3, 1, 2, 1]
    assert labels_of(odd, parts) == [[0, 0, 0], [1], [0, 0], [1]]


def test_iid_split_by_hand():
    labels = [i % 3 for i in range(13)]
    parts = partition(labels, 3, "iid", seed=1)
    assert_partition(parts, 13)
    assert [len(p) for p in parts] == [5, 4, 4]


def test_dirichlet_cut_rule_by_hand():
    # floor(cumsum(p) n): [5, 8] -> 5, 3, 2
    assert dirichlet_cuts(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    # cumsum 0.34, 0.67 -> 3.4, 6.7 -> floors 3, 6 -> 3, 3, 4 (round() would give 3, 4, 3)
    assert dirichlet_cuts(10, [0.34, 0.33, 0.33]) == [3, 3, 4]
    assert dirichlet_cuts(7, [0.0, 1.0, 0.0]) == [0, 7, 0]


def test_dirichlet_split_properties():
    labels = [c for c in range(4) for _ in range(40)]  # 4 classes x 40
    # alpha -> 0: each class lands (essentially) on one client.
    parts = partition(labels, 3, "dirichlet", seed=2, alpha=1e-3, min_size=1)
    assert_partition(parts, 160)
    for c in range(4):
        per_client = [sum(labels[i] == c for i in p) for p in parts]
        assert sorted(per_client) == [0, 0, 40]
    # alpha -> infinity: p ~ 1/4 each; floor(cumsum x 40) = 10, 20, 30 up to one -> 9..11 per client per class.
    parts = partition(labels, 4, "dirichlet", seed=2, alpha=1e6, min_size=1)
    for c in range(4):
        per_client = [sum(labels[i] == c for i in p) for p in parts]
        assert sum(per_client) == 40 and all(9 <= v <= 11 for v in per_client)
    # The min-size rule redraws: with alpha tiny and min_size 40 every client must hold a whole class (3 of 4
    # classes on distinct clients); impossible for min_size above 160 / 3.
    parts = partition(labels, 3, "dirichlet", seed=2, alpha=1e-3, min_size=40)
    assert min(len(p) for p in parts) >= 40
    with pytest.raises(BenchError, match="Dirichlet"):
        partition(labels, 3, "dirichlet", seed=2, alpha=1e-3, min_size=60, max_draws=20)


# --------------------------------------------------------------------------------------------------
# The KMeans filter
# --------------------------------------------------------------------------------------------------


def test_kmeans_filter_on_a_2d_pool_by_hand():
    """Client A: two blobs, centroids (0, 0) and (10, 0); calibration distances .5, 1, 1.5, 2, 3 -> the 0.75
    quantile (linear, position 4 x .75 = 3) is 2. Client B: one centroid (10, 0); calibration distances 1, 3 ->
    position 0.75 -> 1 + .75 x 2 = 2.5. Pool and distances (A; B): (0, 1.9): 1.9; 10.2 -> A keeps.
    (0, 2.1): 2.1; 10.2 -> nobody. (5, 0): 5; 5 -> nobody. (10, 2.4): 2.4; 2.4 -> B keeps.
    (12.6, 0): 2.6; 2.6 -> nobody. (-2, 0): 2 (= t, kept); 12 -> A keeps."""
    blob_a = [[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]
    blob_b = [[8.0, 0.0], [12.0, 0.0], [10.0, -2.0], [10.0, 2.0]]
    fit_a = torch.tensor(blob_a + blob_b)
    centres = kmeans(fit_a, 2, seed=0)
    assert sorted(map(tuple, centres.tolist())) == [(0.0, 0.0), (10.0, 0.0)]
    cal_a = torch.tensor([[0.0, 0.5], [11.0, 0.0], [0.0, -1.5], [10.0, 2.0], [3.0, 0.0]])
    sel_a = fit_selector(fit_a, cal_a, n_clusters=2, keep_quantile=0.75, seed=0)
    assert sel_a.threshold == pytest.approx(2.0)
    assert fit_selector(fit_a, cal_a, n_clusters=2, keep_quantile=0.5, seed=0).threshold == pytest.approx(1.5)
    sel_b = fit_selector(torch.tensor(blob_b), torch.tensor([[10.0, 1.0], [10.0, 3.0]]), n_clusters=1,
                         keep_quantile=0.75, seed=0)
    assert sel_b.centroids.tolist() == [[10.0, 0.0]]
    assert sel_b.threshold == pytest.approx(2.5)
    pool = torch.tensor([[0.0, 1.9], [0.0, 2.1], [5.0, 0.0], [10.0, 2.4], [12.6, 0.0], [-2.0, 0.0]])
    assert sel_a.accept(pool).tolist() == [True, False, False, False, False, True]
    assert sel_b.accept(pool).tolist() == [False, False, False, True, False, False]
    kept = torch.stack([sel_a.accept(pool), sel_b.accept(pool)]).any(0)
    assert kept.nonzero().flatten().tolist() == [0, 3, 5]


def test_holdout_is_disjoint():
    fit, cal = holdout(10, 0.5, seed=4)
    assert len(fit) == 5 and len(cal) == 5 and sorted(fit + cal) == list(range(10))
    assert holdout(4, 1.0, seed=4) == ([0, 1, 2, 3], [0, 1, 2, 3])


# --------------------------------------------------------------------------------------------------
# Aggregation, loss, traffic, schedule
# --------------------------------------------------------------------------------------------------


def test_aggregation_is_the_mean_over_uploaders():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4, 5, generator=g), -1)
    accept = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    targets, have = aggregate(probs, accept)
    assert have.tolist() == [True, True, True, False]
    assert torch.allclose(targets[0], probs[0, 0])
    assert torch.allclose(targets[1], (probs[0, 1] + probs[1, 1] + probs[2, 1]) / 3)
    assert torch.allclose(targets[2], (probs[1, 2] + probs[2, 2]) / 2)
    assert torch.equal(targets[3], torch.zeros(5))


def test_distill_loss_is_soft_cross_entropy():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, generator=g, requires_grad=True)
    q = torch.softmax(torch.randn(3, 4, generator=g), -1)
    expected = 0.0
    for b in range(3):
        lse = torch.logsumexp(z[b], 0)
        expected = expected - sum(q[b, c] * (z[b, c] - lse) for c in range(4)) / 3
    loss = distill_loss(z, q)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # its gradient w.r.t. the logits is (softmax(z) - q) / B
    (gz,) = torch.autograd.grad(loss, z)
    assert torch.allclose(gz, (torch.softmax(z, -1) - q).detach() / 3, atol=1e-6)


def test_round_traffic_by_hand():
    accept = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    t = round_traffic(accept, num_classes=10, bytes_per_value=4)
    assert t["uploads"] == [2, 3, 0]
    assert t["up_bytes"] == 5 * 10 * 4  # 200: five uploaded predictions of 10 float32
    assert t["down_bytes"] == 3 * 4 * 10 * 4  # 480: every client receives the 4 targets
    assert t["id_bytes"] == 3 * 4 * 4  # 48


def test_schedule_and_split_by_hand():
    phases = [schedule_position(s, 1, 2) for s in range(7)]
    assert [p[1] for p in phases] == ["local", "distill", "distill", "local", "distill", "distill", "local"]
    assert [p[0] for p in phases] == [0, 0, 0, 1, 1, 1, 2]
    assert [p[2] for p in phases] == [0, 0, 1, 0, 0, 1, 0]
    assert step_split(7, 1, 2) == {"local": 3, "distill": 4, "exchanges": 2}
    # S-FD's 1 : 10 over the smoke (100) and small (300) budgets: 100 = 9 x 11 + 1; 300 = 27 x 11 + 3.
    assert step_split(100, 1, 10) == {"local": 10, "distill": 90, "exchanges": 9}
    assert step_split(300, 1, 10) == {"local": 28, "distill": 272, "exchanges": 28}
    assert step_split(5, 3, 4) == {"local": 3, "distill": 2, "exchanges": 1}


# --------------------------------------------------------------------------------------------------
# The method on a fake task
# --------------------------------------------------------------------------------------------------


class _Split:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def batch(self, indices):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"pixels": self.x[idx], "labels": self.y[idx], "index": idx}


class _Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.drop = nn.Linear(12, 3), nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.drop(x.flatten(1)))


class _Task:
    num_classes = 3

    def __init__(self, n=60):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 2, 2, generator=g) * 0.3 + self.y.view(-1, 1, 1, 1).float()
        self.split = _Split(self.x, self.y)

    def problem(self):
        return "classification"

    def train_data(self):
        return self.split

    def training(self):
        return TrainConfig(steps=10, batch_size=4, eval_batch_size=8, optim=OptimConfig())

    def student(self, seed):
        return _Net(seed % 1000)

    def forward(self, model, batch):
        return Outputs(logits=model(batch["pixels"]))

    def label_loss(self, out, batch):
        return F.cross_entropy(out.logits, batch["labels"])


class _Ctx:
    def __init__(self, task, total_steps=6):
        self.task, self.seed, self.device, self.step = task, 0, "cpu", 0
        self.total_steps, self.batch_size = total_steps, 4
        self.student = task.student(1)


def _method(**kw):
    params = dict(n_clients=3, split="strong", proxy_fraction=0.25, n_clusters=2, feature_side=0, local_steps=1,
                  distill_steps=2, proxy_batch=6, temperature=2.0)
    params.update(kw)
    return EdgeFD(EdgeFD.Params(**params))


def _ready(method, ctx):
    method.init_student(None, ctx.student, ctx)
    method.create_modules(ctx)
    method.setup(ctx)
    for m in method._models(ctx):
        m.train()


def test_local_steps_use_only_the_clients_data():
    task = _Task()
    ctx = _Ctx(task)
    method = _method()
    _ready(method, ctx)
    assert sorted(method.extra_modules()) == ["client1", "client2"]
    for k in range(3):
        assert {int(task.y[i]) for i in method.local[k]} == {k}  # strong: client k holds class k
        b = method._local_batch(ctx, k)
        assert len(b["labels"]) == 4 and set(b["labels"].tolist()) == {k}
        assert set(b["index"].tolist()) <= set(method.local[k])
    assert not set(method.proxy) & {i for p in method.local for i in p}
    losses = method.training_step(None, ctx)  # step 0: local
    assert sorted(losses) == ["client1", "client2", "student"]
    assert method.comm["round"] == []


def test_one_exchange_and_distill_step_in_plain_torch():
    task = _Task()
    ctx = _Ctx(task)
    method = _method()
    _ready(method, ctx)
    # A hand-chosen filter over the 15 proxy samples: client 0 accepts 0-4, client 1 accepts 3-7, client 2 none.
    n_proxy = len(method.proxy)
    accept = torch.zeros(3, n_proxy, dtype=torch.bool)
    accept[0, 0:5] = True
    accept[1, 3:8] = True
    method.accept, method.pool = accept, list(range(8))
    ctx.step = 1  # round 0's first distillation step: the exchange happens here
    models = method._models(ctx)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    losses = method.training_step(None, ctx)
    ids = method.round_ids
    assert len(ids) == 6 and all(i in {method.proxy[c] for c in range(8)} for i in ids)
    cols = [method.proxy.index(i) for i in ids]
    x = task.x[torch.tensor(ids)]
    expected = []
    with torch.no_grad():
        for j, c in enumerate(cols):
            ups = [torch.softmax(F.linear(x[j].flatten(), b["fc.weight"], b["fc.bias"]) / 2.0, -1)
                   for k, b in enumerate(before) if accept[k, c]]
            expected.append(sum(ups) / len(ups))
    expected = torch.stack(expected)
    assert torch.allclose(method.targets, expected, atol=1e-6)
    assert all(m.training for m in models), "clients go back to training mode after the exchange"
    # Each client's loss: -sum q log softmax(z) over the whole exchanged batch (its dropout is on: recompute with
    # the same masks is not possible, so compare with dropout off).
    for m in models:
        m.eval()
    losses = method.training_step(None, ctx)
    for k, m in enumerate(models):
        z = F.linear(x.flatten(1), m.fc.weight, m.fc.bias)
        ref = -(expected * torch.log_softmax(z, -1)).sum(-1).mean()
        assert losses[method.key(k)].item() == pytest.approx(ref.item(), rel=1e-5)
    up = [int(accept[0, cols].sum()), int(accept[1, cols].sum()), 0]
    assert method.comm["uploads"] == [up], "one exchange per round: the second distillation step reuses it"
    assert method.comm["round"] == [0] and method.comm["up_bytes"] == [sum(up) * 3 * 4]
    assert method.comm["down_bytes"] == [3 * 6 * 3 * 4]
    info = method.record_info()
    assert info["communication"]["rounds"] == 1 and info["communication"]["clients"] == 3
    assert info["communication"]["logit_bytes_up"] == sum(up) * 12


def test_resume_keeps_the_rounds_targets():
    task = _Task()
    ctx = _Ctx(task)
    method = _method()
    _ready(method, ctx)
    ctx.step = 1
    method.training_step(None, ctx)
    state = method.state_dict()
    fresh = _method()
    fresh.create_modules(ctx)
    fresh.load_state_dict(state)
    fresh.setup(ctx)
    ctx.step = 2  # the round's second distillation step: no new exchange after the resume
    fresh.training_step(None, ctx)
    assert fresh.comm["round"] == [0]
    assert torch.equal(fresh.targets, method.targets) and fresh.round_ids == method.round_ids


def test_budget_and_teacher_facts():
    method = _method()
    assert EdgeFD.uses_task_teacher is False
    p = EdgeFD.Params()
    assert (p.n_clients, p.split, p.local_steps, p.distill_steps, p.proxy_batch, p.temperature) == \
        (10, "strong", 1, 10, 512, 1.0)
    assert math.isclose(p.keep_quantile, 0.75) and math.isclose(p.proxy_fraction, 0.1)
    assert method.unsupported(_Task()) is not None and "imagenet" in method.unsupported(_Task())

    class _Reg(_Task):
        def problem(self):
            return "regression"

    assert "regression" in method.unsupported(_Reg())


def test_unsupported_is_none_on_the_imagenet_task(tmp_path):
    from bench.api import TaskEnv
    from bench.tasks.imagenet import ImageNet

    task = ImageNet(ImageNet.Params(), TaskEnv("smoke", "val", None, tmp_path))
    assert EdgeFD(EdgeFD.Params()).unsupported(task) is None


def test_resume_through_the_harness_is_exact(tmp_path):
    """A cell stopped after a checkpoint taken mid-distillation (step 3 of round 0: local, exchange, 2 of 3
    distillation steps) and resumed ends with the weights of an uninterrupted run."""
    from dataclasses import replace

    from bench.api import TaskEnv
    from bench.tasks.imagenet import ImageNet
    from bench.train import train

    task = ImageNet(ImageNet.Params(smoke_train_size=128), TaskEnv("smoke", "val", None, tmp_path))
    cfg = replace(task.training(), steps=8)
    params = dict(n_clients=3, local_steps=1, distill_steps=3, proxy_batch=16, proxy_fraction=0.25)

    class Stop(Exception):
        pass

    def run(ckpt=None, stop=None):
        def on_step(s, n, losses):
            if s == stop:
                raise Stop

        method = EdgeFD(EdgeFD.Params(**params))
        try:
            model, _ = train(method, task, task.student(0), None, cfg, seed=0, checkpoint_path=ckpt,
                             checkpoint_every=3, on_step=on_step)
        except Stop:
            return None, method
        return model, method

    whole, m_whole = run()
    ckpt = tmp_path / "state.pt"
    run(ckpt, stop=5)
    assert ckpt.exists()
    resumed, m_resumed = run(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert m_whole.comm == m_resumed.comm and m_whole.comm["round"] == [0, 1]
