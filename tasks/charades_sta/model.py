"""Models of the ``charades_sta`` task: a CLIP frame encoder + text encoder (open_clip's ``CLIP`` class, used as
a library), and the interface every grounding model offers the task (`VideoCLIP`).

The task's grounding procedure needs two things of a model: a feature per video frame (``encode_video``) and a
feature per query (``encode_text``); cosine similarity between them is the whole protocol. Methods change only
how frame features are made (DESIGN.md, "grounding"): a ResidualViT student encodes most frames with few tokens,
a frame-skipping one encodes some frames and fills in the rest, a KD student is a smaller frame encoder. All of
them keep the teacher's text encoder and logit scale, frozen (`share_text`), so every row is scored against the
same query features and differs only in its frame features.

The ViT token helpers (`vit_tokens`, `vit_head`) split open_clip's ``VisionTransformer.forward`` into the part
before the transformer (patch embedding, [CLS], positional embedding) and the part after it, so a method can
run the transformer on a chosen subset of tokens plus tokens of its own (ResidualViT) with the foundation model's
weights unchanged. They follow open_clip 3.x's attribute names (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer``, ``ln_post``, ``proj``), the same for the tiny models
built from configs here and for the official OpenAI CLIP weights loaded at the full tier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    pass

# open_clip's OPENAI_DATASET_MEAN / STD (the normalisation every OpenAI CLIP was trained with)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipConfig(BaseModel):
    """A CLIP built from a config (open_clip ``CLIPVisionCfg`` / ``CLIPTextCfg`` fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 32
    vocab_size: int = 49408  # the CLIP BPE tokenizer's vocabulary (open_clip.tokenizer.SimpleTokenizer)


def build_clip(cfg: ClipConfig, seed: int) -> nn.Module:
    """An open_clip ``CLIP`` with random weights (open_clip's own initialisation), seeded."""
    import open_clip

    torch.manual_seed(seed)
    vision = open_clip.CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=cfg.width // cfg.heads,
                                     patch_size=cfg.patch_size, image_size=cfg.image_size)
    text = open_clip.CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                                 heads=cfg.text_heads, layers=cfg.text_layers)
    return open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)


def tokenize(sentences: list[str], context_length: int) -> torch.Tensor:
    """CLIP BPE tokens (open_clip's SimpleTokenizer; its vocabulary ships inside the package, no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)(sentences)


def vit_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[CLS] + patch tokens with positional embeddings added: (B, 1 + h*w, width), before ``ln_pre``."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def vit_head(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``ln_pre`` -> transformer -> ``ln_post`` of [CLS] -> ``proj``: the image embedding (not normalised)."""
    x = visual.transformer(visual.ln_pre(tokens))
    pooled = visual.ln_post(x[:, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled


def grid_size(visual: nn.Module) -> tuple[int, int]:
    return tuple(int(g) for g in visual.grid_size)


class VideoCLIP(nn.Module):
    """A CLIP seen as a video encoder: every frame through the whole image encoder (the teacher, the KD
    student). Subclasses (methods' students) change ``encode_video``; ``encode_text`` is the task's."""

    def __init__(self, clip: nn.Module, context_length: int) -> None:
        super().__init__()
        self.clip = clip
        self.context_length = int(context_length)

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100.0)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) normalised embeddings, every token."""
        return F.normalize(vit_head(self.visual, vit_tokens(self.visual, images)), dim=-1)

    def encode_video(self, frames: torch.Tensor, motion: torch.Tensor | None = None,
                     anchor_every: int | None = None) -> torch.Tensor:
        """(B, T, 3, H, W) frames of B clips -> (B, T, D) normalised frame features. ``motion`` (B, T, h, w) is
        each frame's per-patch motion; ``anchor_every`` overrides how often a model that encodes some frames
        cheaply encodes one in full (training clips: frame 0 of each clip); this model encodes every frame."""
        b, t = frames.shape[:2]
        return self.encode_frames(frames.flatten(0, 1)).view(b, t, -1)

    def schedule(self) -> dict[str, Any]:
        """How this model encodes a video, for the record: the share of frames encoded cheaply, and how."""
        return {"kind": "every frame in full", "reduced_fraction": 0.0}


class OnTeacher(nn.Module):
    """Base of the video encoders a method builds on a *frozen copy of the teacher* (ResidualViT's P-frames,
    frame skipping): the teacher's text side and full-frame path, unchanged; subclasses add their schedule."""

    def __init__(self, teacher: VideoCLIP) -> None:
        super().__init__()
        import copy

        self.base = copy.deepcopy(teacher)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.context_length = self.base.context_length

    @property
    def clip(self) -> nn.Module:
        return self.base.clip

    @property
    def visual(self) -> nn.Module:
        return self.base.visual

    def logit_scale(self) -> torch.Tensor:
        return self.base.logit_scale()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.base.encode_text(tokens)

    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.encode_frames(images)


def share_text(student: VideoCLIP, teacher: VideoCLIP) -> None:
    """Give ``student`` the teacher's text encoder and logit scale, frozen: every row is scored against the same
    query features (the task's text side), and only frame features differ."""
    s, t = student.clip, teacher.clip
    for name in ("token_embedding", "transformer", "ln_final"):
        getattr(s, name).load_state_dict(getattr(t, name).state_dict())
    s.positional_embedding.data.copy_(t.positional_embedding.data)
    s.text_projection.data.copy_(t.text_projection.data)
    s.logit_scale.data.copy_(t.logit_scale.data)
    if getattr(t, "attn_mask", None) is not None:
        s.attn_mask = t.attn_mask
    for p in text_parameters(student):
        p.requires_grad_(False)


def text_parameters(model: VideoCLIP) -> list[nn.Parameter]:
    c = model.clip
    out = [c.positional_embedding, c.text_projection, c.logit_scale]
    for name in ("token_embedding", "transformer", "ln_final"):
        out += list(getattr(c, name).parameters())
    return out
