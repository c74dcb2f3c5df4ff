"""The two contracts every method and task implements, and the small objects they exchange.

A **Task** owns data, models and quality metrics for one family of benchmarks (with subtasks, e.g.
``glue/sst2``). A **Method** is one distillation algorithm: it turns a batch into losses. The harness
(`bench.train`) owns everything in between — optimiser, schedule, step budget, seeds, checkpoints,
teacher-output caching — which is what makes rows comparable.

This module imports no torch: type hints referring to torch live behind ``TYPE_CHECKING``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from torch import nn

DOMAINS = ("classification", "lm", "diffusion", "segmentation", "grounding")
TIERS = ("smoke", "small", "full")
Tier = Literal["smoke", "small", "full"]
Problem = Literal["classification", "regression"]

Batch = dict  # str -> Tensor; every training batch carries "index" (LongTensor of example ids)


class Params(BaseModel):
    """Base of every method's and task's parameter model: strict, immutable, documented fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------------------------------
# Objects exchanged between harness, tasks and methods
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One quality metric a task reports. Values are stored in natural units (0.873, not 87.3)."""

    name: str
    higher_is_better: bool = True
    primary: bool = False
    description: str = ""
    #: Show this metric as its own leaderboard column (tasks whose quality is several numbers, e.g. the lm
    #: task's perplexity and GLUE-prompt scores). ``scale`` is the display multiplier (100: a fraction
    #: shown as points; 1: shown as is, e.g. a perplexity).
    column: bool = False
    scale: float = 100.0
    #: This metric is a no-model floor of the named metric (segmentation: the mask that fills the prompt box,
    #: the floor of box mIoU). A teacher row that does not beat a floor is flagged as a weak teacher in its
    #: record (``teacher_quality``) and under the leaderboard (`weak_teacher`).
    floor_of: str = ""


def weak_teacher(metrics: dict[str, Any], specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The floors (``Metric.floor_of``) that a model's ``metrics`` do not beat: one dict per floor with the
    metric, its value, the floor's name and value. ``specs`` are metric specs as records store them
    (``Metric.__dict__``); a metric or floor that is missing or not a finite number is not judged."""
    import math

    hib = {s.get("name"): bool(s.get("higher_is_better", True)) for s in specs}
    out = []
    for s in specs:
        target = s.get("floor_of")
        if not target:
            continue
        v, f = metrics.get(target), metrics.get(s.get("name"))
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (v, f)):
            continue
        if (v <= f) if hib.get(target, True) else (v >= f):
            out.append({"metric": target, "value": float(v), "floor": s.get("name"), "floor_value": float(f)})
    return out


@dataclass
class Outputs:
    """What `Task.forward` returns: the parts of a model's output a method may use."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    features: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    #: Further named outputs a domain has (segmentation: the decoder's predicted IoUs and output tokens).
    extras: dict[str, torch.Tensor] | None = None


class Split(Protocol):
    """An indexable split. The harness, not the task, decides the order in which examples are seen.

    That is what makes resume exact (the position in an epoch is a function of the step) and lets
    teacher outputs be cached by example id.
    """

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> Batch:
        """Collate the examples at ``indices`` into one batch (with an ``index`` tensor)."""
        ...


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule a task declares for every method that trains on it."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.1
    grad_clip: float | None = 1.0
    no_decay: tuple[str, ...] = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    source: str = ""  # where these defaults come from


@dataclass(frozen=True)
class TrainConfig:
    """The budget and optimiser of one cell; identical for every method on a (task, subtask, tier)."""

    steps: int
    batch_size: int
    eval_batch_size: int
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class Component:
    """A part of a model whose cost is reported on its own, per its own unit (segmentation: the image
    encoder per image; the prompt encoder and mask decoder per prompt). See ``Task.components``."""

    name: str
    per: str  # the unit one forward of the component serves: "image", "prompt"
    module: str  # attribute path of the submodule(s) whose parameters count, comma-separated


@dataclass(frozen=True)
class TeacherCandidate:
    """One entry of a task's teacher pool (MiniMA's capacity-gap law chooses among them)."""

    name: str
    n_params: int
    description: str = ""


@dataclass(frozen=True)
class Generation:
    """One training generation of a method that trains several models in sequence.

    Most methods train one student once (one generation). Iterated self-distillation (Borup & Andersen
    2021), defensive distillation (a network trained at temperature T, then a fresh one distilled from
    it) and two-phase recipes (DMAE: distillation pre-training, then fine-tuning) split the cell's step
    budget into generations. The harness re-creates every optimiser and learning-rate schedule at the
    start of each generation (the schedule runs over that generation's steps), restarts the data order,
    and, when ``fresh_student`` is true, builds a newly initialised student (``Task.student`` with a
    seed derived from the cell's seed and the generation index); the previous generation's student is
    then frozen and offered to the method as ``StepContext.previous``. The total over generations is the
    cell's step budget, the same as every other method's.
    """

    steps: int
    fresh_student: bool = True
    name: str = ""


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` steps in ``min(parts, total)`` near-equal generations (earlier ones take the remainder)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class DataDomains:
    """The data domains a task declares (DDK, Liu et al. 2024, resamples training data by domain).

    ``train_domain[i]`` is the domain index (into ``names``) of training example ``i``; ``validation``
    holds a held-out split per domain name, in the training split's batch format."""

    names: tuple[str, ...]
    train_domain: tuple[int, ...]
    validation: dict[str, Split]


class TeacherStore(Protocol):
    """A teacher's outputs over the training split, kept by the task (``Task.teacher_store``), e.g. the
    top-k teacher logits on disk of `bench.teacher_cache`, shared by every method and seed of a cell row."""

    def outputs(self, batch: Batch) -> tuple[Outputs, int, int]:
        """The teacher's outputs for ``batch`` and the teacher forward passes and examples this call ran
        (a store built on first use reports the whole build on that call; 0 and 0 when it is read)."""
        ...

    def info(self) -> dict[str, Any]:
        """What the run record says about the store: ``used``, its key, k, path, built or read."""
        ...


@dataclass(frozen=True)
class TaskEnv:
    """Where a task finds its data and caches, and which tier it builds."""

    tier: Tier
    subtask: str
    data_root: Path | None
    cache_dir: Path
    device: str = "cpu"
    quiet: bool = False


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------


class Task:
    """Contract for a task family. One instance serves one (subtask, tier, params); it is shared by
    every method and seed of that cell row, so data are loaded and teachers trained once.

    Subclasses set the class attributes and implement the methods below.
    """

    name: ClassVar[str]
    domain: ClassVar[str]
    version: ClassVar[str]
    subtasks: ClassVar[tuple[str, ...]]
    Params: ClassVar[type[Params]] = Params
    #: How per-subtask scores combine into the family's summary score (stated under every table).
    aggregate_name: ClassVar[str] = "score"
    aggregate_rule: ClassVar[str] = "unweighted mean of the per-subtask scores"
    #: True when a cell's training does not depend on its subtask: the subtasks are evaluation protocols of
    #: one trained model (sam's box and point prompts, as the SAM papers evaluate one model both ways). The
    #: harness then trains each (method, tier, seed, configuration) once, keeps the trained model under
    #: ``<out>/trained/``, and evaluates it on every subtask; each record says which cell trained it
    #: (``training.shared``). ``--force`` retrains.
    shared_training: ClassVar[bool] = False

    def __init__(self, params: Params, env: TaskEnv) -> None:
        self.params = params
        self.env = env

    # A task travels to measuring subprocesses by its parameters alone; caches are rebuilt there lazily.
    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "env": self.env}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["params"], state["env"])

    # --- what the cell needs --------------------------------------------------------------------
    def unavailable(self) -> str | None:
        """Why this subtask cannot run at this tier (reported as a skipped cell), or None."""
        return None

    def metrics(self) -> list[Metric]:
        raise NotImplementedError

    def problem(self) -> Problem:
        """classification (logits over labels) or regression (one real output)."""
        return "classification"

    def training(self) -> TrainConfig:
        raise NotImplementedError

    def teacher_pool(self) -> list[TeacherCandidate]:
        """Teachers available for this subtask; the first is the default teacher."""
        raise NotImplementedError

    def teacher(self, name: str | None = None) -> nn.Module:
        """The trained teacher (trained once and cached by content hash where needed)."""
        raise NotImplementedError

    def student(self, seed: int) -> nn.Module:
        """A fresh student for one cell."""
        raise NotImplementedError

    def train_data(self) -> Split:
        raise NotImplementedError

    def eval_data(self) -> Split:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch) -> Outputs:
        """Run ``model`` on ``batch``: the adapter that makes methods model-agnostic in a domain."""
        raise NotImplementedError

    def label_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor:
        """The supervised loss on ground truth (cross-entropy, or MSE for regression)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def score(self, metrics: dict[str, float]) -> float:
        """This subtask's contribution to the family's aggregate score (see ``aggregate_rule``)."""
        primary = [m.name for m in self.metrics() if m.primary]
        return float(metrics[primary[0]])

    def example_inputs(self, batch_size: int) -> Batch:
        """Inputs at the task's declared shape, for FLOPs, latency and memory probes."""
        raise NotImplementedError

    def example_batch(self, batch_size: int) -> Batch:
        """``example_inputs`` plus whatever ``label_loss`` needs (labels): the training-step memory probe."""
        return self.example_inputs(batch_size)

    def teacher_outputs_cacheable(self) -> bool:
        """Whether a teacher's output for an example is the same at every visit of that example.

        False when training batches are augmented at random (random crops, flips): the harness then
        runs the teacher on every batch instead of caching its outputs by example id."""
        return True

    def teacher_store(self, teacher: nn.Module) -> TeacherStore | None:
        """Where this task keeps ``teacher``'s outputs over the training split, or None.

        None (the default): the harness caches logits in memory by example id, one row per example.
        A task whose outputs are not one row per example (the lm task: one row per scored token) or that
        keeps teacher outputs on disk across cells returns a `TeacherStore`; the harness then takes the
        teacher's outputs for training batches from it and adds the passes it reports to the cell's count."""
        return None

    def generation_inputs(self, batch_size: int) -> tuple[Batch, int] | None:
        """Prompts at the task's declared generation shape and the number of tokens to generate, for the
        tokens/s and time-to-first-token probes (`bench.measure.generation`); None for tasks whose models
        do not generate."""
        return None

    def generate(self, model: nn.Module, batch: Batch, *, max_new_tokens: int,
                 temperature: float | None = None) -> Batch:
        """lm domain: ``model``'s continuation of the prompts of ``batch`` (a training batch: the task's
        declared prompt part of each example; or a ``generation_inputs`` batch), greedy when
        ``temperature`` is None, else sampled at that temperature. Returns a training-format batch (same
        ``index``) whose scored positions are the generated tokens (on-policy samples, GKD)."""
        raise NotImplementedError(f"task {self.name} does not generate")

    def data_domains(self) -> DataDomains | None:
        """The domains of the training data and a held-out split per domain, or None (no domains)."""
        return None

    def teacher_pairs(self, teacher: nn.Module, n: int | None = None, trajectory: bool = False) -> Any:
        """Generative tasks: the store of ``teacher``'s noise -> image pairs (`bench.pairs.PairStore`)."""
        raise NotImplementedError(f"task {self.name} keeps no teacher pairs")

    def components(self) -> list[Component]:
        """Parts of the model costed separately (parameters, FLOPs, latency per ``Component.per``), beside
        the whole model's cost per sample; empty for tasks whose models are one piece."""
        return []

    def component_inputs(self, name: str, batch_size: int) -> Batch:
        """Inputs of component ``name`` for ``batch_size`` units (images, prompts) at the declared shape."""
        raise NotImplementedError(f"task {self.name} has no component {name!r}")

    def component_forward(self, model: nn.Module, name: str, batch: Batch) -> Any:
        """Run component ``name`` of ``model`` on ``component_inputs`` (what the cost probes time)."""
        raise NotImplementedError(f"task {self.name} has no component {name!r}")

    def inference_steps(self) -> int:
        """Forward passes per sample at inference (sampler steps of an iterative student); FLOPs x this."""
        return 1

    def input_description(self) -> str:
        """Human-readable declared input shape (recorded with FLOPs)."""
        return ""

    def data_fingerprint(self) -> dict[str, Any]:
        """Content hashes and sizes of the data this cell trains and evaluates on."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Caveats that must travel with the numbers (e.g. 'MNLI 1k subset')."""
        return []


# --------------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------------


class Method:
    """Contract for a distillation method. Subclasses are standalone (no chains of method classes).

    ``role`` says what the row is: ``distill`` (trains a student with a teacher), ``student`` (the
    student on labels only, the reference row) or ``teacher`` (evaluates the teacher, no training).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    domains: ClassVar[frozenset[str]]
    Params: ClassVar[type[Params]] = Params
    role: ClassVar[Literal["distill", "student", "teacher"]] = "distill"

    def __init__(self, params: Params) -> None:
        self.params = params

    def unsupported(self, task: Task) -> str | None:
        """Why this method cannot run on ``task`` (the cell is reported as skipped), or None."""
        return None

    #: Changes to the task's optimiser settings this method's paper prescribes (e.g. MEAL V2's weight
    #: decay 0), as ``OptimConfig`` field -> value. Applied by the harness to every optimiser of the
    #: cell, recorded in the cell's configuration (and so in its hash); empty for most methods.
    optim_overrides: ClassVar[dict[str, Any]] = {}
    #: True for methods that train nothing (frame_skip: the teacher's encoder run on fewer frames): the
    #: harness builds the student with ``init_student`` and evaluates it without running the step budget; the
    #: record says 0 steps. Budget fairness is then in compute at inference, which the row reports.
    training_free: ClassVar[bool] = False
    #: True for methods whose teacher only initialises the student and is never run during training (TwinFlow:
    #: after the copy the model is its own teacher); their records show 0 teacher forward passes by design.
    teacher_init_only: ClassVar[bool] = False
    #: False for methods whose teachers are their own earlier generations (self-distillation) or peers
    #: (federated distillation): the harness then neither builds nor loads the task's teacher for the cell.
    uses_task_teacher: ClassVar[bool] = True
    #: Where the teaching comes from when ``uses_task_teacher`` is False (the record's ``teacher.note``).
    own_teacher_note: ClassVar[str] = "distils from its own earlier generations"

    def select_teacher(self, pool: list[TeacherCandidate], student_params: int) -> str | None:
        """Pick a teacher from the task's pool; None keeps the task's default."""
        return None

    def select_teachers(self, pool: list[TeacherCandidate], student_params: int) -> list[str] | None:
        """Pick a teacher *ensemble* from the pool (MEAL V2); None means one teacher (``select_teacher``).

        When a list is returned, the harness loads every named teacher; ``StepContext.teacher_outputs(
        batch, index=k)`` gives teacher ``k``'s outputs and ``StepContext.teachers`` holds them all.
        """
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        """How the cell's step budget is split into training generations (see `Generation`).

        The steps must add up to ``total_steps``. The default is one generation: the usual single run.
        """
        return [Generation(total_steps, fresh_student=False)]

    def on_generation_start(self, index: int, ctx: StepContext) -> None:
        """Called when generation ``index`` (0-based) starts, after its student and optimisers exist."""

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        """Initialise (or replace) the student from the teacher before training."""
        return student

    def finalize_student(self, student: nn.Module, ctx: StepContext) -> nn.Module:
        """The model to evaluate and measure once training ends (e.g. a quantised student with its
        full-precision shadow weights dropped); the default is the trained student itself."""
        return student

    def create_modules(self, ctx: StepContext) -> None:
        """Called once per cell, in fresh and resumed runs alike, after the student and teachers are placed
        and before ``extra_modules``: build extra networks that derive from the models here (e.g. a fake
        score network initialised from the teacher, DMD2/SiD). On resume the harness then loads their
        saved weights into them."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules besides the student, each given its own optimiser under its key."""
        return {}

    #: Update ratios (two time-scale updates, TTUR): optimiser key -> every how many harness steps it steps
    #: (DMD2 updates its generator every 5th or 10th step and its fake score network every step). Keys not
    #: listed step every step. On a step where a key is not due, the method returns no loss for it
    #: (`StepContext.updating` says which are due); the harness refuses a loss for a key that is not due.
    #: Learning-rate schedules run on harness steps, so every optimiser sees the same schedule in time.
    update_every: ClassVar[dict[str, int]] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        """Why this method cannot run with these task parameters (e.g. a generative student that cannot
        sample at a requested step count), checked before anything runs: the run then exits with code 2
        and this message. None when fine."""
        return None

    def setup(self, ctx: StepContext) -> None:
        """Called once the models are placed and the budget is known."""

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Losses for this step, keyed by optimiser: ``student`` plus any ``extra_modules`` keys."""
        raise NotImplementedError

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        """After the optimiser step of a *training* step; returns scalars worth logging."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state needed for an exact resume (schedules, momenta)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def record_info(self) -> dict[str, Any]:
        """Method facts worth keeping in the run record (chosen teacher, final schedule values)."""
        return {}

    def table_notes(self, task: Task) -> list[str]:
        """Plain sentences a reader of this method's row must see under the leaderboard table: a deviation
        from the paper or its code that changes the row's numbers on ``task``, or a degenerate schedule seen
        in this run. Called once training ends; kept in the record as ``method_notes`` and printed under
        every table holding the row (``bench.leaderboard``). Empty for most methods."""
        return []


class StepContext:
    """What a method sees during training. Built by the harness; see `bench.train`."""

    task: Task
    student: nn.Module
    teacher: nn.Module | None  # the first teacher (of an ensemble), or None
    teachers: list[nn.Module]  # every teacher of the cell (one, several for an ensemble, or none)
    step: int  # optimiser steps completed before the current one (over all generations)
    total_steps: int
    seed: int
    device: str
    generation: int  # index of the current training generation (0 for single-generation methods)
    generation_step: int  # optimiser steps completed in the current generation
    generation_steps: int  # the current generation's step budget
    previous: nn.Module | None  # the previous generation's frozen student, or None

    def problem(self) -> Problem:
        raise NotImplementedError

    def student_outputs(self, batch: Batch) -> Outputs:
        raise NotImplementedError

    def teacher_outputs(self, batch: Batch, index: int = 0) -> Outputs:
        """Teacher ``index``'s logits for ``batch``, cached by example id within the cell (unless the
        task's training batches are stochastic, see ``Task.teacher_outputs_cacheable``), or taken from the
        task's own store when it keeps one (``Task.teacher_store``: e.g. the lm task's top-k cache on disk,
        whose rebuilt outputs are log-probabilities)."""
        raise NotImplementedError

    def previous_outputs(self, batch: Batch) -> Outputs:
        """The previous generation's logits for ``batch`` (cached like ``teacher_outputs``)."""
        raise NotImplementedError

    def run_teacher(self, fn: Any, n_examples: int, index: int = 0) -> Any:
        """``fn(teacher)`` under ``no_grad``, counted as one teacher forward pass over ``n_examples``
        examples and never cached: for methods that need more than logits (intermediate features of
        a masked input, DMAE)."""
        raise NotImplementedError

    def label_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def calibration_batches(self, n: int) -> list[Batch]:
        """A few training batches in a fixed order (for importance estimation and the like)."""
        raise NotImplementedError

    def updating(self, key: str) -> bool:
        """Whether optimiser ``key`` steps on the current harness step (see ``Method.update_every``)."""
        raise NotImplementedError

    def teacher_pairs(self, batch_size: int, n: int | None = None, trajectory: bool = False) -> Batch:
        """Generative tasks: ``batch_size`` noise -> image pairs of the teacher's reference sampler
        (``noise``, ``cond``, ``image``, the sampler's time ``grid`` and, with ``trajectory``, the states at
        every grid time), from the task's on-disk store of ``n`` pairs (built once per matrix, `bench.pairs`).
        The pairs of step ``s`` are a fixed function of (seed, s), so resume is exact."""
        raise NotImplementedError
