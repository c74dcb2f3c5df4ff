"""Structured pruning of segment_anything's ``ImageEncoderViT`` the way SlimSAM prunes SAM-B (used by
``slimsam``; no Torch-Pruning, the surgery is written out for this one architecture).

Source read: Chen et al., "SlimSAM: 0.1% Data Makes Segment Anything Slim" (NeurIPS 2024, arXiv 2312.05284) and
its official code, czg1225/SlimSAM @ b612c1b: ``prune_funcs.py`` (``prune_sam_step1``,
``prune_sam_step2_global``/``_local``, ``del_pos_init``/``get_pos_init``), the bundled Torch-Pruning
(``torch_pruning/pruner/importance.py::DisturbImportance``, ``pruner/algorithms/metapruner.py``:
``prune_local``, ``prune_global``, ``get_channel_groups``) and ``prune_distill_step1.py``/``step2.py``. The
selections below were checked against that code run on a small ViT (12 blocks, embed 48, 4 heads; ratios
0.5 and 0.77): the kept embedding channels, qkv channels and MLP units came out identical. Uniform (local)
pruning of SAM-B gives the released uniform models' widths (``build_sam.py``: ``vit_p50`` 384 / 12 heads of
32 / MLP 1536; ``vit_p77`` 168 / 12 of 14 / 696).

Three structures (SlimSAM's "decoupled sub-structures"), all in one residual-stream convention:

* **Embedding dimension** D (step 1): patch-embed conv output channels, ``pos_embed``, every block's
  ``norm1``/``norm2``, the input columns of ``attn.qkv`` and ``mlp.lin1``, the output rows of ``attn.proj``
  and ``mlp.lin2``, and the input channels of the neck's first 1x1 conv. The qkv output and MLP hidden size
  are untouched in this step (the code puts ``q, k, v, lin1`` in ``ignored_layers``).
* **QKV channels** per block (step 2): SlimSAM does *not* remove whole heads. Torch-Pruning's
  ``channel_groups = num_heads`` on q/k/v makes it score position j of the head dimension by summing over the
  heads (``local_imp.view(ch_groups, -1).sum(0).repeat(ch_groups)``) and prune the same positions j in
  every head, so ``num_heads`` stays and the head dimension shrinks (the released ``vit_p77`` config: 12
  heads, embed 168 -> head dim 14). Removed: those rows of q, k and v in the fused ``qkv`` and the matching
  input columns of ``proj``. Here the relative-position tables keep their kept columns and the attention
  scale stays at the original head dimension's, so the pruned block computes exactly the original with the
  pruned channels zeroed. The code instead deletes the tables before pruning and re-creates them as
  **zeros**, with ``scale = new_head_dim ** -0.5``, after every pruning step (``del_pos_init`` /
  ``get_pos_init``, a way to hide them from Torch-Pruning); `reset_rel_pos` reproduces that.
* **MLP hidden units** per block (step 2): rows of ``lin1``, columns of ``lin2``.

Importance (``DisturbImportance``, group reduction ``mean``): for each layer of a group, the channel's
score is sum |w * g| over that channel's weights (not biases; LayerNorms and ``pos_embed`` are not scored,
they are not in its ``target_types``), with g the gradient accumulated over the calibration images; the
group's score is the mean of its layers' scores. Layers per group, as the code's dependency graph has them
(q, k and v are separate Linear layers there, so they count three times):

* embedding: patch conv out, per block q/k/v in, proj out, lin1 in, lin2 out, neck conv in;
* qkv channels: q out, k out, v out, proj in;   * MLP: lin1 out, lin2 in.

A side effect of the same ``get_channel_groups`` (it returns the group size of *any* member found in
``channel_groups``, and the embedding group contains the q/k/v inputs): the embedding dimension is pruned
with ``num_heads`` groups too, i.e. D is viewed as ``num_heads`` chunks of D/num_heads, chunk positions
are scored by summing over chunks and the same positions are kept in every chunk. The official models
carry that structure; ``groups=1`` in `keep_local` gives a plain top-k instead.

Counts (``round_to = num_heads``): local, a group of n channels keeps ``int(n (1 - ratio))`` rounded down
to a multiple of ``round_to`` (embedding: 768 -> 384 at 0.5, -> 168 at 0.77). Global (step 2 default), the
normalised scores of all blocks' groups are ranked together: ``n_pruned = N - int(N (1 - ratio))`` over
the N scored positions, every position scoring <= the ``n_pruned``-th smallest is pruned, and a group's
pruned count is then rounded down to a multiple of ``round_to`` by dropping the last ones in index order
(``pruning_indices[:n_pruned]``). A group would-be-emptied is left whole (``check_pruning_group``).
Normaliser: ``mean`` (x / mean) in step 1, ``gaussian`` ((x - mean) / (std + 1e-8), std unbiased, over the
head-repeated vector as the code computes it) in step 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn


def is_vit_encoder(module: Any) -> bool:
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    return isinstance(module, ImageEncoderViT)


def encoder_dims(enc: nn.Module) -> dict[str, Any]:
    """Embedding width, and per block: heads, channels per head, MLP units, window size (0 = global)."""
    blocks = []
    for blk in enc.blocks:
        h = blk.attn.num_heads
        blocks.append({"heads": h, "head_channels": blk.attn.qkv.out_features // (3 * h),
                       "mlp": blk.mlp.lin1.out_features, "window": blk.window_size})
    return {"embed": enc.patch_embed.proj.out_channels, "blocks": blocks,
            "params": sum(p.numel() for p in enc.parameters())}


# --------------------------------------------------------------------------------------------------
# Disturbed Taylor importance
# --------------------------------------------------------------------------------------------------


def disturbed_taylor_backward(enc: nn.Module, images: Iterable[Tensor], sigma: float, seed: int) -> int:
    """Accumulate into ``.grad`` the gradient of sum_b MSE(E(x_b), sg(E(x_b)) + sigma * eps_b) and return
    the number of images.

    The official loss is MSE(student, teacher + N(0, sigma^2)) with the teacher equal to the unpruned student
    at that point (SAM-B in step 1, the step-1 model in step 2), so the reference here is the encoder's own
    detached output: the undisturbed gradient would be exactly 0. eps is drawn per batch, in order, from
    ``torch.Generator(device).manual_seed(seed)`` with the embedding's shape. Gradients add over batches
    (``loss.backward()`` without ``zero_grad``, batch 1 in the code: with batches of B the sum is 1/B of it,
    which changes no ranking)."""
    import torch
    import torch.nn.functional as F

    enc.zero_grad(set_to_none=True)
    gen, n = None, 0
    for x in images:
        emb = enc(x)
        if gen is None:
            gen = torch.Generator(device=emb.device).manual_seed(int(seed))
        noise = torch.randn(emb.shape, generator=gen, device=emb.device, dtype=emb.dtype)
        F.mse_loss(emb, emb.detach() + sigma * noise).backward()
        n += int(x.shape[0])
    return n


def _taylor(w: Tensor) -> Tensor:
    if w.grad is None:
        raise ValueError("pruning importance: a weight has no gradient (run disturbed_taylor_backward first)")
    return (w.detach() * w.grad.detach()).abs()


def _rows(w: Tensor) -> Tensor:  # per output channel of a Linear/Conv weight
    return _taylor(w).flatten(1).sum(1)


def _cols(w: Tensor) -> Tensor:  # per input channel
    return _taylor(w).transpose(0, 1).flatten(1).sum(1)


def embedding_importance(enc: nn.Module) -> Tensor:
    """[D]: the mean over the embedding group's layers (2 + 6 per block) of sum |w g| per channel."""
    import torch

    scores = [_rows(enc.patch_embed.proj.weight)]
    for blk in enc.blocks:
        qkv = blk.attn.qkv.weight
        inner = qkv.shape[0] // 3
        t = _taylor(qkv)
        scores += [t[i * inner:(i + 1) * inner].sum(0) for i in range(3)]  # q, k, v inputs
        scores += [_rows(blk.attn.proj.weight), _cols(blk.mlp.lin1.weight), _rows(blk.mlp.lin2.weight)]
    scores.append(_cols(enc.neck[0].weight))
    return torch.stack(scores).mean(0)


def qkv_importance(blk: nn.Module) -> Tensor:
    """[heads * head_channels] of one block: mean of q out, k out, v out and proj in (head-major order)."""
    import torch

    rows = _rows(blk.attn.qkv.weight)
    inner = rows.shape[0] // 3
    return torch.stack([rows[:inner], rows[inner:2 * inner], rows[2 * inner:], _cols(blk.attn.proj.weight)]).mean(0)


def mlp_importance(blk: nn.Module) -> Tensor:
    """[mlp units] of one block: mean of lin1 out and lin2 in."""
    import torch

    return torch.stack([_rows(blk.mlp.lin1.weight), _cols(blk.mlp.lin2.weight)]).mean(0)


# --------------------------------------------------------------------------------------------------
# Which channels to keep
# --------------------------------------------------------------------------------------------------


def _slots(scores: Tensor, groups: int) -> Tensor:
    """Per position within a group of ``groups`` equal chunks: the sum over chunks (ch_groups in the code)."""
    if scores.numel() % groups:
        raise ValueError(f"pruning: {scores.numel()} channels cannot form {groups} equal groups")
    return scores.reshape(groups, -1).sum(0)


def _expand(slots: Tensor, groups: int, size: int) -> Tensor:
    """Channel indices of the kept positions ``slots`` in each of ``groups`` chunks of ``size``, sorted."""
    import torch

    return (slots.reshape(1, -1) + size * torch.arange(groups, device=slots.device).reshape(-1, 1)).reshape(-1).sort().values


def keep_count(n: int, ratio: float, round_to: int | None) -> int:
    """``int(n (1 - ratio))`` rounded down to a multiple of ``round_to`` (metapruner ``prune_local``), at
    least ``round_to`` (the code would then prune nothing: see `keep_local`)."""
    keep = int(n * (1 - ratio))
    if round_to:
        keep = max(round_to, keep - keep % round_to)
    return min(n, max(1, keep))


def keep_local(scores: Tensor, ratio: float, round_to: int | None, groups: int = 1) -> Tensor:
    """Sorted kept channel indices of one group pruned on its own (``prune_local``): the lowest-scoring
    positions go (ties: the lower index goes first, a stable sort; the code's ``argsort`` is unstable)."""
    import torch

    n = scores.numel()
    n_pruned = n - keep_count(n, ratio, round_to)
    slots = _slots(scores, groups)
    order = torch.sort(slots, stable=True).indices
    kept = order[n_pruned // groups:].sort().values
    return _expand(kept, groups, n // groups)


def normalise(scores: Tensor, kind: str) -> Tensor:
    """The code's normalisers (``DisturbImportance._normalize``) of one group's scores."""
    if kind == "gaussian":
        return (scores - scores.mean()) / (scores.std() + 1e-8)
    if kind == "mean":
        return scores / scores.mean()
    if kind == "none":
        return scores
    raise ValueError(f"unknown normaliser {kind!r}; valid: gaussian, mean, none")


def keep_global(scores: list[Tensor], ratio: float, round_to: int | None, groups: list[int],
                normaliser: str = "gaussian") -> list[Tensor]:
    """Sorted kept channel indices of several groups ranked together (``prune_global``): each group's
    scores summed into positions (``groups[i]`` chunks), normalised over its head-repeated vector, then one
    threshold for all; see the module docstring for the rounding and the would-be-emptied groups."""
    import torch

    normed = []
    for s, g in zip(scores, groups):
        slot = _slots(s, g)
        normed.append(normalise(slot.repeat(g), normaliser)[: slot.numel()])
    allv = torch.cat(normed)
    n_pruned = allv.numel() - int(allv.numel() * (1 - ratio))
    if n_pruned <= 0:
        return [torch.arange(s.numel(), device=s.device) for s in scores]
    thres = torch.topk(allv, n_pruned, largest=False).values[-1]
    out = []
    for s, g, v in zip(scores, groups, normed):
        n, size = s.numel(), s.numel() // g
        pos = (v <= thres).nonzero().reshape(-1)
        pruned = torch.cat([pos + size * i for i in range(g)])  # the code's head-major order
        if round_to:
            pruned = pruned[: len(pruned) - len(pruned) % round_to]
        if len(pruned) >= n:  # check_pruning_group: never empty a layer, leave it whole
            pruned = pruned[:0]
        keep = torch.ones(n, dtype=torch.bool, device=s.device)
        keep[pruned] = False
        out.append(keep.nonzero().reshape(-1))
    return out


# --------------------------------------------------------------------------------------------------
# Surgery (in place; new Parameters, so optimisers must be built after it)
# --------------------------------------------------------------------------------------------------


def _linear(old: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    import torch
    from torch import nn

    w = old.weight.detach()
    w = w if rows is None else w.index_select(0, rows.to(w.device))
    w = w if cols is None else w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            b = old.bias.detach()
            new.bias.copy_(b if rows is None else b.index_select(0, rows.to(b.device)))
    return new


def _layernorm(old: nn.LayerNorm, keep: Tensor) -> nn.LayerNorm:
    import torch
    from torch import nn

    new = nn.LayerNorm(len(keep), eps=old.eps, elementwise_affine=old.elementwise_affine,
                       device=old.weight.device, dtype=old.weight.dtype)
    if old.elementwise_affine:
        with torch.no_grad():
            new.weight.copy_(old.weight.detach()[keep])
            new.bias.copy_(old.bias.detach()[keep])
    return new


def _conv(old: nn.Conv2d, out_keep: Tensor | None = None, in_keep: Tensor | None = None) -> nn.Conv2d:
    import torch
    from torch import nn

    w = old.weight.detach()
    w = w if out_keep is None else w[out_keep]
    w = w if in_keep is None else w[:, in_keep]
    new = nn.Conv2d(w.shape[1], w.shape[0], old.kernel_size, stride=old.stride, padding=old.padding,
                    bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach() if out_keep is None else old.bias.detach()[out_keep])
    return new


def prune_embedding_(enc: nn.Module, keep: Tensor) -> None:
    """Keep embedding channels ``keep`` everywhere the residual stream is read or written."""
    from torch import nn

    keep = keep.to(enc.patch_embed.proj.weight.device)
    enc.patch_embed.proj = _conv(enc.patch_embed.proj, out_keep=keep)
    if enc.pos_embed is not None:
        enc.pos_embed = nn.Parameter(enc.pos_embed.detach()[..., keep].clone())
    for blk in enc.blocks:
        blk.norm1, blk.norm2 = _layernorm(blk.norm1, keep), _layernorm(blk.norm2, keep)
        blk.attn.qkv = _linear(blk.attn.qkv, cols=keep)
        blk.attn.proj = _linear(blk.attn.proj, rows=keep)
        blk.mlp.lin1 = _linear(blk.mlp.lin1, cols=keep)
        blk.mlp.lin2 = _linear(blk.mlp.lin2, rows=keep)
    enc.neck[0] = _conv(enc.neck[0], in_keep=keep)


def prune_attention_(attn: nn.Module, keep_channels: Tensor) -> None:
    """Keep positions ``keep_channels`` of the head dimension in every head of one ``Attention``."""
    import torch
    from torch import nn

    h = attn.num_heads
    c = attn.qkv.out_features // (3 * h)
    keep_channels = keep_channels.to(attn.qkv.weight.device)
    per_head = _expand(keep_channels, h, c)  # kept channels of q (and of k, v, proj in)
    rows = torch.cat([per_head + i * h * c for i in range(3)])
    attn.qkv = _linear(attn.qkv, rows=rows)
    attn.proj = _linear(attn.proj, cols=per_head)
    if attn.use_rel_pos:  # add_decomposed_rel_pos contracts q's head dimension with these tables
        attn.rel_pos_h = nn.Parameter(attn.rel_pos_h.detach()[:, keep_channels].clone())
        attn.rel_pos_w = nn.Parameter(attn.rel_pos_w.detach()[:, keep_channels].clone())
    # attn.scale is left at the original head dimension's (see the module docstring).


def prune_mlp_(mlp: nn.Module, keep: Tensor) -> None:
    mlp.lin1 = _linear(mlp.lin1, rows=keep)
    mlp.lin2 = _linear(mlp.lin2, cols=keep)


def reset_rel_pos_(enc: nn.Module) -> None:
    """What the official code leaves after each pruning step (``get_pos_init``): zero relative-position
    tables of the current head dimension and ``scale = head_dim ** -0.5``."""
    import torch
    from torch import nn

    for blk in enc.blocks:
        a = blk.attn
        c = a.qkv.out_features // (3 * a.num_heads)
        a.scale = c ** -0.5
        if a.use_rel_pos:
            a.rel_pos_h = nn.Parameter(torch.zeros(a.rel_pos_h.shape[0], c, device=a.rel_pos_h.device,
                                                   dtype=a.rel_pos_h.dtype))
            a.rel_pos_w = nn.Parameter(torch.zeros(a.rel_pos_w.shape[0], c, device=a.rel_pos_w.device,
                                                   dtype=a.rel_pos_w.dtype))


# --------------------------------------------------------------------------------------------------
# The two SlimSAM pruning steps (importance from the gradients already in .grad)
# --------------------------------------------------------------------------------------------------


def prune_embedding_step(enc: nn.Module, ratio: float, round_to: int | None, groups: int) -> Tensor:
    """Step 1: local pruning of the embedding dimension; returns the kept channel indices."""
    keep = keep_local(embedding_importance(enc), ratio, round_to, groups)
    prune_embedding_(enc, keep)
    enc.zero_grad(set_to_none=True)
    return keep


def prune_bottleneck_step(enc: nn.Module, ratio: float, round_to: int | None, global_ranking: bool = True,
                          normaliser: str = "gaussian") -> dict[str, list[Tensor]]:
    """Step 2: the qkv channels (positions of the head dimension, shared by the heads) of every block, then
    the MLP hidden units, each globally ranked (or per block with ``global_ranking=False``, the code's
    ``prune_sam_step2_local``, the released "uniform" models). Returns the kept head-dimension positions
    and MLP units per block."""
    blocks = list(enc.blocks)
    heads = [b.attn.num_heads for b in blocks]
    qkv = [qkv_importance(b) for b in blocks]
    mlp = [mlp_importance(b) for b in blocks]
    if global_ranking:
        keep_qkv = keep_global(qkv, ratio, round_to, heads, normaliser)
        keep_mlp = keep_global(mlp, ratio, round_to, [1] * len(blocks), normaliser)
    else:
        keep_qkv = [keep_local(s, ratio, round_to, h) for s, h in zip(qkv, heads)]
        keep_mlp = [keep_local(s, ratio, round_to, 1) for s in mlp]
    positions = []
    for blk, h, kq, km in zip(blocks, heads, keep_qkv, keep_mlp):
        c = blk.attn.qkv.out_features // (3 * h)
        pos = kq[kq < c]  # the kept channels of head 0 = the kept positions (the same in every head)
        prune_attention_(blk.attn, pos)
        prune_mlp_(blk.mlp, km)
        positions.append(pos)
    enc.zero_grad(set_to_none=True)
    return {"qkv": positions, "mlp": keep_mlp}


# --------------------------------------------------------------------------------------------------
# Intermediate features SlimSAM aligns (the official segment_anything_kd forward returns them)
# --------------------------------------------------------------------------------------------------


@contextmanager
def features(enc: nn.Module, kinds: set[str]):
    """Capture, while the context is open, per forward: ``qkv_window`` / ``qkv_global`` (the fused q, k, v
    outputs of window- / global-attention blocks), ``mid`` (each MLP's hidden activation after GELU) and
    ``block`` (the patch embedding + position, then per block the residual after attention and the block
    output: the code's ``block_emb``). Yields a dict kind -> list of tensors."""
    out: dict[str, list[Any]] = {k: [] for k in kinds}
    hooks = []
    try:
        if "block" in kinds:
            hooks.append(enc.blocks[0].register_forward_pre_hook(lambda m, a: out["block"].append(a[0])))
        for blk in enc.blocks:
            kind = "qkv_window" if blk.window_size > 0 else "qkv_global"
            if kind in kinds:
                hooks.append(blk.attn.qkv.register_forward_hook(lambda m, a, o, k=kind: out[k].append(o)))
            if "mid" in kinds:
                hooks.append(blk.mlp.act.register_forward_hook(lambda m, a, o: out["mid"].append(o)))
            if "block" in kinds:
                hooks.append(blk.norm2.register_forward_pre_hook(lambda m, a: out["block"].append(a[0])))
                hooks.append(blk.register_forward_hook(lambda m, a, o: out["block"].append(o)))
        yield out
    finally:
        for h in hooks:
            h.remove()


def cat_mse(student: list[Tensor], target: list[Tensor]) -> Tensor:
    """MSE over the concatenation of equal-length lists of tensors (the code's ``torch.cat(..., dim=0)``
    followed by ``MSELoss``: the mean over every element of every tensor)."""
    import torch
    import torch.nn.functional as F

    if len(student) != len(target):
        raise ValueError(f"feature lists differ in length ({len(student)} vs {len(target)})")
    s = torch.cat([t.reshape(-1) for t in student]).float()
    t = torch.cat([x.detach().reshape(-1) for x in target]).float()
    return F.mse_loss(s, t)
