"""ProARD — Mousavi, Mousavi & Daneshtalab, "ProARD: Progressive Adversarial Robustness Distillation: Provide Wide
Range of Robust Students" (arXiv 2506.07666, 2025; IJCNN 2025). Official code: hamidmousavi0/ProARD @ 3f602f2
(read: ``train_ofa_net.py`` — the stages, their lists and defaults; ``proard/classification/elastic_nn/training/
progressive_shrinking.py`` — the training and validation loops; ``robust_loss/rslad.py`` and ``robust_loss/ard.py``
— the distillation criteria; ``elastic_nn/networks/dyn_resnets.py``, ``modules/dynamic_layers.py``,
``modules/dynamic_op.py``, ``elastic_nn/utils.py`` — the dynamic network; ``run_manager/run_config.py``). Only the
abstract and third-party summaries of the paper could be read, so the procedure follows the released code.

What is implemented:

* **Dynamic network** (`bench.methods._proard_dynamic`): the teacher's architecture made elastic in width, depth and
  expansion; the largest sub-network *is* the teacher ("the student network with the largest size as the dynamic
  teacher"), and, as in the code, the dynamic network starts from the teacher's weights while a frozen copy of the
  teacher gives the soft labels. Built for the imagenet task's CIFAR ResNets (the small tier's ``cifar_resnet20``
  teacher, the smoke tier's ``cifar_resnet8``; `select_teacher` takes the pool's first CIFAR ResNet).
* **Adversarial robustness distillation** of every sampled sub-network (the student). Adversarial examples are made
  against the student (in eval mode) from x + 0.001 N(0, 1): ``num_steps`` steps of
  x <- clip_[0,1](Proj_eps(x + step_size sign(grad_x sum KL(softmax(z_t(x)) || softmax(z_s(x)))))), with the
  teacher's logits z_t on the *natural* image (`kl_pgd`). Then, in train mode, with t = softmax(z_t):
  - ``rslad`` (the code's default criterion): L = 5/6 mean[t (log(t + 1e-5) - log_softmax(z_s(x_adv)))]
    + 1/6 mean[t (log(t + 1e-5) - log_softmax(z_s(x)))], means over batch and classes (`rslad_loss`);
  - ``ard``: L = alpha T^2 mean[KL elementwise(softmax(z_t / T) || softmax(z_s(x_adv) / T))] + (1 - alpha) CE(z_s(x), y),
    ``nn.KLDivLoss()``'s mean over batch and classes, T = 30, alpha = 1 (`ard_loss`).
* **Progressive sampling** (``train_ofa_net.py``'s tasks and phases for the ResNet): five stages, each a training
  generation of the same network with its own optimiser and schedule (each stage is a separate run of the script):
  width (every width, largest depth and expansion; 1 sub-network per step), depth phase 1 (the two largest depths;
  2), depth phase 2 (every depth; 2), expansion phase 1 (the two largest expansions; 4), expansion phase 2 (every
  choice; 4). Before each expansion stage the blocks' middle channels are sorted by importance
  (``re_organize_middle_weights``). Each step samples its sub-networks (``sample_active_subnet``: per block an
  expansion, per stage a depth and a width) from a generator seeded by (cell seed, step, index), so resume is exact;
  the losses of the sampled sub-networks are summed, one optimiser step (OFA's gradient accumulation).
* **Students of several sizes**: after training, the code's validation grid (``validate``: the smallest and
  largest depth x expansion x width, uniform over stages and blocks; duplicates dropped) is cut out of the network
  (``get_active_subnet``: copies of the weight slices), each sub-network's batch-norm statistics are recomputed on
  ``bn_images`` training images (``set_running_statistics``, 4,000 images in batches of 200) and it is evaluated by
  the task, with the task's robustness metrics (FGSM, PGD, C&W, `bench.tasks.imagenet.robustness`) when
  ``size_robustness`` is on. **One row**: the sub-network chosen by ``row`` (default: the largest one within the
  task's student parameter budget) is the returned model, evaluated and measured by the harness; every size's
  config, parameter count and metrics are in the record (``method_info.sizes``).

Defaults: attack eps 0.031, step 0.0078, 10 steps (``train_ofa_net.py``); RSLAD's 5/6 : 1/6 (``rslad.py``); ARD's
T = 30, alpha = 1 (``ard.py``); width multipliers 0.65/0.8/1.0, expansions 0.2/0.25/0.35, depths +0/1/2 and the
sub-networks per step 1/2/2/4/4 (``train_ofa_net.py``, ResNet50); classifier dropout 0.1 (``args.dropout``); the
stages' shares of the budget 125/25/125/25/125 (their ``n_epochs + warmup_epochs``).

Deviations (at this harness's tiers):

* Architecture: the task's basic-block CIFAR ResNets instead of the code's bottleneck ResNet-50 (or MobileNetV3 with
  elastic kernels); the stem's width follows stage 0's; the expansion ratios are taken relative to the largest (the
  teacher's block, middle = output channels); channel counts round to multiples of ``channel_divisor`` = 1, not the
  code's 8, which would collapse the 16-channel stages' choices to one. With one block per stage (``cifar_resnet8``,
  smoke tier) depth has a single choice.
* Teacher: the task's teacher, trained on clean labels and shared by every method; ProARD's is adversarially trained
  first (TRADES, ``train_teacher_net.py``).
* Sampling per step (OFA, and the paper's "subset of students" per iteration); the released ``train_one_epoch``
  draws one sub-network per pass over the data (its loop over ``dynamic_batch_size`` encloses the data loop), which
  within these budgets would train one sub-network per stage.
* Budget: the cell's steps, split over the stages in proportion to their epochs (410 epochs + warm-up in the code;
  fewer than five steps run only the first stages). Optimiser: the task's, restarted per stage; the code's SGD
  (Nesterov 0.9, wd 3e-5, cosine, base lr 3e-2 / 2.5e-3 / 7.5e-3 / 2.5e-3 / 7.5e-3 per stage) is not reproduced.
* Students: the paper picks them by an accuracy-robustness predictor and NSGA-II under FLOPs constraints; here the
  validation grid's corners. Attacks: the task's (PGD-10 at 8/255, step 2/255, and FGSM, C&W), not the code's
  evaluation PGD-20 at 0.031.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field, field_validator

from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task, TeacherCandidate

#: (name, how many of the largest depths, of the largest expansions; None: all) per stage, ``train_ofa_net.py``.
STAGES = (("width", 1, 1), ("depth, phase 1", 2, 1), ("depth, phase 2", None, 1),
          ("expand, phase 1", None, 2), ("expand, phase 2", None, None))
#: ``DataProvider.SUB_SEED``: the fixed subset of training images for batch-norm recalibration.
SUB_SEED = 937162211


# --------------------------------------------------------------------------------------------------
# Losses and the training attack (module docstring)
# --------------------------------------------------------------------------------------------------


def kl_pgd(forward: Callable, x: torch.Tensor, teacher_logits: torch.Tensor, eps: float, step_size: float,
           steps: int, noise: torch.Tensor) -> torch.Tensor:
    """RSLAD/ARD's inner maximisation: PGD (L-inf, in [0, 1] pixels) on sum KL(softmax(z_t) || softmax(f(x'))) from
    x + ``noise``, with the teacher's logits on the natural image held fixed."""
    import torch
    import torch.nn.functional as F

    target = F.softmax(teacher_logits.detach().float(), dim=-1)
    x = x.detach()
    adv = x + noise
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(forward(adv).float(), dim=-1), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.clamp(0, 1).detach()


def rslad_loss(adv_logits: torch.Tensor, nat_logits: torch.Tensor, teacher_logits: torch.Tensor,
               adv_weight: float) -> torch.Tensor:
    """w mean[t (log(t + 1e-5) - log q_adv)] + (1 - w) mean[t (log(t + 1e-5) - log q_nat)], t the teacher's
    probabilities (``rslad.py``'s ``kl_loss``, means over batch and classes)."""
    import torch
    import torch.nn.functional as F

    t = F.softmax(teacher_logits.detach().float(), dim=-1)

    def kl(logits: torch.Tensor) -> torch.Tensor:
        return (t * (torch.log(t + 1e-5) - F.log_softmax(logits.float(), dim=-1))).mean()

    return adv_weight * kl(adv_logits) + (1 - adv_weight) * kl(nat_logits)


def ard_loss(adv_logits: torch.Tensor, nat_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float, alpha: float) -> torch.Tensor:
    """alpha T^2 KLDivLoss_mean(log_softmax(z_adv / T), softmax(z_t / T)) + (1 - alpha) CE(z_nat, y) (``ard.py``)."""
    import torch.nn.functional as F

    T = temperature
    # nn.KLDivLoss()'s default reduction, the mean over every entry (batch x classes), written as sum / numel.
    kl = F.kl_div(F.log_softmax(adv_logits.float() / T, dim=-1), F.softmax(teacher_logits.detach().float() / T, dim=-1),
                  reduction="sum") / adv_logits.numel()
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(nat_logits.float(), labels)


# --------------------------------------------------------------------------------------------------
# The progressive schedule
# --------------------------------------------------------------------------------------------------


def stage_steps(total: int, weights: list[int]) -> list[int]:
    """``total`` steps over the stages in proportion to ``weights`` (largest remainders, ties to the earlier stage);
    a stage rounded to 0 takes a step from the largest. Fewer steps than stages: one step each for the first."""
    if total < len(weights):
        return [1] * total
    exact = [total * w / sum(weights) for w in weights]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))[:total - sum(out)]:
        out[i] += 1
    while 0 in out:
        out[out.index(max(out))] -= 1
        out[out.index(0)] = 1
    return out


def stage_choices(index: int, depths: list[int], expands: list[float]) -> tuple[list[int], list[float]]:
    """The depths and expansions stage ``index`` samples from (ascending), of the network's ascending choices."""
    _, nd, ne = STAGES[index]
    return (depths[-nd:] if nd else list(depths)), (expands[-ne:] if ne else list(expands))


def expand_boundaries(index: int, divisor_width: Callable[[float], int], expands: list[float]) -> list[int] | None:
    """The channel counts that the middle-channel sort must not cross at the start of stage ``index`` (None: no sort).
    Expansion phase p (p = 0, 1) protects the widths of the 2nd..(p+1)-th largest ratios of its list
    (``re_organize_middle_weights(expand_ratio_stage=p)``)."""
    name = STAGES[index][0]
    if not name.startswith("expand"):
        return None
    phase = 0 if name.endswith("1") else 1
    _, ratios = stage_choices(index, [0], expands)
    desc = sorted(ratios, reverse=True)
    return [divisor_width(r) for r in desc[1:phase + 1]]


class ProARD(Method):
    """Mousavi et al. 2025: a dynamic network distilled progressively (width, depth, expansion) with adversarial
    robustness distillation; sub-networks of several sizes evaluated with the task's robustness metrics."""

    name = "proard"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        kd_criterion: Literal["rslad", "ard"] = Field(
            "rslad", description="distillation criterion (train_ofa_net.py --kd_criterion, default rslad)")
        epsilon: float = Field(0.031, gt=0, le=1, description="L-inf radius of the training attack in [0, 1] pixels "
                                                              "(train_ofa_net.py --epsilon)")
        step_size: float = Field(0.0078, gt=0, le=1, description="training attack step (train_ofa_net.py --step_size)")
        num_steps: int = Field(10, ge=0, le=100, description="training attack steps (train_ofa_net.py --num_steps)")
        rslad_adv_weight: float = Field(5 / 6, ge=0, le=1, description="weight of the adversarial KL term of RSLAD; "
                                                                       "the natural term has 1 - it (rslad.py: 5/6)")
        ard_temperature: float = Field(30.0, gt=0, le=1000, description="ARD temperature T (ard.py: 30)")
        ard_alpha: float = Field(1.0, ge=0, le=1, description="ARD weight of the KL term; CE gets 1 - it (ard.py: 1)")
        width_mults: list[float] = Field([0.65, 0.8, 1.0], min_length=1, description="elastic width multipliers of "
                                         "each stage; the largest must be 1 (train_ofa_net.py width_mult_list)")
        expand_ratios: list[float] = Field([0.2, 0.25, 0.35], min_length=1, description="elastic expansion ratios, "
                                           "relative to the largest = the teacher's block (train_ofa_net.py expand_list)")
        depth_list: list[int] = Field([0, 1, 2], min_length=1, description="elastic depths: a stage runs blocks - max + d "
                                      "of its blocks for d in the list (train_ofa_net.py depth_list)")
        subnets_per_stage: list[int] = Field([1, 2, 2, 4, 4], min_length=5, max_length=5, description="sub-networks "
                                             "sampled per step in each of the five stages (dynamic_batch_size)")
        stage_epochs: list[int] = Field([125, 25, 125, 25, 125], min_length=5, max_length=5, description="relative "
                                        "budget of the five stages (their n_epochs + warmup_epochs)")
        dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the classifier in training (args.dropout)")
        channel_divisor: int = Field(1, ge=1, le=64, description="channel counts round to multiples of this "
                                     "(code: 8; 1 keeps the CIFAR ResNets' narrow choices apart)")
        bn_images: int = Field(4000, ge=1, le=1_000_000, description="training images for each sub-network's "
                               "batch-norm recalibration (reset_running_statistics subset_size)")
        bn_batch: int = Field(200, ge=1, le=10_000, description="batch size of the recalibration (subset_batch_size)")
        size_robustness: bool = Field(True, description="evaluate every sampled size with the task's robustness "
                                                        "metrics (FGSM, PGD, C&W) even when the task's are off")
        row: Literal["budget", "smallest", "largest"] = Field(
            "budget", description="the size the row reports: the largest within the task's student parameters "
                                  "(budget; the smallest if none fits), the smallest or the largest")

        @field_validator("width_mults")
        @classmethod
        def _widths(cls, v: list[float]) -> list[float]:
            if any(not 0 < w <= 1 for w in v) or max(v) != 1.0 or len(set(v)) != len(v):
                raise ValueError(f"width multipliers must be distinct, in (0, 1], the largest 1 (the teacher); got {v}")
            return v

        @field_validator("expand_ratios")
        @classmethod
        def _expands(cls, v: list[float]) -> list[float]:
            if any(e <= 0 for e in v) or len(set(v)) != len(v):
                raise ValueError(f"expansion ratios must be distinct and positive; got {v}")
            return v

        @field_validator("depth_list")
        @classmethod
        def _depths(cls, v: list[int]) -> list[int]:
            if any(d < 0 for d in v) or len(set(v)) != len(v):
                raise ValueError(f"depths must be distinct integers >= 0; got {v}")
            return v

        @field_validator("subnets_per_stage", "stage_epochs")
        @classmethod
        def _positive(cls, v: list[int]) -> list[int]:
            if any(n < 1 for n in v):
                raise ValueError(f"every stage needs a count >= 1; got {v}")
            return v

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.plan: list[int] = []
        self.student_budget: int | None = None
        self.info: dict[str, Any] = {}
        self._last: dict[str, float] = {}

    # --- applicability and models ----------------------------------------------------------------
    @staticmethod
    def _cifar_resnet(name: str) -> bool:
        from bench.tasks.imagenet.models import CIFAR_RESNET

        return bool(CIFAR_RESNET.match(name))

    def unsupported(self, task: Task) -> str | None:
        if task.problem() != "classification" or not type(task).__module__.startswith("bench.tasks.imagenet"):
            return ("ProARD distils image classifiers under pixel-space attacks; it runs on the imagenet task "
                    "(CIFAR-10 at the small tier) only")
        if task.unavailable():
            return None  # the task's own reason (e.g. no CIFAR-10 under the data root) is reported instead
        names = [c.name for c in task.teacher_pool()]
        if not any(self._cifar_resnet(n) for n in names):
            return (f"ProARD's dynamic network is the teacher made elastic; it is built here for the CIFAR ResNets "
                    f"(cifar_resnet<6n+2>[x<w>]) only, and the teacher pool holds {names}")
        return None

    def select_teacher(self, pool: list[TeacherCandidate], student_params: int) -> str | None:
        self.student_budget = student_params
        name = next(c.name for c in pool if self._cifar_resnet(c.name))
        self.info["teacher"] = name
        return name

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.methods._proard_dynamic import DynamicCifarResNet
        from bench.tasks.imagenet.models import count_params, wrap
        from bench.tasks.imagenet.nets import CifarResNet

        net = getattr(teacher, "net", None)
        if not isinstance(net, CifarResNet):
            from bench import BenchError

            raise BenchError(f"proard needs a CIFAR ResNet teacher to make elastic; got {type(net).__name__}")
        p = self.params
        dyn = DynamicCifarResNet.from_cifar_resnet(net, p.width_mults, p.expand_ratios, p.depth_list, p.channel_divisor)
        dyn.dropout = p.dropout
        self.info["task_student"] = {"replaced_by": "sub-networks of the dynamic network",
                                     "params": count_params(student)}
        return wrap(dyn, teacher.data_config, f"proard-dynamic-{getattr(teacher, 'name', 'teacher')}")

    @staticmethod
    def _describe(dyn: Any) -> dict[str, Any]:
        n_w, n_e = len(dyn.width_mults), len(dyn.expand_ratios)
        configs = math.prod(n_w * sum(n_e ** d for d in dyn.depth_options) for _ in range(dyn.n_stages))
        return {"stages": dyn.n_stages, "blocks_per_stage": dyn.blocks_per_stage,
                "width_options": dyn.width_options, "width_mults": dyn.width_mults,
                "depth_options": dyn.depth_options, "expand_ratios": dyn.expand_ratios,
                "configurations": configs}

    # --- the progressive schedule -----------------------------------------------------------------
    def generations(self, total_steps: int) -> list[Generation]:
        self.plan = stage_steps(total_steps, list(self.params.stage_epochs))
        return [Generation(s, fresh_student=False, name=STAGES[i][0]) for i, s in enumerate(self.plan)]

    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        from bench.methods._proard_dynamic import make_divisible, reorganize_middle

        dyn = ctx.student.net
        full_ratio = max(dyn.expand_ratios)
        for blk in dyn.blocks:
            cuts = expand_boundaries(index, lambda r: min(blk.cout, make_divisible(
                round(blk.cout * r / full_ratio), dyn.divisor)), dyn.expand_ratios)
            if cuts is not None:
                reorganize_middle(blk, cuts)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        model, dyn = ctx.student, ctx.student.net
        depths, expands = stage_choices(ctx.generation, dyn.depth_options, dyn.expand_ratios)
        widths = list(range(len(dyn.width_mults)))
        x, y = batch["pixels"], batch["labels"]
        teacher = ctx.teacher_outputs(batch).logits.detach().float()

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            return ctx.task.forward(model, {"pixels": pixels}).logits

        total = None
        for k in range(p.subnets_per_stage[ctx.generation]):
            rng = random.Random(f"proard-{ctx.seed}-{ctx.step}-{k}")
            dyn.set_active(dyn.sample(rng, widths, depths, expands))
            model.eval()  # the attack runs against the student in eval mode (rslad_inner_loss)
            noise = 0.001 * torch.randn(x.shape, device=x.device, dtype=x.dtype)
            x_adv = kl_pgd(forward, x, teacher, p.epsilon, p.step_size, p.num_steps, noise)
            model.train()
            adv, nat = forward(x_adv), forward(x)
            if p.kd_criterion == "rslad":
                loss = rslad_loss(adv, nat, teacher, p.rslad_adv_weight)
            else:
                loss = ard_loss(adv, nat, teacher, y, p.ard_temperature, p.ard_alpha)
            total = loss if total is None else total + loss
        self._last = {"stage": float(ctx.generation), "subnets": float(p.subnets_per_stage[ctx.generation])}
        return {"student": total}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    # --- sampled students -------------------------------------------------------------------------
    @staticmethod
    def size_grid(dyn: Any) -> list[tuple[str, dict[str, list]]]:
        """The code's validation grid: the smallest and largest depth x expansion x width, uniform over stages and
        blocks (``validate``'s loops), duplicates dropped; named D<blocks>-E<ratio>-W<multiplier>."""
        out, seen = [], set()
        for d in sorted({min(dyn.depth_options), max(dyn.depth_options)}):
            for e in sorted({min(dyn.expand_ratios), max(dyn.expand_ratios)}):
                for w in sorted({0, len(dyn.width_mults) - 1}):
                    cfg = {"w": [w] * dyn.n_stages, "d": [d] * dyn.n_stages, "e": [e] * len(dyn.blocks)}
                    key = repr(cfg)
                    if key not in seen:
                        seen.add(key)
                        out.append((f"D{d}-E{e:g}-W{dyn.width_mults[w]:g}", cfg))
        return out

    def _calibration(self, ctx: StepContext) -> list[torch.Tensor]:
        import torch

        split = ctx.task.train_data()
        g = torch.Generator().manual_seed(SUB_SEED)
        chosen = torch.randperm(len(split), generator=g)[:min(self.params.bn_images, len(split))].tolist()
        bs = self.params.bn_batch
        return [split.batch(chosen[i:i + bs])["pixels"].to(ctx.device) for i in range(0, len(chosen), bs)]

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench import progress
        from bench.methods._proard_dynamic import recalibrate_bn
        from bench.tasks.imagenet.models import count_params, wrap

        dyn, task = student.net, ctx.task
        self.info["dynamic_network"] = self._describe(dyn)
        calibration = self._calibration(ctx)
        sizes, models = [], {}
        for name, cfg in self.size_grid(dyn):
            dyn.set_active(cfg)
            sub = wrap(dyn.subnet(), student.data_config, f"proard-{name}").to(ctx.device)
            n_bn = recalibrate_bn(sub, calibration)
            sub.eval()
            metrics = dict(task.evaluate(sub))
            if self.params.size_robustness and "pgd_top1" not in metrics and hasattr(task, "robustness"):
                metrics.update(task.robustness(sub))
            sizes.append({"name": name, "config": cfg, "params": count_params(sub), "bn_images": n_bn,
                          "metrics": metrics})
            models[name] = sub
            progress.log(f"proard {name}: {sizes[-1]['params']} parameters, "
                         + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        dyn.set_active(dyn.max_config())
        chosen = self.choose_row(sizes, self.params.row, self.student_budget)
        self.info.update({"sizes": sizes, "row_student": chosen["name"], "row_rule": self.params.row,
                          "student_budget_params": self.student_budget})
        return models[chosen["name"]]

    @staticmethod
    def choose_row(sizes: list[dict[str, Any]], rule: str, budget: int | None) -> dict[str, Any]:
        by_size = sorted(sizes, key=lambda s: s["params"])
        if rule == "smallest":
            return by_size[0]
        if rule == "largest" or budget is None:
            return by_size[-1]
        fits = [s for s in by_size if s["params"] <= budget]
        return fits[-1] if fits else by_size[0]

    # --- the record --------------------------------------------------------------------------------
    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "kd_criterion": p.kd_criterion,
                "stages": [{"name": STAGES[i][0], "steps": s, "subnets_per_step": p.subnets_per_stage[i]}
                           for i, s in enumerate(self.plan)],
                "training_attack": {"eps": p.epsilon, "step_size": p.step_size, "steps": p.num_steps,
                                    "objective": "KL(teacher(x) || student(x')), random start 0.001 N(0, 1)"},
                # Sub-network passes over a batch: per sampled sub-network, num_steps attack forward+backward passes
                # and the adversarial and natural forwards (one backward); the record's training FLOPs count one.
                "student_passes": sum(s * p.subnets_per_stage[i] * (p.num_steps + 2) for i, s in enumerate(self.plan))}

    def table_notes(self, task: Task) -> list[str]:
        notes = []
        row = next((s for s in self.info.get("sizes", []) if s["name"] == self.info.get("row_student")), None)
        if row is not None:
            notes.append(f"The row is sub-network {row['name']} ({row['params']} parameters) of the dynamic "
                         f"network made from the teacher {self.info.get('teacher')}; all {len(self.info['sizes'])} "
                         f"evaluated sizes, with clean and robust accuracy, are in the record (method_info.sizes)")
        notes.append("The teacher is the task's, trained on clean labels (the paper distils from an "
                      "adversarially trained teacher)")
        dyn = self.info.get("dynamic_network", {})
        if len(dyn.get("depth_options", [0, 0])) < 2:
            notes.append("Depth is not elastic here (the teacher has one block per stage)")
        p = self.params
        notes.append(f"Training runs {p.num_steps} attack steps and 2 forwards per sampled sub-network, 1 to "
                     f"{max(p.subnets_per_stage)} sub-networks per step; the record's training-FLOPs estimate counts one "
                     f"student pass per sample (method_info.student_passes has the count)")
        if 0 < len(self.plan) < len(STAGES):
            notes.append(f"A budget of {sum(self.plan)} steps ran only the first {len(self.plan)} of the "
                         f"{len(STAGES)} progressive stages")
        return [n if n.endswith(".") else n + "." for n in notes]
