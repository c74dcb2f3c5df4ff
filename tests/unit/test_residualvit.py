"""ResidualViT (methods/grounding/residualvit.py) against values worked out independently: kept-token counts and
selected patches by hand, the P-frame forward recomputed in plain torch from the tiny CLIP's weights (patch
convolution, attention and MLP written out), the I/P schedule from the teacher's own features, the loss from its
formula (and one case by hand), and the optimiser settings from the official training script
(notes/residualvit_recipe.md, section 5)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench import BenchError
from bench.api import Outputs
from bench.methods.grounding.residualvit import ResidualViT, ResidualViTModel, kept_tokens, select_patches

pytestmark = pytest.mark.usefixtures("one_thread")

S, PATCH, WIDTH, EMBED = 16, 4, 16, 16  # 16 px frames, 4 px patches -> 4x4 = 16 patch tokens
G = S // PATCH


def tiny_cfg(**over):
    from bench.tasks.charades_sta.model import ClipConfig

    base = dict(embed_dim=EMBED, image_size=S, patch_size=PATCH, width=WIDTH, layers=1, heads=2, text_width=16,
                text_layers=1, text_heads=2, context_length=8)
    base.update(over)
    return ClipConfig(**base)


def tiny_teacher(seed: int = 0, **over):
    from bench.tasks.charades_sta.model import VideoCLIP, build_clip

    teacher = VideoCLIP(build_clip(tiny_cfg(**over), seed), 8).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial LayerNorms (open_clip initialises them to the identity, under which
        for mod in teacher.modules():  # ln_pre on the residual token would be invisible behind ln_1)
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.add_(0.3 * torch.randn(mod.bias.shape, generator=g))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def model(teacher):
    torch.manual_seed(3)  # the residual projection's default init
    return ResidualViTModel(teacher, n_reduced=2, drop_rate=0.75, selection="motion").eval()


# --------------------------------------------------------------------------------------------------
# kept_tokens
# --------------------------------------------------------------------------------------------------


def test_kept_tokens_floor_in_training_round_at_inference():
    # 64 * (1 - 0.85) = 9.6: floor 9 in training, round 10 at inference
    assert kept_tokens(64, 0.85, training=True) == 9
    assert kept_tokens(64, 0.85, training=False) == 10
    # B/32 at 224: 49 * 0.15 = 7.35 -> 7 both ways
    assert kept_tokens(49, 0.85, training=True) == 7
    assert kept_tokens(49, 0.85, training=False) == 7
    # 16 * 0.01 = 0.16 -> floor 0 / round 0 -> at least 1
    assert kept_tokens(16, 0.99, training=True) == 1
    assert kept_tokens(16, 0.99, training=False) == 1
    # the tiny model below: 16 * 0.25 = 4 exactly
    assert kept_tokens(16, 0.75, training=False) == 4 and kept_tokens(16, 0.75, training=True) == 4


# --------------------------------------------------------------------------------------------------
# select_patches
# --------------------------------------------------------------------------------------------------


def test_motion_selection_takes_the_top_k_patches_row_major():
    # 4x4 grid; the four largest values sit at (0,3)=9, (2,1)=8, (3,3)=7, (1,0)=6 -> raster 3, 9, 15, 4
    grid = torch.tensor([[0.1, 0.2, 0.3, 9.0],
                         [6.0, 0.5, 0.4, 0.3],
                         [0.2, 8.0, 1.0, 0.1],
                         [0.0, 0.3, 0.2, 7.0]])
    idx = select_patches("motion", 4, (4, 4), 1, grid[None])
    assert idx.shape == (1, 4)
    assert idx[0].tolist() == [3, 9, 15, 4]  # topk order: descending motion
    # k = 5 adds the next largest, (2,2) = 1.0 -> raster 10
    assert sorted(select_patches("motion", 5, (4, 4), 1, grid[None])[0].tolist()) == [3, 4, 9, 10, 15]


def test_motion_selection_on_a_non_square_grid_is_row_major_per_sample():
    # 2 rows x 3 columns; sample 0's largest at (1,0) -> 3 and (0,2) -> 2; sample 1's at (0,1) -> 1, (1,2) -> 5
    mot = torch.tensor([[[0.0, 0.1, 5.0], [7.0, 0.2, 0.3]],
                        [[0.1, 4.0, 0.0], [0.2, 0.3, 3.0]]])
    idx = select_patches("motion", 2, (2, 3), 2, mot)
    assert idx.tolist() == [[3, 2], [1, 5]]


def test_motion_ties_are_broken_only_by_the_tiny_noise():
    # patches 0 and 5 are clearly largest; the other 14 tie at 0, so the 3rd pick is decided by the 1e-6 noise
    mot = torch.zeros(1, 4, 4)
    mot[0, 0, 0], mot[0, 1, 1] = 2.0, 1.0
    third = set()
    for seed in range(20):
        idx = select_patches("motion", 3, (4, 4), 1, mot, generator=torch.Generator().manual_seed(seed))[0].tolist()
        assert idx[:2] == [0, 5] and idx[2] not in (0, 5)
        third.add(idx[2])
    assert len(third) > 1  # the tie is broken at random, not always by the lowest index
    # a motion gap of 1e-4 (100x the noise) is never overturned by it
    mot = torch.zeros(1, 4, 4)
    mot[0, 3, 2] = 1e-4  # raster 14
    for seed in range(20):
        assert select_patches("motion", 1, (4, 4), 1, mot, generator=torch.Generator().manual_seed(seed)).item() == 14


def test_motion_selection_needs_motion():
    with pytest.raises(BenchError, match="motion"):
        select_patches("motion", 2, (4, 4), 1, None)


def test_center_selection_picks_the_central_block():
    # 4x4: centre (1.5, 1.5); (1,1),(1,2),(2,1),(2,2) are at squared distance 0.5, all others >= 2.5
    idx = select_patches("center", 4, (4, 4), 3, None)
    assert idx.shape == (3, 4)
    for row in idx.tolist():
        assert sorted(row) == [5, 6, 9, 10]
    # 7x7 (B/32), k = 7: centre 24 (d 0), the plus 17, 23, 25, 31 (d 1), then of the d-2 diagonals 16, 18, 30, 32
    # the two lowest indices (stable sort) 16 and 18
    assert sorted(select_patches("center", 7, (7, 7), 1, None)[0].tolist()) == [16, 17, 18, 23, 24, 25, 31]


def test_random_selection_gives_k_distinct_indices_in_range():
    g = torch.Generator().manual_seed(0)
    idx = select_patches("random", 5, (4, 4), 8, None, generator=g)
    assert idx.shape == (8, 5)
    for row in idx.tolist():
        assert len(set(row)) == 5 and all(0 <= i < 16 for i in row)
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1  # a fresh subset per sample


def test_unknown_selection_is_refused():
    with pytest.raises(BenchError, match="unknown token selection"):
        select_patches("uniform", 2, (4, 4), 1, None)


# --------------------------------------------------------------------------------------------------
# The P-frame forward, written out in plain torch
# --------------------------------------------------------------------------------------------------


def plain_block(blk, x):
    """open_clip's ResidualAttentionBlock (pre-LN, no mask, GELU MLP) from its weights."""
    d = x.shape[-1]
    heads = blk.attn.num_heads
    hd = d // heads

    def ln(mod, y):
        mu = y.mean(-1, keepdim=True)
        var = ((y - mu) ** 2).mean(-1, keepdim=True)
        return (y - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias

    h = ln(blk.ln_1, x)
    qkv = h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
    q, k, v = qkv.split(d, dim=-1)
    b, n = x.shape[:2]
    q, k, v = (u.reshape(b, n, heads, hd).transpose(1, 2) for u in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    h = ln(blk.ln_2, x)
    h = F.gelu(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
    return x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias


def plain_layer_norm(mod, y):
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def plain_embed(visual, images):
    """conv1 as an explicit matmul over 4x4 patches (raster order), [CLS] prepended, positions added."""
    b = images.shape[0]
    patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (B, 3, G, G, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, G * G, 3 * PATCH * PATCH)
    x = patches @ visual.conv1.weight.reshape(WIDTH, -1).T  # conv1 has no bias
    cls = visual.class_embedding.expand(b, 1, WIDTH)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding


def plain_head(visual, tokens, skip_ln_pre_at=None):
    x = plain_layer_norm(visual.ln_pre, tokens)
    if skip_ln_pre_at is not None:  # a deliberately wrong variant: one token bypasses ln_pre
        x[:, skip_ln_pre_at] = tokens[:, skip_ln_pre_at]
    for blk in visual.transformer.resblocks:
        x = plain_block(blk, x)
    return F.normalize(plain_layer_norm(visual.ln_post, x[:, 0]) @ visual.proj, dim=-1)


def p_frame_inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, S, S, generator=g)
    motion = torch.rand(b, G, G, generator=g)  # continuous: no ties, so the noise cannot matter
    anchor = F.normalize(torch.randn(b, EMBED, generator=g), dim=-1)
    return images, motion, anchor


def reference_tokens(model, images, motion, anchor):
    """(CLS+pos, residual, kept patches+pos) as separate pieces."""
    visual = model.visual
    tok = plain_embed(visual, images)
    b = images.shape[0]
    k = 4  # round(16 * (1 - 0.75))
    keep = motion.reshape(b, G * G).argsort(dim=1, descending=True)[:, :k]
    kept = torch.stack([tok[i, 1 + keep[i]] for i in range(b)])
    residual = anchor @ model.residual_proj.weight.T + model.residual_proj.bias
    return tok[:, :1], residual[:, None], kept


def test_plain_reference_reproduces_the_teachers_full_frame(teacher):
    # sanity of the hand-written ViT: every token, no residual -> the teacher's own embedding
    images, _, _ = p_frame_inputs()
    with torch.no_grad():
        ref = plain_head(teacher.visual, plain_embed(teacher.visual, images))
        assert torch.allclose(ref, teacher.encode_frames(images), atol=1e-5)


def test_p_frame_forward_matches_the_plain_torch_recipe(model):
    images, motion, anchor = p_frame_inputs()
    with torch.no_grad():
        cls, res, kept = reference_tokens(model, images, motion, anchor)
        ref = plain_head(model.visual, torch.cat([cls, res, kept], dim=1))
        got = model.encode_reduced(images, motion, anchor)
        tok = plain_embed(model.visual, images)
        low = motion.reshape(2, -1).argsort(dim=1)[:, :4]
        least = torch.stack([tok[i, 1 + low[i]] for i in range(2)])
        high = motion.reshape(2, -1).argsort(dim=1, descending=True)[:, :4]
        kept_pos = model.visual.positional_embedding[1 + high]
        assert got.shape == (2, EMBED)
        assert torch.allclose(got, ref, atol=1e-5)
        assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)

        # The variants the recipe rules out all give a different output, so the comparison above catches them:
        wrong = {
            # the residual token with the positional embedding of index 1
            "residual with a position": torch.cat([cls, res + model.visual.positional_embedding[1], kept], 1),
            # the residual token first: [CLS] would then be read from the residual
            "residual at index 0": torch.cat([res, cls, kept], 1),
            # the patches of the *least* motion instead of the most
            "least motion": torch.cat([cls, res, least], 1),
            # the kept patches without their positional embeddings
            "patches without positions": torch.cat([cls, res, kept - kept_pos], 1),
            # no residual token at all
            "no residual": torch.cat([cls, kept], 1),
        }
        for name, tokens in wrong.items():
            assert not torch.allclose(got, plain_head(model.visual, tokens), atol=1e-3), name
        # the residual token skipping ln_pre
        assert not torch.allclose(got, plain_head(model.visual, torch.cat([cls, res, kept], 1), skip_ln_pre_at=1),
                                  atol=1e-3)
        # the anchor matters
        assert not torch.allclose(got, model.encode_reduced(images, motion, anchor.flip(0)), atol=1e-3)


def test_residual_token_sits_at_index_1_of_the_sequence(model):
    # The [CLS] output is invariant to the order of the non-[CLS] tokens (no mask, no position on the residual:
    # attention is permutation-equivariant), so the output alone cannot see where the residual goes. Shown here,
    # then the sequence entering ln_pre is read directly.
    images, motion, anchor = p_frame_inputs()
    with torch.no_grad():
        cls, res, kept = reference_tokens(model, images, motion, anchor)
        at1 = plain_head(model.visual, torch.cat([cls, res, kept], 1))
        last = plain_head(model.visual, torch.cat([cls, kept, res], 1))
        assert torch.allclose(at1, last, atol=1e-5)  # indistinguishable by output

        seen = []
        hook = model.visual.ln_pre.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
        try:
            model.encode_reduced(images, motion, anchor)
        finally:
            hook.remove()
        (x,) = seen
        assert x.shape == (2, 1 + 1 + 4, WIDTH)
        assert torch.allclose(x[:, 0], cls[:, 0], atol=1e-5)  # [CLS] + its position
        assert torch.allclose(x[:, 1], res[:, 0], atol=1e-5)  # residual_proj(anchor), no position
        # the kept patches, with their own positions (order free: compare as sets via sorting by first channel)
        got_p = x[:, 2:]
        for i in range(2):
            a = got_p[i][got_p[i][:, 0].argsort()]
            b = kept[i][kept[i][:, 0].argsort()]
            assert torch.allclose(a, b, atol=1e-5)


def test_p_frame_without_motion_in_motion_mode_is_refused(model):
    images, _, anchor = p_frame_inputs()
    with pytest.raises(BenchError, match="motion"):
        model.encode_reduced(images, None, anchor)


def test_training_mode_keeps_floor_count_of_random_patches(teacher):
    # drop 0.85 on 16 patches: 2.4 -> 2 kept in training (floor); 2 at inference (round) too, so use 0.7:
    # 16 * 0.3 = 4.8 -> 4 in training, 5 at inference
    m = ResidualViTModel(teacher, n_reduced=2, drop_rate=0.7, selection="motion")
    images, motion, anchor = p_frame_inputs()
    seen = []
    hook = m.visual.ln_pre.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        m.train()
        m.encode_reduced(images, None, anchor)  # training selects at random: no motion needed
        m.eval()
        m.encode_reduced(images, motion, anchor)
    finally:
        hook.remove()
    assert seen == [1 + 1 + 4, 1 + 1 + 5]


# --------------------------------------------------------------------------------------------------
# encode_video: the I/P schedule
# --------------------------------------------------------------------------------------------------


def video(t, seed=5, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, S, S, generator=g), torch.rand(b, t, G, G, generator=g)


def test_encode_video_schedule_n2(model, teacher):
    frames, motion = video(7)
    with torch.no_grad():
        out = model.encode_video(frames, motion)
        full = torch.stack([teacher.encode_frames(frames[:, f]) for f in range(7)], dim=1)
        assert out.shape == (2, 7, EMBED)
        # I-frames 0, 3, 6: the teacher's all-token features
        for f in (0, 3, 6):
            assert torch.allclose(out[:, f], full[:, f], atol=1e-6), f
        # P-frames: own pixels, own motion, their group's I-frame as anchor (1, 2 <- 0; 4, 5 <- 3)
        for f, a in ((1, 0), (2, 0), (4, 3), (5, 3)):
            ref = model.encode_reduced(frames[:, f], motion[:, f], full[:, a])
            assert torch.allclose(out[:, f], ref, atol=1e-5), f
            assert not torch.allclose(out[:, f], full[:, f], atol=1e-3), f  # reduced, not full
        # the wrong anchor (the previous frame, or the next group's I-frame) or another frame's motion differ
        assert not torch.allclose(out[:, 2], model.encode_reduced(frames[:, 2], motion[:, 2], out[:, 1]), atol=1e-3)
        assert not torch.allclose(out[:, 4], model.encode_reduced(frames[:, 4], motion[:, 4], full[:, 6]), atol=1e-3)
        assert not torch.allclose(out[:, 1], model.encode_reduced(frames[:, 1], motion[:, 0], full[:, 0]), atol=1e-3)
    assert model.reduced_mask(7).tolist() == [False, True, True, False, True, True, False]


def test_encode_video_anchor_every_overrides_the_group(model, teacher):
    frames, motion = video(4, seed=6)
    with torch.no_grad():
        out = model.encode_video(frames, motion, anchor_every=4)
        i0 = teacher.encode_frames(frames[:, 0])
        assert torch.allclose(out[:, 0], i0, atol=1e-6)
        for f in (1, 2, 3):  # frame 3 is a P-frame too (with the default group of 3 it would be an I-frame)
            ref = model.encode_reduced(frames[:, f], motion[:, f], i0)
            assert torch.allclose(out[:, f], ref, atol=1e-5), f
        assert not torch.allclose(out[:, 3], teacher.encode_frames(frames[:, 3]), atol=1e-3)


def test_schedule_reports_two_thirds_reduced(model):
    assert model.schedule()["reduced_fraction"] == 2 / 3
    assert ResidualViTModel(tiny_teacher(), n_reduced=5, drop_rate=0.85, selection="motion"
                            ).schedule()["reduced_fraction"] == 5 / 6


# --------------------------------------------------------------------------------------------------
# init_student: only the residual projection trains
# --------------------------------------------------------------------------------------------------


def test_only_the_residual_projection_trains():
    # embed_dim 8 != width 16, so the count tells Linear(D -> width) from Linear(width -> D)
    teacher = tiny_teacher(embed_dim=8)
    method = ResidualViT(ResidualViT.Params())
    student = method.init_student(teacher, None, SimpleNamespace(seed=0))
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert set(trainable) == {"residual_proj.weight", "residual_proj.bias"}
    assert trainable["residual_proj.weight"].shape == (16, 8) and trainable["residual_proj.bias"].shape == (16,)
    assert sum(p.numel() for p in trainable.values()) == 8 * 16 + 16 == 144
    assert method.record_info()["trainable_params"] == 144
    # the frozen base is the teacher's: same text features, same logit scale, same full-frame features
    tokens = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student.encode_text(tokens), teacher.encode_text(tokens))
        assert torch.equal(student.logit_scale(), teacher.logit_scale())
        img = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
        assert torch.equal(student.encode_frames(img), teacher.encode_frames(img))
    # the default Params are the recipe's
    p = ResidualViT.Params()
    assert (p.n_reduced, p.drop_rate, p.selection, p.loss) == (2, 0.85, "motion", "ce")


def test_init_student_needs_a_video_teacher():
    with pytest.raises(BenchError, match="VideoCLIP"):
        ResidualViT(ResidualViT.Params()).init_student(torch.nn.Linear(2, 2), None, SimpleNamespace(seed=0))


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


class LossCtx:
    def __init__(self, z, t, text=None, scale=None):
        self.z, self.t, self.text, self.scale = z, t, text, scale

    def student_outputs(self, batch):
        extras = {"text": self.text, "scale": self.scale} if self.text is not None else {}
        return Outputs(logits=self.z, extras=extras)

    def teacher_outputs(self, batch, index=0):
        return Outputs(logits=self.t)


def test_soft_target_ce_by_hand():
    # one clip, frame 0 (I) and frame 1 (P); two captions text = e1, e2; scale s = ln 3.
    #   P-frame teacher t1 = e1: logits (ln3, 0) -> p = (3/4, 1/4)
    #   P-frame student z1 = (e1 + e2)/sqrt2: logits (ln3/sqrt2, ln3/sqrt2) -> q = (1/2, 1/2)
    #   CE = -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2 = 0.6931472
    # teacher and student swapped it would be -(1/2 ln 3/4 + 1/2 ln 1/4) = ln(16/3) / 2 = 0.8369882;
    # frame 0 (z0 = t0 = e1) would add the entropy H(3/4, 1/4) = 0.5623351, the mean then 0.6277411
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e1, (e1 + e2) / math.sqrt(2)])[None].requires_grad_(True)  # (B=1, F=2, D=2)
    t = torch.stack([e1, e1])[None]
    text = torch.stack([e1, e2])
    method = ResidualViT(ResidualViT.Params())
    loss = method.training_step({}, LossCtx(z, t, text, torch.tensor(math.log(3.0))))["student"]
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert torch.all(z.grad[:, 0] == 0)  # the I-frame is not in the loss
    assert method.on_step_end(None)["distill"] == pytest.approx(0.6931472, abs=1e-6)


def test_soft_target_ce_formula_over_p_frames():
    g = torch.Generator().manual_seed(0)
    b, f, d = 3, 4, 5
    z = F.normalize(torch.randn(b, f, d, generator=g), dim=-1).requires_grad_(True)
    t = F.normalize(torch.randn(b, f, d, generator=g), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    s = torch.tensor(20.0)
    per_frame = []
    for i in range(1, f):  # P-frames only
        p = torch.softmax(s * t[:, i] @ text.T, dim=-1)
        log_q = torch.log_softmax(s * z[:, i] @ text.T, dim=-1)
        per_frame.append(-(p * log_q).sum(-1).mean())
    expected = torch.stack(per_frame).mean()
    with_i_frame = torch.stack([-(torch.softmax(s * t[:, i] @ text.T, -1) *
                                  torch.log_softmax(s * z[:, i] @ text.T, -1)).sum(-1).mean() for i in range(f)]).mean()
    loss = ResidualViT(ResidualViT.Params()).training_step({}, LossCtx(z, t, text, s))["student"]
    assert torch.allclose(loss, expected.detach(), atol=1e-6)
    assert not torch.allclose(loss, with_i_frame.detach(), atol=1e-3)
    loss.backward()
    assert t.grad is None  # the teacher's side is a target
    assert torch.all(z.grad[:, 0] == 0) and torch.all(z.grad[:, 1:].abs().sum(-1) > 0)


def test_mse_variant_by_hand_and_formula():
    # by hand: D = 4, P-frame z1 = e1, t1 = e2: ||z - t||^2 = 2, / sqrt(4) = 1, x 100 = 100.
    # frame 0 (z0 = e1, t0 = -e1: 4 / 2 x 100 = 200) is left out; with it the mean would be 150
    eye = torch.eye(4)
    z = torch.stack([eye[0], eye[0]])[None]
    t = torch.stack([-eye[0], eye[1]])[None]
    method = ResidualViT(ResidualViT.Params(loss="mse"))
    assert method.training_step({}, LossCtx(z, t))["student"].item() == pytest.approx(100.0, abs=1e-4)

    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(3, 4, 6, generator=g), dim=-1)
    t = F.normalize(torch.randn(3, 4, 6, generator=g), dim=-1)
    rows = [((z[i, j] - t[i, j]) ** 2).sum() / math.sqrt(6) for i in range(3) for j in range(1, 4)]
    expected = 100 * torch.stack(rows).mean()
    assert torch.allclose(method.training_step({}, LossCtx(z, t))["student"], expected, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------------


def test_optim_overrides_are_the_training_scripts():
    # ResidualViT_token_dropping.sh: --lr 5e-4 --wd 0.0 --warmup 0, const scheduler; AdamW (0.9, 0.98), eps 1e-6
    assert ResidualViT.optim_overrides == {"lr": 5e-4, "weight_decay": 0.0, "warmup_ratio": 0.0,
                                           "schedule": "constant", "betas": (0.9, 0.98), "eps": 1e-6}
    from dataclasses import fields

    from bench.api import OptimConfig

    assert set(ResidualViT.optim_overrides) <= {f.name for f in fields(OptimConfig)}
