"""AutoDistil's search space, weight-sharing SuperLMs and self-attention relation loss (used by ``autodistil``).

Read from the official code, microsoft/autodistil @ ea5cc7f (see ``autodistil.py`` for what is a deviation):

* **Sub-spaces** (``Code/run_yaml/KD_wiki_book_Seqlen128_PreModel_RndSampl_{Base,Small,Tiny}_256Subs.yaml``):
  each a grid of 4 values per dimension, ``linspace(lo, hi, 4)`` of a fraction of the teacher's layers, heads
  and hidden size, and of an FFN ratio; 4^4 = 256 students per sub-space (K = 3: base, small, tiny).
* **Weight sharing** (``Code/transformers/modeling_bert.py``: ``DynaLinear_v1``, ``DynaEmbedding_v1``,
  ``DynaBertLayerNorm_v1``, ``BertEncoder_v1``): every weight of a student is the leading slice of the
  SuperLM's (the first ``hidden`` dimensions, the first ``heads`` heads of the teacher's head size, the first
  ``ffn`` neurons); its layers are the SuperLM's layers ``floor(i / depth_mult)``, i < depth.
* **Relations** (``BertSelfAttention_v1.forward`` and ``run_wiki_plus_book_NoAssist_RndSampl.py``): the last
  layer's queries, keys and values (each ``heads x head_size`` wide) are split into as many *relation heads* as
  the teacher has attention heads, each of width ``width // teacher_heads``; relation = X X^T / sqrt(d_r).

Students run through Hugging Face's own ``BertForSequenceClassification`` code: a sub-network is a model of the
student's shape (built once per architecture on the meta device) called with ``torch.func.functional_call`` on
views of the SuperLM's parameters, so gradients flow into those slices, and the extracted student (the same
shape, with the slices copied) computes exactly what the sub-network computed.

This module imports torch: ``autodistil`` imports it only inside its functions.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import product
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from bench.api import Batch


# --------------------------------------------------------------------------------------------------
# Architectures and the sub-space partition
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Arch:
    """One student: encoder layers, attention heads (of the teacher's head size), hidden size, FFN width."""

    layers: int
    heads: int
    hidden: int
    ffn: int

    def name(self) -> str:
        return f"L{self.layers}-A{self.heads}-H{self.hidden}-F{self.ffn}"

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# The paper's K = 3 sub-spaces as the official configurations write them, per dimension (lo, hi) for
# linspace(lo, hi, points): layers, heads and hidden as fractions of BERT-base's 12 / 12 / 768, the FFN ratio
# absolute (FFN = hidden x ratio for a teacher whose FFN is 4 x hidden). KD_wiki_book_..._{Base,Small,Tiny}_256Subs.yaml
# (Depth_Mult_List, Width_Mult_List, Hidden_Mult_List, Intermediate_Mult_List).
PAPER_SUBSPACES: dict[str, tuple[tuple[float, float], ...]] = {
    "base": ((9 / 12, 12 / 12), (9 / 12, 12 / 12), (17 / 24, 20 / 24), (2.5, 4.0)),
    "small": ((9 / 12, 12 / 12), (7 / 12, 10 / 12), (8 / 24, 11 / 24), (2.5, 4.0)),
    "tiny": ((4 / 12, 7 / 12), (7 / 12, 10 / 12), (4 / 24, 7 / 24), (2.0, 3.5)),
}


@dataclass(frozen=True)
class SubSpace:
    """One sub-space: the values of each dimension, and the students they make (their product)."""

    name: str
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    hidden: tuple[int, ...]
    ratios: tuple[float, ...]
    teacher_ffn_ratio: float  # the teacher's FFN / hidden (4 for BERT): FFN = hidden x ratio x this / 4
    max_ffn: int

    def ffn(self, hidden: int, ratio: float) -> int:
        return min(self.max_ffn, max(1, round_half_up(hidden * ratio * self.teacher_ffn_ratio / 4.0)))

    def archs(self) -> list[Arch]:
        """The distinct students of the sub-space, sorted."""
        return sorted({Arch(l, a, h, self.ffn(h, r))
                       for l, a, h, r in product(self.layers, self.heads, self.hidden, self.ratios)})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers), "heads": list(self.heads),
                "hidden": list(self.hidden), "ffn_ratio": list(self.ratios), "students": len(self.archs())}


def round_half_up(x: float) -> int:
    """Nearest integer, halves up (Python's round() rounds halves to even; 1e-9 absorbs 543.9999... for 544)."""
    return int(math.floor(x + 0.5 + 1e-9))


def linspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo] if n == 1 else [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def partition(layers: int, heads: int, hidden: int, ffn: int, names: Sequence[str] = ("base", "small", "tiny"),
              points: int = 4) -> list[SubSpace]:
    """The paper's sub-spaces scaled to a teacher of these dimensions: each fraction times the teacher's size,
    rounded (halves up) and kept within [1, teacher's]; values that coincide after rounding are kept once."""
    out = []
    for name in names:
        (l0, l1), (a0, a1), (h0, h1), (r0, r1) = PAPER_SUBSPACES[name]

        def grid(lo: float, hi: float, full: int) -> tuple[int, ...]:
            return tuple(sorted({min(full, max(1, round_half_up(f * full))) for f in linspace(lo, hi, points)}))

        out.append(SubSpace(name, grid(l0, l1, layers), grid(a0, a1, heads), grid(h0, h1, hidden),
                            tuple(linspace(r0, r1, points)), ffn / hidden, ffn))
    return out


def kept_layers(depth: int, teacher_depth: int) -> list[int]:
    """The SuperLM layers a ``depth``-layer student runs: floor(i / depth_mult), depth_mult = depth / teacher's
    (``BertEncoder_v1``), in integer arithmetic."""
    return [(i * teacher_depth) // depth for i in range(depth)]


# --------------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What a BERT classifier's cost depends on besides its architecture."""

    head_dim: int
    vocab: int
    positions: int
    type_vocab: int
    labels: int


def shape_of(model: nn.Module) -> Shape:
    cfg = model.config
    return Shape(head_dim=cfg.hidden_size // cfg.num_attention_heads, vocab=cfg.vocab_size,
                 positions=cfg.max_position_embeddings, type_vocab=cfg.type_vocab_size, labels=cfg.num_labels)


def arch_of(model: nn.Module) -> Arch:
    cfg = model.config
    return Arch(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size)


def n_params(arch: Arch, shape: Shape) -> int:
    """Parameters of ``BertForSequenceClassification`` of this shape (embeddings, layers, pooler, classifier)."""
    h, w, f = arch.hidden, arch.heads * shape.head_dim, arch.ffn
    emb = (shape.vocab + shape.positions + shape.type_vocab) * h + 2 * h
    layer = 3 * (h * w + w) + (w * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    return emb + arch.layers * layer + (h * h + h) + (h * shape.labels + shape.labels)


def n_flops(arch: Arch, shape: Shape, seq: int) -> int:
    """Forward FLOPs of one sequence of ``seq`` tokens: 2 x the multiply-adds of the matrix products (projections,
    attention scores and context, FFN, pooler, classifier); lookups, norms and activations are not counted."""
    h, w, f = arch.hidden, arch.heads * shape.head_dim, arch.ffn
    layer = seq * (3 * h * w + w * h + 2 * h * f) + 2 * seq * seq * w
    return 2 * (arch.layers * layer + h * h + h * shape.labels)


# --------------------------------------------------------------------------------------------------
# The self-attention relation loss
# --------------------------------------------------------------------------------------------------


def relations(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Scaled dot-product relations of ``x`` (B, T, D) split into ``n_heads`` relation heads of width
    d_r = D // n_heads (the last D - n_heads d_r columns are dropped): (B, n_heads, T, T), X_r X_r^T / sqrt(d_r)."""
    b, t, d = x.shape
    dr = d // n_heads
    if dr < 1:
        raise ValueError(f"{d} dimensions cannot make {n_heads} relation heads")
    xr = x[..., : dr * n_heads].reshape(b, t, n_heads, dr).transpose(1, 2)
    return xr @ xr.transpose(-1, -2) / math.sqrt(dr)


def relation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor,
                  n_heads: int, kind: str = "mse") -> torch.Tensor:
    """Sum over (queries, keys, values) of the distance between the student's and teacher's relations.

    ``mse``: mean over relation heads and over the (query, key) pairs of real tokens of the squared difference of
    the relation scores (the official SuperLM training: ``loss_mse`` of QQ, KK and VV, summed). ``kl``: MiniLMv2's
    KL(teacher || student) between each query's softmax distribution over the real keys, averaged over relation
    heads and real queries. ``mask`` (B, T) is the attention mask (1 for real tokens)."""
    import torch.nn.functional as F

    real = mask.bool()
    keys = real[:, None, None, :]
    pairs = real[:, None, :, None] & keys
    total = torch.zeros((), device=mask.device)
    for s, t in zip(student, teacher):
        rs, rt = relations(s.float(), n_heads), relations(t.detach().float(), n_heads)
        if kind == "mse":
            sq = (rs - rt).pow(2).masked_fill(~pairs, 0.0)
            total = total + sq.sum() / (pairs.sum() * n_heads)
        elif kind == "kl":
            log_s = F.log_softmax(rs.masked_fill(~keys, -1e4), dim=-1)
            log_t = F.log_softmax(rt.masked_fill(~keys, -1e4), dim=-1)
            kl = (log_t.exp() * (log_t - log_s)).masked_fill(~pairs, 0.0)
            total = total + kl.sum() / (real.sum() * n_heads)
        else:
            raise ValueError(f"unknown relation loss {kind!r}; valid: mse, kl")
    return total


# --------------------------------------------------------------------------------------------------
# Sub-networks of a SuperLM
# --------------------------------------------------------------------------------------------------


def resize_attention(model: nn.Module, heads: int, head_dim: int) -> nn.Module:
    """Give every self-attention of a Hugging Face BERT ``heads`` heads of width ``head_dim`` (queries, keys and
    values of width heads x head_dim, read back by the attention output), whatever its hidden size, as the official
    ``DynaLinear_v1`` slicing does. Hugging Face's attention reads only these attributes at run time."""
    width = heads * head_dim
    for layer in model.bert.encoder.layer:
        att, out = layer.attention.self, layer.attention.output
        hidden = att.query.in_features
        kw = {"device": att.query.weight.device, "dtype": att.query.weight.dtype}
        att.query, att.key, att.value = (nn.Linear(hidden, width, **kw) for _ in range(3))
        out.dense = nn.Linear(width, hidden, **kw)
        att.num_attention_heads, att.attention_head_size, att.all_head_size = heads, head_dim, width
        att.scaling = head_dim ** -0.5
    model.config.num_attention_heads = heads
    model.config.autodistil_head_size = head_dim  # the config alone no longer says it (hidden / heads need not)
    return model


def build_student(config: Any, arch: Arch, head_dim: int, meta: bool = False) -> nn.Module:
    """An (untrained) ``BertForSequenceClassification`` of shape ``arch``, config fields otherwise as ``config``."""
    from transformers import BertForSequenceClassification

    cfg = copy.deepcopy(config)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = arch.hidden, arch.layers, arch.ffn
    cfg.num_attention_heads = 1  # any divisor of the hidden size; resize_attention sets the heads
    if meta:
        with torch.device("meta"):
            model = BertForSequenceClassification(cfg)
    else:
        model = BertForSequenceClassification(cfg)
    return resize_attention(model, arch.heads, head_dim)


def super_name(name: str, kept: Sequence[int]) -> str:
    """The SuperLM parameter a student parameter is a slice of (its layer i is the SuperLM's layer kept[i])."""
    prefix = "bert.encoder.layer."
    if name.startswith(prefix):
        i, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{kept[int(i)]}.{rest}"
    return name


def leading_slice(src: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The leading ``shape`` block of ``src`` (a view: gradients reach ``src``)."""
    if len(shape) != src.dim() or any(s > m for s, m in zip(shape, src.shape)):
        raise ValueError(f"a {tuple(shape)} slice does not fit in a {tuple(src.shape)} tensor")
    return src[tuple(slice(0, s) for s in shape)]


def student_tensors(supernet: nn.Module, template: nn.Module, arch: Arch) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a student of ``template``'s shape, as views of ``supernet``'s."""
    kept = kept_layers(arch.layers, supernet.config.num_hidden_layers)
    source = dict(supernet.named_parameters())
    source.update(dict(supernet.named_buffers()))
    out = {}
    for name, t in list(template.named_parameters()) + list(template.named_buffers()):
        out[name] = leading_slice(source[super_name(name, kept)], t.shape)
    return out


def extract(supernet: nn.Module, arch: Arch, head_dim: int) -> nn.Module:
    """The student ``arch`` as a standalone model: the SuperLM's slices copied into a model of its shape."""
    student = build_student(supernet.config, arch, head_dim)
    tensors = student_tensors(supernet, student, arch)
    with torch.no_grad():
        for name, t in list(student.named_parameters()) + list(student.named_buffers()):
            t.copy_(tensors[name])
    return student.to(next(supernet.parameters()).device)


@contextmanager
def last_layer_qkv(model: nn.Module) -> Iterator[list]:
    """While active, the list holds the last encoder layer's query, key and value projections (B, T, width)."""
    att = model.bert.encoder.layer[-1].attention.self
    seen: list = [None, None, None]
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
               for i, m in enumerate((att.query, att.key, att.value))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def teacher_qkv(teacher: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """The teacher's last-layer queries, keys and values on ``batch``."""
    with last_layer_qkv(teacher) as seen:
        teacher(**model_inputs(batch))
    return list(seen)


class SubnetRunner:
    """Runs students of a SuperLM: the meta-device templates of their shapes, built once per architecture."""

    def __init__(self) -> None:
        self.templates: dict[Arch, nn.Module] = {}

    def template(self, supernet: nn.Module, arch: Arch, head_dim: int) -> nn.Module:
        if arch not in self.templates:
            self.templates[arch] = build_student(supernet.config, arch, head_dim, meta=True)
        return self.templates[arch]

    def run(self, supernet: nn.Module, arch: Arch, head_dim: int, batch: Batch) -> tuple[torch.Tensor, list]:
        """The student ``arch`` of ``supernet`` on ``batch`` (in the SuperLM's train/eval mode): its logits and
        last-layer queries, keys and values; gradients flow into the SuperLM's slices."""
        from torch.func import functional_call

        template = self.template(supernet, arch, head_dim)
        template.train(supernet.training)
        with last_layer_qkv(template) as seen:
            out = functional_call(template, student_tensors(supernet, template, arch), (),
                                  model_inputs(batch), strict=True)
        return out.logits, list(seen)


class SuperLMContainer(nn.Module):
    """The K SuperLMs of one cell, one per sub-space, each a trainable copy of the teacher: the cell's "student"
    while they train. Not a model to evaluate: the chosen student is extracted from it."""

    def __init__(self, teacher: nn.Module, n: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(copy.deepcopy(teacher) for _ in range(n))
        for p in self.nets.parameters():
            p.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the AutoDistil SuperLMs are trained and searched, not run as a model; the chosen "
                           "student is extracted from them at the start of fine-tuning")


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A scored student: its sub-space, architecture, cost and held-out relation loss (lower is better)."""

    space: str
    arch: Arch
    cost: float
    loss: float


def choose(candidates: Sequence[Candidate], budget: float) -> Candidate:
    """The candidate with the lowest loss among those costing at most ``budget`` (ties: the cheaper, then the
    first listed). Raises ValueError when none meets the budget."""
    feasible = [c for c in candidates if c.cost <= budget]
    if not feasible:
        raise ValueError(f"no candidate costs at most {budget:g} (cheapest: {min(c.cost for c in candidates):g})"
                         if candidates else "no candidates")
    return min(enumerate(feasible), key=lambda ic: (ic[1].loss, ic[1].cost, ic[0]))[1]
