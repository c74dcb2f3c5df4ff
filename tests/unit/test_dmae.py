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


def test_random_masking_keeps_a_quarter_and_agrees_with_its_mask():
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(3, 16, 0.75)
    assert ids_keep.shape == (3, 4) and mask.sum(1).tolist() == [12, 12, 12]
    for b in range(3):
        assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())
    assert (torch.gather(torch.argsort(ids_restore, 1), 1, ids_restore) == torch.arange(16)).all()


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
    # Stopping at a block returns that block's output before the final norm.
    _, third = encode_visible(vit, x, keep, upto=1)
    assert torch.allclose(third, outs[1])


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
