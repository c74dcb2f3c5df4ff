"""SlimSAM (methods/segmentation/slimsam.py) and its ViT pruning (methods/segmentation/_vit_pruning.py).

Every expected value is worked out here independently: parameter counts and FLOPs from the written-out
formula of segment_anything's ImageEncoderViT, the disturbed Taylor scores from a plain-torch backward and
explicit loops over layers, the kept sets from hand-made scores, the pruned function from the original with
the pruned channels zeroed. The selection rules themselves were checked once against the official code
(czg1225/SlimSAM @ b612c1b with its bundled Torch-Pruning) on a 12-block ViT: identical kept indices.
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from bench import BenchError
from bench.api import OptimConfig, Task, TeacherCandidate, TrainConfig
from bench.measure.flops import count_flops
from bench.methods.segmentation import _vit_pruning as vp
from bench.methods.segmentation.slimsam import SlimSAM, step2_alpha, virtual_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

# The small config: embed 48, depth 2, 4 heads (12 channels each), 64 px, patch 8 -> 8x8 tokens; block 0
# windowed (window 3: 8 -> padded 9, 9 windows of 9 tokens), block 1 global; rel-pos on; MLP 192; neck 32.
IMG, PATCH, D, DEPTH, HEADS, WIN, OUT = 64, 8, 48, 2, 4, 3, 32
T = IMG // PATCH


def make_encoder(seed: int = 0) -> ImageEncoderViT:
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
                          out_chans=OUT, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          global_attn_indexes=(1,), window_size=WIN)
    with torch.no_grad():
        for name, p in enc.named_parameters():  # non-trivial pos/rel-pos tables and norms
            if "norm" in name or name.startswith("neck.1") or name.startswith("neck.3"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return enc.eval()


def images(n: int = 2, b: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, IMG, IMG, generator=g) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# The hand formula of ImageEncoderViT's parameters and FLOPs (FlopCounterMode: 2 per MAC; matmuls, convs,
# attention bmm and the rel-pos einsums; norms, softmax, adds count 0)
# --------------------------------------------------------------------------------------------------


def formula(d: int, blocks: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """(params, FLOPs at batch 1) for embed width d and per block (heads h, channels per head c, MLP m,
    window w; 0 = global)."""
    n_tok = T * T
    params = d * 3 * PATCH * PATCH + d  # patch conv + bias
    flops = 2 * n_tok * d * 3 * PATCH * PATCH
    params += T * T * d  # pos_embed
    for h, c, m, w in blocks:
        side = w if w else T
        n_win = (-(-T // w)) ** 2 if w else 1  # ceil(T / w)^2 windows of w*w tokens (padded)
        L = side * side
        computed = n_win * L  # tokens through qkv / attention / proj (padding included)
        params += 4 * d  # norm1, norm2
        params += d * 3 * h * c + 3 * h * c  # qkv
        params += h * c * d + d  # proj
        params += d * m + m + m * d + d  # lin1, lin2
        params += 2 * (2 * side - 1) * c  # rel_pos_h, rel_pos_w
        flops += 2 * computed * d * 3 * h * c  # qkv
        flops += 2 * (2 * n_win * h * L * L * c)  # q k^T and attn v
        flops += 2 * (2 * n_win * h * L * c * side)  # rel_h and rel_w einsums (k_h = k_w = side)
        flops += 2 * computed * h * c * d  # proj
        flops += 2 * 2 * n_tok * d * m  # lin1 + lin2 (after window unpartition: real tokens only)
    params += d * OUT + 2 * OUT + OUT * OUT * 9 + 2 * OUT  # neck: 1x1 conv, LN2d, 3x3 conv, LN2d
    flops += 2 * n_tok * d * OUT + 2 * n_tok * OUT * OUT * 9
    return params, flops


def measured(enc: nn.Module) -> tuple[int, int]:
    x = torch.zeros(1, 3, IMG, IMG)
    with torch.no_grad():
        fc = count_flops(lambda: enc(x), strict=True)
    return sum(p.numel() for p in enc.parameters()), fc.flops


def dims_of(enc: nn.Module) -> tuple[int, list[tuple[int, int, int, int]]]:
    d = vp.encoder_dims(enc)
    return d["embed"], [(b["heads"], b["head_channels"], b["mlp"], b["window"]) for b in d["blocks"]]


def test_formula_matches_the_unpruned_encoder():
    enc = make_encoder()
    assert measured(enc) == formula(D, [(HEADS, 12, 192, WIN), (HEADS, 12, 192, 0)])


# Worked by hand for local (uniform) pruning, round_to = 4 heads:
#   ratio 0.5 : embed int(48*.5)=24; qkv int(48*.5)=24 -> 6 per head; MLP int(192*.5)=96
#   ratio 0.77: embed int(48*.23)=11 -> 8; qkv int(48*.23)=11 -> 8 -> 2 per head; MLP int(192*.23)=44 (44 % 4 = 0)
@pytest.mark.parametrize("ratio,embed,per_head,mlp", [(0.5, 24, 6, 96), (0.77, 8, 2, 44)])
def test_pruned_params_and_flops_follow_the_ratios(ratio, embed, per_head, mlp):
    enc = make_encoder()
    vp.disturbed_taylor_backward(enc, images(), 0.01, seed=0)
    keep = vp.prune_embedding_step(enc, ratio, HEADS, groups=HEADS)
    assert len(keep) == embed
    vp.disturbed_taylor_backward(enc, images(), 0.01, seed=1)
    kept = vp.prune_bottleneck_step(enc, ratio, HEADS, global_ranking=False)
    assert [len(k) for k in kept["qkv"]] == [per_head] * DEPTH and [len(k) for k in kept["mlp"]] == [mlp] * DEPTH
    expect = formula(embed, [(HEADS, per_head, mlp, WIN), (HEADS, per_head, mlp, 0)])
    assert measured(enc) == expect
    assert enc(images(1, 1)[0]).shape == (1, OUT, T, T)


@pytest.mark.parametrize("ratio", [0.5, 0.77])
def test_global_bottleneck_pruning_keeps_the_ratio_over_all_blocks(ratio):
    enc = make_encoder()
    vp.disturbed_taylor_backward(enc, images(), 0.01, seed=0)
    vp.prune_embedding_step(enc, ratio, HEADS, groups=HEADS)
    vp.disturbed_taylor_backward(enc, images(), 0.01, seed=1)
    kept = vp.prune_bottleneck_step(enc, ratio, HEADS, global_ranking=True)
    # 24 scored head positions (2 blocks x 12): int(24 (1 - r)) are kept in all (no ties in real scores)
    assert sum(len(k) for k in kept["qkv"]) == int(24 * (1 - ratio))
    assert all(b.attn.num_heads == HEADS for b in enc.blocks)  # heads are kept, their dimension shrinks
    d, blocks = dims_of(enc)
    assert [c for _, c, _, _ in blocks] == [len(k) for k in kept["qkv"]]
    assert measured(enc) == formula(d, blocks)


# The official repository's build_sam.py registers the released uniform (local) models: vit_p50 = embed 384,
# MLP 1536, 12 heads (qkv 3 x 384: 32 channels per head); vit_p77 = embed 168, MLP 696, 12 heads (14 each).
@pytest.mark.parametrize("ratio,embed,per_head,mlp", [(0.5, 384, 32, 1536), (0.77, 168, 14, 696)])
def test_uniform_pruning_of_sam_b_gives_the_released_slimsam_shapes(ratio, embed, per_head, mlp):
    def sam_b(dim=768, mlp_ratio=4.0):
        return ImageEncoderViT(depth=12, embed_dim=dim, img_size=1024, mlp_ratio=mlp_ratio, num_heads=12,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6), patch_size=16, use_rel_pos=True,
                               global_attn_indexes=(2, 5, 8, 11), window_size=14, out_chans=256)

    g = torch.Generator().manual_seed(0)  # any scores: the counts depend on the sizes only
    keep = vp.keep_local(torch.rand(768, generator=g), ratio, 12, 12)
    with torch.device("meta"):
        enc = sam_b()
    vp.prune_embedding_(enc, keep.to("meta"))
    for blk in enc.blocks:
        q = vp.keep_local(torch.rand(768, generator=g), ratio, 12, 12)
        vp.prune_attention_(blk.attn, q[q < 64].to("meta"))
        vp.prune_mlp_(blk.mlp, vp.keep_local(torch.rand(3072, generator=g), ratio, 12, 1).to("meta"))
    d = vp.encoder_dims(enc)
    assert d["embed"] == embed
    assert {(b["heads"], b["head_channels"], b["mlp"]) for b in d["blocks"]} == {(12, per_head, mlp)}
    if ratio == 0.5:  # vit_p50 is ImageEncoderViT(embed 384, mlp ratio 4): the same parameter count
        with torch.device("meta"):
            released = sam_b(384)
        assert d["params"] == sum(p.numel() for p in released.parameters()) == 23_897_216


# --------------------------------------------------------------------------------------------------
# Which channels are kept
# --------------------------------------------------------------------------------------------------


def test_kept_embedding_is_the_top_of_a_hand_made_importance():
    scores = torch.tensor([5., 1., 9., 3., 7., 2., 8., 0.5])
    # plain top-4 (groups=1, round_to 2): 9, 8, 7, 5 -> indices 0, 2, 4, 6
    assert vp.keep_local(scores, 0.5, 2, groups=1).tolist() == [0, 2, 4, 6]
    # 2 chunks of 4: positions sum over chunks [5+7, 1+2, 9+8, 3+.5] = [12, 3, 17, 3.5] -> keep 0, 2
    assert vp.keep_local(scores, 0.5, 2, groups=2).tolist() == [0, 2, 4, 6]
    scores2 = torch.tensor([5., 1., 9., 3., 0., 9., 0., 9.])  # sums [5, 10, 9, 12] -> keep 1, 3
    assert vp.keep_local(scores2, 0.5, 2, groups=2).tolist() == [1, 3, 5, 7]

    # Through the encoder: gradients that make the importance of channel d proportional to the patch-conv
    # row's sum |w| (every other gradient zero), then the 24 largest of those are kept.
    enc = make_encoder()
    for p in enc.parameters():
        p.grad = torch.zeros_like(p)
    enc.patch_embed.proj.weight.grad = torch.ones_like(enc.patch_embed.proj.weight)
    row = enc.patch_embed.proj.weight.detach().abs().flatten(1).sum(1)
    top = sorted(np.argsort(-row.numpy())[:24].tolist())
    assert vp.prune_embedding_step(enc, 0.5, HEADS, groups=1).tolist() == top


def test_global_selection_with_gaussian_normaliser_by_hand():
    a, b = torch.tensor([1., 2., 3., 10.]), torch.tensor([4., 4.5, 5., 5.5, 100., 6.])

    def gauss(x):  # (x - mean) / (std + 1e-8), unbiased std
        x = np.asarray(x, dtype=np.float64)
        return (x - x.mean()) / (x.std(ddof=1) + 1e-8)

    za, zb = gauss([1, 2, 3, 10]), gauss([4, 4.5, 5, 5.5, 100, 6])
    allz = np.concatenate([za, zb])
    n_pruned = 10 - int(10 * 0.5)
    thres = np.sort(allz)[n_pruned - 1]
    expect_a = [i for i in range(4) if za[i] > thres]
    expect_b = [i for i in range(6) if zb[i] > thres]
    got = vp.keep_global([a, b], 0.5, None, [1, 1], "gaussian")
    assert [g.tolist() for g in got] == [expect_a, expect_b]
    # round_to 2: a group's pruned set is cut to a multiple of 2 by dropping its last (highest-index) entries
    got = vp.keep_global([a, b], 0.5, 2, [1, 1], "gaussian")
    pruned_b = [i for i in range(6) if zb[i] <= thres]
    pruned_b = pruned_b[: len(pruned_b) - len(pruned_b) % 2]
    assert got[1].tolist() == [i for i in range(6) if i not in pruned_b]


def test_global_selection_of_head_positions_by_hand():
    # Block a: 2 heads x 4 channels, block b: 3 heads x 3. A position's score is the sum over the heads; the
    # gaussian normaliser runs over the head-repeated vector (2 resp. 3 copies), as the code computes it,
    # which here changes the choice (normalising the positions alone would keep a's 2, 3 and b's 2).
    a = torch.tensor([4., 0., 5., 2., 1., 3., 2., 4.])  # positions [5, 3, 7, 6]
    b = torch.tensor([2., 1., 3., 5., 1., 3., 0., 0., 2.])  # positions [7, 2, 8]

    def gauss_rep(pos, g):
        rep = np.tile(np.asarray(pos, dtype=np.float64), g)
        return (np.asarray(pos) - rep.mean()) / (rep.std(ddof=1) + 1e-8)

    za, zb = gauss_rep([5, 3, 7, 6], 2), gauss_rep([7, 2, 8], 3)
    thres = np.sort(np.concatenate([za, zb]))[(7 - int(7 * 0.5)) - 1]  # 7 positions, prune 4
    keep_a = [j for j in range(4) if za[j] > thres]
    keep_b = [j for j in range(3) if zb[j] > thres]
    assert (keep_a, keep_b) == ([2], [0, 2])
    got = vp.keep_global([a, b], 0.5, None, [2, 3], "gaussian")
    assert got[0].tolist() == [2, 6]
    assert got[1].tolist() == [0, 2, 3, 5, 6, 8]


def test_a_group_that_would_be_emptied_is_left_whole():
    a, b = torch.tensor([1., 2., 3., 10.]), torch.tensor([4., 4.5, 5., 5.5, 100., 6.])
    # ratio 0.85 prunes 10 - int(1.5) = 9 of 10: all but b's 100 -> a would lose all 4 channels, so keeps them
    got = vp.keep_global([a, b], 0.85, None, [1, 1], "gaussian")
    assert got[0].tolist() == [0, 1, 2, 3] and got[1].tolist() == [4]


# --------------------------------------------------------------------------------------------------
# Disturbed Taylor importance
# --------------------------------------------------------------------------------------------------


def test_disturbed_taylor_scores_equal_plain_torch():
    enc, ref = make_encoder(), make_encoder()
    xs, sigma, seed = images(), 0.05, 7
    vp.disturbed_taylor_backward(enc, xs, sigma, seed)
    # plain torch: the same noise stream, loss mean((E(x) - (sg(E(x)) + sigma eps))^2), gradients summed
    g = torch.Generator().manual_seed(seed)
    for x in xs:
        emb = ref(x)
        eps = torch.randn(emb.shape, generator=g)
        ((emb - (emb.detach() + sigma * eps)) ** 2).mean().backward()
    W = {n: (p.detach() * p.grad).abs() for n, p in ref.named_parameters() if p.grad is not None}
    # embedding channel d: patch conv row, per block q/k/v columns (3 layers), proj row, lin1 col, lin2 row;
    # neck conv column; mean over the 2 + 6 * depth layers
    emb = torch.zeros(D)
    for d in range(D):
        terms = [W["patch_embed.proj.weight"][d].sum()]
        for i in range(DEPTH):
            q = W[f"blocks.{i}.attn.qkv.weight"]
            terms += [q[s * D:(s + 1) * D, d].sum() for s in range(3)]
            terms += [W[f"blocks.{i}.attn.proj.weight"][d].sum(), W[f"blocks.{i}.mlp.lin1.weight"][:, d].sum(),
                      W[f"blocks.{i}.mlp.lin2.weight"][d].sum()]
        terms.append(W["neck.0.weight"][:, d].sum())
        emb[d] = sum(terms) / len(terms)
    torch.testing.assert_close(vp.embedding_importance(enc), emb, rtol=1e-5, atol=1e-12)
    for i, blk in enumerate(enc.blocks):
        q, pr = W[f"blocks.{i}.attn.qkv.weight"], W[f"blocks.{i}.attn.proj.weight"]
        want = torch.stack([(q[j].sum() + q[D + j].sum() + q[2 * D + j].sum() + pr[:, j].sum()) / 4 for j in range(D)])
        torch.testing.assert_close(vp.qkv_importance(blk), want, rtol=1e-5, atol=1e-12)
        l1, l2 = W[f"blocks.{i}.mlp.lin1.weight"], W[f"blocks.{i}.mlp.lin2.weight"]
        want = torch.stack([(l1[j].sum() + l2[:, j].sum()) / 2 for j in range(l1.shape[0])])
        torch.testing.assert_close(vp.mlp_importance(blk), want, rtol=1e-5, atol=1e-12)


def test_without_the_disturbance_the_gradient_is_zero():
    enc = make_encoder()
    vp.disturbed_taylor_backward(enc, images(1), 0.0, seed=0)
    assert float(vp.embedding_importance(enc).abs().max()) == 0.0


# --------------------------------------------------------------------------------------------------
# The pruned function
# --------------------------------------------------------------------------------------------------


def test_keeping_every_channel_is_the_identity():
    enc = make_encoder()
    x = images(1)[0]
    with torch.no_grad():
        before = enc(x)
        vp.prune_embedding_(enc, torch.arange(D))
        for blk in enc.blocks:
            vp.prune_attention_(blk.attn, torch.arange(12))
            vp.prune_mlp_(blk.mlp, torch.arange(192))
        torch.testing.assert_close(enc(x), before, rtol=0, atol=0)


def test_pruned_heads_and_mlp_equal_the_original_with_those_channels_zeroed():
    # (Not for the embedding width: the LayerNorms average over all D channels, zeros included.)
    enc, zeroed = make_encoder(), make_encoder()
    keep_pos = [torch.tensor([0, 3, 4, 9, 11]), torch.tensor([1, 2, 5, 6, 7, 8, 10])]
    keep_mlp = [torch.arange(0, 192, 3), torch.arange(5, 150)]
    with torch.no_grad():
        for i, blk in enumerate(zeroed.blocks):
            for h in range(HEADS):
                for j in range(12):
                    if j not in keep_pos[i].tolist():
                        for s in range(3):  # q, k, v row of position j of head h
                            r = s * D + h * 12 + j
                            blk.attn.qkv.weight[r] = 0
                            blk.attn.qkv.bias[r] = 0
            drop = [u for u in range(192) if u not in keep_mlp[i].tolist()]
            blk.mlp.lin1.weight[drop] = 0
            blk.mlp.lin1.bias[drop] = 0  # GELU(0) = 0: the unit contributes nothing
        for i, blk in enumerate(enc.blocks):
            vp.prune_attention_(blk.attn, keep_pos[i])
            vp.prune_mlp_(blk.mlp, keep_mlp[i])
        x = images(1)[0]
        torch.testing.assert_close(enc(x), zeroed(x), rtol=1e-5, atol=1e-5)
    assert enc.blocks[0].attn.rel_pos_h.shape == (2 * WIN - 1, 5)
    assert enc.blocks[1].attn.rel_pos_w.shape == (2 * T - 1, 7)


def test_reset_rel_pos_reproduces_the_official_reinitialisation():
    enc = make_encoder()
    vp.prune_attention_(enc.blocks[0].attn, torch.tensor([0, 1, 2]))
    vp.reset_rel_pos_(enc)
    a = enc.blocks[0].attn
    assert a.scale == pytest.approx(3 ** -0.5) and float(a.rel_pos_h.detach().abs().sum()) == 0.0
    assert a.rel_pos_h.shape == (2 * WIN - 1, 3)


# --------------------------------------------------------------------------------------------------
# The method: schedules, losses, harness wiring
# --------------------------------------------------------------------------------------------------


def test_epoch_mapping_and_alpha_by_hand():
    assert [virtual_epoch(k, 40, 20) for k in (0, 1, 2, 19, 20, 39)] == [0, 0, 1, 9, 10, 19]
    assert [virtual_epoch(k, 7, 20) for k in range(7)] == [0, 2, 5, 8, 11, 14, 17]
    assert [step2_alpha(e, 11) for e in (0, 1, 9, 10, 11, 19)] == [10 / 11, 9 / 11, 1 / 11, 0.0, 0.0, 0.0]


# Six harness steps of batch 2 (two generations of 3), AdamW without decay at a visible learning rate.
CFG = TrainConfig(steps=6, batch_size=2, eval_batch_size=2, optim=OptimConfig(
    lr=1e-3, weight_decay=0.0, schedule="constant", warmup_ratio=0.0, grad_clip=None))


class TinySam(nn.Module):
    """A PromptableSAM stand-in: the method uses ``embed`` and ``image_encoder`` only."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.image_encoder = make_encoder(seed)
        self.mask_decoder = nn.Linear(OUT, 4)
        self.img_size = IMG

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(x)


class _Split:
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx):
        return {"image": self.x[list(idx)], "index": torch.as_tensor(list(idx))}


class _Task(Task):
    name, domain, version, subtasks = "fake_sam", "segmentation", "1", ("box",)

    def __init__(self, pool=("sam-lite0", "sam-vit-tiny")) -> None:
        self.split, self.pool = _Split(20), pool

    def teacher_pool(self):
        return [TeacherCandidate(n, 1) for n in self.pool]

    def train_data(self):
        return self.split

    def student(self, seed):
        return TinySam(seed + 1)


def test_teacher_choice_and_unsupported():
    m = SlimSAM(SlimSAM.Params())
    assert m.unsupported(_Task()) is None
    assert m.select_teacher(_Task().teacher_pool(), 1) == "sam-vit-tiny"
    assert m.select_teacher(_Task(pool=("sam_vit_h", "sam_vit_b")).teacher_pool(), 1) == "sam_vit_b"
    reason = m.unsupported(_Task(pool=("sam-lite0", "sam-tinyvit")))
    assert reason and "ImageEncoderViT" in reason
    with pytest.raises(BenchError, match="ImageEncoderViT"):
        bad = TinySam()
        bad.image_encoder = nn.Conv2d(3, OUT, 8, 8)
        m.init_student(bad, TinySam(), type("C", (), {"previous": None})())


def _manual_features(enc, x):
    """qkv outputs per block, MLP hidden after GELU, and the block features, by running the parts by hand."""
    qkv, mid, block = {"w": [], "g": []}, [], []
    h = enc.patch_embed(x) + enc.pos_embed
    block.append(h)
    for blk in enc.blocks:
        y = blk.norm1(h)
        if blk.window_size:
            yy, pad = window_partition(y, blk.window_size)
            att = window_unpartition(blk.attn(yy), blk.window_size, pad, (y.shape[1], y.shape[2]))
        else:
            yy, att = y, blk.attn(y)
        qkv["w" if blk.window_size else "g"].append(blk.attn.qkv(yy))
        h2 = h + att
        a = F.gelu(blk.mlp.lin1(blk.norm2(h2)))
        mid.append(a)
        h = h2 + blk.mlp.lin2(a)
        block += [h2, h]
    return qkv, mid, block


def loss_of(method, x, ctx) -> float:
    return float(method.training_step({"image": x}, ctx)["student"].detach())


def _mse_list(a, b):
    return float(sum(((u - v) ** 2).sum() for u, v in zip(a, b)) / sum(u.numel() for u in a))


def test_step_losses_by_hand():
    teacher = TinySam(0)
    student, prev = TinySam(5), TinySam(9)
    x = images(1)[0]
    m = SlimSAM(SlimSAM.Params())
    m.generations(40)

    class Ctx:  # the StepContext fields training_step reads
        generation, generation_steps, previous = 0, 20, prev

        def run_teacher(self, fn, n_examples):
            with torch.no_grad():
                return fn(teacher)

    ctx = Ctx()
    ctx.student = student
    with torch.no_grad():
        qs, ms, bs = _manual_features(student.image_encoder, x)
        qt, mt, bt = _manual_features(teacher.image_encoder, x)
        _, _, bp = _manual_features(prev.image_encoder, x)
        es, et, ep = student.embed(x), teacher.embed(x), prev.embed(x)
    emb = float(((es - et) ** 2).mean())
    # step 1, epoch 0 (< 10): 0.5 emb + 0.5 (qkv window + qkv global + mid), each an MSE over its blocks
    ctx.generation_step = 0
    want = 0.5 * emb + 0.5 * (_mse_list(qs["w"], qt["w"]) + _mse_list(qs["g"], qt["g"]) + _mse_list(ms, mt))
    assert loss_of(m, x, ctx) == pytest.approx(want, rel=1e-5)
    ctx.generation_step = 10  # epoch 10: embedding only
    assert loss_of(m, x, ctx) == pytest.approx(emb, rel=1e-5)
    # step 2, epoch 1: alpha = 9/11
    ctx.generation, ctx.generation_step = 1, 1
    a = 9 / 11
    want = (1 - a) * emb + a * (_mse_list(bs, bp) + float(((es - ep) ** 2).mean()))
    assert loss_of(m, x, ctx) == pytest.approx(want, rel=1e-5)
    # the code's variant: the global blocks' qkv term is 0
    m2 = SlimSAM(SlimSAM.Params(align_global_qkv=False))
    m2.generations(40)
    ctx.generation, ctx.generation_step = 0, 0
    want = 0.5 * emb + 0.5 * (_mse_list(qs["w"], qt["w"]) + _mse_list(ms, mt))
    assert loss_of(m2, x, ctx) == pytest.approx(want, rel=1e-5)


def test_two_steps_through_the_harness_train_the_pruned_encoder():
    from bench.train import train

    task, teacher = _Task(), TinySam(0)
    method = SlimSAM(SlimSAM.Params(grad_images=3))
    inits: list[nn.Module] = []
    orig = method.init_student

    def spy(t, s, ctx):
        model = orig(t, s, ctx)
        inits.append(copy.deepcopy(model))
        return model

    method.init_student = spy
    final, result = train(method, task, TinySam(3), teacher, CFG, seed=0)
    assert [g["steps"] for g in result.generations] == [3, 3] and len(inits) == 2
    d, blocks = dims_of(final.image_encoder)
    assert d == 24 and sum(c for _, c, _, _ in blocks) == 12  # embed by step 1, qkv positions by step 2
    assert dims_of(inits[1].image_encoder) == (d, blocks)
    # both generations' optimisers held the pruned parameters: the encoder moved away from its pruned start
    for name, p in final.image_encoder.named_parameters():
        if name.endswith("weight") and "norm" not in name:
            assert not torch.equal(p, dict(inits[1].image_encoder.named_parameters())[name]), name
    # the decoder stayed the teacher's, frozen; the whole encoder trains
    torch.testing.assert_close(final.mask_decoder.weight, teacher.mask_decoder.weight, rtol=0, atol=0)
    for init in inits:
        assert not any(p.requires_grad for p in init.mask_decoder.parameters())
        assert all(p.requires_grad for p in init.image_encoder.parameters())
    info = method.record_info()
    assert info["step1_pruning"]["grad_images"] == 3 and info["step1_pruning"]["embed_after"] == 24
    assert info["params"]["after_step2"] == sum(p.numel() for p in final.image_encoder.parameters())
    assert info["params"]["teacher_encoder"] == sum(p.numel() for p in teacher.image_encoder.parameters())
    assert info["step1_model_forward_passes"] > 0
    assert all(np.isfinite(e["student"]) for e in result.loss_log)


def test_resume_inside_step_2_is_exact(tmp_path):
    from bench.train import train

    def run(**kw):
        return train(SlimSAM(SlimSAM.Params(grad_images=3)), _Task(), TinySam(3), TinySam(0), CFG, seed=0, **kw)

    ref, _ = run()

    class Stop(Exception):
        pass

    def stop(step, n, losses):
        if step == 5:  # killed after the 5th step; the last checkpoint is inside step 2 (pruned shapes)
            raise Stop

    ck = tmp_path / "state.pt"
    with pytest.raises(Stop):
        run(checkpoint_path=ck, checkpoint_every=1, on_step=stop)
    again, result = run(checkpoint_path=ck, checkpoint_every=1)
    assert result.resumed_from_step is not None and result.resumed_from_step > 3
    a, b = ref.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
