"""MSD — Multi-student Diffusion Distillation for Better One-step Generators (Song, Lorraine, Nie, Kreis, Lucas;
NVIDIA; ICML 2025; arXiv 2410.23274).

Official code: no official code released (the project page research.nvidia.com/labs/toronto-ai/MSD/ links none,
and none was found in the stored GitHub index). Read: the paper's abstract (arxiv.org/html/2410.23274v2, first
page only offline) and third-party summaries of its full text (a paper note with the paper's Eqs. 7-9, Table 3
ablations and Sec. 5.3's prompt split; several reviews quoting Sec. 4.1, Sec. 5.3 and App. B.2). The DM machinery
is this repository's DMD2 port (`bench.methods.diffusion.dmd2`, tianweiy/DMD2 @ 8d8fa55), imported, not copied.

What is implemented:

* **K students, one routed model.** The conditions are partitioned into ``students`` = K disjoint groups
  (paper: K = 4 for the headline numbers); student k is a one-step generator for group k only and a condition
  is routed to its group's student, so one image goes through exactly one student (NFE 1). The evaluated model
  is ONE `bench.diffusion.Generator` whose network is a `RoutedNet`: a `Router` (parameter-free buffers) maps
  each condition to its group and the row goes through that group's network; FLOPs, latency and memory probes
  therefore measure one image through the right student, and the parameter column counts all K students (the
  memory one deploys); the record gives the per-student counts (`record_info`).
* **Partition** (Sec. 4.1: disjoint, equal-sized, semantically grouped). Class labels: consecutive class
  indices in K near-equal blocks (``torch.tensor_split`` of 0..C-1: the first C mod K blocks one larger), the
  paper's ImageNet split (250 consecutive classes per student; Table 3: sequential 2.37 FID vs k-means 2.39,
  random 2.45). Prompts (Sec. 5.3): the pooled text embedding's quadrant: the sign pattern of its coordinates on
  the top log2(K) principal axes of the training prompts' pooled embeddings (K = 4: the four quadrants of the
  top-2 principal plane; K must be a power of two). Pooled embedding: the mean over tokens of the condition
  embeddings at the full tier (the paper pools SD1.5's text-encoder output); below it, where prompts are token
  ids of a closed vocabulary with no frozen text encoder, the bag of words (the mean one-hot over non-pad
  tokens). The null condition (classifier-free guidance's "no class") routes to group 0.
* **Students.** ``student_size="same"``: every student is the task's student architecture initialised from
  the teacher (DMD/DMD2's init); ``"compact"``: the task's narrower network (``task.compact_student``), a fresh
  one per student, trained first by **Teacher Score Matching** (Eq. 8): ``L_TSM = E_t || mu_k(x_t, t, c) -
  mu_teacher(x_t, t, c) ||^2`` on the batch's real images noised at t ~ U(0, 1) (the teacher's flow-matching
  time), in the teacher's own parameterisation (flow velocity: x0-space weight lambda_t = 1/t^2), teacher
  unguided, each student on its own group's rows. It takes the first ``tsm_fraction`` of the budget (a
  `bench.api.Generation`; the same module continues, ``fresh_student=False``).
* **Distribution matching per student on its own group** (Eqs. 7, 9; Sec. 3 = DMD/DMD2). One-step generator
  x = mu_k(z, 0.999, c) (DMD2's conditioning time 999/1000, unscaled noise); DM gradient and loss are
  dmd2's ``dm_gradient``/``dm_loss``: t = k/1000, k ~ U{20..980}; grad = (p_real - p_fake)/mean|p_real| with
  p = x - D(x_t), D_real the teacher at the task's CFG scale, D_fake student k's OWN fake score network (a copy
  of the teacher, unguided); loss_k = 0.5 mean over group k's rows of (x - sg(x - grad))^2, generator loss
  sum_k loss_k, so each student's gradient is that of its own group's mean loss, as if trained on its own.
  Fake score k: dmd2's ``fake_score_loss`` on student k's detached samples of group k (sum over k).
  DMD's regression term (Sec. 3, ``L_reg``) on the teacher's noise -> image pairs (``ctx.teacher_pairs``),
  weight ``regression_weight``, with the paired set NOT filtered by group (App. B.2 / Fig. 8: filtering it
  collapses modes): the step's pair batch is dealt round-robin to the K students, whatever the pairs' groups.
* **TTUR**: the generators step on every ``gen_update_ratio``-th step of the DM stage (DMD2's ImageNet
  ``--dfake_gen_update_ratio 5``), the fake scores every step. Sampler: ``consistency``, 1 step at t = 0.999,
  ``steps_options=(1,)`` (one-step students; ``check_task`` requires 1 in the task's ``nfe``).

**How K students fit the harness's one student / one optimiser contract.** The harness's ``student`` is the
single routed `Generator` whose network holds the K student networks in a ``ModuleList``; the K fake score
networks are one extra module ``fake`` (a ``ModuleList``). So there are two optimisers, each over K networks.
AdamW is per-parameter, and a student whose group has no row in a batch gets no gradient (its parameters are
skipped that step), so one optimiser over K disjoint networks updates each exactly as K separate optimisers
would, EXCEPT that the harness clips the gradient norm over all K jointly (see Deviations). TTUR is done by
the method (no ``student`` loss on off-turns) because the harness's ``update_every`` is one ratio for the
whole run and the TSM stage steps the students every step. Each harness batch is split by group (the data
filter F(D, V_k) of Eq. 7), so the K students share the cell's batch and step budget: the same examples and
steps as every other row, ~B/K rows per student per step.

Deviations:

* Pixel space on the task's small flow-matching UNets (the paper: EDM ImageNet-64 and SD1.5 latents); t of
  the flow schedule stands in for DDPM steps k/1000, as in dmd2.
* The ADM stage (DMD2's GAN fine-tuning on top of DM, Sec. 3.3) is not implemented: this is MSD's DM stage
  (plus TSM). The paper's per-stage iteration counts and TSM length were not available: ``tsm_fraction`` 0.5
  (equal stages, as the repository's two-stage SlimFlow port).
* The regression distance is L2, not LPIPS (VGG weights unavailable offline); weight 0.25 is DMD's lambda_reg
  (DMD paper, not checked against code); the pairs are the task's fixed store of Euler-sampled teacher pairs.
  The paper's text-to-image DM stage follows DMD2 (no regression): set ``regression_weight=0``.
* Gradient clipping (the task's norm 10) is over all K students (and over all K fake scores) together, not per
  student; the learning rate, warm-up, batch and step budget are the harness's, shared by the K students (the
  paper trains each student with its own batch, e.g. 32 per student).
* The prompt split below the full tier uses a bag of words (no frozen text encoder); the "quadrant" axes are
  the top principal axes (the summaries do not say which axes the paper's quadrants are taken on).
* TSM's weighting lambda_t is the one implied by the teacher's parameterisation (not given in the summaries);
  TSM uses no condition dropout (the students are never guided). The fake scores stay teacher-sized for
  compact students (the paper's fake-score size for small students was not available).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from bench import BenchError
from bench.api import Generation, Method, Params
from bench.methods.diffusion.dmd2 import (NUM_TRAIN_TIMESTEPS, check_step_range, dm_gradient, dm_loss,
                                          fake_score_loss, fixed_steps_error)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task

#: DMD2's one-step conditioning time (``conditioning_timestep`` 999 of 1000)
ONE_STEP_TIME = 0.999


def _torch_module():
    from torch import nn

    return nn.Module


# --------------------------------------------------------------------------------------------------
# Partition and routing
# --------------------------------------------------------------------------------------------------


def class_groups(num_classes: int, k: int) -> list[list[int]]:
    """Consecutive classes in ``k`` near-equal blocks (the first ``num_classes mod k`` one larger)."""
    import torch

    return [b.tolist() for b in torch.tensor_split(torch.arange(num_classes), k)]


def pooled_features(cond: torch.Tensor, vocab_bins: int | None) -> torch.Tensor:
    """The pooled embedding a prompt is routed by: token embeddings [B, L, D] -> their mean over L; token ids
    [B, L] -> the bag of words, the mean one-hot over non-pad tokens (id 0 pads), ``vocab_bins`` ids in all."""
    import torch.nn.functional as F

    if cond.is_floating_point():
        return cond.float().mean(dim=1) if cond.dim() == 3 else cond.float().flatten(1)
    if vocab_bins is None:
        raise BenchError("msd: token-id prompts need the vocabulary size to be routed")
    onehot = F.one_hot(cond.long(), vocab_bins).float()[:, :, 1:]  # drop the pad id 0
    counts = onehot.sum(dim=1)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)


def principal_axes(features: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], axes [D, m]): the centre and the top ``m`` principal directions of ``features`` [N, D], each
    signed so that its largest-magnitude loading is positive (a deterministic choice of the SVD's sign)."""
    import torch

    f = features.double()
    mean = f.mean(dim=0)
    d = f.shape[1]
    axes = torch.zeros(d, m, dtype=torch.float64)
    if m > 0:
        _, _, vh = torch.linalg.svd(f - mean, full_matrices=False)
        top = vh[:m].T  # [D, <=m]
        idx = top.abs().argmax(dim=0)
        top = top * torch.sign(top[idx, torch.arange(top.shape[1])])
        axes[:, :top.shape[1]] = top
    return mean.float(), axes.float()


class Router(_torch_module()):  # type: ignore[misc]
    """Condition -> group index (LongTensor [B]); buffers only, no parameters (see the module docstring).

    ``kind="class"``: a table over the class ids (null id last); ``kind="prompt"``: the orthant of the pooled
    embedding's projection on the ``log2 K`` principal axes, bit j set where coordinate j is > 0."""

    def __init__(self, kind: str, k: int, *, table: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                 axes: torch.Tensor | None = None, vocab_bins: int | None = None) -> None:
        super().__init__()
        import torch

        self.kind = kind
        self.k = k
        self.vocab_bins = vocab_bins
        empty = torch.zeros(0)
        self.register_buffer("table", table if table is not None else empty.long())
        self.register_buffer("mean", mean if mean is not None else empty)
        self.register_buffer("axes", axes if axes is not None else empty)

    @classmethod
    def for_classes(cls, num_classes: int, k: int) -> Router:
        import torch

        table = torch.zeros(num_classes + 1, dtype=torch.long)  # the null class (id num_classes) -> group 0
        for g, members in enumerate(class_groups(num_classes, k)):
            table[members] = g
        return cls("class", k, table=table)

    @classmethod
    def for_prompts(cls, features: torch.Tensor, k: int, vocab_bins: int | None) -> Router:
        m = int(round(math.log2(k)))
        if 2 ** m != k:
            raise BenchError(f"msd: prompts are split into the orthants of log2(K) principal axes; students={k} "
                             f"must be a power of two (1, 2, 4, 8, ...)")
        mean, axes = principal_axes(features, m)
        return cls("prompt", k, mean=mean, axes=axes, vocab_bins=vocab_bins)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        import torch

        if self.kind == "class":
            return self.table[cond.long()]
        f = pooled_features(cond, self.vocab_bins).to(self.mean.device)
        proj = (f - self.mean) @ self.axes  # [B, m]
        bits = (proj > 0).long()
        weights = 2 ** torch.arange(bits.shape[1], device=bits.device)
        return (bits * weights).sum(dim=1)

    def describe(self) -> dict[str, Any]:
        if self.kind == "class":
            n = self.table.numel() - 1
            return {"kind": "class", "rule": "consecutive class ids in K near-equal blocks (tensor_split); the "
                                             "null class -> group 0",
                    "groups": [[c for c in range(n) if int(self.table[c]) == g] for g in range(self.k)]}
        return {"kind": "prompt", "rule": "orthant of the pooled prompt embedding (mean over tokens; bag of words "
                                          "for token ids) on the top log2(K) principal axes of the training "
                                          "prompts: group = sum_j [coordinate_j > 0] 2^j",
                "axes": int(self.axes.shape[1]) if self.axes.dim() == 2 else 0}


class RoutedNet(_torch_module()):  # type: ignore[misc]
    """The K student networks behind one network interface: each row goes to its condition's student. The
    students are sampled unguided (one call per step); a guided call would send its null half to group 0."""

    def __init__(self, nets: list[nn.Module], router: Router) -> None:
        super().__init__()
        from torch import nn

        self.nets = nn.ModuleList(nets)
        self.router = router

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.nets[0].null_condition(cond)

    def _one(self, k: int, x, timestep, cond, guidance):
        net = self.nets[k]
        return net(x, timestep, cond) if guidance is None else net(x, timestep, cond, guidance=guidance)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        groups = self.router(cond).to(x.device)
        present = torch.unique(groups).tolist()
        if len(present) == 1:  # one image, or a batch of one group: that student alone runs
            return self._one(present[0], x, timestep, cond, guidance)
        out = None
        for k in present:
            idx = (groups == k).nonzero(as_tuple=True)[0]
            y = self._one(k, x[idx], timestep[idx], cond[idx], None if guidance is None else guidance[idx])
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return out


def student_view(model: nn.Module, k: int) -> nn.Module:
    """Student ``k`` alone as a `Generator` (same schedule, parameterisation and sampler; shares its weights)."""
    from bench.diffusion import Generator

    return Generator(model.net.nets[k], schedule=model.schedule, prediction=model.prediction, sampler=model.sampler)


def group_rows(groups: torch.Tensor, k: int) -> torch.Tensor:
    return (groups == k).nonzero(as_tuple=True)[0]


def tsm_loss(pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Teacher Score Matching: per group present, mean over its rows of (student prediction - teacher's)^2."""
    out = []
    for g in range(k):
        rows = group_rows(groups, g)
        if rows.numel():
            out.append((pred[rows].float() - target[rows].float()).pow(2).mean())
    return out


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


def _prompt_task(task: Any) -> bool:
    if getattr(task, "tier", None) == "full":
        return True  # both generative tasks condition on text embeddings at the full tier
    nc = getattr(task, "net_condition", None)
    return nc is not None and "vocab_size" in nc()


class MSD(Method):
    """Song et al. (ICML 2025): K one-step students, each distilled by distribution matching on its own group of
    conditions (after Teacher Score Matching when smaller than the teacher), routed by condition at inference."""

    name = "msd"
    version = "1"
    domains = frozenset({"diffusion"})
    # DMD2's AdamW weight decay 0.01 (train_sd.py / train_edm.py), as the dmd2 port
    optim_overrides = {"weight_decay": 0.01}

    class Params(Params):
        # K = 4: the paper's headline runs (ImageNet-64 FID 1.20, COCO 8.20); Table 3 ablates 1, 2, 4, 8
        students: int = Field(4, ge=1, le=64, description="number of students K (disjoint groups of conditions)")
        # same-sized students for the headline numbers; smaller ones (42%/71%/83% fewer parameters) with TSM
        student_size: Literal["same", "compact"] = Field(
            "same", description="same: the task's student architecture initialised from the teacher; compact: "
                                "the task's narrower network, Teacher Score Matching first")
        tsm_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="compact students: share of the step budget "
                                                                     "spent on Teacher Score Matching")
        guidance: float | None = Field(None, ge=1.0, le=20.0, description="CFG scale of the real score; None: the "
                                                                          "task's guidance")
        # DMD2's --min_step_percent 0.02 --max_step_percent 0.98
        min_step_percent: float = Field(0.02, ge=0.0, lt=1.0, description="lowest DM-loss step, fraction of 1000")
        max_step_percent: float = Field(0.98, gt=0.0, le=1.0, description="highest DM-loss step, fraction of 1000")
        # DMD2 ImageNet --dfake_gen_update_ratio 5 (SD1.5: 10)
        gen_update_ratio: int = Field(5, ge=1, le=100, description="DM stage: the students step every this many "
                                                                   "steps, the fake scores every step (TTUR)")
        # DMD's lambda_reg 0.25 (diffusion.md 1.1, from the DMD paper); 0 gives DMD2's recipe
        regression_weight: float = Field(0.25, ge=0.0, description="weight of the regression on the teacher's "
                                                                   "noise -> image pairs (unfiltered by group)")

        @model_validator(mode="after")
        def _range(self) -> "MSD.Params":
            return check_step_range(self)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.min_step = int(p.min_step_percent * NUM_TRAIN_TIMESTEPS)
        self.max_step = int(p.max_step_percent * NUM_TRAIN_TIMESTEPS)
        self.stages: list[str] = ["distribution matching"]
        self.fake: nn.Module | None = None
        self.w = 1.0
        self.info: dict[str, Any] = {}
        self._last: dict[str, float] = {}

    # --- contract ------------------------------------------------------------------------------------
    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        if fixed_steps_error("msd", 1, task, task_params):
            return (f"MSD's students are one-step generators; {task}.nfe={list(task_params.nfe)} must contain 1 "
                    f"(e.g. --set {task}.nfe=[1,4])")
        k = params.students
        if task == "geneval" and 2 ** int(round(math.log2(k))) != k:
            return (f"msd splits prompts into the orthants of log2(K) principal axes (the paper's quadrants at "
                    f"K = 4); msd.students={k} must be a power of two for {task}")
        return None

    def unsupported(self, task: Task) -> str | None:
        if self.params.student_size == "compact":
            if not hasattr(task, "compact_student"):
                return "msd.student_size=compact needs a task that builds a narrower student (compact_student)"
            if getattr(task, "tier", None) == "full":
                return "msd.student_size=compact: the full tier builds no narrower student network"
        k = self.params.students
        if _prompt_task(task) and 2 ** int(round(math.log2(k))) != k:
            return f"msd.students={k}: prompts are split into 2^m orthants; K must be a power of two"
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        if self.params.student_size == "compact" and total_steps >= 2:
            tsm = min(total_steps - 1, max(1, round(self.params.tsm_fraction * total_steps)))
            self.stages = ["teacher score matching", "distribution matching"]
            plan = [Generation(tsm, fresh_student=False, name=self.stages[0]),
                    Generation(total_steps - tsm, fresh_student=False, name=self.stages[1])]
        else:
            self.stages = ["distribution matching"]
            plan = [Generation(total_steps, fresh_student=False, name=self.stages[0])]
        self.info["stage_steps"] = {s: g.steps for s, g in zip(self.stages, plan)}
        return plan

    # --- models --------------------------------------------------------------------------------------
    def build_router(self, task: Task, teacher: nn.Module) -> Router:
        """The partition of the task's conditions into K groups (class blocks, or prompt orthants fitted on the
        training prompts)."""
        k = self.params.students
        net = teacher.net
        num_classes = getattr(net, "num_classes", None)
        if num_classes is not None:
            return Router.for_classes(int(num_classes), k)
        split = task.train_data()
        if hasattr(split, "conds"):
            conds = split.conds
        elif hasattr(split, "conditions"):  # the full tier encodes captions on demand
            conds = split.conditions(list(range(min(len(split), 2048))))
        else:
            raise BenchError("msd: the task's training split exposes no conditions to partition")
        vocab = getattr(net, "vocab_size", None)
        bins = int(vocab) + 1 if vocab is not None else None  # ids 0..vocab (the null token last)
        return Router.for_prompts(pooled_features(conds.cpu(), bins), k, bins)

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.diffusion import Generator, Sampler

        k = self.params.students
        router = self.build_router(ctx.task, teacher)
        if self.params.student_size == "same":
            first = student.net
            first.load_state_dict(teacher.net.state_dict())  # DMD/DMD2: the generator starts as the teacher
            nets = [first] + [copy.deepcopy(first) for _ in range(k - 1)]
        else:  # fresh narrower networks, one seed each (TSM trains them first)
            nets = [ctx.task.compact_student(ctx.seed * 1000 + i).net for i in range(k)]
        times = (ONE_STEP_TIME,)
        return Generator(RoutedNet(nets, router), schedule=student.schedule, prediction=student.prediction,
                         sampler=Sampler("consistency", steps=1, timesteps=times), steps_options=(1,),
                         timestep_table={1: times},
                         description=f"MSD: {k} one-step {self.params.student_size}-size students routed by "
                                     f"condition (consistency sampler at t = {ONE_STEP_TIME})")

    def create_modules(self, ctx: StepContext) -> None:
        from torch import nn

        k = self.params.students
        fakes = []
        for _ in range(k):  # one fake score network per student, each a copy of the teacher
            f = copy.deepcopy(ctx.teacher)
            f.requires_grad_(True)
            fakes.append(f)
        self.fake = nn.ModuleList(fakes)
        self._describe(ctx)

    def _describe(self, ctx: StepContext) -> None:
        import torch

        routed = ctx.student.net
        per = [sum(p.numel() for p in n.parameters()) for n in routed.nets]
        part = routed.router.describe()
        split = ctx.task.train_data()
        if hasattr(split, "conds"):
            dev = next(iter(routed.router.buffers())).device
            with torch.no_grad():
                g = routed.router(split.conds.to(dev))
            part["training_conditions_per_group"] = torch.bincount(g.cpu(), minlength=routed.router.k).tolist()
        self.info.update(students=len(per), student_size=self.params.student_size, params_per_student=per,
                         params_total=sum(per), teacher_params=sum(p.numel() for p in ctx.teacher.parameters()),
                         partition=part)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"fake": self.fake}

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        self.w = float(p.guidance if p.guidance is not None else getattr(ctx.task.params, "guidance", 1.0))

    # --- losses --------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.stages[ctx.generation] == "teacher score matching":
            return self._tsm_step(batch, ctx)
        return self._dm_step(batch, ctx)

    def _tsm_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        real, cond = batch["x0"], batch["cond"]
        student = ctx.student
        groups = student.net.router(cond).to(real.device)
        t = torch.rand(real.shape[0], device=real.device)
        x_t = student.add_noise(real, torch.randn_like(real), t)
        target = ctx.run_teacher(lambda g: g.predict(x_t, t, cond), n_examples=real.shape[0])
        pred = student.predict(x_t, t, cond)  # routed: each row through its group's student
        parts = tsm_loss(pred, target, groups, self.params.students)
        loss = torch.stack(parts).sum()
        self._last = {"loss_tsm": float(loss.detach())}
        return {"student": loss}

    def _dm_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        real, cond = batch["x0"], batch["cond"]
        student = ctx.student
        k = p.students
        n = real.shape[0]
        groups = student.net.router(cond).to(real.device)
        generator_turn = ctx.generation_step % p.gen_update_ratio == 0
        with torch.set_grad_enabled(generator_turn):
            x = student.denoise(torch.randn_like(real), torch.full((n,), ONE_STEP_TIME, device=real.device), cond)
        losses: dict[str, torch.Tensor] = {}
        log: dict[str, float] = {}
        present = [g for g in range(k) if group_rows(groups, g).numel()]
        if generator_turn:
            grad = self.dm_grad(x.detach(), cond, groups, ctx)
            parts = []
            for g in present:
                rows = group_rows(groups, g)
                part = dm_loss(x[rows], grad[rows])  # student g: the mean over its own group's rows
                log[f"loss_dm_{g}"] = float(part.detach())
                parts.append(part)
            loss = torch.stack(parts).sum()
            log["loss_dm"] = float(loss.detach())
            if p.regression_weight > 0:
                reg = self.regression(student, ctx, n)
                log["loss_reg"] = float(reg.detach())
                loss = loss + p.regression_weight * reg
            losses["student"] = loss
        fake_parts = []
        for g in present:
            rows = group_rows(groups, g)
            fake_parts.append(fake_score_loss(self.fake[g], x.detach()[rows], cond[rows]))
        losses["fake"] = torch.stack(fake_parts).sum()
        log["loss_fake"] = float(losses["fake"].detach())
        self._last = log
        return losses

    def dm_grad(self, x: torch.Tensor, cond: Any, groups: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """dmd2's normalised DM gradient per row, D_fake from the row's own student's fake score network."""
        import torch

        w = self.w
        with torch.no_grad():
            ks = torch.randint(self.min_step, min(self.max_step + 1, NUM_TRAIN_TIMESTEPS), (x.shape[0],),
                               device=x.device)
            t = ks.to(x.dtype) / NUM_TRAIN_TIMESTEPS
            x_t = ctx.teacher.add_noise(x, torch.randn_like(x), t)
            d_real = ctx.run_teacher(lambda g: g.denoise(x_t, t, cond, guidance=w),
                                     n_examples=x.shape[0] * (2 if w != 1.0 else 1))
            d_fake = torch.zeros_like(x)
            for g in range(self.params.students):
                rows = group_rows(groups, g)
                if rows.numel():
                    d_fake[rows] = self.fake[g].denoise(x_t[rows], t[rows], cond[rows])  # never guided
            return dm_gradient(x, d_real, d_fake)

    def regression(self, student: nn.Module, ctx: StepContext, n: int) -> torch.Tensor:
        """DMD's regression on teacher pairs, NOT filtered by group: pair i goes to student i mod K."""
        import torch

        pairs = ctx.teacher_pairs(n)
        z, y, c = pairs["noise"].float(), pairs["image"].float(), pairs["cond"]
        k = self.params.students
        parts = []
        for g in range(k):
            rows = torch.arange(g, z.shape[0], k, device=z.device)
            if rows.numel():
                view = student_view(student, g)
                pred = view.denoise(z[rows], torch.full((rows.numel(),), ONE_STEP_TIME, device=z.device), c[rows])
                parts.append((pred.float() - y[rows]).pow(2).mean())
        return torch.stack(parts).sum()

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "stages": list(self.stages), "sampler": "consistency", "timesteps": [ONE_STEP_TIME],
                "routing": "each condition to its group's student (one student per image, NFE 1)",
                "fake_scores": p.students, "real_guidance": self.w,
                "dm_steps": [self.min_step, min(self.max_step, NUM_TRAIN_TIMESTEPS - 1)],
                "gen_update_ratio": p.gen_update_ratio, "regression_weight": p.regression_weight,
                "regression": "L2 on teacher pairs, unfiltered by group (pair i -> student i mod K)",
                "tsm": p.student_size == "compact",
                "harness_fit": "one routed Generator (ModuleList of K student nets) under the 'student' optimiser; "
                               "K fake scores (ModuleList) under 'fake'; gradient clipping is joint over the K"}
