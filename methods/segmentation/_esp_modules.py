"""The networks of ESP-MedSAM (`esp_medsam`), built around the SAM / MobileSAM library classes.

* **Modality Controller** (E:SAM/modeling/student_encoder.py of xq141839/ESP-MedSAM @ 9c3ade6): in every
  attention block of the TinyViT student (mobile_sam ``TinyViTBlock`` with its ``Attention``), one learnable
  prefix token per head, ``deep_QKV_embeddings_med`` (heads, 1, head_dim), concatenated to the keys *and* the
  values (one tensor for both, as the code); a scalar ``med_attention_biases`` added to the logits of that
  prefix column (TinyViT's relative biases stay on the other columns); and a parallel MLP expert ``med_dah``
  (LayerNorm, Linear d -> 4d, GELU, Linear 4d -> d) added next to the block's MLP: x <- x + MLP(x) + med_dah(x).
  Every controller parameter has ``med`` in its name, which is how the code selects them (D:train.py).
  `ModalityAttention` / `ModalityTinyViTBlock` take over the original layers (same submodules, same names and
  weights); with the controller off they compute exactly what the original modules compute.
* **Medical teacher** F_ViT-Med: a SAM ``ImageEncoderViT`` whose ``Block``s get the same three additions
  (`ModalityViTAttention`, `ModalityViTBlock`; the relative-position terms stay on the image-token columns).
  Its architecture is not in the released code (research note §2: [U]); it mirrors the student's controller.
* **SPPG + QDMD** (`ESPHeads`, E:model.py and E:SAM/modeling/mask_decoder.py): a patch head at half the
  embedding grid, its detached hard (> 0.5) prompt upsampled x2 and embedded by ``dense_prompter`` and added to
  the image embedding; ``mask_query`` (num_modalities + 1 learned tokens) through SAM's ``TwoWayTransformer``
  and output upscaling, ONE hypernetwork MLP shared by the tokens 0..num_modalities-1, read out at ``mcls``.

Losses of the supervised stage (`binary_mask_loss`, `sppg_target`, `sppg_loss`) live here too.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import (Block, add_decomposed_rel_pos, window_partition,
                                                     window_unpartition)
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn

from bench import BenchError
from bench.tasks.sam.model import PromptableSAM

#: E:student_encoder.py: the prefix tokens are drawn from U(-v, v), v = sqrt(6 / (3 * 16 * 16 + 16)) = 0.0875.
PREFIX_INIT = math.sqrt(6.0 / (3 * 16 * 16 + 16))
#: E:model.py patch_decoder: Conv2d(256, 64, 2, 2) -> the hidden width of the patch head.
PATCH_HIDDEN = 64


def _tinyvit_classes() -> tuple[type, type]:
    import sys

    from bench.tasks.sam import model as _model  # noqa: F401  (imports mobile_sam without touching timm)

    mod = sys.modules["mobile_sam.modeling.tiny_vit_sam"]
    return mod.TinyViTBlock, mod.Attention


def med_expert(dim: int) -> nn.Sequential:
    """``med_dah``: LayerNorm -> Linear d->4d -> GELU -> Linear 4d->d; trunc_normal(0.02) weights, zero biases
    (E:student_encoder.py 684-691)."""
    net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


def _prefix(heads: int, head_dim: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(heads, 1, head_dim).uniform_(-PREFIX_INIT, PREFIX_INIT))


# --------------------------------------------------------------------------------------------------
# Student: SemiTViT = TinyViT + one Modality Controller
# --------------------------------------------------------------------------------------------------


class ModalityAttention(nn.Module):
    """mobile_sam ``Attention`` with a prefix K/V token per head and a prefix-logit bias (``med_on``)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if attn.key_dim != attn.d:
            raise BenchError(f"esp_medsam: the prefix token is shared by keys and values, so key_dim ({attn.key_dim}) "
                             f"must equal the value width ({attn.d}) (TinyViT blocks use attn_ratio 1)")
        for name in ("num_heads", "scale", "key_dim", "nh_kd", "d", "dh", "attn_ratio"):
            setattr(self, name, getattr(attn, name))
        self.norm, self.qkv, self.proj = attn.norm, attn.qkv, attn.proj
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        self.deep_QKV_embeddings_med = _prefix(self.num_heads, self.key_dim)
        self.med_attention_biases = nn.Parameter(torch.zeros(1))
        self.med_on = False

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x)
        q, k, v = qkv.view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N), = the original's ``ab``
        if not self.med_on:  # the original computation, operation for operation
            attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        else:
            p = self.deep_QKV_embeddings_med.unsqueeze(0).expand(b, -1, -1, -1)  # (B, heads, 1, d)
            k, v = torch.cat([p, k], dim=2), torch.cat([p, v], dim=2)
            col = self.med_attention_biases.view(1, 1, 1).expand(self.num_heads, n, 1)
            attn = (q @ k.transpose(-2, -1)) * self.scale + torch.cat([col, bias], dim=-1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.dh)
        return self.proj(x)


class ModalityTinyViTBlock(nn.Module):
    """mobile_sam ``TinyViTBlock`` with the controller: the attention above and ``med_dah`` beside the MLP."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name in ("dim", "input_resolution", "num_heads", "window_size", "mlp_ratio"):
            setattr(self, name, getattr(block, name))
        self.drop_path = block.drop_path
        self.attn = ModalityAttention(block.attn)
        self.mlp = block.mlp
        self.local_conv = block.local_conv
        self.med_dah = med_expert(block.dim)

    @property
    def med_on(self) -> bool:
        return self.attn.med_on

    @med_on.setter
    def med_on(self, on: bool) -> None:
        self.attn.med_on = bool(on)

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        res = x
        ws = self.window_size
        if h == ws and w == ws:
            x = self.attn(x)
        else:
            x = x.view(b, h, w, c)
            pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            x = self.attn(x)
            x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            if pad_b or pad_r:
                x = x[:, :h, :w].contiguous()
            x = x.view(b, n, c)
        x = res + self.drop_path(x)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.local_conv(x)
        x = x.view(b, c, n).transpose(1, 2)
        if self.med_on:  # E:466: x + DropPath(MLP(x)) + med_dah(x)
            return x + self.drop_path(self.mlp(x)) + self.med_dah(x)
        return x + self.drop_path(self.mlp(x))


def add_controller(encoder: nn.Module) -> int:
    """Replace every TinyViT attention block of ``encoder`` by a `ModalityTinyViTBlock` (in place); returns how many."""
    block_cls, _ = _tinyvit_classes()
    n = 0
    for layer in getattr(encoder, "layers", []):
        blocks = getattr(layer, "blocks", None)
        if blocks is None:
            continue
        for i, blk in enumerate(blocks):
            if isinstance(blk, block_cls):
                blocks[i] = ModalityTinyViTBlock(blk)
                n += 1
    if n == 0:
        raise BenchError(f"esp_medsam: the student's image encoder ({type(encoder).__name__}) has no mobile_sam "
                         f"TinyViT attention blocks; the Modality Controller is defined on TinyViT (SemiTViT)")
    return n


def is_controller(name: str) -> bool:
    """A Modality Controller parameter: its name contains ``med`` (D:train.py selects them so)."""
    return "med" in name


# --------------------------------------------------------------------------------------------------
# SPPG + QDMD
# --------------------------------------------------------------------------------------------------


class ESPHeads(nn.Module):
    """Self-Patch Prompt Generator and Query-Decoupled Modality Decoder (see the module docstring)."""

    def __init__(self, dim: int, *, depth: int, heads: int, mlp_dim: int, num_modalities: int = 6, mcls: int = 4,
                 patch_hidden: int = PATCH_HIDDEN) -> None:
        super().__init__()
        if not 0 <= mcls < num_modalities:
            raise BenchError(f"esp_medsam: modality index {mcls} outside 0..{num_modalities - 1}")
        self.num_modalities, self.mcls = num_modalities, mcls
        self.patch_decoder = nn.Sequential(nn.Conv2d(dim, patch_hidden, kernel_size=2, stride=2),
                                           LayerNorm2d(patch_hidden), nn.GELU(), nn.Conv2d(patch_hidden, 1, 1))
        self.dense_prompter = nn.Sequential(nn.Conv2d(1, dim, 1), LayerNorm2d(dim), nn.GELU())
        self.mask_query = nn.Embedding(num_modalities + 1, dim)
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads)
        self.output_upscaling = nn.Sequential(  # SAM's MaskDecoder.output_upscaling
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU())
        # E:mask_decoder.py 51-56: ``for i in range(1)`` -> one MLP for every query token.
        self.output_hypernetwork = MLP(dim, dim, dim // 8, 3)

    def prompt(self, patch_logits: Tensor, grid: int) -> Tensor:
        """Detached hard patch prompt: sigmoid > 0.5, nearest upsampling to the embedding grid (x2), embedded."""
        hard = (torch.sigmoid(patch_logits.detach()) > 0.5).to(patch_logits.dtype)
        return self.dense_prompter(F.interpolate(hard, size=(grid, grid), mode="nearest"))

    def all_masks(self, emb: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """(B, num_modalities, 4h, 4w) low-resolution mask logits (one per query token) and the patch logits."""
        b, c, h, w = emb.shape
        patch = self.patch_decoder(emb)
        src = emb + self.prompt(patch, h)
        tokens = self.mask_query.weight.unsqueeze(0).expand(b, -1, -1)
        pos = torch.repeat_interleave(pe, b, dim=0)
        hs, keys = self.transformer(src, pos, tokens)
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = self.output_hypernetwork(hs[:, : self.num_modalities])  # (B, K, C/8): one shared MLP
        ub, uc, uh, uw = up.shape
        masks = (hyper @ up.view(ub, uc, uh * uw)).view(ub, -1, uh, uw)
        return masks, patch

    def forward(self, emb: Tensor, pe: Tensor, mcls: int | None = None) -> tuple[Tensor, Tensor]:
        """The read-out mask (channel ``mcls``, default the configured modality) and the patch logits."""
        k = self.mcls if mcls is None else int(mcls)
        if not 0 <= k < self.num_modalities:
            raise BenchError(f"esp_medsam: mcls {k} outside 0..{self.num_modalities - 1}")
        masks, patch = self.all_masks(emb, pe)
        return masks[:, k:k + 1], patch


class SelfPrompting:
    """Prompt-free segmentation through the ESP heads ``esp`` of a model with ``embed``, ``prompt_encoder`` (its
    dense positional encoding) and ``img_size``: the student and the medical teacher alike."""

    def segment(self, images: Tensor, mcls: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B,1,S,S) mask logits, patch logits and the image embedding (the student: at its current ``modality``)."""
        emb = self.embed(images)
        low, patch = self.esp(emb, self.prompt_encoder.get_dense_pe(), mcls)
        return F.interpolate(low, (self.img_size, self.img_size), mode="bilinear", align_corners=False), patch, emb

    def segment_auto(self, images: Tensor, mcls: int | None = None) -> Tensor:
        return self.segment(images, mcls)[0]


class ESPStudent(SelfPrompting, PromptableSAM):
    """The task's TinyViT `PromptableSAM` made into ESP-MedSAM's student: SemiTViT (shared TinyViT + one Modality
    Controller for modality ``controller``) and the ESP heads (``esp``). ``modality`` switches the controller:
    None = off = the plain shared backbone (what the task's prompted evaluation sees)."""

    def __init__(self, base: PromptableSAM, heads: ESPHeads, controller: int) -> None:
        super().__init__(base.image_encoder, base.prompt_encoder, base.mask_decoder, base.config)
        self.controller_blocks = add_controller(self.image_encoder)
        self.esp = heads
        self.controller = int(controller)
        self._modality: int | None = None

    @property
    def modality(self) -> int | None:
        return self._modality

    @modality.setter
    def modality(self, value: int | None) -> None:
        if value is not None and int(value) != self.controller:
            raise BenchError(f"esp_medsam: this student has a Modality Controller for modality {self.controller} "
                             f"only (one controller per checkpoint, as the released models); got {value}")
        self._modality = None if value is None else int(value)
        for m in self.image_encoder.modules():
            if isinstance(m, ModalityTinyViTBlock):
                m.med_on = value is not None



# --------------------------------------------------------------------------------------------------
# The medical teacher: SAM ViT + prefix K/V + parallel MLP + its own ESP heads
# --------------------------------------------------------------------------------------------------


class ModalityViTAttention(nn.Module):
    """segment_anything ``Attention`` with a prefix K/V token per head and a prefix-logit bias (always on)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        self.qkv, self.proj = attn.qkv, attn.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        head_dim = attn.qkv.out_features // 3 // attn.num_heads
        self.deep_QKV_embeddings_med = _prefix(self.num_heads, head_dim)
        self.med_attention_biases = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        qs = q * self.scale
        attn = qs @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        p = self.deep_QKV_embeddings_med.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * self.num_heads, 1, -1)
        col = qs @ p.transpose(-2, -1) + self.med_attention_biases
        attn = torch.cat([col, attn], dim=-1).softmax(dim=-1)
        x = (attn @ torch.cat([p, v], dim=1)).view(b, self.num_heads, h, w, -1)
        return self.proj(x.permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


class ModalityViTBlock(nn.Module):
    """segment_anything ``Block`` + the controller: x <- x + MLP(norm2(x)) + med_dah(x)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2, self.mlp, self.window_size = block.norm1, block.norm2, block.mlp, block.window_size
        self.attn = ModalityViTAttention(block.attn)
        self.med_dah = med_expert(block.norm1.normalized_shape[0])

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x)) + self.med_dah(x)


class MedicalTeacher(SelfPrompting, nn.Module):
    """F_ViT-Med: a copy of the foundation teacher's ViT encoder (frozen) with a controller per block and its own
    ESP heads (trainable); the prompt encoder's copy gives the dense positional encoding."""

    def __init__(self, teacher: PromptableSAM, heads: ESPHeads) -> None:
        super().__init__()
        self.image_encoder = copy.deepcopy(teacher.image_encoder)
        self.prompt_encoder = copy.deepcopy(teacher.prompt_encoder)
        for p in self.parameters():
            p.requires_grad_(False)
        blocks = getattr(self.image_encoder, "blocks", None)
        if blocks is None or not all(isinstance(b, Block) for b in blocks):
            raise BenchError(f"esp_medsam: the foundation teacher's encoder ({type(teacher.image_encoder).__name__}) "
                             f"is not a segment_anything ImageEncoderViT; the medical teacher is a SAM ViT")
        for i, blk in enumerate(blocks):
            blocks[i] = ModalityViTBlock(blk)
        self.esp = heads
        self.img_size = int(teacher.img_size)

    def embed(self, images: Tensor) -> Tensor:
        return self.image_encoder(images)



# --------------------------------------------------------------------------------------------------
# Losses of the supervised stage
# --------------------------------------------------------------------------------------------------


def binary_mask_loss(prob: Tensor, target: Tensor, weight: float = 0.8, smooth: float = 1.0) -> Tensor:
    """BinaryMaskLoss(w) on probabilities, sums over the whole batch (the author's loss.py style):
    w (1 - (2 sum pg + s) / (sum p + sum g + s)) + (1 - w) 0.8 (1 - exp(-BCE))^2 BCE, BCE the mean."""
    prob, target = prob.float(), target.float()
    dice = (2.0 * (prob * target).sum() + smooth) / (prob.sum() + target.sum() + smooth)
    bce = F.binary_cross_entropy(prob, target, reduction="mean")
    focal = 0.8 * (1.0 - torch.exp(-bce)) ** 2 * bce
    return weight * (1.0 - dice) + (1.0 - weight) * focal


def sppg_target(mask: Tensor, patch_hw: int) -> Tensor:
    """The patch label: max pooling of the (B,1,S,S) mask over S/patch_hw cells (D:train.py: max_pool2d(GT, 32, 32))."""
    size = mask.shape[-1]
    if size % patch_hw:
        raise BenchError(f"esp_medsam: mask side {size} is not a multiple of the patch grid {patch_hw}")
    k = size // patch_hw
    return F.max_pool2d(mask.float(), k, k)


def sppg_loss(patch_logits: Tensor, mask: Tensor) -> Tensor:
    """L_SPPG = BCE(sigmoid(patch logits), max-pooled mask) (the commented-out ``nn.BCELoss()`` of D:train.py)."""
    target = sppg_target(mask, patch_logits.shape[-1])
    return F.binary_cross_entropy(torch.sigmoid(patch_logits.float()), target)
