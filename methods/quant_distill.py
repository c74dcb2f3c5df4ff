"""Quantized distillation — Polino, Pascanu & Alistarh, "Model compression via distillation and
quantization" (ICLR 2018, arXiv 1802.05668), method 1. Official code: antspy/quantized_distillation @
bb500b7, ``quantization/quant_functions.py`` (``uniformQuantization``, ``ScalingFunction``),
``quantization/help_functions.py`` (``create_bucket_tensor``), ``cnn_models/help_fun.py``
(``forward_and_backward``: the loss) and ``cnn_models/conv_forward_model.py`` (``train_model``: shadow
weights).

What is implemented, following the official code:

* Quantiser (``uniformQuantization`` with ``type_of_scaling='linear'``): every quantised tensor is
  flattened and cut into buckets of ``bucket_size`` consecutive values (the last padded with the final
  value); each bucket is scaled to [0, 1] by (v - min) / (max - min), rounded to one of s = 2^bits levels
  {0, 1/(s-1), ..., 1} (deterministically, or stochastically and unbiased), and scaled back.
* Shadow weights, straight-through: the forward pass runs on Q(w), the gradient with respect to Q(w) is
  applied to the full-precision w (``train_model`` quantises, computes the loss, restores w, then steps;
  ``backprop_quantization_style='none'``). All parameter tensors are quantised (biases and batch-norm
  affine parameters included) except the first and last tensors of ``model.parameters()``, exactly as
  the code indexes them: the official experiments (``cifar10_wideResNet.py``, ``cifar100_test.py``,
  ``imageNet_distilled.py``) all pass ``quantize_first_and_last_layer: False`` to ``train_model`` (whose own
  default is True), so that is the default here; ``quantize_first_last=true`` quantises every tensor.
* Loss (``forward_and_backward``, ``ask_teacher_strategy='always'``):
      L = 0.7 * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + 0.3 * CE(y, z_s),  T = 2.
* The deployed model is Q(w) (``train_model`` quantises once more at the end): the evaluated and measured
  row is the quantised network. The record states the bit width and the real size of the quantised
  model: b bits per quantised value plus a float32 (min, scale) pair per bucket, everything else float32.

Deviations: the KL term is averaged per example (``batchmean``, Hinton's loss as the paper writes it);
the official code's ``nn.KLDivLoss()`` under PyTorch 0.3 also averaged over classes, scaling the soft term
by 1 / C (``kl_reduction="elementwise"`` reproduces it). Both facts that change the row's numbers (the
soft term's scale, and which tensors are quantised when they differ from the experiments) are printed
under every leaderboard table holding the row (``table_notes``). Rounding halves go up (PyTorch 0.3's ``round``
on non-negative values). The optimiser and schedule are the task's (the reference uses SGD with Nesterov
momentum, weight decay 2.2e-4). Weights are stored as float32 values on the quantisation grid; FLOPs and
latency are those of the float model (no integer kernels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float, soft_weight: float, kl_reduction: str = "batchmean") -> torch.Tensor:
    """soft_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - soft_weight) * CE(y, z_s)."""
    import torch.nn.functional as F

    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = F.kl_div(log_q, p, reduction="batchmean")
    if kl_reduction == "elementwise":  # averaged over examples x classes, as PyTorch 0.3's KLDivLoss()
        kl = kl / student_logits.shape[-1]
    return soft_weight * t * t * kl + (1.0 - soft_weight) * F.cross_entropy(student_logits.float(), labels)


class QuantDistill(Method):
    """Polino et al. 2018: bucketed uniform quantisation of the student with shadow weights, trained with Hinton's loss."""

    name = "quant_distill"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # bits 4 and bucket 256: the paper's CIFAR-10 quantised-distillation runs (cifar10_test.py numBits
        # [4, 2], bucket_size 256); 'linear' scaling: train_model's default quantizationFunctionToUse.
        bits: int = Field(4, ge=1, le=16, description="bits per quantised weight (s = 2^bits levels)")
        bucket_size: int | None = Field(256, ge=1, description="values per scaling bucket (None: one per tensor)")
        # train_model's default uniformQuantization(stochastic_rounding=False).
        rounding: Literal["deterministic", "stochastic"] = Field("deterministic", description="rounding to the grid")
        # The experiments' quantize_first_and_last_layer=False (cifar10_wideResNet.py, cifar100_test.py,
        # imageNet_distilled.py); train_model's own default is True.
        quantize_first_last: bool = Field(False, description="also quantise the first and last parameter tensors "
                                                             "(the official experiments leave them full precision)")
        # help_fun.forward_and_backward: temperature_distillation=2, weight_teacher_loss=0.7.
        temperature: float = Field(2.0, gt=0, description="distillation temperature T")
        soft_weight: float = Field(0.7, ge=0, le=1, description="weight of the T^2-scaled KL term (CE gets the rest)")
        kl_reduction: Literal["batchmean", "elementwise"] = Field(
            "batchmean", description="KL averaged per example (Hinton), or over examples x classes (PyTorch 0.3's "
                                     "KLDivLoss default in the official code)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.size: dict[str, Any] = {}

    def unsupported(self, task: Task) -> str | None:
        if task.problem() != "classification":
            return "quantised distillation uses Hinton's softmax loss; this subtask is a regression"
        return None

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.methods._modules import QuantizedStudent

        p = self.params
        return QuantizedStudent(student, p.bits, p.bucket_size, p.rounding == "stochastic", not p.quantize_first_last)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher = ctx.teacher_outputs(batch)
        p = self.params
        return {"student": hinton_loss(out.logits, teacher.logits, batch["labels"], p.temperature, p.soft_weight,
                                       p.kl_reduction)}

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        if not hasattr(student, "bake"):
            return student
        bits = student.size_bits()
        n_params = sum(p.numel() for p in student.net.parameters())
        n_buffers = sum(b.numel() for b in student.net.buffers() if b.is_floating_point())
        total = bits["quantized_bits"] + bits["other_bits"]
        fp32 = (n_params + n_buffers) * 32
        self.size = {"bits": self.params.bits, "bucket_size": self.params.bucket_size,
                     "quantized_tensors": len(student.names), "quantized_values": bits["quantized_values"],
                     "buckets": bits["buckets"], "size_bytes": total / 8, "float32_size_bytes": fp32 / 8,
                     "compression": fp32 / total,
                     "rule": "bits per quantised value + a float32 (min, scale) pair per bucket; everything else float32"}
        return student.bake()

    def table_notes(self, task: Task) -> list[str]:
        p = self.params
        notes = []
        if p.kl_reduction == "batchmean":
            notes.append("the soft (KL) term is averaged per example as the paper writes Hinton's loss; the "
                         "official code's KLDivLoss also averaged over classes, a soft term 1/C as large "
                         "(kl_reduction=elementwise reproduces it)")
        if p.quantize_first_last:
            notes.append("the first and last parameter tensors are quantised too; the official experiments "
                         "keep them full precision (quantize_first_and_last_layer=False)")
        else:
            notes.append("the first and last parameter tensors stay full precision, as in the official "
                         "experiments (quantize_first_and_last_layer=False)")
        return notes

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = dict(state["size"])

    def record_info(self) -> dict[str, Any]:
        return {"quantization": self.size or {"bits": self.params.bits, "bucket_size": self.params.bucket_size}}
