"""Suites as data: a strict YAML schema, ``--set key=value`` overrides, and their resolution.

A suite names tasks, methods, seeds and a tier. Resolution checks every name and every parameter
against the registries and the methods'/tasks' own ``Params`` models *before* anything runs or is
written, so a typo costs an exit code 2 and a message, never a half-written run directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bench import BenchError
from bench import registry

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TrainOverrides(_Strict):
    """Optional overrides of a task's declared budget and optimiser (recorded, hashed)."""

    steps: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)


class RuntimeOptions(_Strict):
    """How a run is executed; none of these change results, so none enter the config hash."""

    checkpoint_every: int | None = Field(None, gt=0, description="steps between checkpoints")
    checkpoint_seconds: float = Field(120.0, gt=0, description="wall seconds between checkpoints")
    measure: bool = Field(True, description="measure latency and memory (FLOPs and params always)")


class QualityRule(_Strict):
    """Quality metrics compared cell by cell (same task, subtask, method, tier and seed)."""

    enabled: bool = True
    max_drop: float = Field(0.01, ge=0, description="largest allowed drop of a quality metric in its "
                                                    "natural units (0.01 = one point of accuracy); a metric "
                                                    "where lower is better may rise by as much")
    metrics: list[str] | None = Field(None, description="metric names to gate (default: every metric a "
                                                        "record reports, e.g. accuracy, f1)")


class CountRule(_Strict):
    """Parameters or FLOPs per sample: deterministic counts, so gated tightly (measurement.md §5.8)."""

    enabled: bool = True
    exact: bool = Field(True, description="any change fails, a decrease too: commit the new baseline with it")
    max_increase: float = Field(0.0, ge=0, description="when exact is false: largest allowed relative "
                                                       "increase (0.01 = 1%)")


class LatencyRule(_Strict):
    """asv's rule (measurement.md §5.4): a slowdown counts only if the median ratio exceeds ``max_ratio``
    *and* the samples differ — Mann–Whitney U at p < ``p_value`` where the sample sizes can reach it,
    otherwise non-overlapping ``ci`` intervals of the medians."""

    enabled: bool = True
    max_ratio: float = Field(1.10, gt=1, description="current/baseline median above which a slowdown is a "
                                                     "candidate (asv compare --factor 1.1)")
    p_value: float = Field(0.002, gt=0, lt=1, description="two-sided Mann-Whitney U threshold (asv: 0.002)")
    ci: float = Field(0.99, gt=0, lt=1, description="confidence of the median intervals used when p_value "
                                                    "is out of reach for the sample sizes (asv: 99%)")


class MemoryRule(_Strict):
    """Peak memory (inference at each batch size, and the training step)."""

    enabled: bool = True
    max_increase: float = Field(0.10, ge=0, description="largest allowed relative increase (0.10 = 10%)")


class GateRules(_Strict):
    """Regression rules per metric for ``bench gate`` (a suite's optional ``gate`` section)."""

    quality: QualityRule = Field(default_factory=QualityRule)
    params: CountRule = Field(default_factory=CountRule)
    flops: CountRule = Field(default_factory=CountRule)
    latency: LatencyRule = Field(default_factory=LatencyRule)
    memory: MemoryRule = Field(default_factory=MemoryRule)


class Suite(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = "adhoc"
    description: str = ""
    tier: Literal["smoke", "small", "full"] = "smoke"
    tasks: list[str] = Field(min_length=1)
    methods: list[str | MethodSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    #: Add the reference rows (the teacher, and the student trained on labels only) to every table.
    references: bool = True
    task_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    train: TrainOverrides = Field(default_factory=TrainOverrides)
    runtime: RuntimeOptions = Field(default_factory=RuntimeOptions)
    data_root: str | None = None
    out: str = "runs"
    profile: str | None = None
    #: Regression rules for ``bench gate`` (defaults: quality drop <= 0.01, params and FLOPs exact,
    #: latency x1.10 and p < 0.002, memory +10%).
    gate: GateRules = Field(default_factory=GateRules)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be unique, got {v}")
        if any(s < 0 for s in v):
            raise ValueError(f"seeds must be non-negative, got {v}")
        return v

    def method_specs(self) -> list[MethodSpec]:
        return [MethodSpec(name=m) if isinstance(m, str) else m for m in self.methods]


# --------------------------------------------------------------------------------------------------
# Loading and overriding
# --------------------------------------------------------------------------------------------------


def format_validation_error(exc: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem, naming the field, what was given and what would be valid."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field = f"{where}.{loc}" if where and loc else (where or loc)
        msg = err["msg"]
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            valid = sorted(model.model_fields) if model is not None and len(err["loc"]) == 1 else None
            hint = f"; valid fields: {', '.join(valid)}" if valid else ""
            lines.append(f"{field}: unknown field{hint}")
            continue
        bounds = ""
        if model is not None and len(err["loc"]) >= 1 and err["loc"][0] in model.model_fields:
            bounds = describe_field(model, str(err["loc"][0]))
        lines.append(f"{field}: {msg} (got {given!r}){'; ' + bounds if bounds else ''}")
    return "\n".join(lines)


def describe_field(model: type[BaseModel], name: str) -> str:
    """'t_start: float, 0 <= value < 1, default 0.4 — <description>'."""
    info = model.model_fields[name]
    ann = getattr(info.annotation, "__name__", str(info.annotation))
    parts = [f"{name}: {ann}"]
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    lower, upper = [], []
    for meta in info.metadata:
        for key, sym in ops.items():
            val = getattr(meta, key, None)
            if val is not None:
                (lower if key in ("ge", "gt") else upper).append((sym, val))
    if lower or upper:
        lo = " ".join(f"{v} {'<=' if s == '>=' else '<'}" for s, v in lower)
        hi = " ".join(f"{s} {v}" for s, v in upper)
        parts.append(f"{lo} value {hi}".strip().replace("  ", " "))
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        parts.append(f"default {default!r}")
    desc = f" — {info.description}" if info.description else ""
    return ", ".join(parts) + desc


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"suite file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise BenchError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); a suite is a "
                         "YAML file in UTF-8") from exc
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not valid YAML (tags and Python objects are not allowed): {exc}") from exc
    if not isinstance(data, dict):
        raise BenchError(f"{path}: a suite is a YAML mapping with at least 'tasks' and 'methods'")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise BenchError(f"{path}: schema_version {version!r} is not supported (this bench reads {SCHEMA_VERSION})")
    try:
        return Suite.model_validate(data)
    except ValidationError as exc:
        raise BenchError(f"{path}: invalid suite\n" + format_validation_error(exc, "", Suite)) from exc


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BenchError(f"--set {item!r}: expected key=value, e.g. taid.t_start=0.2 or train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [p for p in key.strip().split(".")], value


def apply_overrides(suite: Suite, items: list[str]) -> Suite:
    """Apply ``--set`` items. Roots: suite fields, ``train.*``, ``runtime.*``, a method, or a task."""
    data = suite.model_dump()
    specs = {s.name: s for s in suite.method_specs()}
    task_names = {t.partition("/")[0] for t in suite.tasks}
    for item in items:
        path, value = parse_override(item)
        root = path[0]
        if root in ("train", "runtime") and len(path) == 2:
            data[root][path[1]] = value
        elif root in Suite.model_fields and len(path) == 1 and root not in ("methods", "task_params"):
            data[root] = value
        elif root in specs and len(path) == 2:
            specs[root].params[path[1]] = value
        elif root in task_names and len(path) == 2:
            data["task_params"].setdefault(root, {})[path[1]] = value
        elif root in registry.methods and len(path) == 2:
            raise BenchError(f"--set {item}: method {root!r} is not part of this run "
                             f"(methods: {', '.join(specs)})")
        else:
            roots = sorted({*Suite.model_fields} - {"methods", "task_params", "schema_version"})
            raise BenchError(
                f"--set {item}: unknown key {'.'.join(path)!r}. Valid keys: "
                f"{', '.join(roots)}, train.<field>, runtime.<field>, "
                f"<method>.<param> for {', '.join(specs)}, <task>.<param> for {', '.join(sorted(task_names))}"
            )
    data["methods"] = [s.model_dump() for s in specs.values()]
    try:
        return Suite.model_validate(data)
    except ValidationError as exc:
        raise BenchError("invalid --set value\n" + format_validation_error(exc, "", Suite)) from exc


# --------------------------------------------------------------------------------------------------
# Resolution: names and parameters checked against the registries
# --------------------------------------------------------------------------------------------------


def validate_params(model: type[BaseModel], values: dict[str, Any], where: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise BenchError(f"invalid parameters for {where}\n" + format_validation_error(exc, where, model)) from exc


class Resolved(BaseModel):
    """A suite with every name checked and every parameter validated and filled with defaults."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    suite: Suite
    tasks: list[tuple[str, list[str]]]  # (task, subtasks)
    method_params: dict[str, Any]  # name -> validated Params instance
    task_params: dict[str, Any]


REFERENCE_METHODS = ("teacher", "student")


def resolve(suite: Suite) -> Resolved:
    specs = suite.method_specs()
    if suite.references:
        listed = {s.name for s in specs}
        specs = [MethodSpec(name=r) for r in REFERENCE_METHODS if r not in listed] + specs
    names = [s.name for s in specs]
    for n in names:
        registry.methods.check(n)
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise BenchError(f"method listed twice: {', '.join(sorted(dupes))}")
    tasks = [registry.parse_task_spec(t) for t in suite.tasks]
    for key in suite.task_params:
        if key not in {t for t, _ in tasks}:
            raise BenchError(f"task_params.{key}: task {key!r} is not part of this suite "
                             f"(tasks: {', '.join(t for t, _ in tasks)})")
    method_params = {}
    for spec in specs:
        cls = registry.methods.get(spec.name)
        method_params[spec.name] = validate_params(cls.Params, spec.params, spec.name)
    task_params = {}
    for name, _ in tasks:
        cls = registry.tasks.get(name)
        task_params[name] = validate_params(cls.Params, suite.task_params.get(name, {}), name)
    for spec in specs:
        mcls = registry.methods.get(spec.name)
        for name, _ in tasks:
            if registry.tasks.get(name).domain not in mcls.domains:
                continue
            problem = mcls.check_task(method_params[spec.name], name, task_params[name])
            if problem:
                raise BenchError(f"{spec.name} on {name}: {problem}")
    return Resolved(suite=suite, tasks=tasks, method_params=method_params, task_params=task_params)


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
