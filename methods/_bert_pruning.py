"""Structured pruning of a Hugging Face BERT-family teacher into a smaller student (used by MiniMA).

MiniMA (GeneZC/MiniMA @ 4842dc0, ``minima/run_sparsification_llama.py`` and
``minima/run_converting_llama.py``) puts differentiable masks on attention heads (per layer), FFN
neurons (per layer) and hidden dimensions (shared by all layers), accumulates importance = mean over
batches of |dL/dmask| on a small pruning set, keeps the most important units, and then drops whole
layers symmetrically, keeping the middle block (``layers[d:-d]``).

No masks are inserted here: the gradient of a mask multiplying a unit's output equals a sum of
weight x gradient over the parameters that consume (or, for a LayerNorm, produce) that unit, because
the output is linear in them (Euler's theorem for degree-1 homogeneous functions):

* head h of a layer: columns of ``attention.output.dense`` that read head h's context vector;
* FFN neuron j: column j of ``output.dense``;
* hidden dimension d: gamma_d and beta_d of every LayerNorm (each residual-stream dimension passes
  through a LayerNorm after the embeddings and after every sub-layer), summed over all of them.

So one ordinary backward pass per batch gives exactly the mask gradients MiniMA accumulates.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch

_LAYER = "bert.encoder.layer.{}."


def bert_dims(model: nn.Module) -> dict[str, int] | None:
    """Architecture numbers of a BERT-family model, or None if it is not one."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "bert" or not hasattr(model, "bert"):
        return None
    return {
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads, "ffn": cfg.intermediate_size,
        "vocab": cfg.vocab_size, "positions": cfg.max_position_embeddings,
        "type_vocab": cfg.type_vocab_size, "labels": getattr(cfg, "num_labels", 0),
    }


def why_not_prunable(teacher: nn.Module, student: nn.Module) -> str | None:
    """None if ``student`` can be cut out of ``teacher``, else the reason."""
    t, s = bert_dims(teacher), bert_dims(student)
    if t is None or s is None:
        return "teacher and student are not both Hugging Face BERT-family models"
    return dims_mismatch(t, s, same=("vocab", "positions", "type_vocab", "head_dim", "labels"))


def dims_mismatch(t: dict, s: dict, same: tuple[str, ...],
                  at_most: tuple[str, ...] = ("layers", "hidden", "heads", "ffn")) -> str | None:
    """Why a student of dimensions ``s`` cannot be cut out of a teacher of dimensions ``t``: a key of
    ``same`` differs, or the student has more of a key of ``at_most``; None when it can."""
    for key in same:
        if t[key] != s[key]:
            return f"{key} differs (teacher {t[key]}, student {s[key]})"
    for key in at_most:
        if s[key] > t[key]:
            return f"the student has more {key} than the teacher ({s[key]} > {t[key]})"
    return None


def importance(teacher: nn.Module, batches: list[Batch], loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Mean over batches of |mask gradient| for heads [L, H], neurons [L, F] and hidden dims [D]."""
    import torch

    model = copy.deepcopy(teacher).eval()  # eval: no dropout noise in the estimate
    for p in model.parameters():
        p.requires_grad_(True)
    dims = bert_dims(model)
    L, H, hd = dims["layers"], dims["heads"], dims["head_dim"]
    heads = torch.zeros(L, H)
    neurons = torch.zeros(L, dims["ffn"])
    hidden = torch.zeros(dims["hidden"])
    named = dict(model.named_parameters())
    norms = [n[: -len(".weight")] for n in named if n.endswith("LayerNorm.weight")]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        with torch.no_grad():
            for i in range(L):
                w = named[_LAYER.format(i) + "attention.output.dense.weight"]
                heads[i] += (w * w.grad).sum(0).view(H, hd).sum(-1).abs()
                w = named[_LAYER.format(i) + "output.dense.weight"]
                neurons[i] += (w * w.grad).sum(0).abs()
            h = torch.zeros_like(hidden)
            for n in norms:
                g, b = named[n + ".weight"], named[n + ".bias"]
                h += g * g.grad + b * b.grad
            hidden += h.abs()
    n = max(1, len(batches))
    return {"heads": heads / n, "neurons": neurons / n, "hidden": hidden / n}


def middle_layers(n_teacher: int, n_student: int) -> list[int]:
    """MiniMA keeps the middle block, dropping d = (L_t - L_s) / 2 layers at each end (``layers[d:-d]``).

    When L_t - L_s is odd the extra layer is dropped from the top.
    """
    d = (n_teacher - n_student) // 2
    return list(range(d, d + n_student))


def pruned_state_dict(teacher: nn.Module, student: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's weights cut to the student's shape: top-k heads/neurons per layer, top-k hidden
    dims shared by all layers (indices kept in their original order), then the middle layers."""
    import torch

    t, s = bert_dims(teacher), bert_dims(student)
    hd = t["head_dim"]
    keep_d = torch.sort(torch.topk(scores["hidden"], s["hidden"]).indices).values
    layers = middle_layers(t["layers"], s["layers"])
    src = teacher.state_dict()
    out: dict[str, torch.Tensor] = {}

    def cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, idx).clone()

    def rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, idx).clone()

    for key, value in src.items():
        if key.startswith("bert.embeddings."):
            if key.endswith("position_ids") or key.endswith("token_type_ids"):
                out[key] = value.clone()
            else:  # word/position/type embeddings [*, D] and the embedding LayerNorm [D]
                out[key] = cols(value, keep_d)
        elif key.startswith("bert.pooler.dense."):
            out[key] = cols(rows(value, keep_d), keep_d) if key.endswith("weight") else rows(value, keep_d)
        elif key.startswith("classifier."):
            out[key] = cols(value, keep_d) if key.endswith("weight") else value.clone()
    for new_i, old_i in enumerate(layers):
        pre_old, pre_new = _LAYER.format(old_i), _LAYER.format(new_i)
        keep_h = torch.sort(torch.topk(scores["heads"][old_i], s["heads"]).indices).values
        keep_a = (keep_h[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
        keep_f = torch.sort(torch.topk(scores["neurons"][old_i], s["ffn"]).indices).values
        for proj in ("query", "key", "value"):
            k = f"attention.self.{proj}."
            out[pre_new + k + "weight"] = cols(rows(src[pre_old + k + "weight"], keep_a), keep_d)
            out[pre_new + k + "bias"] = rows(src[pre_old + k + "bias"], keep_a)
        k = "attention.output.dense."
        out[pre_new + k + "weight"] = cols(rows(src[pre_old + k + "weight"], keep_d), keep_a)
        out[pre_new + k + "bias"] = rows(src[pre_old + k + "bias"], keep_d)
        k = "intermediate.dense."
        out[pre_new + k + "weight"] = cols(rows(src[pre_old + k + "weight"], keep_f), keep_d)
        out[pre_new + k + "bias"] = rows(src[pre_old + k + "bias"], keep_f)
        k = "output.dense."
        out[pre_new + k + "weight"] = cols(rows(src[pre_old + k + "weight"], keep_d), keep_f)
        out[pre_new + k + "bias"] = rows(src[pre_old + k + "bias"], keep_d)
        for norm in ("attention.output.LayerNorm.", "output.LayerNorm."):
            for p in ("weight", "bias"):
                out[pre_new + norm + p] = rows(src[pre_old + norm + p], keep_d)
    return out
