"""ACM — Wójcik, Devoto, Pustelnik, Minervini & Scardapane, "Adaptive Computation Modules: Granular Conditional
Computation For Efficient Inference" (arXiv 2312.10193; AAAI 2025). Official code:
bartwojcik/adaptive_computation_modules @ 6760ad64c52925144641e07d7f5627f99d0dbce3 ("Code drop"), read in full:
``architectures/acm.py`` (the module, gates, ``acmize_vit``), ``methods/acm/rep_distill_train.py`` (phase 1),
``methods/acm/gating_networks_train.py`` (phase 2), ``methods/acm/end_to_end.py`` (phase 3), ``eval.py`` (cost
accounting) and ``scripts/pretrained_vit_b_acm_imagenet.py`` (the ViT-B/ImageNet recipe: every default below
not marked otherwise). Of the paper only the abstract and introduction were readable here (arxiv.org/html/
2312.10193v2 in the stored pages); the method is implemented from the official code, which the paper's summary
(three phases: distil the learners, pre-train the gates on artificial labels, fine-tune end to end) matches.

Where it runs: the imagenet task with a ViT teacher (timm ``VisionTransformer``: the smoke tier's default
teacher ``vit_smoke_64d4``, or ``imagenet.teacher=vit_*``/``deit*``); tokens are the patches and the class token.
Elsewhere the cell is skipped with the reason: non-ViT teachers (the small tier's CIFAR ResNets) and text (GLUE)
— the paper ACMizes ViTs (and wav2vec2 for speech), and this implementation ACMizes timm ViTs only.

What is implemented:

* **ACMization** (``acmize_vit``). The ACMized model is a copy of the task's teacher (the task's student
  architecture is not used) in which every block's MLP and its q, k, v and output projections are each replaced by
  an ACM: N = 4 learners x -> act(x W1_i + b1_i) W2_i (bias on the hidden layer only, 'hidden_only'), learner i
  refining the sum of learners 1..i-1; the ACM's output with k learners is o_1 + ... + o_k (0 learners: zero).
  Total cost factor 1.0: FFN learners are mlp_dim / N wide (GELU, the MLP's own activation), projection learners
  (d^2 + d) / (2d + 1) / N wide (identity activation), so all N learners cost what the original layer costs.
  Each ACM has its own gating network (``acm_deep_gumbel``: 3 linear layers d -> 16 -> 16 -> choices, without
  activations as in the official code); projections execute at least one learner (min_choice 1), FFNs 0..N.
  Gate: straight-through Gumbel-softmax at tau 0.8 in training, argmax at inference.
* **Phase 1, module-wise representation distillation** (16/121 of the steps). Every ACM sees the *teacher's* input
  to the layer it replaces (forward hooks on the frozen teacher) and regresses the teacher layer's output at every
  number of learners: MSE over the outputs at 0..N learners, mean over the ACMs. Official detach mode
  ('detach', the mode that runs: the script's 'no_detach' is assigned to an attribute the module never reads): the
  output at k learners passes gradient to learner k only. Only the learners train.
* **Phase 2, gate pre-training** (8/121). Labels from the distilled ACM on the teacher's inputs: with e_k the L2
  error at k learners, the first j with e_j / e_{j+1} < 1.2 (``gating_error_factor``) gives label j + 1 (j = 0,
  or none, gives N); the gates are trained to predict them (cross-entropy). Only the gates train.
* **Phase 3, end-to-end fine-tuning** (97/121; ``acm_finetune_mode='entire_model'``). The whole ACMized model,
  gates sampling their choices, on L = task loss + 0.1 L_budget + 0.05 L_entropy + 0.05 L_diversity:
  L_budget = |sum_l E_tokens[k_l] c_l / sum_l N c_l - beta| (c_l = one learner's FLOPs, beta = 0.6),
  L_entropy = minus the normalised entropy of each example's per-ACM histogram of choices, L_diversity = minus
  twice the mean |s_b - s_b'| over pairs of examples of their mean compute s_b. The task loss is the task's label
  loss, as in the official code (``kd_weight`` > 0 adds KL(teacher || model) at temperature 1; 0 by default).
  As in the official code the choice enters the ACM's output without gradient, so the task loss does not reach the
  gates (they learn from the auxiliary terms through the straight-through sample); ``gate_task_gradient=true``
  multiplies the output by the straight-through sample instead, so it does.
* Step split: the official recipe's optimiser steps (2 epochs at batch 64, 1 at 64, 97 at 512 on ImageNet:
  16 : 8 : 97), each phase a generation with its own optimiser and schedule (the official code runs three).

Efficiency. The forward computes every learner and zeroes the unexecuted ones before the output matmul (identical
outputs and gradients to the official masked ``forward_gated``), so the harness's FLOPs, latency and memory are
those of the full width, plus the gates (which, at the smoke tier's width 64, cost ~19% of the model's FLOPs) and
the selection's element-wise work (the paper's fast path is a Triton kernel, not reproduced here).
After training, the model is run on up to ``width_examples`` evaluation images (evenly spaced) with argmax gates:
``record_info`` reports the average executed width (fraction of the N learners executed per token, per ACM kind
and FLOPs-weighted), the choice histograms, and the expected executed FLOPs per sample = the full-width count
(the harness's counter, ``bench.measure.flops.model_flops_per_sample``) minus, per ACM, tokens x (N - mean
executed learners) x one learner's FLOPs (2 per multiply-accumulate, as the counter counts; the official
``online_evaluate_acm`` accounting). A table note gives both. The budget penalty acts on the choices sampled in
training (Gumbel noise); the argmax choices at inference may execute more or fewer learners (the smoke run: 0.59 of
the learners' FLOPs sampled in training against 0.76 at inference), which the measured width shows.

Deviations (what differs here, and why):

* Optimiser: the task's (smoke AdamW 2e-3 cosine; full SGD), not the official Adam with lr 1e-3 / 1e-2 / 1e-4
  per phase and cosine to 1e-6: the harness owns optimisers and cannot vary the learning rate by generation.
  Weight decay 0 and gradient-norm clipping at 1.0 (official in all phases) are set as ``optim_overrides``.
  No mixup/cutmix/label smoothing, no bf16 (the task's data and precision).
* Gate pre-training: plain cross-entropy of the gate's softmax. The official code takes the NLL of
  log(straight-through Gumbel sample + 1e-20), whose gradient is 1e20 x that of the relaxed sample on every token
  it samples wrongly (tamed there only by gradient clipping); the labels and the target are the same.
* timm's fused qkv projection becomes three ACMs (q, k, v) whose outputs are concatenated; the official code
  ACMizes torchvision's unfused projections. The layers replaced lose their output biases (official: 'hidden_only').
* The entropy and diversity terms are computed in float32 (official: float64).
* Budgets: the phases' share of the cell's steps, not epochs (budgets here are far below the recipe's 100 epochs);
  with fewer than 3 steps, phase 2 (2 steps) or phases 1-2 (1 step) are dropped.
* The row's model is the ACMized teacher (its parameters: the teacher's, less the replaced layers' output biases,
  plus the gates); the task's student architecture plays no part.
* beta = 0.6 is one of the official script's four budgets (0.75, 0.6, 0.4, 0.25); the paper reports the range.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from bench import BenchError
from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task

PHASE_NAMES = {"distill": "representation distillation", "gates": "gate pre-training",
               "end_to_end": "end-to-end fine-tuning"}


def phase_plan(total: int, ratio: tuple[float, float, float]) -> list[tuple[str, int]]:
    """(phase, steps) for a budget of ``total`` steps split by ``ratio``: each phase gets at least one step; under 3
    steps gate pre-training (2 steps) or both pre-training phases (1 step) are dropped."""
    if total <= 1:
        return [("end_to_end", total)]
    if total == 2:
        return [("distill", 1), ("end_to_end", 1)]
    s = sum(ratio)
    n1 = max(1, round(total * ratio[0] / s))
    n2 = max(1, round(total * ratio[1] / s))
    while n1 + n2 > total - 1:  # keep at least one fine-tuning step
        if n1 >= n2 and n1 > 1:
            n1 -= 1
        else:
            n2 -= 1
    return [("distill", n1), ("gates", n2), ("end_to_end", total - n1 - n2)]


def set_trainable(model: nn.Module, phase: str) -> None:
    """Phase 1: the learners only; phase 2: the gates only; phase 3: everything."""
    from bench.methods._acm import acm_layers

    for p in model.parameters():
        p.requires_grad_(phase == "end_to_end")
    if phase == "end_to_end":
        return
    for layer in acm_layers(model):
        for name, p in layer.named_parameters():
            p.requires_grad_(name.startswith("gate.") == (phase == "gates"))


class ACM(Method):
    """Wójcik et al. 2023: ACMize a ViT teacher (learners + per-token gates), distil each ACM, pre-train gates, fine-tune with a compute budget."""

    name = "acm"
    version = "1"
    domains = frozenset({"classification"})
    # The official recipe: weight decay 0 and gradient-norm clipping at 1.0 in all three phases.
    optim_overrides: ClassVar[dict[str, Any]] = {"weight_decay": 0.0, "grad_clip": 1.0}

    class Params(Params):
        # pretrained_vit_b_acm_imagenet.py: num_blocks 4, total_flops_factor 1.0, ffn/q/k/v/o_proj all True.
        num_learners: int = Field(4, ge=1, le=64, description="learners per ACM (N)")
        flops_factor: float = Field(1.0, gt=0, le=8,
                                    description="cost of an ACM at full width over the layer it replaces")
        ffn: bool = Field(True, description="ACMize every block's MLP")
        attention: bool = Field(True, description="ACMize every block's q, k, v and output projections")
        # min_choice_dict {'q_proj': 1, 'k_proj': 1, 'v_proj': 1, 'o_proj': 1}.
        attention_min_learners: int = Field(1, ge=0, description="learners the projection ACMs always execute")
        # 'acm_deep_gumbel' with gs_tau 0.8, depth 3, gating_hidden_dim 16.
        gate_hidden: int = Field(16, ge=1, description="width of the gating networks")
        gate_depth: int = Field(3, ge=1, le=8, description="linear layers of a gating network")
        gumbel_tau: float = Field(0.8, gt=0, description="Gumbel-softmax temperature of the gates in training")
        # _detach_mode 'detach' (the mode the official code runs; see the module docstring).
        detach_learners: bool = Field(True, description="phase 1: the output at k learners trains learner k only")
        # gating_error_factor 1.2.
        gate_error_factor: float = Field(1.2, gt=1,
                                         description="phase 2 labels: smallest relative improvement worth a learner")
        # routing_loss_type 'l1', routing_loss_weight 0.1, routing_loss_target one of 0.75/0.6/0.4/0.25.
        budget_target: float = Field(0.6, gt=0, le=1, description="target fraction of the learners' compute (beta)")
        budget_weight: float = Field(0.1, ge=0, description="weight of the L1 budget penalty")
        entropy_weight: float = Field(0.05, ge=0, description="weight of the gate-entropy term")
        diversity_weight: float = Field(0.05, ge=0, description="weight of the compute-diversity term")
        gate_task_gradient: bool = Field(False, description="let the task loss reach the gates through the "
                                                            "straight-through sample (official code: no)")
        kd_weight: float = Field(0.0, ge=0, description="weight of KL(teacher || model) at T = 1 in phase 3 "
                                                        "(official: 0, labels only)")
        # 2 epochs at batch 64, 1 at 64, 97 at 512 in optimiser steps: 16 : 8 : 97.
        phase_ratio: tuple[float, float, float] = Field((16.0, 8.0, 97.0), description="shares of the steps of "
                                                        "phases 1, 2 and 3 (representation, gates, end to end)")
        width_examples: int = Field(10_000, ge=1,
                                    description="evaluation images over which the executed width is measured")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.phases: list[str] = []
        self.info: dict[str, Any] = {}
        self._last: dict[str, float] = {}

    # --- applicability ---------------------------------------------------------------------------
    def unsupported(self, task: Task) -> str | None:
        if not hasattr(task, "teacher_is_vit"):
            return ("ACM ACMizes ViT teachers (the paper's vision setting; tokens = patches); this task has no ViT "
                    "teacher, and text encoders (GLUE) are not implemented")
        if not task.teacher_is_vit():
            return ("ACM builds its model from a ViT teacher (timm VisionTransformer); this cell's teacher is not a "
                    "ViT — set imagenet.teacher to one, e.g. vit_smoke_64d4 (smoke) or a timm vit_* with its weights")
        return None

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        if not (params.ffn or params.attention):
            return "acm: nothing to ACMize (acm.ffn and acm.attention are both false)"
        if params.attention_min_learners > params.num_learners:
            return "acm.attention_min_learners exceeds acm.num_learners"
        if min(params.phase_ratio) <= 0:
            return f"acm.phase_ratio must be three positive shares, got {list(params.phase_ratio)}"
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        plan = phase_plan(total_steps, tuple(self.params.phase_ratio))
        self.phases = [name for name, _ in plan]
        self.info["phases"] = {name: steps for name, steps in plan}
        return [Generation(steps, fresh_student=False, name=PHASE_NAMES[name]) for name, steps in plan]

    # --- the model -------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        import torch

        from bench.methods import _acm

        vit = getattr(teacher, "net", None)
        reason = _acm.why_not_acmizable(vit) if vit is not None else "the teacher has no .net (not an ImageClassifier)"
        if reason:
            raise BenchError(f"acm: cannot ACMize the teacher {type(vit or teacher).__name__}: {reason}")
        p = self.params
        model = copy.deepcopy(teacher)
        with torch.random.fork_rng(devices=[]):  # the new weights must not shift the cell's random stream
            torch.manual_seed(ctx.seed + 7919)
            layers = _acm.acmize_vit(model.net, num_learners=p.num_learners, flops_factor=p.flops_factor, ffn=p.ffn,
                                     attention=p.attention, attention_min_choice=p.attention_min_learners,
                                     gate_hidden=p.gate_hidden, gate_depth=p.gate_depth, tau=p.gumbel_tau,
                                     gate_task_gradient=p.gate_task_gradient, prefix="net.")
        device = next(teacher.parameters()).device
        model.to(device)
        set_trainable(model, self.phases[0] if self.phases else "end_to_end")
        self.info.update(teacher=getattr(teacher, "name", type(teacher).__name__), acms=len(layers),
                         learners=p.num_learners,
                         widths={layer.kind: layer.width for layer in layers},
                         params_teacher=sum(q.numel() for q in teacher.parameters()),
                         params_acmized=sum(q.numel() for q in model.parameters()),
                         params_gates=sum(q.numel() for l in layers for q in l.gate.parameters()))
        return model

    def _phase(self, ctx: StepContext) -> str:
        return self.phases[ctx.generation] if self.phases else "end_to_end"

    # --- training --------------------------------------------------------------------------------
    def _teacher_activations(self, batch: Batch, ctx: StepContext, layers: list) -> dict:
        from bench.methods._acm import capture

        sites = [layer.site for layer in layers]
        n = len(batch["index"])
        return ctx.run_teacher(lambda t: capture(t, lambda m: ctx.task.forward(m, batch), sites), n_examples=n)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        from bench.methods import _acm

        phase = self._phase(ctx)
        layers = _acm.acm_layers(ctx.student)
        if phase in ("distill", "gates"):
            acts = self._teacher_activations(batch, ctx, layers)
            losses = []
            for layer in layers:
                x, out = acts[layer.site]
                target = out.chunk(layer.parts, dim=-1)[layer.part].float()
                x = x.detach()
                if phase == "distill":
                    cum = layer.cumulative(x, self.params.detach_learners).float()
                    losses.append(_acm.representation_loss(cum, target))
                else:
                    with torch.no_grad():
                        labels = _acm.gate_labels(layer.cumulative(x).float(), target, self.params.gate_error_factor)
                    losses.append(_acm.gate_loss(layer.gate.logits(x), labels, layer.gate.min_choice))
            loss = torch.stack(losses).mean()
            self._last = {f"{phase}_loss": float(loss.detach())}
            return {"student": loss}
        outputs = ctx.student_outputs(batch)
        task_loss = ctx.label_loss(outputs, batch)
        loss = task_loss
        terms = {"task_loss": float(task_loss.detach())}
        if self.params.kd_weight > 0:
            import torch.nn.functional as F

            t = ctx.teacher_outputs(batch).logits.float()
            kd = F.kl_div(F.log_softmax(outputs.logits.float(), -1), F.log_softmax(t, -1), log_target=True,
                          reduction="batchmean")
            loss = loss + self.params.kd_weight * kd
            terms["kd_loss"] = float(kd.detach())
        choices = torch.stack([layer.last_choice for layer in layers], dim=2).float()  # [B, T, A, N + 1]
        costs = torch.tensor([float(layer.learner_flops) for layer in layers], device=choices.device)
        p = self.params
        lb = _acm.budget_loss(choices, costs, p.budget_target)
        le = _acm.entropy_loss(choices)
        ld = _acm.diversity_loss(choices)
        loss = loss + p.budget_weight * lb + p.entropy_weight * le + p.diversity_weight * ld
        k = torch.arange(choices.shape[-1], device=choices.device, dtype=choices.dtype)
        terms.update(budget_loss=float(lb.detach()), entropy_loss=float(le.detach()), diversity_loss=float(ld.detach()),
                     train_width=float(((choices.detach() * k).sum(-1).mean(dim=(0, 1)) * costs).sum()
                                       / (p.num_learners * costs.sum())))
        self._last = terms
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        from bench.methods._acm import acm_layers

        for layer in acm_layers(ctx.student):
            layer.last_choice = None  # drop the step's graph
        gen = ctx.generation
        if ctx.generation_step == ctx.generation_steps - 1 and gen + 1 < len(self.phases):
            # The harness builds the next generation's optimiser before on_generation_start: switch now.
            set_trainable(ctx.student, self.phases[gen + 1])
        return dict(self._last)

    # --- after training: the executed width ----------------------------------------------------------
    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.methods._acm import acm_layers

        for layer in acm_layers(student):
            layer.last_choice = None
        try:
            self.info["width"] = self._measure_width(student, ctx.task)
        except Exception as exc:  # a failed report must not lose the trained row; it is recorded with its reason
            self.info["width"] = {"error": f"{type(exc).__name__}: {exc}"}
        return student

    def _measure_width(self, model: nn.Module, task: Task) -> dict[str, Any]:
        import torch

        from bench.methods._acm import acm_layers

        layers = acm_layers(model)
        split = task.eval_split(getattr(model, "data_config", None)) if hasattr(task, "eval_split") else task.eval_data()
        n = min(len(split), self.params.width_examples)
        rows = sorted({i * len(split) // n for i in range(n)})  # evenly spaced (ImageNet val is sorted by class)
        device = next(model.parameters()).device
        bs = task.training().eval_batch_size
        model.eval()
        for layer in layers:
            layer.tally = torch.zeros(layer.num_choices, dtype=torch.float64)
        try:
            with torch.inference_mode():
                for i in range(0, len(rows), bs):
                    batch = split.batch(rows[i:i + bs])
                    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    task.forward(model, batch)
            tallies = [layer.tally.clone() for layer in layers]
        finally:
            for layer in layers:
                layer.tally = None
        return self._width_report(layers, tallies, len(rows), model, task)

    def _width_report(self, layers: list, tallies: list, n_examples: int, model: nn.Module, task: Task) -> dict[str, Any]:
        N = self.params.num_learners
        k = list(range(N + 1))
        per_kind: dict[str, list[float]] = {}
        executed = full = tokens = learners_run = gates = 0.0
        for layer, t in zip(layers, tallies):
            count = float(t.sum())
            mean_k = sum(ki * float(c) for ki, c in zip(k, t)) / max(count, 1.0)
            h = per_kind.setdefault(layer.kind, [0.0] * (N + 1))
            for ki in k:
                h[ki] += float(t[ki])
            executed += mean_k * count * layer.learner_flops
            full += N * count * layer.learner_flops
            tokens += count
            learners_run += mean_k * count
            gates += count * layer.gate_flops
        report: dict[str, Any] = {
            "examples": n_examples,
            "tokens_per_example": round(tokens / len(layers) / n_examples, 3),
            "average_width": learners_run / (N * tokens),
            "flops_weighted_width": executed / full,
            "width_by_kind": {kind: sum(ki * c for ki, c in zip(k, h)) / (N * sum(h)) for kind, h in per_kind.items()},
            "choice_histogram_by_kind": {kind: [round(c / sum(h), 4) for c in h] for kind, h in per_kind.items()},
            "learner_flops_full_per_example": round(full / n_examples),
            "learner_flops_executed_per_example": round(executed / n_examples),
            "flops_saved_per_example": round((full - executed) / n_examples),
            "gate_flops_per_example": round(gates / n_examples),
            "how": ("expected executed FLOPs per example = the full-width count of the harness's counter minus, per "
                    "ACM, tokens x (N - mean executed learners) x one learner's FLOPs (2 per multiply-accumulate), "
                    "measured with argmax gates on the evaluation images"),
        }
        try:
            import torch

            from bench.measure.flops import model_flops_per_sample

            device = next(model.parameters()).device
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in task.example_inputs(1).items()}
            counted = model_flops_per_sample(model, task.forward, inputs, 1).flops
            report["counted_flops_per_example"] = counted
            report["expected_executed_flops_per_example"] = counted - report["flops_saved_per_example"]
            report["expected_executed_fraction"] = report["expected_executed_flops_per_example"] / counted
        except Exception as exc:  # the width is still reported
            report["counted_flops_per_example"] = None
            report["counted_flops_error"] = f"{type(exc).__name__}: {exc}"
        return report

    # --- records ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"info": copy.deepcopy(self.info), "phases": list(self.phases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])
        self.phases = list(state["phases"])

    def record_info(self) -> dict[str, Any]:
        return copy.deepcopy(self.info)

    def table_notes(self, task: Task) -> list[str]:
        i = self.info
        if "teacher" not in i:
            return []
        notes = [f"acm: the row is the ACMized teacher {i['teacher']} ({i['acms']} ACMs of {i['learners']} learners; "
                 f"the task's student architecture is unused); trained with the task's optimiser in every phase, not "
                 f"the official Adam at 1e-3/1e-2/1e-4"]
        w = i.get("width", {})
        if "average_width" in w:
            s = (f"acm: average executed width {w['average_width']:.3f} of the learners per token "
                 f"(FLOPs-weighted {w['flops_weighted_width']:.3f}) on {w['examples']} evaluation images; the FLOPs "
                 f"and latency columns are full width (every learner is computed, the unexecuted masked out; latency "
                 f"also pays the gates and the masking of this unfused implementation)")
            if w.get("expected_executed_flops_per_example") is not None:
                s += (f"; expected executed FLOPs {w['expected_executed_flops_per_example']:,} per image "
                      f"({100 * w['expected_executed_fraction']:.1f}% of the counted {w['counted_flops_per_example']:,}, "
                      f"of which the gates take {w['gate_flops_per_example']:,})")
            notes.append(s)
        elif "error" in w:
            notes.append(f"acm: the executed width could not be measured ({w['error']})")
        return notes
