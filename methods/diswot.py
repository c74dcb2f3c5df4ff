"""DisWOT — Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training" (CVPR 2023,
arXiv 2303.15678). Official code: lliai/DisWOT-CVPR2023 @ dffe4e6: the README's "Core Code"
(``semantic_similarity_metric``, ``relation_similarity_metric``), ``exps/parse_nb201_distill.py``
(``compute_diswot_procedure``: the combined score, ``network_weight_gaussian_init``), ``searcher/evo_search_nb201.py``
(the evolutionary search and its defaults), ``distiller_zoo/ICKD.py`` and ``distiller_zoo/SP.py`` (the matrices),
``scripts/run_diswot_sp.sh`` (how the searched student is distilled).

What is implemented:

* **Training-free score** of a candidate student s against the teacher t, both *randomly initialised*
  (the teacher's architecture, re-initialised; ``network_weight_gaussian_init``: conv and linear weights N(0, 1),
  biases 0, batch-norm weight 1 and bias 0), in training mode, on one fixed batch of the training split:

  - semantic: the Grad-CAM-like gradient of the cross-entropy w.r.t. the classifier's weight,
    g = dCE/dW = (1/B) (softmax(z) - onehot(y))^T h  (K x C; what ``fc.weight.grad`` holds after
    ``criterion(logits, label).backward()``), its class-correlation matrix A = row_normalise(g g^T) (K x K),
    and M_s = mean_{k,l} (A_t - A_s)^2;
  - relation (similarity-preserving KD): the Gram matrix of the features over the batch,
    R = row_normalise(h h^T) (B x B), and M_r = mean_{i,j} (R_t - R_s)^2 (``SP.py``: sum / B^2);
  - score = -(M_s + M_r) (``compute_diswot_procedure``: ``score_sp + score_ickd``, each a negated distance;
    ``evo_search_nb201.py`` searches with the semantic part alone, its relation line commented out).

  ``row_normalise`` divides each row by its L2 norm (``F.normalize``, as both official losses do).
* **Search** (``regularized_evolution`` of ``evo_search_nb201.py``, Real et al. 2019's aging evolution):
  a population of ``population`` random candidates; each cycle draws ``sample_size`` members at random, the best
  of them is the parent, its child changes one gene to a different value (``mutate_arch_func``), joins the
  population and the oldest member leaves. The chosen student is the best-scoring candidate seen.
* **Search space**: the task's student family, built by the task's own model module
  (``bench.tasks.imagenet.models.build``) under the names it accepts. ``cifar_resnet<6n+2>[x<w>]`` (He et al.'s
  CIFAR ResNets): n in 1..9 (depth 8..56), width multiplier w in 1..4; ``vit_smoke_<dim>d<depth>``: dim in
  16..128 (multiples of 16), depth 1..12. ``candidates`` replaces the space with a list of names the task can
  build (e.g. timm names at the full tier). Only candidates with at most ``param_budget`` times the parameters
  of the task's default student are admitted, so DisWOT competes at the size of the other rows.
* **Distillation** of the chosen student (the task's initialisation, the cell's seed) with the trained teacher:
  L = (1 - alpha) CE + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + relation_weight M_r + semantic_weight M_s,
  M_r and M_s as above on the batch (the abstract's "we extend similarity metrics in DisWOT as new distillers"; the
  KD part is ``run_diswot_sp.sh``'s ``--distill kd -r 0.1 -a 0.9``, T = 4). The teacher runs on every batch (its
  features are needed), counted as teacher forward passes.
* Seeds: the evolution draws from the cell's seed; each architecture's scoring initialisation is fixed (a hash of
  its name), the random teacher's too, so a score is a function of the architecture and the batch. The search's
  own cost (random networks' forwards, wall time) is in the record (``method_info``), not in the training FLOPs.

Deviations and uncertainties:

* Semantic matrix: the official code feeds the K x C gradient, as [K, C, 1, 1], to ``ICKDLoss``, which builds a
  C x C channel-correlation matrix per class and needs equal teacher and student classifier widths (true in its
  NAS-Bench-201 space against ResNet-56, both 64). The widths here vary, so the same gradient is contracted over
  channels instead: a K x K class-correlation matrix, which compares networks of any widths. Its distance is a mean
  over entries, like SP's (ICKD's is a mean over rows).
* Features: the classifier's input (pooled features), found as the model's last linear layer with K outputs; the
  README takes the activation before global pooling, which has no module to hook in a generic classifier (the
  CIFAR ResNet pools inline).
* The batch: one fixed calibration batch of the task (its batch size; the official uses 64) and a fixed random
  initialisation per architecture, so every candidate is scored on the same data and scores are reproducible; the
  official draws the next batch per candidate (and ``compute_diswot_procedure`` accumulates the teacher's
  gradient across candidates). The random teacher is drawn once per cell.
* Parent selection: the best of the sample, as Real et al.'s Algorithm 1 (cited by the official function); the
  official code sorts the sample ascending and draws the parent among its first five (the lowest scores), which
  is read as a slip. The budget is a parameter count checked for every candidate (the official checks FLOPs for
  the initial population only). Cycles are counted (``ea_cycles`` 1000), not timed (its ``time_budget`` 1000 s).
  Scores are cached per architecture (they are deterministic here).
* At the small tier the task's student, ``cifar_resnet8``, is the smallest name the task accepts, so under the
  default budget the search has one candidate: the row is then the task's student distilled with DisWOT's losses
  (the record says ``search_trivial``). A real search there needs narrower members of the family (e.g. base widths
  below 16 channels) among the names the task can build.
* The weight of the semantic term in distillation is not in the released code (its ``train_student.py`` has no
  DisWOT distiller); it is a declared value (``Params``). The optimiser and schedule are the task's.
"""

from __future__ import annotations

import collections
import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from pydantic import Field

from bench.api import Method, Outputs, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


# --------------------------------------------------------------------------------------------------
# The matrices and the score
# --------------------------------------------------------------------------------------------------


def classifier_grad(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """dCE/dW of a linear classifier z = W h + b under the batch-mean cross-entropy: (softmax(z) - onehot(y))^T h / B."""
    import torch.nn.functional as F

    err = F.softmax(logits, dim=-1) - F.one_hot(labels.long(), logits.shape[-1]).to(logits.dtype)
    return err.transpose(0, 1) @ features.flatten(1).to(logits.dtype) / logits.shape[0]


def semantic_matrix(grad: torch.Tensor) -> torch.Tensor:
    """Row-normalised class correlation of the classifier gradient: normalise(g g^T) (K x K)."""
    import torch.nn.functional as F

    return F.normalize(grad @ grad.transpose(0, 1), dim=1)


def relation_matrix(features: torch.Tensor) -> torch.Tensor:
    """Row-normalised Gram matrix of the batch's features: normalise(h h^T) (B x B), as similarity-preserving KD."""
    import torch.nn.functional as F

    f = features.flatten(1)
    return F.normalize(f @ f.transpose(0, 1), dim=1)


def matrix_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two matrices (SP.py: sum of squares / B^2)."""
    return (a - b).pow(2).mean()


def diswot_terms(t_logits: torch.Tensor, t_features: torch.Tensor, s_logits: torch.Tensor, s_features: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_s, M_r): the semantic and relation distances between teacher and student on one batch."""
    sem = matrix_distance(semantic_matrix(classifier_grad(t_logits, labels, t_features)),
                          semantic_matrix(classifier_grad(s_logits, labels, s_features)))
    rel = matrix_distance(relation_matrix(t_features), relation_matrix(s_features))
    return sem, rel


def diswot_score(t_logits: torch.Tensor, t_features: torch.Tensor, s_logits: torch.Tensor, s_features: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, float]:
    """The training-free score -(M_s + M_r), in float64, with its two parts."""
    d = lambda x: x.detach().double()  # noqa: E731
    sem, rel = diswot_terms(d(t_logits), d(t_features), d(s_logits), d(s_features), labels)
    return {"score": -float(sem + rel), "semantic": float(sem), "relation": float(rel)}


# --------------------------------------------------------------------------------------------------
# Models: the classifier's input, the random initialisation
# --------------------------------------------------------------------------------------------------


def find_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """The last linear layer with ``num_classes`` outputs: the classifier whose input are the features."""
    from torch import nn

    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        from bench import BenchError

        raise BenchError(f"diswot: {type(model).__name__} has no linear layer with {num_classes} outputs (the "
                         f"classifier whose gradient and input the DisWOT matrices use)")
    return found[-1]


@contextmanager
def capture_classifier(model: nn.Module, num_classes: int) -> Iterator[dict[str, Any]]:
    """While active, ``seen["features"]`` / ``seen["logits"]`` hold the classifier's last input and output."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["features"], seen["logits"] = args[0], out

    handle = find_classifier(model, num_classes).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def forward_features(task: Task, model: nn.Module, batch: Batch, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, classifier input) of ``model`` on ``batch`` through the task's forward."""
    import torch

    with capture_classifier(model, num_classes) as seen:
        logits = task.forward(model, batch).logits
    z = seen.get("logits")
    if z is None or z.shape != logits.shape or not torch.allclose(z.float(), logits.float()):
        from bench import BenchError

        raise BenchError("diswot: the model's logits are not the output of its last linear layer; the DisWOT "
                         "matrices need the classifier's input")
    return logits, seen["features"]


def gaussian_init(model: nn.Module) -> nn.Module:
    """``network_weight_gaussian_init``: conv/linear weights N(0, 1) and biases 0; batch/group-norm weight 1, bias 0."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def arch_seed(arch: str) -> int:
    """The fixed seed of an architecture's random initialisation for scoring."""
    return zlib.crc32(arch.encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------
# Search space and the evolution
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Space:
    """A product of gene choices and the architecture name of each genome."""

    family: str
    genes: tuple[tuple[Any, ...], ...]
    name: Callable[[tuple[Any, ...]], str]

    def genomes(self) -> list[tuple[Any, ...]]:
        return list(product(*self.genes))


CIFAR_DEPTH_UNITS = tuple(range(1, 10))  # n blocks per stage: depth 6n + 2 = 8 .. 56
CIFAR_WIDTHS = (1, 2, 3, 4)
VIT_DIMS = (16, 32, 48, 64, 96, 128)  # heads of width 16 (the task's vit_smoke rule)
VIT_DEPTHS = tuple(range(1, 13))


def family_space(arch: str, candidates: list[str] | None) -> Space:
    """The search space of the family of the task's student ``arch`` (or the given ``candidates``)."""
    if candidates:
        return Space("candidates", (tuple(candidates),), lambda g: g[0])
    from bench.tasks.imagenet import models as imodels

    if imodels.CIFAR_RESNET.match(arch):
        return Space("cifar_resnet<6n+2>[x<w>]", (CIFAR_DEPTH_UNITS, CIFAR_WIDTHS),
                     lambda g: f"cifar_resnet{6 * g[0] + 2}" + (f"x{g[1]}" if g[1] > 1 else ""))
    if imodels.SMOKE_VIT.match(arch):
        return Space("vit_smoke_<dim>d<depth>", (VIT_DIMS, VIT_DEPTHS), lambda g: f"vit_smoke_{g[0]}d{g[1]}")
    return Space(f"{arch} only (no family to enumerate; give diswot.candidates)", ((arch,),), lambda g: g[0])


def mutate(genome: tuple[Any, ...], genes: tuple[tuple[Any, ...], ...], rng: random.Random) -> tuple[Any, ...]:
    """One gene (among those with a choice) set to a different value (``mutate_arch_func``)."""
    open_genes = [i for i, choices in enumerate(genes) if len(choices) > 1]
    i = rng.choice(open_genes)
    value = rng.choice([c for c in genes[i] if c != genome[i]])
    return genome[:i] + (value,) + genome[i + 1:]


def regularized_evolution(feasible: list[tuple[Any, ...]], genes: tuple[tuple[Any, ...], ...],
                          score: Callable[[tuple[Any, ...]], float], population: int, sample_size: int, cycles: int,
                          rng: random.Random, max_tries: int = 100) -> list[tuple[tuple[Any, ...], float]]:
    """Aging evolution (Real et al. 2019, Algorithm 1) over the ``feasible`` genomes; returns the history.

    Children outside ``feasible`` are re-drawn from the same parent (up to ``max_tries``; else the parent)."""
    allowed = set(feasible)
    pop: collections.deque = collections.deque()
    history: list[tuple[tuple[Any, ...], float]] = []
    while len(pop) < population:
        g = rng.choice(feasible)
        pop.append((g, score(g)))
        history.append(pop[-1])
    if len(allowed) < 2:
        return history
    for _ in range(cycles):
        sample = [rng.choice(pop) for _ in range(sample_size)]
        parent = max(sample, key=lambda m: m[1])[0]
        child = parent
        for _ in range(max_tries):
            c = mutate(parent, genes, rng)
            if c in allowed:
                child = c
                break
        pop.append((child, score(child)))
        history.append(pop[-1])
        pop.popleft()
    return history


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class DisWOT(Method):
    """Dong, Li & Wei 2023 (DisWOT): training-free student search by semantic + relation similarity to a random
    teacher, then KD + the two similarity losses."""

    name = "diswot"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # searcher/evo_search_nb201.py argparse defaults: --ea_population 36, --ea_sample_size 8, --ea_cycles 1000.
        population: int = Field(36, ge=1, le=10_000, description="population of the aging evolution")
        sample_size: int = Field(8, ge=1, le=10_000, description="members drawn per tournament")
        cycles: int = Field(1000, ge=0, le=1_000_000, description="children bred (evaluations after the population)")
        # Declared: students compete at the task's student size (the official searches under --target_flops).
        param_budget: float = Field(1.0, gt=0, le=1000, description="max candidate parameters / the task student's")
        candidates: list[str] | None = Field(None, description="architecture names to search instead of the family "
                                                               "of the task's student")
        # compute_diswot_procedure re-initialises teacher and student with network_weight_gaussian_init; "default"
        # keeps the models' own initialisation (as evo_search_nb201.py does): the task's for candidates, PyTorch's
        # reset_parameters for the teacher's copy.
        score_init: Literal["gaussian", "default"] = Field("gaussian", description="random initialisation of the "
                                                                                     "scored networks")
        # run_diswot_sp.sh: train_student.py --distill kd -r 0.1 -a 0.9 (and its default --kd_T 4).
        temperature: float = Field(4.0, gt=0, description="KD temperature T")
        alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term (the label CE gets 1 - alpha)")
        # 3000: the SP weight of RepDistiller (HobbitLong/RepDistiller @ b0722bc scripts/run_cifar_distill.sh,
        # --distill similarity -b 3000), the SP code the DisWOT repository ships (distiller_zoo/SP.py).
        relation_weight: float = Field(3000.0, ge=0, description="weight of the relation (SP) distance in training")
        # Declared (no released value; module docstring): 30 puts the term at ~0.1 x the KD term at the start on the
        # small tier (M_s ~ 0.008 for a fresh cifar_resnet8 against the trained cifar_resnet20, KD ~ 1.8); 300 (the
        # order of KD) cost 28 points of top-1 on the smoke tier over 100 steps, 30 and 3 were within noise.
        semantic_weight: float = Field(30.0, ge=0, description="weight of the semantic (class-correlation) "
                                                                 "distance in training")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}
        self.num_classes: int | None = None
        self.last: dict[str, float] = {}

    def unsupported(self, task: Task) -> str | None:
        if task.problem() != "classification":
            return "DisWOT's semantic matrix is a classifier's cross-entropy gradient; this subtask is a regression"
        if not type(task).__module__.startswith("bench.tasks.imagenet"):
            return ("DisWOT searches image-classifier students among the architectures of the imagenet task's model "
                    "module; this task builds none of them")
        return None

    # --- search -------------------------------------------------------------------------------------
    def _scored(self, model: nn.Module, arch: str, ctx: StepContext) -> nn.Module:
        import torch

        if self.params.score_init == "gaussian":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(arch_seed(arch))
                gaussian_init(model)
        return model.to(ctx.device).train()

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        import copy

        import torch
        from bench.tasks.imagenet import models as imodels

        t0 = time.perf_counter()
        batch = ctx.calibration_batches(1)[0]
        labels = batch["labels"]
        with torch.no_grad():
            self.num_classes = int(ctx.task.forward(student, batch).logits.shape[-1])
        k = self.num_classes
        default_arch = getattr(student, "name", type(student).__name__)
        size = (getattr(student, "data_config", None) or {}).get("input_size", (None, None, None))[-1]

        def spec(arch: str) -> imodels.ModelSpec:
            builtin = bool(imodels.CIFAR_RESNET.match(arch) or imodels.SMOKE_VIT.match(arch))
            return imodels.ModelSpec(arch, arch, input_size=size if builtin else None, extra={"role": "student"})

        space = family_space(default_arch, self.params.candidates)
        default_params = sum(p.numel() for p in student.parameters())
        budget = self.params.param_budget * default_params
        sizes: dict[str, int] = {}
        for g in space.genomes():  # counted on a real (CPU) build: faster than the meta device for these sizes
            arch = space.name(g)
            sizes[arch] = default_params if arch == default_arch else sum(
                q.numel() for q in imodels.build(spec(arch), k, seed=0).parameters())
        feasible = [g for g in space.genomes() if sizes[space.name(g)] <= budget]
        if not feasible:
            from bench import BenchError

            raise BenchError(f"diswot: no candidate of {space.family} has at most {self.params.param_budget} x the "
                             f"task student's {default_params} parameters (smallest: {min(sizes.values())})")

        # The random teacher: the teacher's architecture, re-initialised (on the CPU, from its own seed: the cell's
        # random streams are untouched), drawn once.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            rand_teacher = copy.deepcopy(teacher).cpu()
            for p in rand_teacher.parameters():
                p.requires_grad_(False)
            if self.params.score_init == "gaussian":
                gaussian_init(rand_teacher)
            else:
                for m in rand_teacher.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        rand_teacher.to(ctx.device).train()
        with torch.no_grad():
            t_logits, t_feats = forward_features(ctx.task, rand_teacher, batch, k)
        del rand_teacher

        scores: dict[str, dict[str, float]] = {}

        def score(g: tuple) -> float:
            arch = space.name(g)
            if arch not in scores:
                model = imodels.build(spec(arch), k, seed=arch_seed(arch))
                model = self._scored(model, arch, ctx)
                with torch.no_grad():
                    s_logits, s_feats = forward_features(ctx.task, model, batch, k)
                scores[arch] = diswot_score(t_logits, t_feats, s_logits, s_feats, labels)
            return scores[arch]["score"]

        rng = random.Random(ctx.seed)
        history = regularized_evolution(feasible, space.genes, score, self.params.population,
                                        self.params.sample_size, self.params.cycles, rng)
        best_g = max(history, key=lambda m: m[1])[0]  # ties: the first seen
        chosen = space.name(best_g)
        ranked = sorted(scores.items(), key=lambda kv: -kv[1]["score"])
        self.info = {
            "chosen_student": chosen, "chosen_params": sizes[chosen],
            "task_student": default_arch, "task_student_params": default_params,
            "param_budget": self.params.param_budget, "search_space": space.family,
            "space_size": len(space.genomes()), "feasible": len(feasible), "evaluated": len(scores),
            "history": len(history), "search_trivial": len(feasible) == 1,
            "score": scores[chosen], "top": [{"arch": a, **s} for a, s in ranked[:5]],
            "score_init": self.params.score_init, "score_batch": int(labels.shape[0]),
            "search_wall_s": round(time.perf_counter() - t0, 3),
            "note": ("random (untrained) teacher and candidates scored on one training batch; the trained teacher is "
                     "used only for distillation"),
        }
        if chosen == default_arch:
            return student
        return imodels.build(spec(chosen), k, seed=ctx.seed)

    # --- distillation -------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        from bench.methods.kd import kd_loss

        p = self.params
        if self.num_classes is None:
            self.num_classes = int(ctx.teacher_outputs(batch).logits.shape[-1])
        k = self.num_classes
        s_logits, s_feats = forward_features(ctx.task, ctx.student, batch, k)
        label = ctx.label_loss(Outputs(logits=s_logits), batch)
        if p.relation_weight == 0 and p.semantic_weight == 0:
            t_logits = ctx.teacher_outputs(batch).logits
            loss, _ = kd_loss(s_logits, t_logits, label, p.temperature, p.alpha)
            return {"student": loss}
        t_logits, t_feats = ctx.run_teacher(lambda t: forward_features(ctx.task, t, batch, k), len(batch["index"]))
        loss, _ = kd_loss(s_logits, t_logits, label, p.temperature, p.alpha)
        sem, rel = diswot_terms(t_logits.float(), t_feats.float(), s_logits.float(), s_feats.float(), batch["labels"])
        self.last = {"kd": float(loss.detach()), "relation": float(rel.detach()), "semantic": float(sem.detach())}
        return {"student": loss + p.relation_weight * rel + p.semantic_weight * sem}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info), "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])
        self.num_classes = state.get("num_classes")

    def table_notes(self, task: Task) -> list[str]:
        i = self.info
        if not i:
            return []
        notes = [f"diswot: student {i['chosen_student']} ({i['chosen_params']:,} parameters) chosen from {i['feasible']} "
                 f"candidates of {i['search_space']} within {i['param_budget']:g} x the task student's size"]
        if i.get("search_trivial"):
            notes.append("diswot: only the task's student fits the budget, so nothing was searched: the row is KD plus "
                         "DisWOT's two similarity losses on the task's student")
        return notes

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "temperature": p.temperature, "alpha": p.alpha, "relation_weight": p.relation_weight,
                "semantic_weight": p.semantic_weight}
