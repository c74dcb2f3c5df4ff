"""TinySAM — Shu, Li, Tang, Zhang, Chen, Li, Wang & Chen, "TinySAM: Pushing the Envelope for Efficient Segment
Anything Model" (AAAI 2025, arXiv 2312.13789v3). Official code: xinghaochen/TinySAM @ 11589bc — inference,
evaluation (``eval/tinysam_zero_shot_ins_eval.py``) and the W8A8 layers (``tinysam/quantization_layer/layers.py``);
it has **no training code**, so the training recipe follows the paper text (§"Full-Stage Knowledge
Distillation", "Online Hard Prompt Sampling", "Quantization").

What is implemented:

* Student initialised like MobileSAM: the teacher's prompt encoder and mask decoder are copied into the
  student (`mobilesam.copy_decoder`), here *trainable* (full-stage distillation trains the whole student);
  the student's image embedding must have the teacher's shape (`mobilesam.check_embeddings`).
* Full-stage loss, every distillation term an ℓ1 distance (the paper: MSE "too small to be well optimized"):
      L = α·ℓ1(E_S, E_T) + β·ℓ1(tokens_S, tokens_T) + γ·mean_i H_i·ℓ1(M_S,i, M_T,i) + L_mask + L_iou
  with E the image embeddings (mean over elements), tokens the two-way transformer's output tokens (mean over
  tokens x channels per prompt), M_i the low-resolution mask logits of output mask i (mean over pixels),
  L_mask SAM's focal (20) + dice (1) of the upscaled student masks against the ground truth, the best of the K
  output masks per prompt (SAM's multimask rule; `tasks.sam.losses.sam_focal_dice`), and L_iou the ℓ1 between
  the predicted IoU and the actual IoU of that best mask (the paper: "L_iou ... ℓ1"; best mask only as SAM and
  the task's label loss do, all K with ``supervise_all_iou``). Means over valid prompts.
* Hard mask weighting: H_i = sigmoid(IoU(M_T,i, GT) / (IoU(M_S,i, GT) + ε) − 1), IoUs of the binarised
  (logit > 0) upscaled masks (`tasks.sam.losses.mask_ious`); no gradient flows through H.
* Online hard prompt sampling (paper Eq. 8-9): for every prompt an iteration count k is drawn uniformly from
  0…9; P_0 is a point drawn uniformly inside the GT mask; for i < k the model predicts M_i from the points so
  far (the most confident of its three output masks, the paper's evaluation rule) and P_{i+1} is a foreground
  point drawn uniformly from M_gt − M_i (Eq. 8 taken literally: the figure's points all lie inside the mask and
  move to its edge); where M_gt − M_i is empty no point is added. Whose M_i: Eq. 9 writes D_mask(E_prompt(P_i),
  E_img(I)) without the T/S superscripts of Eq. 1-3; the *student* is used (``sampling_model``), because the
  strategy is called *online* and is meant to make prompts "harder for student network to learn" — the
  teacher's predictions would be fixed in advance. ``next_point="error_region"`` draws from the whole error
  region instead (SAM's iterative training: background points in M_i − M_gt); ``"center"`` takes SAM's
  evaluation click (`tasks.sam.prompts.next_point`). The final point set is fed to teacher and student.
  Prompts with fewer points are padded with SAM's "not a point" label (−1), as ``PromptEncoder`` pads.
* Randomness: one generator per step seeded by (cell seed, step), so a resumed cell draws the same prompts.
* Post-training quantisation (``quant_bits=8``, Q-TinySAM's W8A8): after training, every ``nn.Linear`` and
  ``nn.Conv2d`` of the image encoder gets 8-bit weights, one scale per output channel (the repository's
  quantiser `methods._modules.uniform_quantize` with a bucket = one output channel: min-max affine, 256
  levels, round to nearest), and, with ``quant_activations``, its input fake-quantised to signed 8 bits with
  one per-tensor scale (absmax over ``calibration_images`` training images / 127; the official layers'
  ``round(x / interval).clamp(-128, 127)``). The record states the bit width and the *real serialized size*:
  ``torch.save`` of the deployed state dict with uint8 codes plus float32 (min, step) per output channel for
  the quantised weights, everything else float32, against ``torch.save`` of the float student.

Deviations: no SA-1B (the task's images); teacher embeddings recomputed each step instead of pre-computed
(same loss, other cost); α = β = γ = 1 and ε = 1e-6 — not stated in the paper, and the official repository has
no training code; Eq. 7's Σ_i over masks is a mean here (a constant factor, absorbed in γ); training prompts are
points only (the paper describes the sampling "taking points prompt as an example"; the batches' boxes are
unused) and P_0 is one point; every decoder call uses the three-mask output (the task's convention), also for
multi-point prompts where SAM reads its single-mask token; no previous-mask dense prompt in the iterations (the
paper mentions none); optimiser, schedule, batch and prompts per image are the task's (paper: Adam, 8 epochs,
64 prompts per iteration). Quantisation: Q-TinySAM searches symmetric intervals (per weight block in the
official layers) by an alternating grid search (θ in [0.01, 1.2] x max / 2^(b−1), 100 candidates, 3 rounds) under
a Hessian-guided metric with KL(masks) + KL(IoUs) as the task loss on 8 SA-1B images, splits post-softmax and
post-GELU activations into two ranges, and also quantises the decoder and the attention matmuls; here weights
are min-max per output channel, activations absmax per tensor, encoder Linear/Conv inputs only, simulated in
float: the deployed model holds float weights on the 8-bit grid, so FLOPs and latency are the float model's.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from bench import BenchError
from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext


class InputQuant:
    """Forward pre-hook that fake-quantises a layer's input to signed ``bits`` at the layer's ``act_scale``
    buffer (the official ``InferQuantLinear.quant_input``: ``round(x / interval).clamp(-2^(b-1), 2^(b-1) - 1)``).
    A plain module-level class, so a quantised model still pickles and deep-copies."""

    def __init__(self, bits: int) -> None:
        self.qmax = 2 ** (bits - 1)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        s = module.act_scale
        return ((args[0] / s).round().clamp(-self.qmax, self.qmax - 1) * s, *args[1:])


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def hard_mask_weight(iou_teacher: torch.Tensor, iou_student: torch.Tensor, eps: float) -> torch.Tensor:
    """H = sigmoid(IoU_T / (IoU_S + eps) - 1): above 0.5 where the student is worse than the teacher."""
    import torch

    return torch.sigmoid(iou_teacher / (iou_student + eps) - 1.0)


def full_stage_losses(s, t, s_emb: torch.Tensor, t_emb: torch.Tensor, s_up: torch.Tensor, t_up: torch.Tensor,
                      gt: torch.Tensor, valid: torch.Tensor, eps: float, all_iou: bool = False) -> dict[str, torch.Tensor]:
    """The five TinySAM terms (unweighted) for student/teacher `Decoded` ``s``/``t``; ``s_up``/``t_up`` are the
    upscaled mask logits (B,P,K,S,S), ``gt`` (B,P,S,S) 0/1, ``valid`` (B,P). The IoU term supervises the mask
    that the mask term back-propagates (SAM's rule, as the task's label loss), or all K with ``all_iou``."""
    from bench.tasks.sam.losses import mask_ious, sam_focal_dice

    b, p, k = s.iou.shape
    v = valid.float()
    n = v.sum().clamp(min=1.0)
    gt_k = gt.float()[:, :, None].expand(b, p, k, *gt.shape[-2:]).reshape(b * p * k, *gt.shape[-2:])
    iou_s = mask_ious(s_up.reshape(b * p * k, *s_up.shape[-2:]).detach(), gt_k).view(b, p, k)
    iou_t = mask_ious(t_up.reshape(b * p * k, *t_up.shape[-2:]), gt_k).view(b, p, k)
    weight = hard_mask_weight(iou_t, iou_s, eps).detach()
    out_l1 = (s.masks.float() - t.masks.detach().float()).abs().mean(dim=(-2, -1))
    tok_l1 = (s.tokens.float() - t.tokens.detach().float()).abs().mean(dim=(-2, -1))
    focal_dice = sam_focal_dice(s_up.reshape(b * p * k, *s_up.shape[-2:]), gt_k).view(b, p, k)
    best = focal_dice.detach().argmin(dim=-1, keepdim=True)
    iou_err = (s.iou.float() - iou_s).abs()
    return {
        "embedding": (s_emb.float() - t_emb.detach().float()).abs().mean(),
        "token": (tok_l1 * v).sum() / n,
        "output": (weight * out_l1 * v[..., None]).sum() / (n * k),
        "mask": (focal_dice.min(dim=-1).values * v).sum() / n,
        "iou": (((iou_err.mean(dim=-1) if all_iou else iou_err.gather(-1, best).squeeze(-1))) * v).sum() / n,
        "hard_weight": (weight * v[..., None]).sum() / (n * k),
    }


# --------------------------------------------------------------------------------------------------
# Online hard prompt sampling
# --------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: a pure function of (cell seed, step), so resume is exact."""
    import torch

    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 0x7153) % (2 ** 63))


def draw_iterations(gen: torch.Generator, shape: tuple[int, ...], max_iterations: int) -> torch.Tensor:
    """Iteration counts drawn uniformly from 0..max_iterations (TinySAM: 0…9), one per prompt."""
    import torch

    return torch.randint(0, max_iterations + 1, shape, generator=gen)


def sample_in(region: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly from each (H, W) boolean ``region`` of a (N, H, W) stack: (x, y) (N, 2) float
    and ``ok`` (N,) — False where the region is empty (then the point is (0, 0)). The uniform numbers come from
    ``gen`` on the CPU, so the draw does not depend on the device."""
    import torch

    n, h, w = region.shape
    flat = region.reshape(n, h * w).long()
    counts = flat.sum(dim=1)
    u = torch.rand(n, generator=gen).to(region.device)
    rank = torch.minimum((u * counts).floor().long(), (counts - 1).clamp(min=0)) + 1  # 1..count
    idx = torch.searchsorted(flat.cumsum(dim=1), rank[:, None]).squeeze(1).clamp(max=h * w - 1)
    xy = torch.stack([idx % w, idx // w], dim=-1).float()
    return xy, counts > 0


def error_point(gt: torch.Tensor, pred: torch.Tensor, gen: torch.Generator, rule: str = "gt_minus_pred"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next point for each prediction of a (N, H, W) stack: (x, y), label and ``ok`` (False where the rule's
    region is empty). ``gt_minus_pred``: uniform in GT − pred, label 1 (TinySAM Eq. 8); ``error_region``: uniform
    in the symmetric difference, label 1 in a false negative, 0 in a false positive (SAM's training);
    ``center``: SAM's evaluation click (`tasks.sam.prompts.next_point`)."""
    import torch

    gt, pred = gt.bool(), pred.bool()
    fn, fp = gt & ~pred, pred & ~gt
    if rule == "center":
        from bench.tasks.sam.prompts import next_point

        g, q = gt.cpu().numpy(), pred.cpu().numpy()
        # Padded prompt slots have an empty GT, where SAM's click is undefined (next_point refuses it): no point.
        clicks = [next_point(g[i], q[i]) if g[i].any() else ((0.0, 0.0), 0) for i in range(len(g))]
        xy = torch.tensor([c[0] for c in clicks], dtype=torch.float32, device=gt.device).view(-1, 2)
        label = torch.tensor([c[1] for c in clicks], dtype=torch.long, device=gt.device)
        return xy, label, (fn | fp).flatten(1).any(dim=1) & gt.flatten(1).any(dim=1)
    xy, ok = sample_in(fn if rule == "gt_minus_pred" else fn | fp, gen)
    x, y = xy[:, 0].long(), xy[:, 1].long()
    label = fn[torch.arange(len(fn), device=fn.device), y, x].long()
    return xy, label, ok


def hard_prompts(decode, upscale, gt: torch.Tensor, valid: torch.Tensor, iterations: torch.Tensor,
                 gen: torch.Generator, rule: str = "gt_minus_pred"):
    """TinySAM's online hard prompts for (B, P) ground-truth masks ``gt`` (B,P,S,S): P_0 inside the mask, then
    ``iterations[b, p]`` corrections, each from GT minus ``decode(prompts)``'s most confident mask (``rule``).
    Returns `Prompts` with points (B,P,n,2) and labels (B,P,n) (−1: padding, SAM's "not a point")."""
    import torch

    from bench.tasks.sam.model import Prompts

    b, p = gt.shape[:2]
    region = gt.bool() & valid.bool()[..., None, None]
    xy, ok = sample_in(region.flatten(0, 1), gen)
    points = xy.view(b, p, 1, 2)
    labels = torch.where(ok, 1, -1).view(b, p, 1).to(gt.device)
    iterations = iterations.to(gt.device)
    for i in range(int(iterations.max()) if iterations.numel() else 0):
        dec = decode(Prompts(points=points, labels=labels))
        best = dec.iou.argmax(dim=-1)  # (B, P): the most confident output mask
        low = torch.gather(dec.masks, 2, best[:, :, None, None, None].expand(-1, -1, 1, *dec.masks.shape[-2:]))
        pred = upscale(low[:, :, 0]) > 0
        xy, lab, ok = error_point(gt.flatten(0, 1) > 0.5, pred.flatten(0, 1), gen, rule)
        use = ok.view(b, p) & (iterations > i) & valid.bool()
        points = torch.cat([points, torch.where(use[..., None], xy.view(b, p, 2), 0.0)[:, :, None]], dim=2)
        labels = torch.cat([labels, torch.where(use, lab.view(b, p), -1)[:, :, None]], dim=2)
    return Prompts(points=points, labels=labels)


# --------------------------------------------------------------------------------------------------
# Post-training quantisation (Q-TinySAM, W8A8)
# --------------------------------------------------------------------------------------------------


def _serialized_bytes(tensors: dict[str, torch.Tensor]) -> int:
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, buf)
    return buf.getbuffer().nbytes


def channel_codes(deq: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes and float32 (min, step) per output channel of a weight already on the min-max grid of
    `uniform_quantize` (read back off the grid: code = (w - min) / step)."""
    import torch

    rows = deq.detach().reshape(deq.shape[0], -1).float()
    lo = rows.min(dim=1).values
    step = (rows.max(dim=1).values - lo) / (2 ** bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.where(step[:, None] > 0, ((rows - lo[:, None]) / safe[:, None]).round(), torch.zeros_like(rows))
    return codes.clamp(0, 2 ** bits - 1).to(torch.uint8).view(deq.shape), lo, step


def quantize_encoder(model: nn.Module, bits: int, calibration: torch.Tensor | None) -> dict[str, Any]:
    """Quantise ``model.image_encoder`` in place (see the module docstring): 8-bit weights per output channel
    and, with ``calibration`` images, the layers' inputs fake-quantised at absmax / 127 scales (an
    ``act_scale`` buffer and an `InputQuant` pre-hook per layer). Returns the size facts for the record."""
    import torch
    from torch import nn

    from bench.methods._modules import uniform_quantize

    float_bytes = _serialized_bytes(model.state_dict())
    layers = [(n, m) for n, m in model.image_encoder.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    codes: dict[str, torch.Tensor] = {}
    q_float: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in layers:
            key = f"image_encoder.{name}.weight"
            q_float[key] = m.weight.detach().float().clone()
            deq = uniform_quantize(m.weight, bits, bucket_size=m.weight[0].numel())  # bucket = one output channel
            c, lo, step = channel_codes(deq, bits)
            codes.update({key + ".codes": c, key + ".min": lo, key + ".step": step})
            m.weight.copy_(deq)
    if calibration is not None:
        absmax: dict[str, float] = {}

        def record(name: str):
            return lambda _m, args: absmax.__setitem__(name, max(absmax.get(name, 0.0), float(args[0].abs().max())))

        hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model.embed(calibration)  # calibrated on the quantised weights, float activations
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        for name, m in layers:
            scale = max(absmax.get(name, 0.0), 1e-8) / (2 ** (bits - 1) - 1)
            m.register_buffer("act_scale", torch.tensor(scale, device=m.weight.device))
            m.register_forward_pre_hook(InputQuant(bits))
    state = model.state_dict()
    packed = {k: v for k, v in state.items() if k not in q_float}
    packed.update(codes)
    size = _serialized_bytes(packed)
    return {"bits": bits, "scheme": f"W{bits}A{bits}" if calibration is not None else f"W{bits}",
            "quantized_layers": len(layers), "quantized_values": sum(v.numel() for v in q_float.values()),
            "size_bytes": size, "float32_size_bytes": float_bytes, "compression": float_bytes / size,
            "quantized_layers_bytes": _serialized_bytes(codes),
            "quantized_layers_float32_bytes": _serialized_bytes(q_float),
            "calibration_images": 0 if calibration is None else int(calibration.shape[0]),
            "rule": "torch.save of the state dict: uint8 codes + float32 (min, step) per output channel for the "
                    "encoder's Linear/Conv weights (and a float32 input scale per layer with A8), the rest as stored"}


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class TinySAM(Method):
    """Shu et al. 2023: full-stage ℓ1 distillation (embedding, decoder tokens, hard-mask-weighted mask logits) with online hard prompt sampling, optional W8A8 post-training quantisation."""

    name = "tinysam"
    version = "1"
    domains = frozenset({"segmentation"})

    class Params(Params):
        # α, β, γ: not stated in the paper; the official repository has no training code. Equal weights.
        alpha: float = Field(1.0, ge=0, description="weight of the ℓ1 image-embedding term")
        beta: float = Field(1.0, ge=0, description="weight of the ℓ1 decoder output-token term")
        gamma: float = Field(1.0, ge=0, description="weight of the hard-mask-weighted ℓ1 mask-logit term")
        # Paper: L_total = L_distill + L_mask + L_iou (unit weights on the ground-truth terms).
        mask_weight: float = Field(1.0, ge=0, description="weight of focal + dice against the ground truth")
        iou_weight: float = Field(1.0, ge=0, description="weight of the ℓ1 IoU-prediction term")
        # SAM (and the task's label loss): only the back-propagated mask's IoU prediction is supervised.
        supervise_all_iou: bool = Field(False, description="supervise the IoU prediction of all K output masks")
        # ε of H_i = sigmoid(IoU_T / (IoU_S + ε) − 1): not stated in the paper.
        eps: float = Field(1e-6, gt=0, description="ε of the hard-mask weight")
        # Paper: "the iteration number is uniformly sampled from 0 to 9".
        max_iterations: int = Field(9, ge=0, le=64, description="hard prompt iterations drawn from 0..max")
        # Eq. 9 names no model; the student's predictions make the sampling online (module docstring).
        sampling_model: Literal["student", "teacher"] = Field(
            "student", description="whose predictions M_i the next points are drawn against")
        # Eq. 8: P_{i+1} in M_gt - M_i; 'error_region' is SAM's training rule, 'center' SAM's evaluation click.
        next_point: Literal["gt_minus_pred", "error_region", "center"] = Field(
            "gt_minus_pred", description="where a correction point is drawn")
        # Q-TinySAM: W8A8 post-training quantisation; None trains and deploys the float student.
        quant_bits: Literal[8] | None = Field(None, description="post-training quantisation bit width (None: off)")
        quant_activations: bool = Field(True, description="also fake-quantise the quantised layers' inputs (A8)")
        # Q-TinySAM calibrates on 8 SA-1B images.
        calibration_images: int = Field(8, ge=1, description="training images that calibrate activation scales")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}
        self._last: dict[str, float] = {}

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.methods.segmentation.mobilesam import check_embeddings, copy_decoder

        if teacher is None:
            raise BenchError("tinysam needs the task's teacher (the cell has none)")
        shape = check_embeddings(teacher, student, self.name)
        copy_decoder(teacher, student, trainable=True, method=self.name)
        self.info.update(embedding_shape=list(shape), decoder="copied from the teacher, trained")
        return student

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p, student = self.params, ctx.student
        images, gt, valid = batch["image"], batch["gt_masks"], batch["valid"]
        b, n_prompts = gt.shape[:2]
        gen = step_generator(ctx.seed, ctx.step)
        iterations = draw_iterations(gen, (b, n_prompts), p.max_iterations)
        t_emb = ctx.run_teacher(lambda t: t.embed(images), b)
        s_emb = student.embed(images)
        if p.sampling_model == "teacher":
            def decode(prompts):
                return ctx.run_teacher(lambda t: t.decode(t_emb, prompts), b)
        else:
            def decode(prompts):
                with torch.no_grad():
                    return student.decode(s_emb.detach(), prompts)
        prompts = hard_prompts(decode, student.upscale, gt, valid, iterations, gen, p.next_point)
        t_dec = ctx.run_teacher(lambda t: t.decode(t_emb, prompts), b)
        s_dec = student.decode(s_emb, prompts)
        with torch.no_grad():
            t_up = student.upscale(t_dec.masks)
        terms = full_stage_losses(s_dec, t_dec, s_emb, t_emb, student.upscale(s_dec.masks), t_up, gt, valid, p.eps,
                                  p.supervise_all_iou)
        loss = (p.alpha * terms["embedding"] + p.beta * terms["token"] + p.gamma * terms["output"]
                + p.mask_weight * terms["mask"] + p.iou_weight * terms["iou"])
        v = valid.bool()
        self._last = {f"{k}_loss" if k != "hard_weight" else k: float(x.detach()) for k, x in terms.items()}
        self._last["prompt_points"] = float((prompts.labels >= 0).sum(dim=-1)[v].float().mean()) if v.any() else 0.0
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        import torch

        p = self.params
        if p.quant_bits is None:
            return student
        calib = None
        if p.quant_activations:  # the first training batches of the harness's fixed calibration order
            batches = ctx.calibration_batches(1)
            need = -(-p.calibration_images // max(1, int(batches[0]["image"].shape[0])))
            if need > 1:
                batches = ctx.calibration_batches(need)
            calib = torch.cat([bt["image"] for bt in batches])[: p.calibration_images]
        self.info["quantization"] = quantize_encoder(student, p.quant_bits, calib)
        return student

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])

    def record_info(self) -> dict[str, Any]:
        p = self.params
        out = dict(self.info)
        out.update(loss_weights={"alpha": p.alpha, "beta": p.beta, "gamma": p.gamma, "mask": p.mask_weight,
                                 "iou": p.iou_weight},
                   hard_prompts={"iterations": f"uniform 0..{p.max_iterations}", "sampling_model": p.sampling_model,
                                 "next_point": p.next_point})
        out.setdefault("quantization", {"bits": p.quant_bits} if p.quant_bits else None)
        return out
