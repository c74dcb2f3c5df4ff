"""DMAE (Bai et al. 2023): masking, patch layout, the masked pixel loss and the normalised-feature L1 loss
against numbers worked out by hand; the visible-token encoder against timm's own forward pass."""

from __future__ import annotations

import pytest
import torch
from bench.methods._modules import MAEHead
from bench.methods.dmae import (
    DMAE,
    aligned_block,
    encode_visible,
    feature_loss,
    masked_pixel_loss,
    patchify,
    random_masking,
)
from torch import nn


def test_aligned_blocks_at_three_quarters_depth_match_the_official_recipe():
    assert aligned_block(12, None) == 8 and aligned_block(24, None) == 17  # pretrain.sh: 8 (ViT-B), 17 (ViT-L)
    assert aligned_block(4, None) == 2 and aligned_block(4, 1) == 1


def test_random_masking_keeps_the_lowest_noise_patches_and_restores_them_in_place():
    # random_masking_customized: noise ~ U(0, 1) per patch, the int(L (1 - r)) patches of lowest noise are kept
    # (in ascending noise order). The noise is the first draw from the generator, so it can be replayed here.
    torch.manual_seed(0)
    noise = torch.rand(3, 16)
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(3, 16, 0.75)
    for b in range(3):
        by_noise = sorted(range(16), key=lambda i: noise[b, i].item())
        assert ids_keep[b].tolist() == by_noise[:4]
        assert mask[b].tolist() == [0.0 if i in by_noise[:4] else 1.0 for i in range(16)]
    # ids_restore puts [visible tokens ; mask tokens] back in patch order: visible patch i gets its own token
    # (here the token's value is its patch index), every masked patch a mask token (-1).
    tokens = torch.cat([ids_keep.float(), -torch.ones(3, 12)], dim=1)
    restored = torch.gather(tokens, 1, ids_restore)
    for b in range(3):
        assert restored[b].tolist() == [float(i) if mask[b, i] == 0 else -1.0 for i in range(16)]


def test_patchify_orders_patches_by_row_and_pixels_by_row_column_channel():
    img = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4)
    patches = patchify(img, 2)
    assert patches.shape == (1, 4, 12)
    # Patch 1 is the top-right 2x2 block: rows 0-1, columns 2-3; inside, (row, column) then channel.
    expected = [img[0, c, r, col].item() for r in (0, 1) for col in (2, 3) for c in range(3)]
    assert patches[0, 1].tolist() == expected


def test_masked_pixel_loss_by_hand():
    # Two patches of two values; predictions 0. Patch 0 errors (1, 3) -> mean 5; patch 1 errors (2, 2) -> 4.
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    pred = torch.zeros_like(target)
    assert masked_pixel_loss(pred, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(5.0)
    assert masked_pixel_loss(pred, target, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(4.0)
    assert masked_pixel_loss(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(4.5)


def test_feature_loss_by_hand():
    # Student [3, 4] through an identity projection normalises to [.6, .8]; teacher [2, 0] to [1, 0].
    # L1 mean = (|.6 - 1| + |.8 - 0|) / 2 = .6.
    proj = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(2))
    loss = feature_loss(torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[2.0, 0.0]]]), proj)
    assert loss.item() == pytest.approx(0.6)


def test_visible_encoder_with_nothing_masked_is_timms_forward_features():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    keep = torch.arange(16).expand(2, 16)
    outs, final = encode_visible(vit, x, keep)
    with torch.no_grad():
        assert torch.allclose(final, vit.forward_features(x), atol=1e-5)


def test_visible_encoder_runs_the_blocks_on_the_class_token_and_the_kept_patches_only():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[5, 0, 9], [3, 14, 7]])
    with torch.no_grad():
        outs, final = encode_visible(vit, x, keep)
        _, second = encode_visible(vit, x, keep, upto=1)
        # By hand: patch p of image b is the 4x4 window at row p // 4, column p % 4, embedded by the patch
        # convolution and given position embedding p + 1 (index 0 is the class token's).
        w, bias = vit.patch_embed.proj.weight, vit.patch_embed.proj.bias
        rows = []
        for b in range(2):
            tokens = [vit.cls_token[0, 0] + vit.pos_embed[0, 0]]
            for p in keep[b].tolist():
                window = x[b, :, 4 * (p // 4):4 * (p // 4) + 4, 4 * (p % 4):4 * (p % 4) + 4]
                tokens.append((w * window).sum(dim=(1, 2, 3)) + bias + vit.pos_embed[0, 1 + p])
            rows.append(torch.stack(tokens))
        h = torch.stack(rows)  # [2, 1 + 3, 32]
        expected = []
        for blk in vit.blocks:
            h = blk(h)
            expected.append(h)
    assert len(outs) == 3 and all(torch.allclose(o, e, atol=1e-5) for o, e in zip(outs, expected))
    assert torch.allclose(final, vit.norm(expected[-1]), atol=1e-5)
    # Stopping at block 1 returns block 1's output, before the final norm.
    assert torch.allclose(second, expected[1], atol=1e-5)


class _Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x):
        return self.s * x


class _Normalised(nn.Module):
    """The task's wrapper: ``net`` is the ViT, ``normalize`` maps pixels in [0, 1] to (p - 0.5) / 0.25."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def normalize(self, pixels):
        return (pixels - 0.5) / 0.25


def _hand_vit(patch_channel: int, cls: list[float], scales: list[float]):
    """A 2-wide timm ViT on 8x8 images, patch 4 (4 patches), whose token for a patch of constant normalised value
    n is n in channel ``patch_channel`` and 1 in the other; no position embedding; class token ``cls``; each block
    multiplies by its scale."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=2, depth=len(scales), num_heads=1, num_classes=3)
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.weight[patch_channel] = 1.0 / 48  # the mean over the patch's 3 x 4 x 4 values
        vit.patch_embed.proj.bias.copy_(torch.tensor([1.0, 1.0]))
        vit.patch_embed.proj.bias[patch_channel] = 0.0
        vit.pos_embed.zero_()
        vit.cls_token.copy_(torch.tensor(cls).view(1, 1, 2))
    vit.blocks = nn.ModuleList([_Scale(s) for s in scales])
    return _Normalised(vit)


class _DMAECtx:
    def __init__(self, student, teacher):
        self.student, self.teacher, self.generation = student, teacher, 0

    def run_teacher(self, fn, n_examples, index=0):
        with torch.no_grad():
            return fn(self.teacher)


def test_pretraining_step_losses_by_hand():
    # Patches (row-major) of constant raw value .5, .75, 1, .25: normalised n = 0, 1, 2, -1 (the target is the
    # normalised image). One patch of four stays visible (ratio .75). The decoder predicts 0 (zeroed output layer),
    # so the pixel loss is the mean over the 3 masked patches of n^2: (0 + 1 + 4 + 1 - n_vis^2) / 3.
    # Features, aligned block ceil(.75 * 4) - 1 = 2 on both sides (the block after it flips the sign, so a wrong
    # block shows): student tokens [n, 1] (class [1, 0]) times 1 * 2 * 3; teacher tokens [1, n] (class [0, 1]).
    # With an identity projection the L1 of the L2-normalised pairs, over 2 tokens x 2 channels, is
    # (|1 - 0| + |0 - 1| + 2 |n - 1| / sqrt(1 + n^2)) / 4.
    values = [0.5, 0.75, 1.0, 0.25]
    n = [0.0, 1.0, 2.0, -1.0]
    pixels = torch.zeros(1, 3, 8, 8)
    for p, v in enumerate(values):
        pixels[0, :, 4 * (p // 2):4 * (p // 2) + 4, 4 * (p % 2):4 * (p % 2) + 4] = v
    student = _hand_vit(0, [1.0, 0.0], [1.0, 2.0, 3.0, -1.0])
    teacher = _hand_vit(1, [0.0, 1.0], [2.0, 1.0, 1.0, -1.0])
    method = DMAE(DMAE.Params(decoder_dim=8, decoder_depth=1, decoder_heads=1))
    method.init_student(teacher, student, type("C", (), {"seed": 0})())
    assert (method.info["student_block"], method.info["teacher_block"]) == (2, 2)
    with torch.no_grad():
        method.head.decoder_pred.weight.zero_()
        method.head.decoder_pred.bias.zero_()
        method.head.proj.weight.copy_(torch.eye(2))
        method.head.proj.bias.zero_()
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        visible = int(torch.rand(1, 4).argmin())  # the mask's noise is the step's first random draw
        if visible in seen:
            continue
        seen.add(visible)
        torch.manual_seed(seed)
        losses = method.training_step({"pixels": pixels, "index": torch.arange(1)}, _DMAECtx(student, teacher))
        nv = n[visible]
        pixel = (6.0 - nv ** 2) / 3
        feat = (2.0 + 2 * abs(nv - 1) / (1 + nv ** 2) ** 0.5) / 4
        assert method._last["pixel_loss"] == pytest.approx(pixel, rel=1e-5), visible
        assert method._last["feature_loss"] == pytest.approx(feat, rel=1e-5), visible
        assert losses["student"].item() == pytest.approx(pixel + feat, rel=1e-5)
        assert losses["dmae"].item() == pytest.approx(pixel + feat, rel=1e-5)
    assert seen == {0, 1, 2, 3}


def test_fine_tuning_generation_trains_on_labels_only():
    method = DMAE(DMAE.Params())

    class Ctx:
        generation = 1

        def student_outputs(self, batch):
            return "outputs"

        def label_loss(self, outputs, batch):
            return torch.tensor(1.25) if (outputs, batch["labels"]) == ("outputs", 7) else torch.tensor(-1.0)

    assert method.training_step({"labels": 7}, Ctx()) == {"student": torch.tensor(1.25)}


def test_decoder_reconstructs_every_patch():
    head = MAEHead(student_dim=32, teacher_dim=64, num_patches=16, patch_pixels=48, decoder_dim=16, decoder_depth=1,
                   decoder_heads=2)
    _, ids_restore, _ = random_masking(2, 16, 0.75)
    assert head.decode(torch.randn(2, 1 + 4, 32), ids_restore).shape == (2, 16, 48)
    assert head.proj.in_features == 32 and head.proj.out_features == 64


def test_two_phases_share_one_student():
    plan = DMAE(DMAE.Params()).generations(10)
    assert [g.steps for g in plan] == [5, 5] and not any(g.fresh_student for g in plan)
    p = DMAE.Params()
    assert (p.mask_ratio, p.decoder_dim, p.decoder_depth) == (0.75, 512, 8)
