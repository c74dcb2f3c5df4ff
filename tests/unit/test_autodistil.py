"""AutoDistil (Xu et al. 2022): the self-attention relation loss on tiny tensors worked out by hand, the sub-space
partition against the official configurations' values, weight sharing (a student's weights are slices of its
SuperLM's, and the sub-network the SuperLM runs is the student it extracts), the costs, the search's choice on a
hand-made candidate list, the sandwich and the step split.

Breaks tried (each made the named test fail, then was undone):
* relation loss: padded positions counted (``pairs`` mask dropped) -> test_relation_loss_mse_by_hand;
  no 1/sqrt(d_r) -> test_relation_heads_split_and_scaled; KL direction swapped (student || teacher) ->
  test_relation_loss_kl_by_hand;
* partition: Python's round() (halves to even) instead of halves up -> test_partition_rounds_halves_up;
  hidden fractions of /12 instead of /24 -> test_partition_matches_the_official_subspaces;
* kept layers: the first L layers instead of floor(i L_t / L) -> test_kept_layers_by_hand and
  test_student_weights_are_slices_of_the_superlm; slices taken from the end (``-s:``) -> the latter;
* costs: Q/K/V width taken as the hidden size (as cal_para_bert approximates) -> test_param_count_matches_the_model;
  attention score term dropped -> test_flops_by_hand;
* search: budget ignored -> test_search_picks_the_best_candidate_within_budget; ties broken by the larger cost ->
  the same test;
* schedule: the fine-tuning generation without a fresh student (so no search and extraction at the boundary) ->
  test_generations_split_the_budget;
* sandwich: the smallest left out, or the draw not depending on the seed ->
  test_sandwich_has_largest_smallest_and_is_fixed;
* relation teacher: ``fork_rng`` removed around the task's build, or ``auto`` taking the pretrained teacher at the
  smoke tier -> test_relation_teacher_is_pretrained_where_the_task_has_one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.methods import _autodistil_supernet as S
from bench.methods.autodistil import AutoDistil

# --------------------------------------------------------------------------------------------------
# The relation loss
# --------------------------------------------------------------------------------------------------


def col(*v: float) -> torch.Tensor:
    """A (1, T, 1) tensor: one sequence, one feature per token."""
    return torch.tensor(v, dtype=torch.float32).reshape(1, -1, 1)


MASK = torch.tensor([[1, 1, 0]])  # the third token is padding


def test_relation_loss_mse_by_hand():
    """One relation head of width 1, so relation_ij = x_i x_j. Real tokens 0, 1 only.
    Q: student [1, 2] -> [[1, 2], [2, 4]]; teacher [1, 1] -> all ones; squared differences 0, 1, 1, 9 -> 11/4.
    K: identical -> 0. V: student [0, 0] -> zeros; teacher [1, 1] -> ones; -> 1. Total 2.75 + 0 + 1 = 3.75.
    The padded token (9 / 5 / 7 against 5 / 5 / 3) must not count."""
    s = [col(1, 2, 9), col(3, -1, 5), col(0, 0, 7)]
    t = [col(1, 1, 5), col(3, -1, 5), col(1, 1, 3)]
    assert S.relation_loss(s, t, MASK, n_heads=1, kind="mse").item() == pytest.approx(3.75)
    # Every token real: the official loss_mse (the mean over every entry) of each relation, summed.
    full = torch.ones(1, 3, dtype=torch.long)
    expected = sum(F.mse_loss(a @ a.transpose(1, 2), b @ b.transpose(1, 2)) for a, b in zip(s, t))
    assert S.relation_loss(s, t, full, n_heads=1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_relation_loss_kl_by_hand():
    """KL(teacher || student) per real query over the real keys, averaged over real queries.
    Q: student rows [1, 2] and [2, 4] -> softmax [1, e]/(1+e) and [1, e^2]/(1+e^2); teacher rows [1, 1] -> [.5, .5].
    KL(.5,.5 || 1-q, q) = ln .5 - .5 ln(q (1 - q)). K identical -> 0; V student zeros -> uniform = teacher -> 0."""
    s = [col(1, 2, 9), col(3, -1, 5), col(0, 0, 7)]
    t = [col(1, 1, 5), col(3, -1, 5), col(1, 1, 3)]

    def kl_half(q: float) -> float:
        return math.log(0.5) - 0.5 * math.log(q * (1 - q))

    q0, q1 = math.e / (1 + math.e), math.e ** 2 / (1 + math.e ** 2)
    expected = (kl_half(q0) + kl_half(q1)) / 2
    assert S.relation_loss(s, t, MASK, n_heads=1, kind="kl").item() == pytest.approx(expected, rel=1e-5)


def test_relation_heads_split_and_scaled():
    """Width 5 into 2 relation heads: d_r = 2, the fifth column dropped; relation = X_r X_r^T / sqrt(2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g)
    rel = S.relations(x, 2)
    assert rel.shape == (2, 2, 3, 3)
    for b in range(2):
        for h in range(2):
            xr = x[b, :, 2 * h: 2 * h + 2]
            for i in range(3):
                for j in range(3):
                    want = float((xr[i] * xr[j]).sum()) / math.sqrt(2)
                    assert rel[b, h, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # The teacher side with 4 columns and 2 heads (d_r = 2) is comparable: the loss is over equal shapes.
    t = torch.randn(2, 3, 4, generator=g)
    mask = torch.ones(2, 3, dtype=torch.long)
    def plain(z: torch.Tensor) -> torch.Tensor:  # (2, 3, 4) -> 2 heads of 2 columns: (2, 2, 3, 3)
        zr = z[..., :4].reshape(2, 3, 2, 2).transpose(1, 2)
        return zr @ zr.transpose(-1, -2) / math.sqrt(2)

    want = 3 * ((plain(x) - plain(t)) ** 2).mean()
    assert S.relation_loss([x] * 3, [t] * 3, mask, n_heads=2).item() == pytest.approx(want.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# The partition
# --------------------------------------------------------------------------------------------------


def test_partition_matches_the_official_subspaces():
    """BERT-base (12 layers, 12 heads, 768 hidden, 3072 FFN): the *_256Subs.yaml comments' ranges exactly."""
    base, small, tiny = S.partition(12, 12, 768, 3072)
    assert (base.name, base.layers, base.heads, base.hidden, base.ratios) == (
        "base", (9, 10, 11, 12), (9, 10, 11, 12), (544, 576, 608, 640), (2.5, 3.0, 3.5, 4.0))
    assert (small.layers, small.heads, small.hidden, small.ratios) == (
        (9, 10, 11, 12), (7, 8, 9, 10), (256, 288, 320, 352), (2.5, 3.0, 3.5, 4.0))
    assert (tiny.layers, tiny.heads, tiny.hidden, tiny.ratios) == (
        (4, 5, 6, 7), (7, 8, 9, 10), (128, 160, 192, 224), (2.0, 2.5, 3.0, 3.5))
    archs = [set(s.archs()) for s in (base, small, tiny)]
    assert [len(a) for a in archs] == [256, 256, 256]
    assert not (archs[0] & archs[1]) and not (archs[1] & archs[2]) and not (archs[0] & archs[2])
    assert S.Arch(9, 9, 544, 1360) in archs[0]  # FFN = hidden x ratio: 544 x 2.5
    assert S.Arch(4, 7, 128, 256) == min(archs[2])


def test_partition_rounds_halves_up():
    """MiniLM-L6 (6 layers, 12 heads, 384 hidden): base layers 4.5, 5, 5.5, 6 -> 5, 5, 6, 6 -> (5, 6); hidden
    17/24 .. 20/24 of 384 = 272, 288, 304, 320. The smoke teacher (4, 4, 64): hidden 45.3, 48, 50.7, 53.3 ->
    45, 48, 51, 53; tiny layers 1.33, 1.67, 2, 2.33 -> 1, 2, 2, 2 -> (1, 2)."""
    base = S.partition(6, 12, 384, 1536, names=("base",))[0]
    assert base.layers == (5, 6) and base.hidden == (272, 288, 304, 320) and base.heads == (9, 10, 11, 12)
    smoke_base, smoke_tiny = S.partition(4, 4, 64, 256, names=("base", "tiny"))
    assert smoke_base.hidden == (45, 48, 51, 53) and smoke_base.layers == (3, 4)
    assert smoke_tiny.layers == (1, 2)
    assert len(smoke_base.archs()) == 2 * 2 * 4 * 4


def test_kept_layers_by_hand():
    """floor(i / depth_mult): 9 of 12 -> i / 0.75; 5 of 12 -> i / (5/12) = 2.4 i."""
    assert S.kept_layers(9, 12) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert S.kept_layers(5, 12) == [0, 2, 4, 7, 9]
    assert S.kept_layers(2, 4) == [0, 2]
    assert S.kept_layers(4, 4) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# Weight sharing
# --------------------------------------------------------------------------------------------------


def tiny_teacher(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2, initializer_range=0.2)
    cfg._attn_implementation = "sdpa"
    return BertForSequenceClassification(cfg).eval()


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_student_weights_are_slices_of_the_superlm():
    """Student L2-A3-H10-F20 of a 4-layer, 4 x 4-head, 16-hidden teacher: its layers 0, 1 are the SuperLM's 0, 2;
    Q/K/V are the first 3 heads (12 rows) over the first 10 inputs; everything else the leading block."""
    net = S.SuperLMContainer(tiny_teacher(), 1).nets[0]
    arch = S.Arch(layers=2, heads=3, hidden=10, ffn=20)
    st = S.extract(net, arch, head_dim=4).eval()
    sb, nb = st.bert, net.bert
    eq = torch.equal
    assert eq(sb.embeddings.word_embeddings.weight, nb.embeddings.word_embeddings.weight[:, :10])
    assert eq(sb.embeddings.position_embeddings.weight, nb.embeddings.position_embeddings.weight[:, :10])
    assert eq(sb.embeddings.LayerNorm.weight, nb.embeddings.LayerNorm.weight[:10])
    for i, j in ((0, 0), (1, 2)):
        s, t = sb.encoder.layer[i], nb.encoder.layer[j]
        for proj in ("query", "key", "value"):
            assert eq(getattr(s.attention.self, proj).weight, getattr(t.attention.self, proj).weight[:12, :10])
            assert eq(getattr(s.attention.self, proj).bias, getattr(t.attention.self, proj).bias[:12])
        assert eq(s.attention.output.dense.weight, t.attention.output.dense.weight[:10, :12])
        assert eq(s.attention.output.LayerNorm.bias, t.attention.output.LayerNorm.bias[:10])
        assert eq(s.intermediate.dense.weight, t.intermediate.dense.weight[:20, :10])
        assert eq(s.output.dense.weight, t.output.dense.weight[:10, :20])
        assert eq(s.output.dense.bias, t.output.dense.bias[:10])
    assert eq(sb.pooler.dense.weight, nb.pooler.dense.weight[:10, :10])
    assert eq(st.classifier.weight, net.classifier.weight[:, :10])
    att = sb.encoder.layer[0].attention.self
    assert (att.attention_head_size, att.query.out_features, att.query.in_features) == (4, 12, 10)

    # The sub-network the SuperLM runs (on views of its weights) is the extracted student.
    batch = tiny_batch()
    runner = S.SubnetRunner()
    logits, qkv = runner.run(net, arch, 4, batch)
    assert torch.allclose(logits, st(**batch).logits, atol=1e-5)
    assert [x.shape for x in qkv] == [(3, 7, 12)] * 3
    # The full architecture is the teacher itself.
    full, _ = runner.run(net, S.arch_of(net), 4, batch)
    assert torch.allclose(full, tiny_teacher()(**batch).logits, atol=1e-5)

    # Gradients reach exactly the slice: layer 2's query rows < 12, columns < 10; layers 1 and 3 get none.
    _, qkv = runner.run(net, arch, 4, batch)
    sum(x.sum() for x in qkv).backward()
    g = nb.encoder.layer[2].attention.self.query.weight.grad
    assert g[:12, :10].abs().sum() > 0 and g[12:].abs().sum() == 0 and g[:, 10:].abs().sum() == 0
    assert nb.encoder.layer[1].attention.self.query.weight.grad is None
    assert nb.encoder.layer[3].attention.self.query.weight.grad is None


def test_param_count_matches_the_model():
    """n_params against the built model, for a student whose hidden size (10) is no multiple of its 3 heads."""
    teacher = tiny_teacher()
    shape = S.shape_of(teacher)
    for arch in (S.Arch(2, 3, 10, 20), S.Arch(4, 4, 16, 32), S.Arch(1, 1, 5, 7)):
        model = S.build_student(teacher.config, arch, head_dim=4)
        assert S.n_params(arch, shape) == sum(p.numel() for p in model.parameters())
    assert S.n_params(S.arch_of(teacher), shape) == sum(p.numel() for p in teacher.parameters())


def test_flops_by_hand():
    """Arch(1 layer, 1 head of 2, hidden 2, FFN 4), 3 tokens, 2 labels. Per layer: projections 3 x (3 x 2 x 2
    + 2 x 2 + 2 x 2 x 4) = 96 multiply-adds, scores + context 2 x 3 x 3 x 2 = 36; pooler 4, classifier 4 -> 140
    multiply-adds = 280 FLOPs."""
    shape = S.Shape(head_dim=2, vocab=10, positions=8, type_vocab=2, labels=2)
    assert S.n_flops(S.Arch(1, 1, 2, 4), shape, seq=3) == 280


# --------------------------------------------------------------------------------------------------
# The search and the schedule
# --------------------------------------------------------------------------------------------------


def test_search_picks_the_best_candidate_within_budget():
    a = S.Arch
    cands = [
        S.Candidate("base", a(4, 4, 64, 256), cost=200, loss=0.1),   # best loss, over budget
        S.Candidate("small", a(3, 3, 48, 96), cost=100, loss=0.5),
        S.Candidate("small", a(3, 2, 48, 96), cost=90, loss=0.3),    # best within 100
        S.Candidate("tiny", a(2, 2, 32, 64), cost=60, loss=0.9),
        S.Candidate("tiny", a(2, 2, 16, 64), cost=50, loss=0.3),     # tie on loss with the one above, cheaper
    ]
    assert S.choose(cands, budget=100).arch == a(2, 2, 16, 64)
    assert S.choose(cands[:4], budget=100).arch == a(3, 2, 48, 96)
    assert S.choose(cands, budget=1000).arch == a(4, 4, 64, 256)
    assert S.choose(cands, budget=60).arch == a(2, 2, 16, 64)
    with pytest.raises(ValueError):
        S.choose(cands, budget=10)


def _method_with_plan(**params) -> AutoDistil:
    m = AutoDistil(AutoDistil.Params(**params))
    teacher = tiny_teacher()
    m.plan = {"teacher": S.arch_of(teacher).as_dict(), "shape": S.shape_of(teacher).__dict__, "seq": 7,
              "task_student": S.Arch(2, 4, 16, 32).as_dict(), "task_student_cost": 1, "budget": 1}
    return m


def test_sandwich_has_largest_smallest_and_is_fixed():
    """Per step: the largest and smallest students by parameters, then 2 others, distinct; a function of
    (seed, step). Small sub-space of (4, 4, 16, 32): layers (3, 4), heads (2, 3), hidden 5.3 .. 7.3 -> (5, 6, 7),
    so the smallest by parameters is L3-A2-H5 with the lowest FFN and the largest L4-A3-H7 with the highest."""
    m = _method_with_plan()
    space = m._space_list()[1]
    assert (space.layers, space.heads, space.hidden) == ((3, 4), (2, 3), (5, 6, 7))
    picked = m.sandwich(1, step=5, seed=0)
    assert len(picked) == 4 and len(set(picked)) == 4
    assert picked[0] == S.Arch(4, 3, 7, space.ffn(7, 4.0)) and picked[1] == S.Arch(3, 2, 5, space.ffn(5, 2.5))
    assert picked == m.sandwich(1, step=5, seed=0)
    assert any(m.sandwich(1, step=5, seed=s)[2:] != picked[2:] for s in range(1, 6))
    assert any(m.sandwich(1, step=s, seed=0)[2:] != picked[2:] for s in range(6, 12))


def test_generations_split_the_budget():
    m = AutoDistil(AutoDistil.Params())
    plan = m.generations(100)
    assert [(g.steps, g.fresh_student, g.name) for g in plan] == [(50, False, "superlm"), (50, True, "finetune")]
    m3 = AutoDistil(AutoDistil.Params(superlm_fraction=0.3))
    assert [g.steps for g in m3.generations(250)] == [75, 175]
    assert [g.name for g in m.generations(1)] == ["finetune"]
    assert [g.name for g in AutoDistil(AutoDistil.Params(superlm_fraction=0)).generations(10)] == ["finetune"]
    planned = _method_with_plan()
    assert [planned._steps_of(k, 100) for k in range(3)] == [17, 17, 16]  # 50 SuperLM steps, in turn


def test_params_reject_repeated_subspaces():
    with pytest.raises(ValueError):
        AutoDistil.Params(subspaces=("base", "base"))
    assert AutoDistil.Params(subspaces=["tiny"]).subspaces == ("tiny",)


def test_relation_teacher_is_pretrained_where_the_task_has_one():
    """auto: the task's pretrained teacher (frozen) at small/full tiers, the cell's teacher at smoke or when the
    task has none; the task's seeding inside its build leaves the cell's random stream alone."""
    from types import SimpleNamespace

    from bench import BenchError

    fine, pre = tiny_teacher(0), tiny_teacher(1)

    def hook(teacher):
        assert teacher is fine
        torch.manual_seed(0)  # as the GLUE task's build does
        return pre

    def ctx(tier, with_hook=True):
        task = SimpleNamespace(env=SimpleNamespace(tier=tier), **({"pretrained_teacher": hook} if with_hook else {}))
        return SimpleNamespace(task=task, teacher=fine, device="cpu")

    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    base = AutoDistil(AutoDistil.Params())._base_teacher(ctx("small"))
    assert base is pre and not any(p.requires_grad for p in base.parameters())
    assert torch.equal(torch.rand(3), want)
    assert AutoDistil(AutoDistil.Params())._base_teacher(ctx("smoke")) is fine
    assert AutoDistil(AutoDistil.Params())._base_teacher(ctx("small", with_hook=False)) is fine
    assert AutoDistil(AutoDistil.Params(teacher_weights="finetuned"))._base_teacher(ctx("small")) is fine
    assert AutoDistil(AutoDistil.Params(teacher_weights="pretrained"))._base_teacher(ctx("smoke")) is pre
    with pytest.raises(BenchError):
        AutoDistil(AutoDistil.Params(teacher_weights="pretrained"))._base_teacher(ctx("small", with_hook=False))
