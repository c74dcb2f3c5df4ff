"""GPUSQ-ViT — Chong Yu, Tao Chen, Zhongxue Gan, Jiayuan Fan, "Boost Vision Transformer with GPU-Friendly
Sparsity and Quantization" (CVPR 2023, arXiv 2305.10727). No official code is published (the paper gives no
link; none is found on GitHub). The paper's full text could not be read here (only its abstract); the method is
reconstructed from the abstract and from two secondary summaries of the paper, both AI-generated notes stored in
public GitHub repositories (hustzxd/EfficientPaper @ 012841e ``notes/2023/GPUSQ-ViT/note.md``, and an unnamed
paper-notes file); every value that comes from them, and every choice made here, is marked below.

What is implemented:

* Stage 1, 2:4 structured pruning (dense float model -> sparse float model M_SF): at the start of the stage every
  Linear and ungrouped Conv2d of the student except the classifier gets a magnitude mask along the GEMM's input
  dimension K — the two largest |w| of every 4 consecutive weights (2:4, the FP16/INT8 sparse tensor cores'
  pattern; a convolution's K is cin*kh*kw in torch's (cin, kh, kw) order, so the patch embedding, a strided
  convolution, is sparsified as the implicit GEMM of width C*P^2 the summaries describe). Layers whose K is not a
  multiple of 4 stay dense (the CIFAR ResNet stem: K = 27). The mask is fixed for the rest of the run (NVIDIA
  apex ASP's recipe, whose masks the sparse tensor cores run): the forward uses w * mask and the pruned weights are
  re-zeroed after every optimiser step. With ``bits=4`` the pattern is the INT4 tensor cores' 4:8 pair-wise one
  (of every 8 weights along K, the 2 pairs with the largest |w_a| + |w_b| are kept), which the summaries' storage
  figures imply (37.5% saved at INT4).
* Stage 2, sparse-distillation-aware QAT (M_SF -> sparse quantised M_SQ): M_SF is frozen as the stage's teacher;
  the student keeps its masks, and every GEMM layer's weights (per output channel) and input (per tensor) are
  fake-quantised, symmetric, with NVIDIA pytorch-quantization's conventions (TensorRT's toolkit for INT8 QAT:
  scale (2^(b-1) - 1)/amax, narrow range, round half to even, straight-through gradient clipped outside amax;
  weight amax = max |w| per row at every step, activation amax max-calibrated on ``calib_batches`` fixed batches at
  the stage's start).
* Mixed-strategy distillation, both stages: L = alpha L_hard + beta L_soft + gamma L_feature with alpha = 1,
  beta = 10, gamma = 5 (the weights the EfficientPaper summary gives for L_prune). L_hard: cross-entropy to the
  teacher's arg-max label; L_soft: tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau)); L_feature: over the feature
  maps of the later stages (the summaries: the paper mimics only later-stage features, found by CAM analysis, and
  only where teacher and student predict the same class), the per-example mean squared error of each tapped layer
  averaged over the examples on which the two arg-max predictions agree, summed over layers. In stage 2 each
  layer's term is multiplied by its sparse-distillation-aware weight factor: the summaries say the pruning stage's
  per-layer feature loss is the factor's source and that a larger loss gives a smaller factor; here
  w_j = J (1/L_j) / sum_k (1/L_k) (mean 1), with L_j measured between M_SF and the dense teacher on the
  calibration batches at the end of stage 1.
* The deployed model is M_SQ: weights Q_b(w * mask) written into the network, activations fake-quantised; it is
  what is evaluated. The record states the sparsity pattern, the sparsified and dense layers, the bit widths and
  the real size with compressed 2:4 storage: per sparse weight b/2 bits of values plus 2 bits of index per kept
  value (2:4), or per kept pair of INT4 values (4:8 pairs) — 5 bits per weight at INT8, 2.5 at INT4, so a 32-bit
  weight compresses 6.4x / 12.8x as the paper's 6.4x / 12.7x — plus a float32 scale per output channel and per
  quantised input; dense quantised weights b bits each; everything else float32. It also states the FLOPs with the
  2:4 kernels (the sparse GEMMs skip half their multiply-accumulates) and, on a CUDA GPU with sparse tensor cores,
  the FP16 2:4 kernels' speed per sparse Linear (PyTorch semi-structured kernels, timed by bench.measure.latency);
  on a CPU it says the speed is not measured.

Deviations and reconstructions (the paper's text and code were not available):

* Reconstructed, unsure: the loss weights (a secondary summary), the temperature (1: DeiT's distillation default,
  the paper's DeiT baselines' code base), the hard label's source (the teacher's arg-max; ``hard_label`` switches to
  the ground truth), the feature loss (MSE), which layers are "later stages" (see ``feature_taps``), the agreement
  rule's normalisation, the weight-factor formula, the activation bit width at INT4 (8: the paper's FLOPs ratio,
  62x at INT4 against 31x at INT8, fits 4-bit weights with 8-bit activations) and the split of the budget between
  the stages (``prune_fraction`` 0.5).
* The paper compresses a trained dense model and distils from that same model. Here the student is the task's
  (random-initialised at the smoke and small tiers, so its mask is drawn from the initial weights), the stage-1
  teacher is the task's teacher, and where their widths differ a learned projection (linear for tokens, 1x1
  convolution for maps; ``gpusq_proj``, its own optimiser) maps the student's features to the teacher's. Stage 2's
  teacher M_SF has the student's architecture, as in the paper.
* Feature taps exist for timm ViTs, the task's CIFAR ResNets and timm ResNets (``feature_taps``); other
  architectures (timm's Swin, whose stage outputs are NHWC, included) train without the feature term, which the
  record and the table note say.
* M_SF's forward passes in stage 2 are run by the method and counted in ``method_info`` (``sf_teacher_passes``),
  not in the harness's teacher counts. The optimiser and schedule are the task's, restarted for each stage.
* Evaluation, FLOPs and latency columns are those of float32 kernels running the fake-quantised network; the 2:4
  FLOPs, real size and (GPU) kernel speed are in ``method_info`` (see ``table_notes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


# --------------------------------------------------------------------------------------------------
# The loss and the weight factors (pure functions, tested against plain torch)
# --------------------------------------------------------------------------------------------------


def gpusq_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
               student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], factors: list[float] | None,
               *, alpha: float, beta: float, gamma: float, temperature: float, hard_label: str = "teacher",
               agreement: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """alpha CE(z_s, y_hard) + beta tau^2 KL(p_t^tau || p_s^tau) + gamma sum_j w_j L_feat_j.

    ``y_hard`` is the teacher's arg-max (``hard_label="teacher"``) or ``labels``. L_feat_j is the mean squared
    error of layer j's (aligned) features per example, averaged over the examples where teacher and student
    arg-max predictions agree (all examples without ``agreement``; 0 when none agree); w_j = ``factors[j]`` (1 when
    None). Returns the loss and its parts (floats, and per-layer feature losses)."""
    import torch
    import torch.nn.functional as F

    s, t = student_logits.float(), teacher_logits.detach().float()
    target = t.argmax(-1) if hard_label == "teacher" else labels
    hard = F.cross_entropy(s, target)
    tau = temperature
    soft = tau * tau * F.kl_div(F.log_softmax(s / tau, -1), F.softmax(t / tau, -1), reduction="batchmean")
    agree = (s.argmax(-1) == t.argmax(-1)).float() if agreement else torch.ones(s.shape[0], device=s.device)
    n_agree = agree.sum()
    per_layer = []
    for sf, tf in zip(student_feats, teacher_feats):
        per_example = ((sf.float() - tf.detach().float()) ** 2).flatten(1).mean(1)
        per_layer.append((per_example * agree).sum() / n_agree.clamp(min=1.0))
    w = factors if factors is not None else [1.0] * len(per_layer)
    feat = sum((wj * lj for wj, lj in zip(w, per_layer)), s.new_zeros(()))
    total = alpha * hard + beta * soft + gamma * feat
    parts = {"hard": float(hard.detach()), "soft": float(soft.detach()), "feature": float(feat.detach()),
             "agree": float(n_agree) / max(1, s.shape[0]), "per_layer": [float(x.detach()) for x in per_layer]}
    return total, parts


def weight_factors(layer_losses: list[float], eps: float = 1e-12) -> list[float]:
    """Sparse-distillation-aware factors from the pruning stage's per-layer feature losses L_j: inversely
    proportional to L_j, normalised to mean 1, w_j = J (1/L_j) / sum_k (1/L_k)."""
    if not layer_losses:
        return []
    inv = [1.0 / max(x, eps) for x in layer_losses]
    return [len(inv) * v / sum(inv) for v in inv]


# --------------------------------------------------------------------------------------------------
# The deployed size (plain arithmetic, tested by hand)
# --------------------------------------------------------------------------------------------------


def deployed_size_bits(layers: list[dict[str, Any]], other_values: int, bits: int, quantized: bool,
                       quantize_activations: bool) -> dict[str, Any]:
    """Bits of the deployed model. ``layers``: one dict per GEMM layer with ``n`` (weight values), ``out``
    (output channels) and ``sparse``; ``other_values``: every other parameter and floating buffer (float32).

    Sparse weight: n/2 kept values of b bits, plus 2 index bits per kept value (2:4) or per kept pair at INT4 (4:8
    pair-wise); a float32 scale per output channel. Dense quantised weight: b bits per value and the scales. A
    quantised layer input: one float32 amax. Without quantisation (no QAT stage ran) values are float32."""
    b = bits if quantized else 32
    weight_bits = index_bits = scale_bits = 0
    sparse_values = dense_values = 0
    for layer in layers:
        n, out = int(layer["n"]), int(layer["out"])
        if layer["sparse"]:
            weight_bits += n // 2 * b
            index_bits += (n // 4 if bits == 4 and quantized else n // 2) * 2
            sparse_values += n
        else:
            weight_bits += n * b
            dense_values += n
        if quantized:
            scale_bits += 32 * out + (32 if quantize_activations else 0)
    other_bits = 32 * int(other_values)
    total = weight_bits + index_bits + scale_bits + other_bits
    return {"total_bits": total, "weight_bits": weight_bits, "index_bits": index_bits, "scale_bits": scale_bits,
            "other_bits": other_bits, "sparse_weight_values": sparse_values, "dense_gemm_values": dense_values}


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class GPUSQViT(Method):
    """Yu et al. 2023: 2:4 structured pruning, then sparse-distillation-aware QAT, both with hard + soft + feature distillation."""

    name = "gpusq_vit"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # The paper's results are INT8 (6.4x smaller, 31x fewer FLOPs) and INT4 (12.7x, 62x).
        bits: Literal[4, 8] = Field(8, description="weight bits of the QAT stage (8: 2:4 pattern; 4: 4:8 pair-wise)")
        # Reconstructed: 8 fits the paper's FLOPs ratios (62x at INT4 = twice 31x at INT8); TensorRT INT8 layers
        # quantise weights and inputs.
        act_bits: Literal[4, 8] = Field(8, description="bits of the quantised layer inputs")
        quantize_activations: bool = Field(True, description="fake-quantise every GEMM layer's input (integer "
                                                             "tensor cores need both operands quantised)")
        # EfficientPaper summary of the paper: L_prune = 1 L_hard + 10 L_soft + 5 L_feature (and L_calibrate alike).
        alpha: float = Field(1.0, ge=0, description="weight of the hard-label distillation term")
        beta: float = Field(10.0, ge=0, description="weight of the soft-logits (KL) distillation term")
        gamma: float = Field(5.0, ge=0, description="weight of the feature distillation term")
        # Not available from the paper; 1 is DeiT's distillation-tau default (the code base of its DeiT models).
        temperature: float = Field(1.0, gt=0, description="softmax temperature tau of the soft term (scaled tau^2)")
        hard_label: Literal["teacher", "ground_truth"] = Field(
            "teacher", description="hard label of L_hard: the teacher's arg-max (hard-label distillation) or the "
                                   "ground truth")
        # Summaries: features are mimicked only when teacher and student predict the same class.
        agreement_only: bool = Field(True, description="feature term only on examples where the teacher's and the "
                                                       "student's predicted classes agree")
        weight_factor: bool = Field(True, description="weight the QAT stage's feature terms by the sparse-"
                                                      "distillation-aware factors (inverse pruning-stage losses)")
        # Chosen here (the paper's epochs per stage are not known): half the budget each.
        prune_fraction: float = Field(0.5, gt=0, le=1, description="share of the step budget spent in the 2:4 "
                                                                   "pruning stage (the rest is QAT)")
        # pytorch-quantization's examples calibrate on a few batches; 4 chosen here.
        calib_batches: int = Field(4, ge=1, le=1000, description="fixed training batches for activation amax "
                                                                 "calibration and the weight factors")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}
        self.proj: nn.Module | None = None
        self.sf_teacher: nn.Module | None = None
        self.factors: list[float] | None = None
        self._last: dict[str, float] = {}

    @property
    def pattern(self) -> str:
        return "4:8-pairs" if self.params.bits == 4 else "2:4"

    def unsupported(self, task: Task) -> str | None:
        if not hasattr(task, "student_is_vit") or task.domain != "classification":
            return ("GPUSQ-ViT compresses image classifiers (the imagenet task family: its ViTs, and CNNs whose "
                    "convolutions it sparsifies); this task has no vision classifier")
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        prune = min(total_steps, max(1, round(self.params.prune_fraction * total_steps)))
        plan = [Generation(prune, fresh_student=False, name="2:4 structured pruning (mixed distillation from the dense teacher)")]
        if total_steps - prune > 0:
            plan.append(Generation(total_steps - prune, fresh_student=False,
                                   name="sparse-distillation-aware QAT (mixed distillation from the sparse float model)"))
        self.info["stage_steps"] = [g.steps for g in plan]
        return plan

    # --- stage 1: masks --------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from torch import nn

        from bench.methods import _gpusq_modules as gm

        p = self.params
        mods = dict(student.named_modules())
        group = 8 if self.pattern == "4:8-pairs" else 4
        sparse, skipped = gm.sparse_candidates(student, group)
        wrapped = gm.SparseQuantStudent(student, sparse, gm.gemm_layers(student), self.pattern, p.bits, p.act_bits,
                                        p.quantize_activations)
        wrapped.apply_masks_()
        self.info.update(pattern=self.pattern, sparse_layers=sparse, dense_layers=[f"{n} ({why})" for n, why in skipped],
                         quantized_layers=list(wrapped.quant),
                         student_is_cnn=bool(sparse) and all(isinstance(mods[n], nn.Conv2d) for n in sparse))
        return wrapped

    def create_modules(self, ctx: StepContext) -> None:
        """Feature taps of student and teacher and, where their widths differ, the projection (rebuilt on resume;
        the harness restores its weights)."""
        import torch
        from bench.methods import _gpusq_modules as gm

        student = ctx.student
        s_taps = gm.feature_taps(student.model)
        t_taps = gm.feature_taps(ctx.teacher) if ctx.teacher is not None else []
        j = min(len(s_taps), len(t_taps))
        s_taps, t_taps = s_taps[len(s_taps) - j:], t_taps[len(t_taps) - j:]
        self.info.update(student_taps=s_taps, teacher_taps=t_taps)
        self.proj = None
        if not j:
            self.info["feature_note"] = "no later-stage feature taps for this student/teacher pair: no feature term"
            return
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            was = (student.training, ctx.teacher.training)
            student.eval()
            ctx.teacher.eval()
            pixels = ctx.task.example_inputs(2)["pixels"].to(ctx.device)
            _, sf = gm.run_with_features(student, pixels, s_taps)
            _, tf = gm.run_with_features(ctx.teacher, pixels, t_taps)
            student.train(was[0])
            ctx.teacher.train(was[1])
            specs = []
            for a, b in zip(sf, tf):
                (ka, ca), (kb, cb) = gm.feature_kind(a), gm.feature_kind(b)
                if ka != kb or (ka == "tokens" and a.shape[1] != b.shape[1]):
                    self.info.update(student_taps=[], teacher_taps=[], feature_note=(
                        f"student and teacher features do not align ({ka} {tuple(a.shape[1:])} vs {kb} "
                        f"{tuple(b.shape[1:])}): no feature term"))
                    return
                specs.append((ka, ca, cb))
            torch.manual_seed(ctx.seed + 17)
            proj = gm.FeatureProjector(specs)
        self.info["projection"] = [f"{k} {a}->{b}" + (" (identity)" if a == b else "") for k, a, b in specs]
        if any(True for _ in proj.parameters()):
            self.proj = proj

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"gpusq_proj": self.proj} if self.proj is not None else {}

    # --- stage 2: M_SF frozen, factors, calibration, quantisation on ------------------------------
    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        if index != 1:
            return
        import copy

        student = ctx.student
        sf = copy.deepcopy(student).eval()
        for q in sf.parameters():
            q.requires_grad_(False)
        self.sf_teacher = sf
        batches = ctx.calibration_batches(self.params.calib_batches)
        if self.params.weight_factor and self.info.get("student_taps"):
            losses = self._pruning_layer_losses(ctx, batches)
            self.info["pruning_layer_feature_losses"] = losses
            self.factors = weight_factors(losses)
        else:
            self.factors = None
        self.info["weight_factors"] = self.factors
        student.calibrate([b["pixels"] for b in batches])
        student.quant_on.fill_(True)
        self.info["act_amax"] = [round(float(a), 6) for a in student.act_amax]
        self.info["sf_teacher_passes"] = 0

    def _pruning_layer_losses(self, ctx: StepContext, batches: list[Batch]) -> list[float]:
        """Per tapped layer, the pruning stage's feature loss (MSE of M_SF's aligned features to the dense
        teacher's, over the agreeing examples of the calibration batches)."""
        import torch
        from bench.methods import _gpusq_modules as gm

        s_taps, t_taps = self.info["student_taps"], self.info["teacher_taps"]
        sums = [0.0] * len(s_taps)
        for b in batches:
            pixels = b["pixels"]
            t_logits, tf = ctx.run_teacher(lambda t: gm.run_with_features(t, pixels, t_taps), n_examples=len(pixels))
            with torch.no_grad():
                s_logits, sf = gm.run_with_features(self.sf_teacher, pixels, s_taps)
                sf, tf = self._align(sf, tf)
                _, parts = gpusq_loss(s_logits, t_logits, None, sf, tf, None, alpha=0, beta=0, gamma=1,
                                      temperature=1.0, agreement=self.params.agreement_only)
            sums = [a + x for a, x in zip(sums, parts["per_layer"])]
        return [x / len(batches) for x in sums]

    def _align(self, sf: list[torch.Tensor], tf: list[torch.Tensor]) -> tuple[list, list]:
        from bench.methods import _gpusq_modules as gm

        out_s, out_t = [], []
        for j, (a, b) in enumerate(zip(sf, tf)):
            if self.proj is not None:
                a = self.proj(j, a)
            a, b = gm.match_spatial(a, b)
            out_s.append(a)
            out_t.append(b)
        return out_s, out_t

    # --- the step ---------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch
        from bench.methods import _gpusq_modules as gm

        p = self.params
        pixels = batch["pixels"]
        s_taps = self.info.get("student_taps", [])
        s_logits, sf = gm.run_with_features(ctx.student, pixels, s_taps)
        if ctx.generation == 0:
            t_taps = self.info.get("teacher_taps", [])
            t_logits, tf = ctx.run_teacher(lambda t: gm.run_with_features(t, pixels, t_taps), n_examples=len(pixels))
            sf, tf = self._align(sf, tf)
            factors = None
        else:
            self.sf_teacher.to(pixels.device)  # a resumed run loads it on the CPU
            with torch.no_grad():
                t_logits, tf = gm.run_with_features(self.sf_teacher, pixels, s_taps)
            self.info["sf_teacher_passes"] = self.info.get("sf_teacher_passes", 0) + 1
            factors = self.factors
        total, parts = gpusq_loss(s_logits, t_logits, batch.get("labels"), sf, tf, factors, alpha=p.alpha, beta=p.beta,
                                  gamma=p.gamma, temperature=p.temperature, hard_label=p.hard_label,
                                  agreement=p.agreement_only)
        self._last = {f"{k}_loss" if k != "agree" else "agreement": v for k, v in parts.items() if k != "per_layer"}
        out = {"student": total}
        if ctx.generation == 0 and self.proj is not None:
            out["gpusq_proj"] = total
        return out

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        ctx.student.apply_masks_()  # ASP: pruned weights stay zero through every optimiser step
        return dict(self._last)

    # --- the deployed model -------------------------------------------------------------------------
    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        if not hasattr(student, "bake"):
            return student
        student.bake()
        self.info["quantized"] = bool(student.quant_on)
        self.info["size"] = self._size(student)
        if ctx is not None:
            self.info["flops"] = self._flops(student, ctx)
            self.info["kernel_speed"] = self._speed(student, ctx)
        return student

    def _size(self, student: nn.Module) -> dict[str, Any]:
        p = self.params
        mods = dict(student.model.named_modules())
        sparse = set(student.sparse)
        layers = [{"name": n, "n": mods[n].weight.numel(), "out": mods[n].weight.shape[0], "sparse": n in sparse}
                  for n in student.quant]
        gemm_weights = {id(mods[n].weight) for n in student.quant}
        other = sum(q.numel() for q in student.model.parameters() if id(q) not in gemm_weights)
        other += sum(b.numel() for b in student.model.buffers() if b.is_floating_point())
        fp32 = 32 * (sum(q.numel() for q in student.model.parameters())
                     + sum(b.numel() for b in student.model.buffers() if b.is_floating_point()))
        quantized = bool(student.quant_on)
        size = deployed_size_bits(layers, other, p.bits, quantized, p.quantize_activations)
        nonzero = sum(int((mods[n].weight != 0).sum()) for n in sparse)
        return {**size, "size_bytes": size["total_bits"] / 8, "float32_size_bytes": fp32 / 8,
                "compression": fp32 / size["total_bits"], "weight_bit_width": p.bits if quantized else 32,
                "act_bit_width": (p.act_bits if p.quantize_activations else None) if quantized else None,
                "pattern": self.pattern, "sparse_nonzero_fraction": nonzero / max(1, size["sparse_weight_values"]),
                "rule": ("sparse weights: b/2 bits of kept values + 2 index bits per kept value (2:4) or per kept "
                         "INT4 pair (4:8 pair-wise); dense GEMM weights b bits; a float32 scale per output channel "
                         "and per quantised input; everything else float32")}

    def _flops(self, student: nn.Module, ctx: StepContext) -> dict[str, Any]:
        from bench.measure.flops import model_flops_per_sample
        from bench.methods import _gpusq_modules as gm

        task = ctx.task
        inputs = {k: v.to(ctx.device) for k, v in task.example_inputs(1).items()}
        shapes = gm.gemm_shapes(student, inputs["pixels"])
        dense = model_flops_per_sample(student, task.forward, inputs, 1).flops
        sparse = sum(s["flops"] for s in shapes.values())
        return {"dense_per_sample": dense, "sparse_gemm_per_sample": sparse, "with_2to4_per_sample": dense - sparse // 2,
                "rule": "FLOPs of the float network (bench.measure.flops) minus half of the sparsified GEMMs' FLOPs; "
                        "integer arithmetic is not folded in"}

    def _speed(self, student: nn.Module, ctx: StepContext) -> dict[str, Any]:
        import torch

        device = str(ctx.device)
        if not (device.startswith("cuda") and torch.cuda.is_available()
                and torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)):
            return {"measured": False, "reason": f"no CUDA GPU with sparse tensor cores in this run (device {device}): "
                                                 "the 2:4 kernels' speed is not measured; FLOPs and size only"}
        from bench.methods import _gpusq_modules as gm

        bs = ctx.task.training().eval_batch_size
        pixels = ctx.task.example_inputs(bs)["pixels"].to(device)
        try:
            return {**gm.semi_structured_speed(student, pixels, device), "batch_size": bs}
        except Exception as exc:  # noqa: BLE001 - a probe failure is recorded, the row stands
            return {"measured": False, "reason": f"2:4 kernel probe failed: {type(exc).__name__}: {exc}"[:400]}

    # --- records ----------------------------------------------------------------------------------
    def table_notes(self, task: Task) -> list[str]:
        p = self.params
        notes = [("GPUSQ-ViT has no public code and its full text was not readable here: the loss weights (1/10/5, "
                  "from a secondary summary), tau, hard-label source, MSE feature loss, tapped layers and weight-factor "
                  "formula are reconstructions (see the method docstring)")]
        speed = self.info.get("kernel_speed") or {}
        quant = f"INT{p.bits} weights" + (f", INT{p.act_bits} activations" if p.quantize_activations else "")
        notes.append(f"the row is the {self.pattern} sparse model with {quant}, evaluated as fake quantisation in "
                     f"float32; the FLOPs/latency columns are dense float kernels' — the 2:4 FLOPs and the compressed "
                     f"size are in method_info" + ("" if speed.get("measured") else
                                                   "; no GPU in this run, so the 2:4 kernels' speed is not measured"))
        if self.info.get("student_is_cnn"):
            k = 8 if self.pattern == "4:8-pairs" else 4
            notes.append(f"the student is a CNN: its convolutions whose implicit-GEMM K = cin*kh*kw is a multiple of {k} "
                         f"are {self.pattern} sparsified along K; the rest (e.g. the stem) and the classifier stay dense")
        if self.info.get("projection") and any("identity" not in x for x in self.info["projection"]):
            notes.append("the task's teacher is wider than the student (the paper distils from the dense model "
                         "itself): a learned projection maps student features to the teacher's in stage 1")
        if self.info.get("feature_note"):
            notes.append(self.info["feature_note"])
        if len(self.info.get("stage_steps", [])) < 2:
            notes.append("the budget allowed no QAT stage: the row is the sparse float model")
        return notes

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info), "factors": self.factors, "sf_teacher": self.sf_teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])
        self.factors = state["factors"]
        self.sf_teacher = state["sf_teacher"]

    def record_info(self) -> dict[str, Any]:
        return {"gpusq": {k: v for k, v in self.info.items()}}
