"""FLOPs and MACs of a forward pass, from ``torch.utils.flop_counter.FlopCounterMode``.

Why this counter (measurement.md §4 and §7.5): the tools in use disagree by up to 2x, mostly because
some return MACs under the name "flops" (fvcore's ``FlopCountAnalysis`` counts "one fused multiply-add
as one flop"; thop and ptflops return MACs too) and because fused attention kernels are invisible to
hook-based counters. ``FlopCounterMode`` intercepts aten ops with a ``TorchDispatchMode``, so it sees
what actually runs, and its formulas count **2 FLOPs per multiply-accumulate** (``mm`` = 2·m·n·k). We
store FLOPs and derive ``macs = flops / 2``.

Conventions (the same as ``FlopCounterMode``'s built-in formulas, stated here because they decide the
numbers on the leaderboard):

- Only matmul-like work is counted: mm/addmm/bmm/baddbmm, convolutions, attention. Norms, softmax,
  activations, element-wise ops and bias additions count 0 (about 1% on ResNet-50, §4.2).
- Attention counts the two matmuls QKᵀ and AV: ``2·(2·B·H·Lq·Lk·D)`` FLOPs forward. **No causal
  discount**: a causal mask does not halve the count (torch's CUDA SDPA formulas make the same choice,
  "NB: We aren't accounting for causal attention here").
- The backward of attention counts five matmuls (recomputed scores, dV, dP, dQ, dK), like torch's
  formulas for the CUDA SDPA kernels.

What we add to torch's registry (``_extra_formulas``), per-counter through ``custom_mapping`` so nothing
global is patched:

- ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward. Without them CPU SDPA counts
  **0** in torch 2.14 (verified; measurement.md §4 cites allenai/olmoearth_pretrain PR #605 and other
  repositories that add it through ``custom_mapping``). Every HF model with ``attn_implementation="sdpa"``
  on CPU goes through this kernel.
- ``aten._scaled_dot_product_attention_math_for_mps`` and the "overrideable" fused SDPA (XPU and other
  out-of-tree backends) with the same formula, where this torch has them.
- ``mv``, ``addmv``, ``dot``, ``vdot`` and ``_addmm_activation`` (matrix-vector and fused addmm+activation
  kernels that are leaves on CPU and otherwise count 0).
- ``aten._native_multi_head_attention`` and ``aten._transformer_encoder_layer_fwd``: the fused inference
  kernels that ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take in ``eval()`` under
  ``no_grad`` (§4: "no formula"). Each is one opaque leaf op, so without a formula a whole attention block,
  projections and feed-forward included, counts 0: torchvision's ``vit_b_16`` came out at 11.27 instead
  of 17.56 GMACs. The formulas count the same matmuls as the unfused path (in-projections, QKᵀ, AV,
  output projection, and the two FFN linears for the encoder layer), so eval+no_grad and grad-enabled
  counts agree exactly; with nested-tensor inputs (padding masks in eval) only real tokens are counted,
  as only they are computed.

Ops that look matmul/conv/attention-like but have no formula (for example ``nn.LSTM``'s CPU kernel
``aten.mkldnn_rnn_layer``) are reported in `FlopCount.uncounted`; ``strict=True`` turns them into an error
(§4.2: "fail when a matmul-like aten op is left uncounted"). They are found by a second dispatch mode placed *below* the counter, which therefore
sees exactly the leaf ops the counter executed (after the counter's own decompositions).

``FlopCounterMode`` works on the ``meta`` device and under ``FakeTensorMode``, so large models can be
counted without allocating their weights (see the tests for a BERT-base count at 11.17 GMACs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from bench.measure._errors import UncountedOpsError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FlopCount", "count_flops", "is_matmul_like", "model_flops_per_sample"]


@dataclass
class FlopCount:
    """The result of one count.

    ``flops`` counts 2 per multiply-accumulate; ``macs`` is ``flops // 2``. ``by_op`` maps aten op names
    (``"aten.addmm"``) to FLOPs. ``uncounted`` lists matmul/conv/attention-like ops that ran without a
    formula (sorted, unique): a non-empty list means ``flops`` is a lower bound. ``batch_size`` is the
    divisor already applied (1 for a raw count; `model_flops_per_sample` sets it). ``inputs`` records the
    input shapes counted, when known.
    """

    flops: int
    by_op: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)
    batch_size: int = 1
    inputs: dict[str, list[int]] = field(default_factory=dict)
    macs: int = field(init=False)

    def __post_init__(self) -> None:
        # Every formula counts 2 per MAC, so flops is even; integer division keeps JSON integers.
        self.macs = self.flops // 2

    @property
    def complete(self) -> bool:
        """True when no matmul-like op went uncounted."""
        return not self.uncounted

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for run records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlopCount:
        """Inverse of `to_dict` (``macs`` is recomputed from ``flops``)."""
        return cls(**{k: v for k, v in data.items() if k != "macs"})


# --------------------------------------------------------------------------------------------------
# Formulas added to torch's registry. They receive shapes (FlopCounterMode's ``shape_wrapper`` turns
# tensors into their shapes) and return FLOPs, 2 per MAC.
# --------------------------------------------------------------------------------------------------


def _attention_dims(query: Any, key: Any, value: Any) -> tuple[int, int, int, int, int]:
    """(batch*heads, Lq, Lk, D, Dv) from q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv).

    Batch*heads comes from the *query*, so grouped-query attention (fewer K/V heads, broadcast by the
    kernel) is counted at the work actually done per query head.
    """
    *lead, lq, d = query
    lk = key[-2]
    dv = value[-1]
    return math.prod(lead), lq, lk, d, dv


def _sdpa_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Scores QKᵀ plus output AV; masks, scale, dropout and softmax are not counted, causal not discounted."""
    bh, lq, lk, d, dv = _attention_dims(query, key, value)
    return 2 * bh * lq * lk * d + 2 * bh * lq * lk * dv


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Five matmuls: recomputed scores (QKᵀ), dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q.

    The flash-style CPU kernel recomputes the scores from the saved logsumexp, so the recompute is real
    work; torch's formulas for the CUDA kernels use the same five products.
    """
    bh, lq, lk, d, dv = _attention_dims(query, key, value)
    return 2 * bh * lq * lk * (3 * d + 2 * dv)


def _mv_flops(mat, vec, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat[0] * mat[1]


def _addmv_flops(self_, mat, vec, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat[0] * mat[1]


def _dot_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0]


def _addmm_activation_flops(self_, mat1, mat2, *args, out_shape=None, **kwargs) -> int:
    # same work as addmm; the fused activation is element-wise and, as everywhere, not counted
    return 2 * mat1[0] * mat1[1] * mat2[1]


def _shape(x: Any) -> tuple[int, ...]:
    """The shape of a (non-nested) tensor, or the shape itself if one is passed."""
    return tuple(int(n) for n in (x.shape if hasattr(x, "shape") else x))


def _sequence_lengths(x: Any) -> list[int]:
    """Tokens per sequence of a ``(..., L, E)`` activation: one entry ``L`` per sequence.

    The fused transformer kernels below also accept *nested* tensors (``nn.TransformerEncoder`` packs a
    padded batch into one when given ``src_key_padding_mask`` in eval; ``nn.MultiheadAttention`` passes
    nested inputs through), and a nested tensor has no ``.shape``. Its per-sequence sizes come from
    ``_nested_tensor_size()``, so the padding the kernel skips is not counted. A plain ``torch.Size``
    is accepted too, in case a torch build hands shapes instead of tensors to a raw formula.
    """
    if getattr(x, "is_nested", False):
        return [int(row[-2]) for row in x._nested_tensor_size().tolist()]  # one row (L_i, E) per sequence
    *lead, length, _features = _shape(x)
    return [length] * math.prod(lead)


def _fused_attention_block_flops(query: Any, key: Any, qkv_weight: Any, proj_weight: Any) -> int:
    """Input projections (Q from ``query``, K and V from ``key``), QKᵀ and AV over all heads, output
    projection; 2 per MAC, biases, scaling, masks and softmax not counted, as everywhere.

    Heads do not appear: per head the two attention matmuls cost ``Lq·Lk·(E/H)`` MACs each, and the
    ``H`` heads add up to ``Lq·Lk·E``. ``value`` has the same sequence lengths as ``key`` (the kernel
    requires it), so it is not needed. ``qkv_weight`` is the packed ``(3E, E)`` in-projection.
    """
    lq, lk = _sequence_lengths(query), _sequence_lengths(key)
    packed_rows, e_in = _shape(qkv_weight)
    e = packed_rows // 3
    out_rows, out_cols = _shape(proj_weight)
    nq, nk = sum(lq), sum(lk)
    in_proj = 2 * e * e_in * (nq + 2 * nk)  # Q over the query tokens; K and V over the key tokens
    attention = 2 * 2 * e * sum(a * b for a, b in zip(lq, lk))  # QKᵀ and AV, all heads
    out_proj = 2 * nq * out_rows * out_cols
    return in_proj + attention + out_proj


def _native_mha_flops(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, *args,
                      out_val=None, **kwargs) -> int:
    """``aten._native_multi_head_attention``: the fused inference kernel behind ``nn.MultiheadAttention``
    in eval mode under no_grad (batch-first, same embedding size for Q/K/V), used by torchvision's ViT.

    Without this formula FlopCounterMode sees one opaque leaf op and counts the whole attention block,
    projections included, as 0 (torchvision ``vit_b_16`` came out at 11.27 instead of 17.56 GMACs).
    """
    return _fused_attention_block_flops(query, key, qkv_weight, proj_weight)


def _transformer_encoder_layer_flops(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                                     proj_bias, use_gelu, norm_first, eps, norm_weight_1, norm_bias_1,
                                     norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2,
                                     *args, out_val=None, **kwargs) -> int:
    """``aten._transformer_encoder_layer_fwd``: ``nn.TransformerEncoderLayer``'s eval + no_grad fast path,
    one kernel for self-attention (as `_native_mha_flops`) plus the two feed-forward linears
    ``E→F`` and ``F→E``. Layer norms, activation and residual additions count 0, as everywhere.
    """
    tokens = sum(_sequence_lengths(src))
    ffn = sum(2 * tokens * math.prod(_shape(w)) for w in (ffn_weight_1, ffn_weight_2))
    return _fused_attention_block_flops(src, src, qkv_weight, proj_weight) + ffn


# Raw formulas get the op's tensors, not their shapes (FlopCounterMode's ``custom_mapping`` skips its
# shape wrapper for callables with ``_get_raw``), because nested-tensor inputs have no shape to take.
_native_mha_flops._get_raw = True  # type: ignore[attr-defined]
_transformer_encoder_layer_flops._get_raw = True  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def _extra_formulas() -> dict[Any, Callable[..., int]]:
    """Op packet -> formula, for the ops this torch build has (names differ across torch versions)."""
    import torch

    aten = torch.ops.aten
    wanted = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_forward_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward_flops,
        "_scaled_dot_product_attention_math_for_mps": _sdpa_forward_flops,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_forward_flops,
        "_scaled_dot_product_fused_attention_overrideable_backward": _sdpa_backward_flops,
        "mv": _mv_flops,
        "addmv": _addmv_flops,
        "dot": _dot_flops,
        "vdot": _dot_flops,
        "_addmm_activation": _addmm_activation_flops,
        "_native_multi_head_attention": _native_mha_flops,
        "_transformer_encoder_layer_fwd": _transformer_encoder_layer_flops,
    }
    mapping: dict[Any, Callable[..., int]] = {}
    for name, formula in wanted.items():
        try:
            packet = getattr(aten, name)
        except (AttributeError, RuntimeError):
            continue  # not in this torch build
        mapping[packet] = formula
    return mapping


# --------------------------------------------------------------------------------------------------
# Detecting matmul-like ops that have no formula
# --------------------------------------------------------------------------------------------------

# Name tokens (op names split on "_") that mark matmul-, conv- or attention-like work. Matching whole
# tokens avoids false hits such as "convert_element_type" or "upsample_bilinear2d".
_MATMUL_TOKENS = frozenset(
    {
        "mm", "bmm", "addmm", "addbmm", "baddbmm", "matmul", "mv", "addmv", "dot", "vdot", "addr",
        "gemm", "gemv", "einsum", "tensordot", "linear", "bilinear", "trilinear", "cdist",
        "convolution", "attention", "attn", "sdpa", "transformer", "lstm", "gru", "rnn",
    }
)
_CONV_TOKEN = re.compile(r"conv(\d+d)?|conv_?transpose\d*d?")


def is_matmul_like(op_name: str) -> bool:
    """Whether an op name (``"aten._transformer_encoder_layer_fwd"``) denotes matmul/conv/attention work."""
    base = op_name.rsplit(".", 1)[-1].lower()
    for token in base.split("_"):
        if token in _MATMUL_TOKENS or _CONV_TOKEN.fullmatch(token):
            return True
    return "scaled_dot_product" in base


def _leaf_recorder():
    """A dispatch mode that records the packet of every op reaching it, then runs the op unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _LeafOpRecorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[Any] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func._overloadpacket)
            return func(*args, **(kwargs or {}))

    return _LeafOpRecorder()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def count_flops(fn: Callable[[], Any], *, strict: bool = False) -> FlopCount:
    """Run ``fn()`` once under ``FlopCounterMode`` (with `_extra_formulas`) and return its `FlopCount`.

    ``fn`` runs for real on whatever tensors it closes over (real, ``meta`` or fake), including any
    backward it calls. With ``strict=True``, raise `UncountedOpsError` if a matmul/conv/attention-like op
    ran without a formula; otherwise such ops are listed in ``uncounted`` and the caller decides.
    """
    from torch.utils.flop_counter import FlopCounterMode

    recorder = _leaf_recorder()
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    # The recorder is entered first, so it sits *below* the counter on the mode stack: the counter sees
    # each op first, decomposes what it has no formula for, and the ops it finally executes fall through
    # to the recorder. The recorder thus sees the same leaf ops the counter looked up.
    with recorder, counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items() if n}
    uncounted = sorted(
        str(op)
        for op in recorder.seen
        if op not in counter.flop_registry and is_matmul_like(str(op))
    )
    result = FlopCount(flops=int(counter.get_total_flops()), by_op=by_op, uncounted=uncounted)
    if strict and uncounted:
        raise UncountedOpsError(uncounted)
    return result


def model_flops_per_sample(
    model: nn.Module,
    forward: Callable[[nn.Module, dict], Any],
    inputs: dict,
    batch_size: int,
    *,
    strict: bool = False,
) -> FlopCount:
    """FLOPs of one inference forward per sample: ``forward(model, inputs)`` in eval mode under no_grad,
    divided by ``batch_size`` (the batch size of ``inputs``).

    The model's train/eval flag is restored afterwards. Division is exact for models whose work scales
    with the batch; batch-independent work (rare) is spread over the batch and rounded to an integer.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = count_flops(lambda: forward(model, inputs), strict=strict)
    finally:
        model.train(was_training)
    shapes = {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return FlopCount(
        flops=round(total.flops / batch_size),
        by_op={op: round(n / batch_size) for op, n in total.by_op.items()},
        uncounted=total.uncounted,
        batch_size=batch_size,
        inputs=shapes,
    )
