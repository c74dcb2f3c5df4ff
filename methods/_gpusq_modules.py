"""torch side of GPUSQ-ViT (`bench.methods.gpusq_vit`): the 2:4 masks, the symmetric fake quantiser, the student
wrapper that trains and deploys the sparse (quantised) network, feature capture, and the GPU 2:4 kernel probe.
Imported lazily by the method, so `bench ls` stays free of torch; module-level classes, so the student pickles
into checkpoints and into the measuring processes."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: amax at or below this quantises to 0 (pytorch-quantization ``_tensor_quant``: "smaller than the minimum
#: representable of fp16").
EPS_AMAX = 1.0 / (1 << 24)


# --------------------------------------------------------------------------------------------------
# Structured masks along the GEMM's input (reduction) dimension
# --------------------------------------------------------------------------------------------------


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the [N, K] matrix of its GEMM: a Linear's [out, in]; a convolution's [out, cin*kh*kw] in
    torch's (cin, kh, kw) order, the K of the NCHW implicit GEMM."""
    return weight.reshape(weight.shape[0], -1)


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the two largest magnitudes of every 4 consecutive weights along K (2:4, FP16/INT8 sparse tensor
    cores); ties go to the lower index. Returns a 0/1 mask shaped like ``weight``."""
    w = gemm_view(weight.detach()).abs().float()
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs the GEMM input dimension divisible by 4; got K = {k}")
    groups = w.reshape(n, k // 4, 4)
    keep = _top_indices(groups, 2)
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(weight.shape).to(weight.dtype)


def mask_4to8_pairs(weight: torch.Tensor) -> torch.Tensor:
    """The INT4 pattern of the sparse tensor cores: every 8 consecutive weights along K are 4 pairs, of which the
    2 pairs with the largest magnitude (|w_a| + |w_b|) are kept (4:8 pair-wise, 50% like 2:4)."""
    w = gemm_view(weight.detach()).abs().float()
    n, k = w.shape
    if k % 8:
        raise ValueError(f"4:8 pair-wise sparsity needs the GEMM input dimension divisible by 8; got K = {k}")
    pairs = w.reshape(n, k // 8, 4, 2).sum(-1)
    keep = _top_indices(pairs, 2)
    mask = torch.zeros_like(pairs).scatter_(-1, keep, 1.0)
    return mask.unsqueeze(-1).expand(n, k // 8, 4, 2).reshape(weight.shape).to(weight.dtype)


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dimension; equal scores go to the lower index (a
    stable descending sort, so the result does not depend on the top-k kernel)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


# --------------------------------------------------------------------------------------------------
# Symmetric fake quantisation (NVIDIA pytorch-quantization conventions)
# --------------------------------------------------------------------------------------------------


def fake_quant(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantisation as pytorch-quantization's ``_tensor_quant`` with ``narrow_range``:
    scale s = (2^(b-1) - 1) / amax, q = clamp(round(x s), -(2^(b-1) - 1), 2^(b-1) - 1) / s (torch.round: halves
    to even); amax <= 2^-24 gives 0. Straight-through gradient inside [-amax, amax], zero outside (its
    ``FakeTensorQuantFunction.backward``). ``amax`` broadcasts against ``x`` (per tensor or per channel)."""
    qmax = float(2 ** (bits - 1) - 1)
    amax = amax.to(x.dtype)
    live = amax > EPS_AMAX
    scale = qmax / torch.where(live, amax, torch.ones_like(amax))
    q = torch.clamp(torch.round(x.detach() * scale), -qmax, qmax) / scale
    q = torch.where(live, q, torch.zeros_like(q))
    inside = x.detach().abs() <= amax
    return torch.where(inside, x + (q - x).detach(), q)


def weight_amax(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel max |w| (pytorch-quantization's weight descriptor ``axis=(0)``), shaped to broadcast."""
    flat = gemm_view(weight.detach()).abs().amax(dim=1)
    return flat.reshape(-1, *([1] * (weight.dim() - 1)))


# --------------------------------------------------------------------------------------------------
# Which layers: GEMM layers, the classifier, feature taps
# --------------------------------------------------------------------------------------------------


def body(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, network) of a task model: the `ImageClassifier`'s ``net``, or the module itself."""
    net = getattr(model, "net", None)
    return ("net.", net) if isinstance(net, nn.Module) else ("", model)


def classifier_name(model: nn.Module) -> str | None:
    """Module path (relative to ``model``) of the classifier: timm's ``get_classifier()``, else the last Linear."""
    prefix, net = body(model)
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    names = {id(m): n for n, m in net.named_modules()}
    if isinstance(head, nn.Module) and id(head) in names:
        return prefix + names[id(head)]
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return prefix + linears[-1] if linears else None


def gemm_layers(model: nn.Module) -> list[str]:
    """Every Linear and Conv2d of the network (module paths relative to ``model``), in module order."""
    prefix, net = body(model)
    return [prefix + n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def gemm_k(module: nn.Module) -> int:
    """The GEMM input dimension K of a Linear (in_features) or Conv2d (cin / groups * kh * kw)."""
    return int(module.weight[0].numel())


def sparse_candidates(model: nn.Module, group: int) -> tuple[list[str], list[tuple[str, str]]]:
    """(layers that take the structured mask, [(layer, why not)]): every Linear and ungrouped Conv2d whose K is
    divisible by ``group`` (4 for 2:4, 8 for 4:8 pairs), except the classifier."""
    mods = dict(model.named_modules())
    head = classifier_name(model)
    keep, skipped = [], []
    for name in gemm_layers(model):
        m = mods[name]
        if name == head:
            skipped.append((name, "classifier (kept dense)"))
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            skipped.append((name, f"grouped convolution (groups={m.groups})"))
        elif gemm_k(m) % group:
            skipped.append((name, f"K = {gemm_k(m)} not divisible by {group}"))
        else:
            keep.append(name)
    return keep, skipped


def feature_taps(model: nn.Module) -> list[str]:
    """Module paths (relative to ``model``) whose outputs are distilled: the later stages.

    ViT (``patch_embed`` + ``blocks``): the blocks at three quarters of the depth and at the end (the outputs of
    Swin's stages 3 and 4 in depth terms). The task's CIFAR ResNets (``stem`` + ``blocks``, three stages): the
    ends of stages 2 and 3. timm ResNets: ``layer3`` and ``layer4``. Anything else: none."""
    prefix, net = body(model)
    blocks = getattr(net, "blocks", None)
    if hasattr(net, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        d = len(blocks)
        idx = sorted({math.ceil(0.75 * d) - 1, d - 1})
        return [f"{prefix}blocks.{i}" for i in idx]
    if hasattr(net, "stem") and isinstance(blocks, nn.Sequential) and len(blocks) >= 3 and len(blocks) % 3 == 0:
        n = len(blocks) // 3
        return [f"{prefix}blocks.{2 * n - 1}", f"{prefix}blocks.{3 * n - 1}"]
    if all(hasattr(net, a) for a in ("layer3", "layer4")):
        return [f"{prefix}layer3", f"{prefix}layer4"]
    return []


def run_with_features(model: nn.Module, pixels: torch.Tensor, taps: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``model(pixels)`` and the outputs of the modules ``taps`` (paths relative to the task model; for a
    `SparseQuantStudent`, relative to the model it wraps)."""
    root = model.model if isinstance(model, SparseQuantStudent) else model
    mods = dict(root.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = [mods[t].register_forward_hook(lambda m, a, out, t=t: got.__setitem__(t, out)) for t in taps]
    try:
        logits = model(pixels)
    finally:
        for h in handles:
            h.remove()
    return logits, [got[t] for t in taps]


# --------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------


class SparseQuantStudent(nn.Module):
    """The task's student under GPUSQ-ViT: structured masks on the sparse layers' weights, and (in the QAT stage)
    fake-quantised weights and layer inputs of every GEMM layer.

    Forward: each sparse weight enters as w * mask (so its gradient is masked too); once ``quantized`` each GEMM
    weight enters as Q_b(w * mask) with a per-output-channel scale (straight-through) and each GEMM layer's input
    as Q_a(x) with a calibrated per-tensor amax. The full-precision weights are the trained (shadow) weights;
    `apply_masks_` re-zeroes the pruned ones after every optimiser step (apex ASP's step hook). `bake` writes the
    deployed weights Q_b(w * mask) into the network; afterwards only the activations are fake-quantised."""

    def __init__(self, model: nn.Module, sparse: list[str], quant: list[str], pattern: str, bits: int,
                 act_bits: int, quantize_activations: bool) -> None:
        super().__init__()
        self.model = model
        self.sparse, self.quant = list(sparse), list(quant)
        self.pattern, self.bits, self.act_bits = pattern, bits, act_bits
        self.quantize_activations = quantize_activations
        mods = dict(model.named_modules())
        make = mask_4to8_pairs if pattern == "4:8-pairs" else mask_2to4
        for i, name in enumerate(self.sparse):
            self.register_buffer(f"mask_{i}", make(mods[name].weight))
        self.register_buffer("act_amax", torch.zeros(len(self.quant)))
        self.register_buffer("quant_on", torch.tensor(False))
        self.register_buffer("baked", torch.tensor(False))
        self.calibrating = False

    # The task reads these off the model it evaluates (each model's own preprocessing).
    @property
    def data_config(self) -> dict[str, Any]:
        return self.model.data_config

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.normalize(pixels)

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"mask_{i}") for i, name in enumerate(self.sparse)}

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero the pruned weights in place (after each optimiser step: weight decay must not revive them)."""
        mods = dict(self.model.named_modules())
        for name, m in self.masks().items():
            mods[name].weight.mul_(m)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The weights the forward pass uses: w * mask, then Q_b(.) per output channel when quantised."""
        mods = dict(self.model.named_modules())
        masks = self.masks()
        out: dict[str, torch.Tensor] = {}
        if bool(self.baked):
            return out
        for name in set(masks) | (set(self.quant) if bool(self.quant_on) else set()):
            w = mods[name].weight
            if name in masks:
                w = w * masks[name]
            if bool(self.quant_on) and name in self.quant:
                w = fake_quant(w, weight_amax(w), self.bits)
            out[name + ".weight"] = w
        return out

    def _act_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if self.calibrating:  # max calibration (pytorch-quantization's default calib_method "max")
                with torch.no_grad():
                    self.act_amax[i] = torch.maximum(self.act_amax[i], x.detach().abs().max().float())
                return None
            return (fake_quant(x, self.act_amax[i], self.act_bits), *args[1:])
        return hook

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        handles = []
        if self.quantize_activations and (bool(self.quant_on) or self.calibrating):
            mods = dict(self.model.named_modules())
            handles = [mods[n].register_forward_pre_hook(self._act_hook(i)) for i, n in enumerate(self.quant)]
        try:
            return functional_call(self.model, self.effective_weights(), (pixels,), strict=False)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor]) -> None:
        """Activation amax of every quantised layer's input: the max |x| over ``batches`` (sparse float model)."""
        was = self.training
        self.eval()
        self.act_amax.zero_()
        self.calibrating = True
        try:
            for pixels in batches:
                self(pixels)
        finally:
            self.calibrating = False
            self.train(was)

    @torch.no_grad()
    def bake(self) -> SparseQuantStudent:
        """Write the deployed weights (Q_b(w * mask), or w * mask without QAT) into the network, in place."""
        mods = dict(self.model.named_modules())
        for key, w in self.effective_weights().items():
            mods[key[: -len(".weight")]].weight.copy_(w)
        self.baked.fill_(True)
        return self


# --------------------------------------------------------------------------------------------------
# Costs of the deployed model: FLOPs of the sparse GEMMs, and (on a GPU) the 2:4 kernels' speed
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def gemm_shapes(student: SparseQuantStudent, pixels: torch.Tensor) -> dict[str, dict[str, int]]:
    """Per sparse layer, from one forward on ``pixels``: GEMM rows M (tokens or output pixels), K and N, and its
    FLOPs (2 M K N, the convention of `bench.measure.flops`)."""
    mods = dict(student.model.named_modules())
    shapes: dict[str, dict[str, int]] = {}

    def tap(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            k, n = gemm_k(module), int(module.weight.shape[0])
            rows = args[0].numel() // k if isinstance(module, nn.Linear) else out.numel() // n
            shapes[name] = {"M": int(rows), "K": k, "N": n, "flops": 2 * int(rows) * k * n}
        return hook

    handles = [mods[n].register_forward_hook(tap(n)) for n in student.sparse]
    was = student.training
    student.eval()
    try:
        student(pixels)
    finally:
        student.train(was)
        for h in handles:
            h.remove()
    return shapes


def semi_structured_speed(student: SparseQuantStudent, pixels: torch.Tensor, device: str) -> dict[str, Any]:
    """Time every sparse Linear's GEMM at its deployed shape (batch of ``pixels``) with dense FP16 weights and with
    PyTorch's 2:4 semi-structured FP16 kernels (CUTLASS / cuSPARSELt), through `bench.measure.latency`.
    Convolutions (implicit GEMMs) and INT8/INT4 sparse kernels are not timed (they need TensorRT)."""
    from torch.sparse import to_sparse_semi_structured

    from bench.measure.latency import measure_latency

    shapes = gemm_shapes(student, pixels)
    mods = dict(student.model.named_modules())
    masks = student.masks()
    layers, dense_ms, sparse_ms = [], 0.0, 0.0
    protocol = {"threads": 1, "batch_size": 1, "min_run_time": 0.05, "min_count": 10, "warmup": 5, "device": device}
    for name in student.sparse:
        m = mods[name]
        if not isinstance(m, nn.Linear) or student.pattern != "2:4":
            continue
        s = shapes[name]
        w = (m.weight.detach() * masks[name]).to(device=device, dtype=torch.float16)
        x = torch.randn(s["M"], s["K"], device=device, dtype=torch.float16)
        row: dict[str, Any] = {"layer": name, **{k: s[k] for k in ("M", "K", "N")}}
        try:
            ws = to_sparse_semi_structured(w)
            err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
            td = measure_latency(lambda: F.linear(x, w), **protocol)["median_ms"]
            ts = measure_latency(lambda: F.linear(x, ws), **protocol)["median_ms"]
        except Exception as exc:  # noqa: BLE001 - a shape the kernels refuse is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            layers.append(row)
            continue
        row.update(dense_ms=td, sparse_ms=ts, speedup=td / ts if ts > 0 else None, max_abs_diff=err)
        dense_ms += td
        sparse_ms += ts
        layers.append(row)
    timed = [r for r in layers if "error" not in r]
    return {"measured": bool(timed), "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
            "kernels": "torch.sparse.to_sparse_semi_structured FP16 vs dense FP16 F.linear",
            "layers": layers, "timed_layers": len(timed), "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms if sparse_ms > 0 else None}


# --------------------------------------------------------------------------------------------------
# Feature alignment (the dense teacher may differ from the student in width)
# --------------------------------------------------------------------------------------------------


class FeatureProjector(nn.Module):
    """Per distilled layer: identity where student and teacher widths agree, else a learned linear map of the
    student's tokens (Linear) or feature maps (1x1 Conv2d) to the teacher's width."""

    def __init__(self, specs: list[tuple[str, int, int]]) -> None:
        super().__init__()
        layers = []
        for kind, cs, ct in specs:
            if cs == ct:
                layers.append(nn.Identity())
            elif kind == "tokens":
                layers.append(nn.Linear(cs, ct))
            else:
                layers.append(nn.Conv2d(cs, ct, 1))
        self.layers = nn.ModuleList(layers)
        self.specs = list(specs)

    def forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[j](x)


def feature_kind(x: torch.Tensor) -> tuple[str, int]:
    """("tokens", C) for [B, N, C] or ("maps", C) for [B, C, H, W]."""
    if x.dim() == 3:
        return "tokens", int(x.shape[-1])
    if x.dim() == 4:
        return "maps", int(x.shape[1])
    raise ValueError(f"feature of shape {tuple(x.shape)} is neither tokens [B, N, C] nor maps [B, C, H, W]")


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps pooled (adaptive average) to the smaller of the two spatial sizes; tokens unchanged."""
    if s.dim() != 4 or s.shape[-2:] == t.shape[-2:]:
        return s, t
    hw = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    return F.adaptive_avg_pool2d(s, hw), F.adaptive_avg_pool2d(t, hw)
