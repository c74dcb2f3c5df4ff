"""A-SDM — Zhu, Wang, Pan, Wan, Zhang & Huang, "A-SDM: Accelerating Stable Diffusion through Model Assembly and
Feature Inheritance Strategies" (arXiv 2406.00210, 2024; IEEE TNNLS 2025).

**Sources read.** No official code of A-SDM was found (GitHub searched by title and name; none listed by the
paper's pages). The paper itself could be read offline only through its abstract (arXiv/ar5iv/OpenReview pages)
and a third-party summary (themoonlight.io): a *tuning* part — a compressed UNet "assembled" from the teacher's
layers (layers removed from each block, particularly in the costly shallow part) and distilled from it, with
multi-expert conditional convolution (ME-CondConv) in the compressed UNet to regain capacity at no extra latency
(and multi-UNet switching, not implemented) — and a *tuning-free* part — feature inheritance, skipping block,
layer or unit computations by reusing features computed at an earlier timestep. Where the paper's details were
not available the reference implementations it builds on were read:

* BK-SDM (Kim et al. 2023), the block-removed, knowledge-distilled SD that A-SDM compares with and extends:
  Nota-NetsPresso/BK-SDM @ fe4cb33, ``src/kd_train_text_to_image.py`` (``copy_weight_from_teacher``: the
  student starts from the teacher's weights; loss ``lambda_sd * MSE(pred, target) + lambda_kd_output *
  MSE(pred, teacher_pred) + lambda_kd_feat * sum_l MSE(f_l, f_l^T)`` over the outputs of every down and up
  block, all lambdas 1.0; the teacher is run unguided on the same noisy input).
* DeepCache (Ma et al. 2024), the feature-reuse schedule A-SDM's inheritance follows: horseee/DeepCache @
  1691a3a, ``DeepCache/extension/deepcache.py`` (``set_params(cache_interval, cache_branch_id,
  skip_mode='uniform')``: step i (counted from the first) computes everything when ``i % interval == 0`` and
  stores every layer's output; other steps recompute only the layers shallower than the chosen skip branch
  and take the deeper ones from the store) and its README (``cache_interval=3, cache_branch_id=0``).
* CondConv (Yang et al., NeurIPS 2019, arXiv 1904.04971): ``(sum_k r_k W_k) * x`` with per-example routing
  ``r = sigmoid(GAP(x) R)``, one convolution per example.

What is implemented:

1. **Model assembly** (``init_student``): the student is a copy of the teacher's network (every kept layer
   keeps the teacher's weights, as BK-SDM's ``copy_weight_from_teacher``) with layers removed: the mid block
   (``drop_mid_block``, as BK-SDM-Small) and the last ``drop_up_layers`` ResNet layers of every up block (BK-SDM
   drops one of the three layers of each SD up stage; here the last one, the only one removable in every block
   of a one-layer-per-block UNet, whose skip connection is dropped with it). The network runs through
   `unet_forward`, a layer-by-layer forward of diffusers' ``UNet2DModel`` in which every kept up layer takes the
   skip connection it took in the teacher (`teacher_skips`).
2. **ME-CondConv** (`CondConv2d`): the two 3x3 convolutions of every ResNet layer of the up path
   (``condconv="up"``; ``"all"``: every ResNet layer; ``"none"``) become ``experts`` expert kernels mixed per
   sample, ``W(x) = sum_k sigmoid(GAP(x) R + c)_k W_k`` (the bias mixed the same way), one grouped convolution
   per batch. The routing input carries the time embedding (it is added before a ResNet's second convolution;
   its first sees features of earlier time-conditioned layers). Initialisation keeps the teacher's function:
   ``W_k = (2 / K) W_teacher + d_k`` with ``d_k`` centred over the experts (``sum_k d_k = 0``, std
   ``expert_noise * std(W)``) and a zero routing layer, so ``r_k = 1/2`` and ``W(x) = W_teacher`` at the start.
3. **Distillation loss** (BK-SDM's, which A-SDM's assembly is distilled with): with ``x_t = alpha_t x0 +
   sigma_t eps``, ``t ~ U(0, 1)``, the condition replaced by the null condition with the task's
   ``cond_dropout`` (the student samples with classifier-free guidance, as the teacher), the student's and the
   teacher's predictions ``s`` and ``T`` in the teacher's parameterisation and target ``y`` (the flow velocity
   ``eps - x0`` on the smoke/small teachers), ``L = lambda_task MSE(s, y) + lambda_out MSE(s, T) +
   lambda_feat sum_l MSE(f_l, f_l^T)``, ``f_l`` the outputs of every down block and every up block (the mid
   block is gone), MSE the mean over elements.
4. **Feature inheritance** (`ASDMGenerator`, tuning-free, at sampling): DeepCache's uniform schedule with
   ``inherit_interval`` N: sampler step i computes the whole pruned network when ``i % N == 0`` and keeps the
   hidden state entering the up path's shallow part; the other steps compute only the shallow part — the input
   convolution, the down layers up to the skip that branch ``inherit_branch`` consumes, and the last
   ``inherit_branch + 1`` kept up layers — and inherit the deep feature of the last full step (the deep down
   layers, the mid block and the deep up layers are skipped). ``inherit_interval = 1`` turns it off.
5. **Sampler**: the teacher's deterministic ``ode`` (Euler) sampler at the teacher's reference step count and
   guidance (``steps``/``guidance`` override), any step count (the student is a full denoiser).
6. **Speed-ups recorded** (``record_info``), with the harness's FLOP counter (`bench.measure.flops`) on one
   image at batch 1: FLOPs of one network evaluation of the teacher and of the pruned student (the pruning
   speed-up), of a student evaluation that inherits, and per image at every evaluated step count with and
   without inheritance (the inheritance speed-up). Latency is the harness's measurement of the row (with
   inheritance, the row's own configuration); the method times nothing.

Deviations:

* Pixel-space smoke/small UNets (diffusers ``UNet2DModel``, attention-free ``DownBlock2D``/``UpBlock2D``, one
  ResNet layer per down block) instead of Stable Diffusion's latent ``UNet2DConditionModel``; the full tier
  (the pipeline's ``UNet2DConditionModel``) is refused in ``unsupported``: its cross-attention blocks would need
  their own layer-wise forward.
* Which layers A-SDM removes, where it places ME-CondConv, its expert count, routing and initialisation, its
  loss weights and its inheritance intervals could not be read (paper text unavailable offline): the removal
  follows BK-SDM-Small (mid block and one layer per up block), the loss BK-SDM's (all weights 1), ME-CondConv
  CondConv's sigmoid routing on the up path with 4 experts (ours; CondConv scales 1 to 32 experts per layer)
  and the function-preserving initialisation above (ours), inheritance DeepCache's uniform schedule with
  interval 2 (ours; DeepCache's README uses 3; on the coco_fid smoke UNet it gives 1.40x fewer FLOPs per image,
  near the abstract's 40%) and branch 0 (DeepCache's README). ME-CondConv makes the student larger in
  parameters than its pruned backbone (coco_fid smoke: teacher 161k, pruned 84k, with CondConv 196k) at
  1.6x fewer FLOPs per network call than the teacher: the paper's capacity-for-free trade.
* Block removal only, no channel pruning: the student keeps the teacher's widths so that every kept layer
  inherits the teacher's weights and the feature loss needs no projections (the task's narrower
  ``compact_student`` would start from scratch).
* Not implemented: multi-UNet switching (the compressed UNet for early steps, the original for late ones),
  layer- and unit-level inheritance inside a layer, and A-SDM's non-uniform inheritance modes.
* The harness's budget, optimiser and learning rate (the task's; BK-SDM: AdamW 5e-5, batch 256) and the
  task's data (generated images / CIFAR-10 / shape prompts instead of LAION).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from bench import BenchError
from bench.api import Method, Params
from bench.diffusion import Generator

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext, Task


def _nn():
    from torch import nn

    return nn


# --------------------------------------------------------------------------------------------------
# ME-CondConv (CondConv, Yang et al. 2019)
# --------------------------------------------------------------------------------------------------


class CondConv2d(_nn().Module):  # type: ignore[misc]
    """A conditionally parameterised convolution: ``K`` expert kernels mixed per sample by ``r(x) =
    sigmoid(route(GAP(x)))``; ``y = conv(x, sum_k r_k W_k) + sum_k r_k b_k``. Built from a plain
    ``nn.Conv2d`` (``from_conv``) so that it computes that convolution at initialisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *, experts: int,
                 stride: tuple[int, int] = (1, 1), padding: Any = (0, 0), dilation: tuple[int, int] = (1, 1)) -> None:
        import torch
        from torch import nn

        super().__init__()
        self.in_channels, self.out_channels, self.experts = in_channels, out_channels, experts
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.zeros(experts, out_channels, in_channels, *kernel_size))
        self.bias = nn.Parameter(torch.zeros(experts, out_channels))
        self.route = nn.Linear(in_channels, experts)

    @classmethod
    def from_conv(cls, conv: Any, experts: int, noise: float) -> CondConv2d:
        import torch

        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise BenchError("CondConv replaces plain convolutions (groups=1, zero padding) only")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, experts=experts, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation)
        with torch.no_grad():
            w = conv.weight.detach()
            d = torch.randn(experts, *w.shape, dtype=w.dtype, device=w.device) * (noise * float(w.std()))
            d = d - d.mean(0, keepdim=True)  # sum_k d_k = 0: the mixture at r_k = 1/2 is the teacher's kernel
            m.weight.copy_((2.0 / experts) * w.unsqueeze(0) + d)
            b = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
            m.bias.copy_((2.0 / experts) * b.unsqueeze(0).expand(experts, -1))
            m.route.weight.zero_()
            m.route.bias.zero_()
        return m.to(conv.weight.device)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K] routing weights sigmoid(GAP(x) R + c)."""
        import torch

        return torch.sigmoid(self.route(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        r = self.routing(x)
        b, _, h, w = x.shape
        kernel = torch.einsum("bk,koihw->boihw", r, self.weight)  # one mixed kernel per sample
        bias = r @ self.bias
        y = F.conv2d(x.reshape(1, b * self.in_channels, h, w), kernel.reshape(b * self.out_channels, *kernel.shape[2:]),
                     bias.reshape(-1), stride=self.stride, padding=self.padding, dilation=self.dilation, groups=b)
        return y.reshape(b, self.out_channels, *y.shape[2:])


# --------------------------------------------------------------------------------------------------
# The layer-by-layer UNet forward (assembly, feature distillation, feature inheritance)
# --------------------------------------------------------------------------------------------------


def teacher_skips(unet: Any) -> list[list[int]]:
    """For every up block, the index (into conv_in + the down layers' outputs, in order) of the skip connection
    each of its ResNet layers takes in diffusers' ``UNet2DModel`` (the most recent skip first)."""
    n = 1 + sum(len(b.resnets) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks)
    out, pos = [], n - 1
    for block in unet.up_blocks:
        out.append(list(range(pos, pos - len(block.resnets), -1)))
        pos -= len(block.resnets)
    return out


def _embedding(unet: Any, timestep: torch.Tensor, class_vec: torch.Tensor, batch: int) -> torch.Tensor:
    import torch

    t = torch.as_tensor(timestep, device=class_vec.device)
    t = (t[None] if t.dim() == 0 else t) * torch.ones(batch, dtype=t.dtype, device=t.device)
    emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_vec).to(dtype=unet.dtype)
    return emb


def unet_forward(unet: Any, skips_of: list[list[int]], x: torch.Tensor, timestep: torch.Tensor,
                 class_vec: torch.Tensor, *, features: dict[str, torch.Tensor] | None = None,
                 branch: int | None = None, cached: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """diffusers ``UNet2DModel`` (center_input_sample off, no skip convs) run layer by layer; up block ``i``'s
    kept ResNet layer ``j`` takes skip ``skips_of[i][j]``. Returns ``(output, deep)``: ``deep`` is the hidden state
    entering the ``branch + 1`` shallowest kept up layers (None when ``branch`` is None). With ``cached`` (a
    ``deep`` of an earlier call) only the shallow part runs: conv_in, the down layers up to the last skip those up
    layers take, and those up layers. ``features`` collects the outputs of every down and up block."""
    import torch

    emb = _embedding(unet, timestep, class_vec, x.shape[0])
    flat = [(i, j) for i, b in enumerate(skips_of) for j in range(len(b))]
    first_fresh = None if branch is None else len(flat) - 1 - branch  # position of the deepest fresh up layer
    need = None if cached is None else max(skips_of[i][j] for i, j in flat[first_fresh:])
    h = unet.conv_in(x)
    skips = [h]
    for bi, block in enumerate(unet.down_blocks):
        for resnet in block.resnets:
            if need is not None and len(skips) > need:
                break
            h = resnet(h, emb)
            skips.append(h)
        if block.downsamplers is not None and (need is None or len(skips) <= need):
            for ds in block.downsamplers:
                h = ds(h)
            skips.append(h)
        if features is not None:
            features[f"down_blocks.{bi}"] = h
    if cached is None and unet.mid_block is not None:
        h = unet.mid_block(h, emb)
    deep, pos = None, 0
    for bi, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if first_fresh is not None and pos == first_fresh:
                if cached is not None:
                    h = cached
                deep = h
            if cached is None or pos >= first_fresh:
                h = resnet(torch.cat([h, skips[skips_of[bi][j]]], dim=1), emb)
            pos += 1
        if block.upsamplers is not None and (cached is None or pos > first_fresh):
            for up in block.upsamplers:
                h = up(h)
        if features is not None:
            features[f"up_blocks.{bi}"] = h
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h, deep


class PrunedUNet(_nn().Module):  # type: ignore[misc]
    """The A-SDM student network: the teacher's ``CondUNet`` with layers removed (``skips_of`` says which skip
    each kept up layer takes), under the network contract ``net(x, timestep, cond, guidance=None)``. While
    `ASDMGenerator.sample` runs it inherits deep features between calls (see the module docstring)."""

    def __init__(self, base: Any, skips_of: list[list[int]], branch: int = 0) -> None:
        super().__init__()
        self.base = base
        self.skips_of = [list(s) for s in skips_of]
        self.branch = branch
        self._interval = 1
        self._calls = 0
        self._deep = None
        self.computed: list[bool] = []  # per call of the current sampling run: did it compute the deep part

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.base.null_condition(cond)

    def begin_inheritance(self, interval: int) -> None:
        self._interval, self._calls, self._deep, self.computed = max(1, int(interval)), 0, None, []

    def end_inheritance(self) -> None:
        self._interval, self._calls, self._deep = 1, 0, None

    def predict_with_features(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                              features: dict[str, torch.Tensor]) -> torch.Tensor:
        return unet_forward(self.base.unet, self.skips_of, x, timestep, self.base.condition_vector(cond),
                            features=features)[0]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        vec = self.base.condition_vector(cond, guidance)
        if self._interval <= 1:
            return unet_forward(self.base.unet, self.skips_of, x, timestep, vec)[0]
        full = self._calls % self._interval == 0 or self._deep is None  # DeepCache's uniform skip mode
        out, deep = unet_forward(self.base.unet, self.skips_of, x, timestep, vec, branch=self.branch,
                                 cached=None if full else self._deep)
        if full:
            self._deep = deep
        self.computed.append(full)
        self._calls += 1
        return out


class ASDMGenerator(Generator):
    """A `Generator` whose sampler inherits deep features across steps (``inherit_interval`` > 1)."""

    def __init__(self, *args: Any, inherit_interval: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inherit_interval = int(inherit_interval)

    def sample(self, noise, cond, sampler=None, generator=None):
        self.net.begin_inheritance(self.inherit_interval)
        try:
            return super().sample(noise, cond, sampler, generator)
        finally:
            self.net.end_inheritance()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "inherit_interval": self.inherit_interval, "inherit_branch": self.net.branch}


# --------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------


def assemble(teacher_net: Any, *, drop_mid_block: bool, drop_up_layers: int, condconv: str, experts: int,
             expert_noise: float, branch: int) -> PrunedUNet:
    """The pruned student network built from a copy of the teacher's ``CondUNet`` (see the module docstring)."""
    from torch import nn

    base = copy.deepcopy(teacher_net)
    unet = base.unet
    skips_of = teacher_skips(unet)
    if drop_mid_block:
        unet.mid_block = None
    for i, block in enumerate(unet.up_blocks):
        keep = len(block.resnets) - drop_up_layers
        if keep < 1:
            raise BenchError(f"a_sdm.drop_up_layers={drop_up_layers} would empty up block {i} "
                             f"({len(block.resnets)} ResNet layers); valid: 0..{len(block.resnets) - 1}")
        block.resnets = nn.ModuleList(list(block.resnets)[:keep])
        skips_of[i] = skips_of[i][:keep]
    n_up = sum(len(s) for s in skips_of)
    if not 0 <= branch < n_up:
        raise BenchError(f"a_sdm.inherit_branch={branch} must name one of the {n_up} kept up layers (0..{n_up - 1})")
    if condconv != "none":
        blocks = list(unet.up_blocks) if condconv == "up" else [*unet.down_blocks, *unet.up_blocks]
        if condconv == "all" and unet.mid_block is not None:
            blocks.append(unet.mid_block)
        for block in blocks:
            for resnet in block.resnets:
                resnet.conv1 = CondConv2d.from_conv(resnet.conv1, experts, expert_noise)
                resnet.conv2 = CondConv2d.from_conv(resnet.conv2, experts, expert_noise)
    return PrunedUNet(base, skips_of, branch)


def distillation_loss(s: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor, feats: dict[str, torch.Tensor],
                      teacher_feats: dict[str, torch.Tensor], weights: tuple[float, float, float]
                      ) -> dict[str, torch.Tensor]:
    """BK-SDM's three terms (MSE = mean over elements) and their weighted sum under ``total``."""
    task = (s.float() - target.float()).pow(2).mean()
    out = (s.float() - teacher.float()).pow(2).mean()
    feat = sum((feats[k].float() - teacher_feats[k].float()).pow(2).mean() for k in teacher_feats)
    return {"task": task, "out": out, "feat": feat,
            "total": weights[0] * task + weights[1] * out + weights[2] * feat}


class ASDM(Method):
    """Zhu et al. 2024 (A-SDM): a pruned UNet assembled from the teacher's layers with ME-CondConv, distilled on
    output and features, sampled with DeepCache-style feature inheritance."""

    name = "a_sdm"
    version = "1"
    domains = frozenset({"diffusion"})

    class Params(Params):
        # BK-SDM-Small (src/unet_config/bk_small): no mid block.
        drop_mid_block: bool = Field(True, description="remove the UNet's mid block")
        # BK-SDM copy_weight_from_teacher: one of the three layers of each SD up stage goes.
        drop_up_layers: int = Field(1, ge=0, description="ResNet layers removed from the end of every up block "
                                                         "(with the skip connections they take)")
        # A-SDM: ME-CondConv in the compressed UNet (placement not available offline: the up path, see Deviations).
        condconv: Literal["up", "all", "none"] = Field("up", description="ResNet convolutions made multi-expert "
                                                                         "CondConv: the up path, all, or none")
        # Ours (A-SDM's count not available offline); CondConv (Yang et al. 2019) scales 1..32 experts per layer.
        experts: int = Field(4, ge=2, le=32, description="expert kernels per CondConv layer")
        expert_noise: float = Field(0.01, ge=0.0, le=1.0, description="std of the centred expert perturbation, "
                                                                      "relative to the teacher kernel's std")
        # BK-SDM kd_train_text_to_image.py: lambda_sd = lambda_kd_output = lambda_kd_feat = 1.0.
        lambda_task: float = Field(1.0, ge=0.0, description="weight of the denoising loss on the data")
        lambda_out: float = Field(1.0, ge=0.0, description="weight of the output distillation loss")
        lambda_feat: float = Field(1.0, ge=0.0, description="weight of the block-feature distillation loss")
        # DeepCache uniform skip mode; interval 2 is ours (module docstring), DeepCache's README uses 3.
        inherit_interval: int = Field(2, ge=1, le=100, description="sampler steps per deep-feature computation "
                                                                   "(1: no feature inheritance)")
        # DeepCache README: cache_branch_id=0 (only the shallowest branch is recomputed).
        inherit_branch: int = Field(0, ge=0, description="kept up layers (from the shallowest, 0-based) that "
                                                         "inheriting steps recompute")
        steps: int | None = Field(None, ge=1, le=1000, description="sampler steps of the student's own sampler "
                                                                   "(default: the teacher's reference steps)")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="guidance scale of the student's own "
                                                                          "sampler (default: the teacher's)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}

    def unsupported(self, task: Task) -> str | None:
        if getattr(getattr(task, "env", None), "tier", None) == "full":
            return ("A-SDM's layer-wise assembly and feature inheritance are written for the task's UNet2DModel "
                    "networks (smoke/small tiers); the full tier's UNet2DConditionModel is not handled")
        if not hasattr(task, "make_generator"):
            return "A-SDM needs a generative task (a Generator teacher)"
        return None

    def init_student(self, teacher: Any, student: Any, ctx: StepContext) -> ASDMGenerator:
        from bench.diffusion import Sampler
        from bench.tasks.generative.nets import CondUNet

        p = self.params
        if not isinstance(getattr(teacher, "net", None), CondUNet):
            raise BenchError("a_sdm assembles its student from the task's CondUNet teacher; got "
                             f"{type(getattr(teacher, 'net', teacher)).__name__}")
        net = assemble(teacher.net, drop_mid_block=p.drop_mid_block, drop_up_layers=p.drop_up_layers,
                       condconv=p.condconv, experts=p.experts, expert_noise=p.expert_noise, branch=p.inherit_branch)
        steps = p.steps or teacher.sampler.steps
        w = p.guidance if p.guidance is not None else teacher.sampler.guidance
        g = ASDMGenerator(net, schedule=teacher.schedule, prediction=teacher.prediction,
                          sampler=Sampler("ode", steps=steps, guidance=w), inherit_interval=p.inherit_interval,
                          description=f"A-SDM pruned student, Euler {steps} steps, guidance {w:g}, "
                                      f"feature inheritance every {p.inherit_interval}")
        self.info.update(teacher_params=sum(q.numel() for q in teacher.parameters()),
                         student_params=sum(q.numel() for q in g.parameters()),
                         up_skips=net.skips_of, mid_block=not p.drop_mid_block)
        return g

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        g = ctx.student
        x0, cond = batch["x0"], batch["cond"]
        n = x0.shape[0]
        t = torch.rand(n, device=x0.device)
        eps = torch.randn_like(x0)
        drop = float(getattr(ctx.task.params, "cond_dropout", 0.0))
        if drop > 0:
            mask = torch.rand(n, device=x0.device) < drop
            cond = torch.where(mask.view(-1, *([1] * (cond.dim() - 1))), g.net.null_condition(cond), cond)
        x_t = g.add_noise(x0, eps, t)
        mt = g.schedule.model_time(t)
        feats: dict[str, torch.Tensor] = {}
        s = g.net.predict_with_features(x_t, mt, cond, feats)
        t_feats: dict[str, torch.Tensor] = {}

        def run(tm: Any) -> torch.Tensor:
            return unet_forward(tm.net.unet, teacher_skips(tm.net.unet), x_t, mt, tm.net.condition_vector(cond),
                                features=t_feats)[0]

        t_pred = ctx.run_teacher(run, n_examples=n)
        losses = distillation_loss(s, g.target(x0, eps, t), t_pred, feats, t_feats,
                                   (p.lambda_task, p.lambda_out, p.lambda_feat))
        self.info["last_losses"] = {k: float(v.detach()) for k, v in losses.items() if k != "total"}
        return {"student": losses["total"]}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self.info.get("last_losses", {}))

    def finalize_student(self, student: Any, ctx: StepContext) -> Any:
        try:
            self.info["flops"] = speedups(student, ctx.teacher, ctx.task)
        except Exception as exc:  # a failed count must not fail the cell; the record says why
            self.info["flops"] = {"error": f"{type(exc).__name__}: {exc}"}
        return student

    def state_dict(self) -> dict[str, Any]:
        return {"info": copy.deepcopy(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info.update(state.get("info", {}))

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**{k: v for k, v in self.info.items() if k != "last_losses"},
                "removed": {"mid_block": p.drop_mid_block, "up_layers_per_block": p.drop_up_layers},
                "condconv": {"where": p.condconv, "experts": p.experts},
                "loss_weights": {"task": p.lambda_task, "out": p.lambda_out, "feat": p.lambda_feat},
                "inheritance": {"interval": p.inherit_interval, "branch": p.inherit_branch,
                                "schedule": "uniform: step i computes the deep blocks iff i % interval == 0"}}


def speedups(student: ASDMGenerator, teacher: Generator, task: Any) -> dict[str, Any]:
    """FLOPs per image (harness counter, batch 1) of one network evaluation (teacher, pruned student computing
    everything, pruned student inheriting) and of the student's sampler at every evaluated step count with and
    without inheritance; the ratios are the pruning and inheritance speed-ups."""
    import torch

    from bench.measure.flops import model_flops_per_sample

    dev = next(student.parameters()).device
    inputs = {k: v.to(dev) for k, v in task.example_inputs(1).items()}
    x, cond = inputs["noise"], inputs["cond"]
    mt = torch.full((1,), 500.0, device=dev)

    def one_call(net: Any, reuse: bool = False) -> int:
        def fwd(m: Any, _: dict) -> Any:
            if not reuse:
                return m(x, mt, cond)
            m.begin_inheritance(2)
            try:
                m(x, mt, cond)
                return m(x, mt, cond)
            finally:
                m.end_inheritance()

        total = model_flops_per_sample(net, fwd, inputs, 1).flops
        return total - (one_call(net) if reuse else 0)  # the inheriting call alone

    per_call = {"teacher": one_call(teacher.net), "student": one_call(student.net),
                "student_inheriting": one_call(student.net, reuse=True)}
    steps = sorted({student.sampler.steps, *getattr(task.params, "nfe", [])})
    per_image: dict[str, Any] = {}
    interval = student.inherit_interval
    for n in steps:
        sp = student.sampler_at(n)
        row = {}
        for label, k in (("no_inheritance", 1), ("inheritance", interval)):
            student.inherit_interval = k
            row[label] = model_flops_per_sample(student, lambda m, i: m.sample(i["noise"], i["cond"], sp),
                                                inputs, 1).flops
        student.inherit_interval = interval
        row["inheritance_speedup"] = row["no_inheritance"] / max(1, row["inheritance"])
        per_image[str(n)] = row
    return {"per_call": per_call, "pruning_speedup": per_call["teacher"] / max(1, per_call["student"]),
            "per_image": per_image, "teacher_per_image": model_flops_per_sample(
                teacher, lambda m, i: m.sample(i["noise"], i["cond"]), inputs, 1).flops,
            "note": "FLOPs per image at batch 1 (bench.measure.flops); guided samplers count both passes"}
