"""torch modules that distillation methods add to a cell or wrap the student in (imported lazily by the methods, so
`bench ls` stays free of torch). Module-level classes, so they pickle into checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LogitDiscriminator(nn.Module):
    """MEAL V2's discriminator (szq0214/MEAL-V2 ``models/discriminator.py``): 1x1 convolutions on the logit
    vector, C -> C/K -> C/K^2 -> 2, a ReLU after every layer including the last. Hidden widths are floored
    at ``min_width`` layer by layer, C -> max(C//K, m) -> max(that//K, m) -> 2 (a documented deviation: with
    K = 8, m = 8 the second hidden layer is wider than the official code's for every label space below 512
    classes; at 512 and above the shape is the official one)."""

    def __init__(self, num_classes: int, k: int = 8, min_width: int = 8) -> None:
        super().__init__()
        w1 = max(num_classes // k, min_width)
        w2 = max(w1 // k, min_width)
        self.conv1 = nn.Conv2d(num_classes, w1, 1)
        self.conv2 = nn.Conv2d(w1, w2, 1)
        self.conv3 = nn.Conv2d(w2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :, None, None]
        out = F.relu(self.conv1(out))
        out = F.relu(self.conv2(out))
        out = F.relu(self.conv3(out))
        return out.flatten(1)


# --------------------------------------------------------------------------------------------------
# Quantised distillation (Polino et al. 2018)
# --------------------------------------------------------------------------------------------------


def bucketize(flat: torch.Tensor, bucket_size: int | None) -> torch.Tensor:
    """Rows of ``bucket_size`` consecutive values, the last row padded with the tensor's last value
    (``quantization/help_functions.py`` ``create_bucket_tensor(fill_values='last')``); a tensor shorter than
    one bucket, or ``bucket_size`` None, is a single row."""
    n = flat.numel()
    if bucket_size is None or n <= bucket_size:
        return flat.view(1, n)
    rest = n % bucket_size
    if rest:
        flat = torch.cat([flat, flat[-1].expand(bucket_size - rest)])
    return flat.view(-1, bucket_size)


def uniform_quantize(t: torch.Tensor, bits: int, bucket_size: int | None, stochastic: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Bucketed uniform quantisation with linear scaling (``uniformQuantization``, type 'linear').

    Each bucket is mapped to [0, 1] by (v - min) / (max - min) (a bucket of equal values keeps scale 1),
    rounded to one of s = 2**bits levels {0, 1/(s-1), ..., 1} (to the nearest, halves up, or
    stochastically and unbiased), and mapped back."""
    flat = t.detach().reshape(-1).float()
    rows = bucketize(flat, bucket_size)
    lo = rows.min(dim=1, keepdim=True).values
    hi = rows.max(dim=1, keepdim=True).values
    scale = hi - lo
    scale = torch.where(scale < 1e-10, torch.ones_like(scale), scale)
    x = (rows - lo) / scale * (2 ** bits - 1)
    if stochastic:
        floor = x.floor()
        u = torch.rand(x.shape, generator=generator).to(x.device)
        x = floor + (u <= (x - floor)).float()
    else:
        x = torch.floor(x + 0.5)
    out = x / (2 ** bits - 1) * scale + lo
    return out.reshape(-1)[: flat.numel()].view_as(t).to(t.dtype)


def quantized_names(net: nn.Module, skip_first_last: bool) -> list[str]:
    """Parameter names that are quantised: all of them, or all but the first and the last parameter tensor
    (``quantize_first_and_last_layer=False`` skips ``model.parameters()`` indices 0 and -1)."""
    names = [n for n, _ in net.named_parameters()]
    return names[1:-1] if skip_first_last else names


class QuantizedStudent(nn.Module):
    """The student with full-precision *shadow* weights, run with quantised weights.

    The forward pass uses Q(w) for every quantised tensor; the gradient with respect to Q(w) is applied to
    w unchanged (straight-through: ``w + (Q(w) - w).detach()``), which is the official code's
    ``backprop_quantization_style='none'`` (quantise, forward/backward, restore w, step w)."""

    def __init__(self, net: nn.Module, bits: int, bucket_size: int | None, stochastic: bool,
                 skip_first_last: bool) -> None:
        super().__init__()
        self.net = net
        self.bits, self.bucket_size, self.stochastic = bits, bucket_size, stochastic
        self.names = quantized_names(net, skip_first_last)

    def quantized(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        params = dict(self.net.named_parameters())
        return {n: uniform_quantize(params[n], self.bits, self.bucket_size, self.stochastic, generator) for n in self.names}

    def forward(self, *args, **kwargs):
        from torch.func import functional_call

        params = dict(self.net.named_parameters())
        ste = {n: params[n] + (q - params[n]).detach() for n, q in self.quantized().items()}
        return functional_call(self.net, ste, args, kwargs, strict=False)

    def bake(self) -> nn.Module:
        """A plain copy of the network whose weights are Q(w): the deployed model."""
        import copy

        out = copy.deepcopy(self.net)
        q = self.quantized(torch.Generator().manual_seed(0))
        with torch.no_grad():
            for name, p in out.named_parameters():
                if name in q:
                    p.copy_(q[name])
        return out

    def size_bits(self) -> dict[str, int]:
        """The deployed model's real size: b bits per quantised value plus a float32 (min, scale) pair per
        bucket; everything else (unquantised parameters, buffers such as batch-norm statistics) in float32."""
        quantized = values = buckets = other = 0
        for name, p in self.net.named_parameters():
            if name in self.names:
                n = p.numel()
                nb = 1 if self.bucket_size is None or n <= self.bucket_size else -(-n // self.bucket_size)
                quantized += n * self.bits + nb * 64
                values += n
                buckets += nb
            else:
                other += p.numel() * 32
        other += sum(b.numel() * 32 for b in self.net.buffers() if b.is_floating_point())
        return {"quantized_bits": quantized, "other_bits": other, "quantized_values": values, "buckets": buckets}


# --------------------------------------------------------------------------------------------------
# DMAE (Bai et al. 2023): the MAE decoder and the feature projection
# --------------------------------------------------------------------------------------------------


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding (half the channels encode rows, half columns; a zero
    vector for the class token), ``util/pos_embed.py`` ``get_2d_sincos_pos_embed``."""

    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")
    emb = torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb.unsqueeze(0)


class MAEHead(nn.Module):
    """What DMAE trains beside the student encoder: the MAE decoder (embed, mask token, fixed sin-cos
    positions, transformer blocks, norm, pixel prediction) and the linear projection of the student's aligned
    features to the teacher's width (``fc-1layer``). Initialised as MAE does: xavier-uniform linears, zero
    biases, unit LayerNorms, mask token ~ N(0, 0.02)."""

    def __init__(self, student_dim: int, teacher_dim: int, num_patches: int, patch_pixels: int, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int) -> None:
        super().__init__()
        from functools import partial

        from timm.models.vision_transformer import Block

        grid = round(num_patches ** 0.5)
        self.decoder_embed = nn.Linear(student_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, grid), persistent=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_pixels)
        self.proj = nn.Linear(student_dim, teacher_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``forward_decoder``: latent [B, 1 + keep, D] (class token first) -> pixels [B, L, p*p*3]."""
        x = self.decoder_embed(latent)
        b, length = x.shape[0], ids_restore.shape[1]
        masks = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        body = torch.cat([x[:, 1:], masks], dim=1)
        body = torch.gather(body, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], body], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]
