"""Structured pruning of a causal-LM teacher (Llama family: llama, qwen2, mistral; and GPT-2) into a smaller
student of the same family (used by MiniMA on the lm domain; ``_bert_pruning`` is the BERT counterpart).

MiniMA (GeneZC/MiniMA @ 4842dc0) puts masks, initialised to 1, on attention heads and FFN neurons (per
layer) and on hidden dimensions (shared by all layers), accumulates importance = mean over batches of
|dL/dmask| of the LM loss on a small pruning set (``minima/run_sparsification_llama.py``), keeps the most
important units, then keeps the middle block of layers (``run_converting_llama.py``: ``layers[d:-d]``).
Where the masks sit (``minima/modules/modeling_sparsellama.py``):

* head mask: multiplies each head's attention output before ``o_proj``;
* neuron mask: multiplies ``act(gate(x)) * up(x)`` before ``down_proj``;
* hidden mask: multiplies the embedding output, each sub-layer's output, and the residual stream after
  each addition (and the norms' statistics are taken over the kept dimensions).

No masks are inserted: at mask = 1 the gradient of a mask multiplying a tensor x is sum(x * dL/dx) over
the positions it scales. For heads and neurons that sum equals sum(W * dL/dW) over the columns of
``o_proj`` / ``down_proj`` that read the unit (their output is linear in those weights; GPT-2's Conv1D
stores them transposed). For the hidden dimensions the tensors are captured with hooks at exactly the
five places above and their gradients with ``Tensor.register_hook``; the five contributions of a
dimension are summed (one shared mask) before the absolute value, per batch, as MiniMA accumulates them.

Heads are pruned only with multi-head attention (grouped-query models keep their head count, and the
student must then have the teacher's). The rotary or learned position tables and the vocabulary must
match. ``middle_layers`` is shared with ``_bert_pruning``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench.methods._bert_pruning import dims_mismatch, middle_layers

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch

LLAMA_FAMILY = ("llama", "qwen2", "mistral")


def lm_dims(model: nn.Module) -> dict[str, Any] | None:
    """Architecture numbers of a Llama-family or GPT-2 causal LM, or None if it is neither."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind in LLAMA_FAMILY and hasattr(model, "model"):
        heads = cfg.num_attention_heads
        return {"arch": "llama", "model_type": kind, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                "heads": heads, "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
                "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size, "positions": cfg.max_position_embeddings,
                "tied": bool(getattr(cfg, "tie_word_embeddings", False))}
    if kind == "gpt2" and hasattr(model, "transformer"):
        return {"arch": "gpt2", "model_type": kind, "layers": cfg.n_layer, "hidden": cfg.n_embd,
                "heads": cfg.n_head, "kv_heads": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
                "ffn": cfg.n_inner or 4 * cfg.n_embd, "vocab": cfg.vocab_size, "positions": cfg.n_positions,
                "tied": bool(getattr(cfg, "tie_word_embeddings", True))}
    return None


def why_not_prunable(teacher: nn.Module, student: nn.Module) -> str | None:
    """None if ``student`` can be cut out of ``teacher``, else the reason."""
    t, s = lm_dims(teacher), lm_dims(student)
    if t is None or s is None:
        return "teacher and student are not both Llama-family or GPT-2 causal LMs"
    reason = dims_mismatch(t, s, same=("model_type", "vocab", "positions", "head_dim", "tied"))
    if reason:
        return reason
    if (t["kv_heads"] != t["heads"] or s["kv_heads"] != s["heads"]) and (t["heads"], t["kv_heads"]) != (s["heads"], s["kv_heads"]):
        return "grouped-query attention: heads can only be kept, not pruned (give the student the teacher's heads)"
    return None


def _blocks(model: nn.Module):
    return model.model.layers if lm_dims(model)["arch"] == "llama" else model.transformer.h


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else x


def importance(teacher: nn.Module, batches: list[Batch], loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Mean over batches of |mask gradient| for heads [L, H], neurons [L, F] and hidden dims [D]."""
    import torch

    model = copy.deepcopy(teacher).eval()  # eval: no dropout noise in the estimate
    for p in model.parameters():
        p.requires_grad_(True)
    d = lm_dims(model)
    L, H, hd, D = d["layers"], d["heads"], d["head_dim"], d["hidden"]
    heads = torch.zeros(L, H)
    neurons = torch.zeros(L, d["ffn"])
    hidden = torch.zeros(D)
    batch_hidden = torch.zeros(D)

    def capture(x: torch.Tensor) -> None:
        if isinstance(x, torch.Tensor) and x.requires_grad and x.shape[-1] == D:
            ref = x.detach()

            def accumulate(g: torch.Tensor) -> None:  # returns None: the gradient itself is left unchanged
                batch_hidden.add_((ref * g).reshape(-1, D).sum(0).float().cpu())

            x.register_hook(accumulate)

    hooks = []
    blocks = _blocks(model)
    if d["arch"] == "llama":
        hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, i, o: capture(o)))
        for blk in blocks:
            hooks.append(blk.self_attn.register_forward_hook(lambda m, i, o: capture(_first(o))))
            hooks.append(blk.post_attention_layernorm.register_forward_pre_hook(lambda m, i: capture(i[0])))
            hooks.append(blk.mlp.register_forward_hook(lambda m, i, o: capture(o)))
            hooks.append(blk.register_forward_hook(lambda m, i, o: capture(_first(o))))
    else:
        hooks.append(blocks[0].register_forward_pre_hook(lambda m, i: capture(i[0])))
        for blk in blocks:
            hooks.append(blk.attn.register_forward_hook(lambda m, i, o: capture(_first(o))))
            hooks.append(blk.ln_2.register_forward_pre_hook(lambda m, i: capture(i[0])))
            hooks.append(blk.mlp.register_forward_hook(lambda m, i, o: capture(o)))
            hooks.append(blk.register_forward_hook(lambda m, i, o: capture(_first(o))))
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            batch_hidden.zero_()
            loss_fn(model, batch).backward()
            with torch.no_grad():
                for i, blk in enumerate(blocks):
                    if d["arch"] == "llama":
                        w = blk.self_attn.o_proj.weight  # [D, H*hd]: columns read the heads
                        heads[i] += (w * w.grad).sum(0).view(H, hd).sum(-1).abs().float().cpu()
                        w = blk.mlp.down_proj.weight  # [D, F]
                        neurons[i] += (w * w.grad).sum(0).abs().float().cpu()
                    else:
                        w = blk.attn.c_proj.weight  # Conv1D [H*hd, D]: rows read the heads
                        heads[i] += (w * w.grad).sum(1).view(H, hd).sum(-1).abs().float().cpu()
                        w = blk.mlp.c_proj.weight  # Conv1D [F, D]
                        neurons[i] += (w * w.grad).sum(1).abs().float().cpu()
            hidden += batch_hidden.abs()
    finally:
        for h in hooks:
            h.remove()
    n = max(1, len(batches))
    return {"heads": heads / n, "neurons": neurons / n, "hidden": hidden / n}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    import torch

    return torch.sort(torch.topk(scores, k).indices).values


def pruned_state_dict(teacher: nn.Module, student: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's weights cut to the student's shape: top hidden dims (shared), top heads and neurons per
    layer (indices kept in their original order), then the middle layers (``middle_layers``)."""
    import torch

    t, s = lm_dims(teacher), lm_dims(student)
    hd, A = t["head_dim"], t["heads"] * t["head_dim"]
    keep_d = _top(scores["hidden"], s["hidden"])
    layers = middle_layers(t["layers"], s["layers"])
    src = teacher.state_dict()
    prefix = "model.layers." if t["arch"] == "llama" else "transformer.h."

    def sel(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return x.index_select(dim, idx.to(x.device))

    out: dict[str, torch.Tensor] = {}
    for key, target in student.state_dict().items():
        layer_idx = None
        if key.startswith(prefix):
            new_i, rest = key[len(prefix):].split(".", 1)
            layer_idx = layers[int(new_i)]
            src_key = f"{prefix}{layer_idx}.{rest}"
        else:
            rest, src_key = key, key
        if src_key not in src:
            raise KeyError(f"pruning: teacher has no parameter {src_key} for the student's {key}")
        w = src[src_key]
        if layer_idx is not None:
            keep_h = _top(scores["heads"][layer_idx], s["heads"])
            keep_a = (keep_h[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
            keep_f = _top(scores["neurons"][layer_idx], s["ffn"])
        if t["arch"] == "llama":
            if layer_idx is None:
                # embed_tokens / lm_head [V, D] and the final norm [D]
                v = sel(w, -1, keep_d)
            elif any(p in rest for p in ("q_proj", "k_proj", "v_proj")):
                v = sel(w, 0, keep_a)
                v = sel(v, 1, keep_d) if rest.endswith("weight") else v
            elif "o_proj" in rest:
                v = sel(sel(w, 0, keep_d), 1, keep_a) if rest.endswith("weight") else sel(w, 0, keep_d)
            elif "gate_proj" in rest or "up_proj" in rest:
                v = sel(w, 0, keep_f)
                v = sel(v, 1, keep_d) if rest.endswith("weight") else v
            elif "down_proj" in rest:
                v = sel(sel(w, 0, keep_d), 1, keep_f) if rest.endswith("weight") else sel(w, 0, keep_d)
            elif "layernorm" in rest:
                v = sel(w, 0, keep_d)
            else:
                v = w
        else:
            if layer_idx is None:
                v = sel(w, -1, keep_d) if w.shape[-1] == t["hidden"] else w  # wte, wpe, ln_f, lm_head
            elif "attn.c_attn" in rest:
                qkv = torch.cat([keep_a, keep_a + A, keep_a + 2 * A])
                v = sel(sel(w, 0, keep_d), 1, qkv) if rest.endswith("weight") else sel(w, 0, qkv)
            elif "attn.c_proj" in rest:
                v = sel(sel(w, 0, keep_a), 1, keep_d) if rest.endswith("weight") else sel(w, 0, keep_d)
            elif "mlp.c_fc" in rest:
                v = sel(sel(w, 0, keep_d), 1, keep_f) if rest.endswith("weight") else sel(w, 0, keep_f)
            elif "mlp.c_proj" in rest:
                v = sel(sel(w, 0, keep_f), 1, keep_d) if rest.endswith("weight") else sel(w, 0, keep_d)
            elif ".ln_" in f".{rest}":
                v = sel(w, 0, keep_d)
            else:
                v = w
        if tuple(v.shape) != tuple(target.shape):
            raise ValueError(f"pruning: {key} would be {tuple(v.shape)}, the student needs {tuple(target.shape)}")
        out[key] = v.clone().to(target.dtype)
    return out


def describe(teacher: nn.Module, student: nn.Module) -> str:
    t, s = lm_dims(teacher), lm_dims(student)
    return (f"pruned from the teacher: layers {middle_layers(t['layers'], s['layers'])} of {t['layers']}, hidden "
            f"{s['hidden']}/{t['hidden']}, heads {s['heads']}/{t['heads']}, ffn {s['ffn']}/{t['ffn']}")
