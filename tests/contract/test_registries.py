"""Contract tests over every registered method and task: they run on the smoke tier, produce complete
records, and follow the project's conventions (documented defaults, declared metrics)."""

from __future__ import annotations

import pytest

from bench import registry
from bench.api import Method, Task, TaskEnv
from bench.config import Suite, resolve
from bench.runner import RunOptions, execute
from bench.store import read_record

from _contract_groups import WHOLE_TASKS, contract_group, scope_of

METHODS = registry.methods.names()
TASKS = registry.tasks.names()


def test_builtins_are_registered():
    assert {"teacher", "student", "kd", "taid", "minima"} <= set(METHODS)
    assert "glue" in TASKS


@pytest.mark.parametrize("name", METHODS)
def test_method_class_contract(name):
    cls = registry.methods.get(name)
    assert issubclass(cls, Method) and cls.name == name
    assert cls.domains, "a method declares the task domains it supports"
    doc = (cls.__doc__ or "").strip()
    assert doc, "the class docstring names the paper"
    module_doc = __import__(cls.__module__, fromlist=["_"]).__doc__ or ""
    if cls.role == "distill":
        assert any(ch.isdigit() for ch in doc + module_doc), "the paper (with its year) is cited"
        assert "official code" in module_doc.lower() or "official" in module_doc.lower()
    for field, info in cls.Params.model_fields.items():
        assert info.description, f"{name}.{field} has no description"
        assert not info.is_required(), f"{name}.{field} has no default (the paper's default belongs here)"
    assert cls.Params.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("name", TASKS)
def test_task_class_contract(name, tmp_path):
    cls = registry.tasks.get(name)
    assert issubclass(cls, Task) and cls.name == name and cls.subtasks and cls.version
    for field, info in cls.Params.model_fields.items():
        assert info.description, f"{name}.{field} has no description"
    for sub in cls.subtasks:
        task = cls(cls.Params(), TaskEnv(tier="smoke", subtask=sub, data_root=None, cache_dir=tmp_path))
        metrics = task.metrics()
        assert sum(m.primary for m in metrics) == 1, f"{name}/{sub} declares exactly one primary metric"
        assert task.unavailable() is None, "the smoke tier needs nothing from outside"


def test_contract_groups_keep_shared_work_in_one_process():
    """A task whose subtasks share one training, or the lm task's teacher cache, must run as one group (else a
    worker would train or build again what another already did, or the shared-training test would fail)."""
    for t in TASKS:
        cls = registry.tasks.get(t)
        if cls.shared_training or t == "lm":
            assert t in WHOLE_TASKS, t
        subs = {contract_group(t, s) for s in cls.subtasks}
        assert len(subs) == (1 if t in WHOLE_TASKS else len(cls.subtasks))
        node = f"tests/contract/test_registries.py::test_every_method_runs_on_every_task[{t}-{cls.subtasks[0]}-kd]"
        assert scope_of(node) == contract_group(t, cls.subtasks[0])


@pytest.fixture(scope="module")
def smoke_matrix(tmp_path_factory, cache_dir):
    """Every registered method on every subtask of every task, smoke tier, a short budget: ``smoke_matrix(task,
    subtask)`` runs (once per process) the group holding that subtask and returns its records."""
    from bench.profiles import detect_profile

    done: dict[str, dict] = {}

    def of(task: str, subtask: str) -> dict:
        group = contract_group(task, subtask)
        if group not in done:
            subs = registry.tasks.get(task).subtasks if group == f"contract-{task}" else (subtask,)
            out = tmp_path_factory.mktemp(group)
            params = {"teacher_steps": 40} if task in ("glue", "lm", "sam", "charades_sta") else {}
            suite = Suite(tasks=[f"{task}/{','.join(subs)}"], methods=METHODS, seeds=[0], tier="smoke", out=str(out),
                          train={"steps": 4}, runtime={"measure": False}, task_params={task: params})
            summary = execute(resolve(suite), RunOptions(out=out, cache_dir=cache_dir, data_root=None,
                                                         profile=detect_profile()))
            done[group] = {(o.cell.task, o.cell.subtask, o.cell.method): (o, read_record(o.path))
                           for o in summary.outcomes}
        return done[group]

    return of


def _cases():
    for t in TASKS:
        for sub in registry.tasks.get(t).subtasks:
            for m in METHODS:
                yield t, sub, m


@pytest.mark.parametrize("task,subtask,method", list(_cases()))
def test_every_method_runs_on_every_task(smoke_matrix, cache_dir, task, subtask, method):
    outcome, rec = smoke_matrix(task, subtask)[(task, subtask, method)]
    if rec["status"] == "skipped":
        assert rec["reason"], "a skipped cell says why"
        return
    assert rec["status"] == "ok", rec.get("traceback")
    cls = registry.tasks.get(task)
    declared = {m.name for m in cls(cls.Params(), TaskEnv("smoke", subtask, None, cache_dir)).metrics()}
    assert set(rec["metrics"]) == declared
    assert all(isinstance(v, float) for v in rec["metrics"].values())
    assert rec["score"] is not None and rec["config_hash"] and rec["versions"]["torch"]
    eff = rec["efficiency"]
    assert eff["params"] > 0 and eff["flops_per_sample"] > 0 and eff["flops_uncounted"] == []
    assert rec["data"]["train"]["sha256"] and rec["hardware"]
    cls_m = registry.methods.get(method)
    training_free = cls_m.training_free
    if not cls_m.uses_task_teacher:  # self-distillation (earlier generations) or peers (federated clients)
        assert rec["teacher"]["name"] == "self" and cls_m.own_teacher_note in rec["teacher"]["note"]
        if cls_m.generations is not Method.generations:  # an earlier generation teaches the later ones
            assert rec["training"]["previous_generation_forward_passes"] >= 1
    elif method not in ("teacher", "student") and not training_free and not cls_m.teacher_init_only:
        # A cell reading teacher outputs a task keeps on disk (the lm task's top-k cache, built by the first
        # cell that needed it) runs no teacher pass itself; its record says the cache was used.
        assert (rec["training"]["teacher_forward_passes"] >= 1
                or (rec["training"].get("teacher_cache") or {}).get("used"))
        assert rec["teacher"]["name"]
    if cls_m.teacher_init_only:  # the teacher initialises the student and is never run afterwards
        assert rec["training"]["teacher_forward_passes"] == 0 and rec["teacher"]["name"]
    if training_free:  # trains nothing: the record says 0 steps, whatever the budget
        assert rec["training"]["steps"] == 0 and rec["teacher"]["name"]
    elif method != "teacher":
        assert rec["training"]["steps"] == 4


SHARED = [t for t in TASKS if registry.tasks.get(t).shared_training]


def test_a_task_shares_training():
    assert SHARED, "sam's box and point protocols share one trained model"


@pytest.mark.parametrize("task", SHARED)
def test_subtasks_that_share_training_evaluate_one_trained_model(smoke_matrix, task):
    """A task whose subtasks are protocols of one model (``Task.shared_training``, e.g. sam's box and point)
    trains each method once: the later subtasks' records evaluate the model the first one trained and say so."""
    checked = 0
    first, *rest = registry.tasks.get(task).subtasks
    matrix = smoke_matrix(task, first)
    for m in METHODS:
        _, a = matrix[(task, first, m)]
        if m == "teacher" or a["status"] != "ok":
            continue
        shared = a["training"]["shared"]
        assert shared["reused"] is False and shared["trained_in"] == a["cell_id"]
        for sub in rest:
            _, b = matrix[(task, sub, m)]
            assert b["status"] == "ok", b.get("traceback")
            assert b["training"]["shared"] == {**shared, "reused": True}
            assert b["training"]["loss_log"] == a["training"]["loss_log"]
            assert b["method_info"] == a["method_info"]
            assert set(b["metrics"]) != set(a["metrics"])  # evaluated by its own protocol
            checked += 1
    assert checked >= 3
