"""Distiller (He et al. 2021): the layer mapping, the MI-alpha bound (Poole et al.'s interpolated bound) on fixed
score matrices and on fixed teacher/student features against formulas written out here in plain Python/torch
(alpha = 1: InfoNCE over every leave-one-out sub-batch; alpha = 0: TUBA, and NWJ with log-baseline 1), the
critic's padding masking, and the full loss KD + MI-alpha + CE of a training step.

Breaks tried (each made the named tests fail, then was restored):
* mi_alpha_bound: alpha and 1 - alpha swapped in the interpolation -> test_bound_matches_the_formula[0.1, 0.9],
  test_mi_alpha_on_fixed_features[0.9], test_full_loss_composition; the alpha = 1 / alpha = 0 end cases swapped ->
  test_alpha_one_is_leave_one_out_infonce, test_alpha_zero_with_log_baseline_one_is_nwj, test_alpha_zero_is_tuba,
  test_bound_by_hand_two_examples; the leave-one-out mean replaced by the full row mean (no column held out) ->
  test_alpha_one_is_leave_one_out_infonce, test_bound_by_hand_two_examples, test_bound_matches_the_formula; the
  marginal term's diagonal kept (mean over all i, j) -> test_alpha_zero_with_log_baseline_one_is_nwj,
  test_alpha_zero_is_tuba, test_bound_matches_the_formula and the tests built on them.
* token_scores: normalised over channels (dim=-1) instead of tokens -> test_mi_alpha_on_fixed_features,
  test_full_loss_composition; the mask not applied before normalising -> the same and test_critic_ignores_padding.
* TokenEncoder: src_key_padding_mask dropped -> test_critic_ignores_padding.
* hidden_states_of through config.output_hidden_states (the first version) -> test_hidden_states_through_hooks_*,
  test_full_loss_composition (transformers leaves hooks behind that make the model unpicklable).
* layer_pairs: int(i * k) replaced by round((i + 1) * k) - 1 (TinyBERT-style, no embedding pair) ->
  test_layer_pairs_by_hand, test_full_loss_composition.
* training_step / kd_term: the temperature dropped from the KD term -> test_full_loss_composition; the hard-label
  term left out -> test_full_loss_composition; the MI term's sign flipped -> test_mi_alpha_on_fixed_features,
  test_full_loss_composition; kd_ce used on a regression subtask -> test_full_loss_composition[True].
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.api import Outputs
from bench.methods.distiller import (
    Distiller,
    MICritic,
    TokenEncoder,
    heads_for,
    hidden_states_of,
    layer_pairs,
    mi_alpha_bound,
    mi_alpha_loss,
)


# --------------------------------------------------------------------------------------------------
# Reference formulas, written out independently of the implementation
# --------------------------------------------------------------------------------------------------


def poole_bound(scores: list[list[float]], log_b: list[float], alpha: float) -> float:
    """I_alpha = 1 + mean_{i!=j}[s_ii - l_ij] - mean_{i!=j} exp(s_ij - l_ii), with
    l_ij = log(alpha * mean_{k!=j} exp(s_ik) + (1 - alpha) * exp(log_b_i)); plain Python loops."""
    n = len(scores)

    def loo_mean(i: int, j: int) -> float:
        return sum(math.exp(scores[i][k]) for k in range(n) if k != j) / (n - 1)

    def interp(i: int, j: int) -> float:
        return math.log(alpha * loo_mean(i, j) + (1 - alpha) * math.exp(log_b[i]))

    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    joint = sum(scores[i][i] - interp(i, j) for i, j in off) / len(off)
    marg = sum(math.exp(scores[i][j] - interp(i, i)) for i, j in off) / len(off)
    return 1.0 + joint - marg


def infonce(s: torch.Tensor) -> torch.Tensor:
    """van den Oord et al.: mean_i [s_ii - log((1/K) sum_k exp(s_ik))]."""
    k = s.shape[0]
    return (s.diagonal() - torch.logsumexp(s, dim=1)).mean() + math.log(k)


def hand_scores(z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each channel of each example divided by its norm over the unmasked tokens, then sum over tokens and channels
    of the products: loops over examples, written out."""
    b = z_s.shape[0]

    def unit(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        z = z * m[:, None]
        return z / z.pow(2).sum(0, keepdim=True).sqrt()

    out = torch.zeros(b, b)
    for i in range(b):
        for j in range(b):
            out[i, j] = (unit(z_s[i], mask[i].float()) * unit(z_t[j], mask[j].float())).sum()
    return out


class Identity(nn.Module):
    def forward(self, h, mask):
        return h


class FirstChannel(nn.Module):
    def forward(self, h, mask):
        return h[..., :1]


def stub_critic() -> nn.Module:
    return MICritic(Identity(), Identity(), FirstChannel())


# --------------------------------------------------------------------------------------------------
# Layer mapping and the bound on fixed score matrices
# --------------------------------------------------------------------------------------------------


def test_layer_pairs_by_hand():
    # cal_layer_mapping 'skip': (int(i * N_T / N_S), i) for i = 0..N_S, the embeddings (0) included.
    assert layer_pairs(4, 2) == [(0, 0), (2, 1), (4, 2)]
    assert layer_pairs(6, 3) == [(0, 0), (2, 1), (4, 2), (6, 3)]
    assert layer_pairs(12, 4) == [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)]
    assert layer_pairs(12, 5) == [(0, 0), (2, 1), (4, 2), (7, 3), (9, 4), (12, 5)]  # 12/5 = 2.4
    assert layer_pairs(6, 3, "last") == [(3, 0), (4, 1), (5, 2), (6, 3)]
    with pytest.raises(ValueError):
        layer_pairs(6, 3, "emd")


def test_bound_by_hand_two_examples():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # alpha = 0, log-baselines 0: 1 + ((1 - 0) + (2 - 0)) / 2 - (e^0 + e^0) / 2 = 1.5
    assert mi_alpha_bound(s, torch.zeros(2), 0.0).item() == pytest.approx(1.5, abs=1e-6)
    # alpha = 1, B = 2: the held-out mean of row i at column j != i is exp(s_ii), so the joint term is 0; at
    # column i it is exp(s_ij), so every marginal ratio is 1: I = 1 + 0 - 1 = 0.
    assert mi_alpha_bound(s, torch.zeros(2), 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_one_is_leave_one_out_infonce():
    """alpha = 1: the mean over the B ways to drop one example of InfoNCE on the other B - 1, whatever the baseline."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 5, generator=g) * 2
    loo = [infonce(s[[k for k in range(5) if k != j]][:, [k for k in range(5) if k != j]]) for j in range(5)]
    expected = torch.stack(loo).mean()
    for baseline in (torch.zeros(5), torch.randn(5, generator=g) * 3):
        assert mi_alpha_bound(s, baseline, 1.0).item() == pytest.approx(expected.item(), abs=1e-5)


def test_alpha_zero_with_log_baseline_one_is_nwj():
    """NWJ (Nguyen et al.): E_joint[f] - e^-1 E_marginal[e^f]; the positives are the diagonal."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 4, generator=g)
    off = ~torch.eye(4, dtype=torch.bool)
    nwj = s.diagonal().mean() - math.exp(-1) * s[off].exp().mean()
    assert mi_alpha_bound(s, torch.ones(4), 0.0).item() == pytest.approx(nwj.item(), abs=1e-6)


def test_alpha_zero_is_tuba():
    """TUBA with log-baseline b_i for row i: 1 + mean_i (s_ii - b_i) - mean_{i!=j} exp(s_ij - b_i)."""
    g = torch.Generator().manual_seed(2)
    s, b = torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    off = ~torch.eye(4, dtype=torch.bool)
    tuba = 1 + (s.diagonal() - b).mean() - (s - b[:, None])[off].exp().mean()
    assert mi_alpha_bound(s, b, 0.0).item() == pytest.approx(tuba.item(), abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_bound_matches_the_formula(alpha):
    g = torch.Generator().manual_seed(3)
    s, b = torch.randn(4, 4, generator=g) * 1.5, torch.randn(4, generator=g)
    expected = poole_bound(s.tolist(), b.tolist(), alpha)
    assert mi_alpha_bound(s, b, alpha).item() == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# MI-alpha on fixed teacher/student features
# --------------------------------------------------------------------------------------------------


def fixed_features():
    # B = 3 examples, L = 3 tokens, 2 channels; example 2 has one pad token (mask 0), whose values must not matter.
    h_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                        [[2.0, 1.0], [0.0, -1.0], [1.0, 0.0]],
                        [[0.5, 0.5], [1.0, -1.0], [9.0, 9.0]]])
    h_t = torch.tensor([[[1.0, 0.5], [0.0, 1.0], [1.0, 2.0]],
                        [[1.0, 1.0], [1.0, -1.0], [0.0, 1.0]],
                        [[0.0, 1.0], [2.0, -1.0], [-7.0, 5.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    return h_s, h_t, mask


@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0])
def test_mi_alpha_on_fixed_features(alpha):
    h_s, h_t, mask = fixed_features()
    scores = hand_scores(h_s, h_t, mask)
    # Entry (0, 0) by hand: student 0's channels are (1, 0, 1)/sqrt2 and (0, 1, 1)/sqrt2 over the tokens, teacher 0's
    # (1, 0, 1)/sqrt2 and (.5, 1, 2)/sqrt5.25: 2/2 + 3/(sqrt2 sqrt5.25).
    assert scores[0, 0].item() == pytest.approx(1 + 3 / math.sqrt(2 * 5.25), rel=1e-6)
    # The baseline stub's log a_i: the mean of the teacher's first channel over the unmasked tokens.
    log_b = [2 / 3, 2 / 3, 1.0]
    expected = -poole_bound(scores.tolist(), log_b, alpha)
    got = mi_alpha_loss(h_s, h_t, mask, stub_critic(), alpha)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # The pad token's features change nothing.
    h_s2, h_t2 = h_s.clone(), h_t.clone()
    h_s2[2, 2], h_t2[2, 2] = torch.tensor([-3.0, 4.0]), torch.tensor([100.0, -2.0])
    assert mi_alpha_loss(h_s2, h_t2, mask, stub_critic(), alpha).item() == pytest.approx(got.item(), abs=1e-6)


def test_critic_ignores_padding():
    """The Transformer critic (eval mode: no dropout): pad tokens' contents and extra padding leave scores and
    baselines unchanged; shapes are [B, B] and [B]."""
    torch.manual_seed(0)
    critic = MICritic(TokenEncoder(8, 4, nhead=2, hidden=16), TokenEncoder(12, 4, nhead=2, hidden=16),
                      TokenEncoder(12, 1, nhead=2, hidden=16)).eval()
    g = torch.Generator().manual_seed(4)
    h_s, h_t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    with torch.no_grad():
        scores, log_b = critic(h_s, h_t, mask)
        noisy_s, noisy_t = h_s.clone(), h_t.clone()
        noisy_s[mask == 0] = torch.randn(int((mask == 0).sum()), 8, generator=g) * 10
        noisy_t[mask == 0] = torch.randn(int((mask == 0).sum()), 12, generator=g) * 10
        scores2, log_b2 = critic(noisy_s, noisy_t, mask)
        pad = lambda x, d: torch.cat([x, torch.randn(3, 2, d, generator=g)], dim=1)  # noqa: E731
        mask3 = torch.cat([mask, torch.zeros(3, 2, dtype=mask.dtype)], dim=1)
        scores3, log_b3 = critic(pad(h_s, 8), pad(h_t, 12), mask3)
    assert scores.shape == (3, 3) and log_b.shape == (3,)
    for s, b in ((scores2, log_b2), (scores3, log_b3)):
        assert torch.allclose(s, scores, atol=1e-5) and torch.allclose(b, log_b, atol=1e-5)
    # Every channel has unit norm over the tokens: a score is at most the number of channels (4).
    assert scores.abs().max().item() <= 4 + 1e-5


def test_heads_and_pickling():
    assert heads_for(384, 8) == 8 and heads_for(312, 8) == 8 and heads_for(60, 8) == 6 and heads_for(7, 8) == 7
    critic = MICritic(TokenEncoder(8, 4, nhead=2, hidden=16), TokenEncoder(8, 4, nhead=2, hidden=16),
                      TokenEncoder(8, 1, nhead=2, hidden=16))
    back = pickle.loads(pickle.dumps(critic))
    assert type(back) is MICritic and type(back.student) is TokenEncoder


# --------------------------------------------------------------------------------------------------
# The full loss of a training step
# --------------------------------------------------------------------------------------------------


def tiny_bert(layers: int, num_labels: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=num_labels,
                     initializer_range=0.5)  # logits of order 1 (not ~0.1): the temperature and the KD form show
    cfg._attn_implementation = "eager"
    model = BertForSequenceClassification(cfg).eval()  # eval: no dropout, so every forward is the same
    return model


class FakeTask:
    name = "glue"
    domain = "classification"

    def __init__(self, regression: bool) -> None:
        self.regression = regression

    def forward(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        return Outputs(logits=out.logits)

    def label_loss(self, outputs, batch):
        if self.regression:
            return F.mse_loss(outputs.logits.squeeze(-1), batch["labels"])
        return F.cross_entropy(outputs.logits, batch["labels"])


class FakeCtx:
    def __init__(self, task, student, teacher) -> None:
        self.task, self.student, self.teacher, self.teachers = task, student, teacher, [teacher]
        self.seed, self.passes = 0, 0

    def problem(self):
        return "regression" if self.task.regression else "classification"

    def student_outputs(self, batch):
        return self.task.forward(self.student, batch)

    def label_loss(self, outputs, batch):
        return self.task.label_loss(outputs, batch)

    def run_teacher(self, fn, n_examples, index=0):
        self.passes += 1
        with torch.no_grad():
            return fn(self.teacher)


def tiny_batch(regression: bool):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 40, (4, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 4 + [0] * 2, [1] * 6])
    labels = torch.tensor([0.5, 3.0, 1.0, 4.5]) if regression else torch.tensor([0, 1, 1, 0])
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels, "index": torch.arange(4)}


def expected_loss(student, teacher, batch, p, regression: bool) -> float:
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        so = student(**kw, output_hidden_states=True)
        to = teacher(**kw, output_hidden_states=True)
    t = p.temperature
    if regression:
        kd = ((so.logits / t - to.logits / t) ** 2).mean()
        label = ((so.logits.squeeze(-1) - batch["labels"]) ** 2).mean()
    else:
        kd = -(torch.softmax(to.logits / t, -1) * torch.log_softmax(so.logits / t, -1)).sum(-1).mean()
        label = F.cross_entropy(so.logits, batch["labels"])
    mask = batch["attention_mask"]
    mi = 0.0
    for ti, si in [(0, 0), (2, 1), (4, 2)]:  # skip mapping, teacher 4 layers -> student 2 (embeddings included)
        hs, ht = so.hidden_states[si], to.hidden_states[ti]
        scores = hand_scores(hs, ht, mask)
        log_b = [(ht[b, :, 0] * mask[b]).sum().item() / mask[b].sum().item() for b in range(hs.shape[0])]
        mi += -poole_bound(scores.tolist(), log_b, p.alpha)
    return p.kd_weight * kd.item() + p.inter_weight * mi + p.hard_label_weight * label.item()


@pytest.mark.parametrize("regression", [False, True])
def test_full_loss_composition(regression):
    """kd_weight * KD(T) + inter_weight * sum over the skip pairs of -I_alpha + hard_label_weight * label loss,
    with the critic replaced by the fixed stub so that every term is worked out above; one teacher pass."""
    labels = 1 if regression else 2
    student, teacher = tiny_bert(2, labels, seed=1), tiny_bert(4, labels, seed=2)
    ctx = FakeCtx(FakeTask(regression), student, teacher)
    method = Distiller(Distiller.Params(alpha=0.7, temperature=2.0, kd_weight=0.8, inter_weight=0.5,
                                        hard_label_weight=0.3))
    method.create_modules(ctx)
    assert method.pairs == [(0, 0), (2, 1), (4, 2)] and set(method.extra_modules()) == {"critic"}
    assert method.info["kd_loss"] == ("mse" if regression else "ce")
    method.critic = stub_critic()
    batch = tiny_batch(regression)
    losses = method.training_step(batch, ctx)
    pickle.dumps(student)  # no hook left behind: the harness can still checkpoint the student
    expected = expected_loss(student, teacher, batch, method.params, regression)
    assert losses["student"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["critic"] is losses["student"] and ctx.passes == 1


def test_default_params_follow_the_official_scripts():
    p = Distiller.Params()
    assert (p.alpha, p.temperature, p.kd_weight, p.inter_weight, p.hard_label_weight) == (0.9, 1.0, 1.0, 1.0, 0.0)
    assert (p.layer_mapping, p.critic_dim, p.critic_hidden, p.critic_layers, p.critic_heads) == ("skip", 16, 512, 2, 8)


def test_hidden_states_through_hooks_and_unsupported_elsewhere():
    """The hooks catch what output_hidden_states returns, leave no hook behind, and the model still pickles (the
    harness checkpoints the student by pickling it)."""
    model, reference = tiny_bert(2, 2, seed=0), tiny_bert(2, 2, seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with hidden_states_of(model) as seen:
        model(input_ids=ids)
    with torch.no_grad():
        want = reference(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(seen["hidden_states"]) == len(want) == 3
    assert all(torch.allclose(a, b) for a, b in zip(seen["hidden_states"], want))
    assert not any(m._forward_hooks for m in model.modules())
    pickle.dumps(model)
    method = Distiller(Distiller.Params())
    other = type("ImageTask", (), {"__module__": "bench.tasks.imagenet", "name": "imagenet"})()
    glue = type("Glue", (), {"__module__": "bench.tasks.glue", "name": "glue"})()
    assert "not GLUE" in method.unsupported(other) and method.unsupported(glue) is None
