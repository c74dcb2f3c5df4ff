"""The torch parts of ACM (`bench.methods.acm`): the Adaptive Computation Module, its gating network and the
losses of the three training phases. Imported lazily by the method, so `bench ls` and suite validation stay free
of torch; module-level classes, so ACMized models pickle into checkpoints and into the measuring processes.

Everything here follows the official code (bartwojcik/adaptive_computation_modules @ 6760ad6,
``architectures/acm.py``, ``methods/acm/*.py``); where it departs, the docstring says so and
`bench.methods.acm` lists it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


def learner_width(kind: str, d_in: int, d_out: int, hidden: int, num_learners: int, flops_factor: float) -> int:
    """Hidden width of one learner (``acmize_vit``; block_flops_factor = flops_factor / N).

    FFN ACMs: ``round(factor / N * mlp_dim)``, so N learners are as wide as the original FFN. Linear projections
    (q, k, v, o): ``round(factor / N * (d_in d_out + d_out) / (d_in + d_out + 1))``, the official
    ``(d^2 + d) / (2d + 1)`` for square projections: N learners (d -> w -> d each, hidden bias) cost what the
    original linear layer (with its bias) costs."""
    per = flops_factor / num_learners
    if kind == "ffn":
        return max(1, round(per * hidden))
    return max(1, round(per * (d_in * d_out + d_out) / (d_in + d_out + 1)))


# --------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------


def st_gumbel(logits: torch.Tensor, tau: float, gumbels: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through Gumbel-softmax sample (torch's ``F.gumbel_softmax(hard=True)``, which the official
    ``DeepGumbelGatingNetwork`` calls in training): the forward value is the one-hot of
    ``argmax(logits + g)``, the gradient that of the relaxed sample ``softmax((logits + g) / tau)``.
    ``gumbels`` (g) are drawn as torch draws them (``-log Exp(1)``) unless given."""
    if gumbels is None:
        gumbels = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + gumbels) / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def pad_min_choice(choice: torch.Tensor, min_choice: int) -> torch.Tensor:
    """The official "minimum choice correction": a gate over choices min_choice..N gets ``min_choice`` zero
    columns in front, so every ACM's choice vector indexes 0..N learners."""
    if min_choice == 0:
        return choice
    return torch.cat([choice.new_zeros(*choice.shape[:-1], min_choice), choice], dim=-1)


class GateNet(nn.Module):
    """The official ``DeepGumbelGatingNetwork``: ``depth`` linear layers (d -> hidden -> ... -> choices), with no
    activation between them (as in the official code), over the ``num_choices - min_choice`` choices it may make.
    Training mode: a straight-through Gumbel-softmax sample at temperature ``tau``; eval mode: the one-hot argmax."""

    def __init__(self, d_in: int, num_choices: int, min_choice: int, hidden: int, depth: int, tau: float) -> None:
        super().__init__()
        widths = [d_in] + [hidden] * (depth - 1) + [num_choices - min_choice]
        self.net = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.num_choices, self.min_choice, self.tau = num_choices, min_choice, tau

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        if self.training:
            g = st_gumbel(z, self.tau)
        else:
            g = F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
        return pad_min_choice(g, self.min_choice)


def executed_mask(choice: torch.Tensor) -> torch.Tensor:
    """[..., N + 1] choice vector (one-hot over 0..N learners) -> [..., N]: learner i (1-based) runs when the
    choice is >= i, i.e. m_i = sum_{k >= i} choice_k (for a straight-through sample the gradient flows the same way)."""
    tail = choice[..., 1:]
    return tail.flip(-1).cumsum(-1).flip(-1)


def cumulative_outputs(outs: torch.Tensor, detach: bool) -> torch.Tensor:
    """[..., N, d] learner outputs -> [..., N + 1, d] outputs of the ACM at 0..N learners (``forward_all``).

    With ``detach`` (the official default ``_detach_mode = 'detach'``) the value is the running sum but the
    output at k learners passes gradient to learner k only: y_k = o_k + (sum_{j<=k} o_j).detach() - o_k.detach()."""
    y = torch.cat([outs.new_zeros(*outs.shape[:-2], 1, outs.shape[-1]), outs], dim=-2)
    if detach:
        return y + y.cumsum(-2).detach() - y.detach()
    return y.cumsum(-2)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class ACMLayer(nn.Module):
    """An Adaptive Computation Module (``AdaptiveComputationMLP``): N learners x -> act(x W1_i + b1_i) W2_i, each
    of width ``width``, summed over the first k, k chosen per token by the gate (0..N; at least ``min_choice``).

    Weights as the official code stores them: ``w1`` [d_in, N w], ``b1`` [N w] (bias 'hidden_only': no output
    bias), ``w2`` [N w, d_out]. The forward computes every learner's hidden layer and zeroes the learners not
    executed before the output matmul (the output equals the sum of the executed learners' outputs, as the official
    masked ``forward_gated``; the FLOPs a counter sees are the full width's). With
    ``gate_task_gradient`` false (the official behaviour) the choice enters the output without gradient, so the
    task loss does not reach the gate; true multiplies by the straight-through sample instead.

    ``site``/``part``/``parts`` name the original layer this ACM replaces (its path in the teacher; the ``part``-th
    of ``parts`` equal chunks of that layer's output, for timm's fused qkv projection)."""

    def __init__(self, d_in: int, d_out: int, num_learners: int, width: int, activation: nn.Module, *,
                 min_choice: int, gate_hidden: int, gate_depth: int, tau: float, gate_task_gradient: bool = False,
                 kind: str = "ffn", site: str = "", part: int = 0, parts: int = 1) -> None:
        super().__init__()
        self.d_in, self.d_out, self.num_learners, self.width = d_in, d_out, num_learners, width
        self.num_choices = num_learners + 1
        self.w1 = nn.Parameter(torch.empty(d_in, num_learners * width))
        self.b1 = nn.Parameter(torch.empty(num_learners * width))
        self.w2 = nn.Parameter(torch.empty(num_learners * width, d_out))
        self.act = activation
        self.gate = GateNet(d_in, self.num_choices, min_choice, gate_hidden, gate_depth, tau)
        self.gate_task_gradient = gate_task_gradient
        self.kind, self.site, self.part, self.parts = kind, site, part, parts
        self.last_choice: torch.Tensor | None = None  # the gate's output of the last training forward
        self.tally: torch.Tensor | None = None  # when set: counts of choices 0..N over the tokens seen
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # ``reset_parameters`` of the official module: kaiming_uniform_(a=sqrt(5)) on w1 and w2 as stored (torch
        # takes fan_in = size(1): N w for w1, d_out for w2), so the bounds are 1 / sqrt(fan_in); b1 ~ U(+-1/sqrt(w)).
        with torch.no_grad():
            b = 1.0 / math.sqrt(self.w1.shape[1])
            self.w1.uniform_(-b, b)
            b = 1.0 / math.sqrt(self.w2.shape[1])
            self.w2.uniform_(-b, b)
            b = 1.0 / math.sqrt(self.width)
            self.b1.uniform_(-b, b)

    @property
    def learner_flops(self) -> int:
        """FLOPs of one learner on one token, as ``FlopCounterMode`` counts them (2 per multiply-accumulate of
        the two matmuls; bias and activation count 0)."""
        return 2 * self.width * (self.d_in + self.d_out)

    @property
    def gate_flops(self) -> int:
        """FLOPs of the gating network on one token (its matmuls; it runs on every token)."""
        return sum(2 * m.in_features * m.out_features for m in self.gate.net)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., N w]: every learner's hidden activations, learner i in columns i w .. (i + 1) w."""
        return self.act(x @ self.w1 + self.b1)

    def learner_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., N, d_out]: every learner's output."""
        h = self.hidden(x).reshape(*x.shape[:-1], self.num_learners, self.width)
        return torch.einsum("...nw,nwo->...no", h, self.w2.view(self.num_learners, self.width, self.d_out))

    def cumulative(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """[..., d_in] -> [..., N + 1, d_out]: the ACM's output at 0..N learners (``forward_mode = 'all'``)."""
        return cumulative_outputs(self.learner_outputs(x), detach)

    def combine(self, h: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Sum of the learners that ``choice`` executes, from their hidden activations ``h`` [..., N w] and the
        choice [..., N + 1]: sum_i m_i h_i W2_i = (h * m repeated over each learner's width) W2 (one matmul)."""
        mask = executed_mask(choice)
        if not self.gate_task_gradient:
            mask = mask.detach()
        return (h * mask.to(h.dtype).repeat_interleave(self.width, dim=-1)) @ self.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.gate(x)
        y = self.combine(self.hidden(x), choice)
        if self.training:
            self.last_choice = choice
        if self.tally is not None:
            counts = choice.detach().reshape(-1, self.num_choices).sum(0).to(self.tally.device, self.tally.dtype)
            self.tally += counts
        return y


class FusedACM(nn.Module):
    """Several ACMs reading one input, outputs concatenated: timm's fused ``qkv`` projection as three ACMs (q, k,
    v; the official code ACMizes the three projections of its unfused attention separately)."""

    def __init__(self, parts: list[ACMLayer]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def representation_loss(cumulative: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Phase 1 (``rep_distill_train.py``): MSE between the ACM's outputs at every number of learners 0..N and the
    original layer's output, mean over tokens, choices and features (``nn.MSELoss()``)."""
    return F.mse_loss(cumulative, target.unsqueeze(-2).expand_as(cumulative))


def gate_labels(cumulative: torch.Tensor, target: torch.Tensor, factor: float) -> torch.Tensor:
    """Phase 2's artificial labels (``gating_networks_train.py``): with e_k = ||y_k - target||_2 the error at k
    learners, the first j with e_j / e_{j+1} < ``factor`` gives label j + 1; j = 0, or no such j, gives N."""
    errors = torch.linalg.vector_norm(cumulative - target.unsqueeze(-2), ord=2, dim=-1)
    rel = errors[..., :-1] / errors[..., 1:]
    first = (rel < factor).double().argmax(-1)
    n = cumulative.shape[-2] - 1
    return torch.where(first == 0, torch.full_like(first, n), first + 1)


def gate_loss(logits: torch.Tensor, labels: torch.Tensor, min_choice: int) -> torch.Tensor:
    """Phase 2: cross-entropy of the gate's softmax over its choices min_choice..N against the labels, mean over
    tokens (the official code takes the NLL of log(straight-through sample + 1e-20) instead; see the method)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), (labels - min_choice).reshape(-1))


def budget_loss(choices: torch.Tensor, learner_costs: torch.Tensor, target: float) -> torch.Tensor:
    """Phase 3's compute penalty (``end_to_end.py``, routing_loss_type 'l1'): ``choices`` [B, T, A, N + 1] over A
    ACMs, ``learner_costs`` [A] (one learner on one token). The ACMs' mean cost per token, summed over ACMs and
    divided by the cost of running every learner, is the executed fraction; the loss is its L1 distance to
    ``target``."""
    n = choices.shape[-1] - 1
    k = torch.arange(n + 1, device=choices.device, dtype=choices.dtype)
    per_acm = (choices * k).sum(-1).mean(dim=(0, 1)) * learner_costs.to(choices.dtype)  # [A]
    return (per_acm.sum() / (n * learner_costs.sum().to(choices.dtype)) - target).abs()


def entropy_loss(choices: torch.Tensor) -> torch.Tensor:
    """Phase 3's entropy term (``end_to_end.py``): per example and ACM, the histogram of choices over the tokens;
    minus the mean of its entropy divided by log(N + 1)."""
    counts = choices.float().sum(dim=1)  # [B, A, N + 1]
    p = counts / counts.sum(-1, keepdim=True)
    ent = -(p * (p + 1e-20).log()).sum(-1)
    return -(ent / math.log(choices.shape[-1])).mean()


def diversity_loss(choices: torch.Tensor) -> torch.Tensor:
    """Phase 3's compute-diversity term (``end_to_end.py``): s_b = mean over tokens, ACMs and choices of
    choice_k * k; minus twice the mean over all pairs (b, b') of |s_b - s_b'|."""
    k = torch.arange(choices.shape[-1], device=choices.device, dtype=torch.float32)
    s = (choices.float() * k).mean(dim=(1, 2, 3))
    return -2.0 * (s[:, None] - s[None, :]).abs().mean()


# --------------------------------------------------------------------------------------------------
# ACMizing a timm ViT
# --------------------------------------------------------------------------------------------------


def why_not_acmizable(vit: nn.Module) -> str | None:
    """Why ``vit`` (a timm VisionTransformer) cannot be ACMized here, or None."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not len(blocks):
        return "not a timm VisionTransformer (no blocks)"
    for i, blk in enumerate(blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)):
            return f"block {i}'s attention has no fused qkv and proj linear layers (timm Attention)"
        if not all(isinstance(getattr(mlp, a, None), nn.Linear) for a in ("fc1", "fc2")) or type(mlp).__name__ != "Mlp":
            return f"block {i}'s MLP is {type(mlp).__name__}, not timm's two-layer Mlp"
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            return f"block {i}'s MLP normalises its hidden layer (scale_mlp_norm), which an ACM learner has no place for"
    return None


def acmize_vit(vit: nn.Module, *, num_learners: int, flops_factor: float, ffn: bool, attention: bool,
               attention_min_choice: int, gate_hidden: int, gate_depth: int, tau: float,
               gate_task_gradient: bool, prefix: str = "") -> list[ACMLayer]:
    """Replace, in place, every block's MLP (``ffn``) and its q, k, v and output projections (``attention``) with
    ACMs, as ``acmize_vit`` does (FFN learners use the MLP's activation; projection learners the identity, the
    official ``attention_activation``). ``prefix`` is the ViT's path inside the model (to name the teacher's layers)."""
    import copy

    made: list[ACMLayer] = []
    common = dict(gate_hidden=gate_hidden, gate_depth=gate_depth, tau=tau, gate_task_gradient=gate_task_gradient)
    for i, blk in enumerate(vit.blocks):
        base = f"{prefix}blocks.{i}"
        if attention:
            qkv, proj = blk.attn.qkv, blk.attn.proj
            d_in, d_attn = qkv.in_features, qkv.out_features // 3
            w = learner_width("proj", d_in, d_attn, 0, num_learners, flops_factor)
            parts = [ACMLayer(d_in, d_attn, num_learners, w, nn.Identity(), min_choice=attention_min_choice,
                              kind=kind, site=f"{base}.attn.qkv", part=j, parts=3, **common)
                     for j, kind in enumerate(("q", "k", "v"))]
            blk.attn.qkv = FusedACM(parts)
            w = learner_width("proj", proj.in_features, proj.out_features, 0, num_learners, flops_factor)
            blk.attn.proj = ACMLayer(proj.in_features, proj.out_features, num_learners, w, nn.Identity(),
                                     min_choice=attention_min_choice, kind="o", site=f"{base}.attn.proj", **common)
            made += [*parts, blk.attn.proj]
        if ffn:
            mlp = blk.mlp
            w = learner_width("ffn", mlp.fc1.in_features, mlp.fc2.out_features, mlp.fc1.out_features, num_learners,
                              flops_factor)
            blk.mlp = ACMLayer(mlp.fc1.in_features, mlp.fc2.out_features, num_learners, w, copy.deepcopy(mlp.act),
                               min_choice=0, kind="ffn", site=f"{base}.mlp", **common)
            made.append(blk.mlp)
    return made


def acm_layers(model: nn.Module) -> list[ACMLayer]:
    """The ACMs of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ACMLayer)]


def capture(model: nn.Module, run, sites: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``run(model)`` with forward hooks on the modules at ``sites``: each site's (input, output)."""
    modules = dict(model.named_modules())
    missing = [s for s in sites if s not in modules]
    if missing:
        raise ValueError(f"the teacher has no module at {missing[:3]} (the ACMized model was built from another "
                         f"architecture)")
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(module, inputs, output):
            seen[name] = (inputs[0], output)
        return fn

    handles = [modules[s].register_forward_hook(hook(s)) for s in dict.fromkeys(sites)]
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return seen
