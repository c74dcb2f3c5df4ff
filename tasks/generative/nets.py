"""Denoiser networks of the generative tasks' smoke and small tiers: a pixel-space diffusers ``UNet2DModel``
with a conditioning vector added to its time embedding.

``UNet2DModel(class_embed_type="identity")`` adds whatever vector it is given as ``class_labels`` to the
timestep embedding; `CondUNet` makes that vector from the condition:

* class-conditional (``num_classes``): an embedding row per class plus one for the null condition
  (classifier-free guidance's "no class", Ho & Salimans 2022);
* prompt-conditional (``vocab_size`` and ``max_len``): the prompt's token ids (padded to ``max_len``) are
  embedded per position and flattened through a linear layer, so word order matters ("a red circle left of
  a blue square" differs from its mirror); the null condition is every position set to the null token.
  This is the attribute-token conditioning the reference note proposes for speed (no cross-attention,
  which costs ~10x at 32 px on a CPU, diffusion.md §2.1);
* optionally a guidance-scale input (``guidance_embed``): LCM's w-embedding (Luo et al. 2023; diffusers'
  ``time_cond_proj_dim``) and SANA-Sprint's guidance embedding feed the scale w as a sinusoidal embedding
  of 1000 w, added like the condition.

Attention-free blocks throughout (``DownBlock2D``/``UpBlock2D``, ``add_attention=False``): forward-mode
AD (``torch.func.jvp``, sCM) does not go through the CPU flash-attention kernel (diffusion.md §2.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def sinusoidal(values: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[B] -> [B, dim] sinusoidal embedding (the transformer/DDPM timestep embedding, cos then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CondUNet(nn.Module):
    """A small conditional UNet (see the module docstring). ``forward(x, timestep, cond, guidance=None)``."""

    def __init__(self, *, size: int, channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 num_classes: int | None = None, vocab_size: int | None = None, max_len: int | None = None,
                 token_dim: int = 32, guidance_embed: bool = False, norm_groups: int = 8,
                 in_channels: int = 3) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        if (num_classes is None) == (vocab_size is None):
            raise ValueError("CondUNet needs exactly one of num_classes (labels) or vocab_size (prompt tokens)")
        self.config_dict = {"size": size, "channels": list(channels), "layers_per_block": layers_per_block,
                            "num_classes": num_classes, "vocab_size": vocab_size, "max_len": max_len,
                            "token_dim": token_dim, "guidance_embed": guidance_embed, "norm_groups": norm_groups,
                            "in_channels": in_channels}
        self.unet = UNet2DModel(
            sample_size=size, in_channels=in_channels, out_channels=in_channels, block_out_channels=tuple(channels),
            layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels), add_attention=False, norm_num_groups=norm_groups,
            class_embed_type="identity")
        dim = channels[0] * 4  # UNet2DModel's time-embedding width
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.max_len = max_len
        if num_classes is not None:
            self.cond_embed = nn.Embedding(num_classes + 1, dim)  # the last row is the null class
        else:
            if not max_len:
                raise ValueError("prompt conditioning needs max_len")
            self.token_embed = nn.Embedding(vocab_size + 1, token_dim)  # the last row is the null token
            self.cond_proj = nn.Sequential(nn.Linear(max_len * token_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.guidance_proj = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if guidance_embed else None

    @property
    def null_id(self) -> int:
        return self.num_classes if self.num_classes is not None else self.vocab_size  # type: ignore[return-value]

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.null_id)

    def condition_vector(self, cond: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes is not None:
            vec = self.cond_embed(cond.long())
        else:
            vec = self.cond_proj(self.token_embed(cond.long()).flatten(1))
        if self.guidance_proj is not None:
            w = torch.zeros(cond.shape[0], device=cond.device) if guidance is None else guidance
            vec = vec + self.guidance_proj(sinusoidal(1000.0 * w, vec.shape[-1]))
        return vec

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, timestep, class_labels=self.condition_vector(cond, guidance)).sample


def build(config: dict[str, Any]) -> CondUNet:
    return CondUNet(**{**config, "channels": tuple(config["channels"])})


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
