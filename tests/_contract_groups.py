"""Which tests of the contract matrix run in one pytest-xdist worker (the README's test command runs
``-n auto --dist loadgroup``). ``tests/conftest.py`` schedules by this rule (pytest-xdist's own
``xdist_group`` marks are not applied under pytest 9, which ignores the node-id suffix they rely on), and
``tests/contract/test_registries.py`` builds its smoke matrix one group at a time by the same rule."""

from __future__ import annotations

#: Tasks whose subtasks share work, so that all of them run in one process: sam's subtasks are protocols of
#: one trained model; the lm task's teacher top-k cache is built by the first cell and read by the others.
WHOLE_TASKS = frozenset({"sam", "lm"})


def contract_group(task: str, subtask: str | None) -> str:
    """A subtask's group: the subtask, or the whole task where its subtasks share work."""
    return f"contract-{task}" if task in WHOLE_TASKS or subtask is None else f"contract-{task}-{subtask}"


def scope_of(nodeid: str) -> str:
    """The scheduling unit of a test: its contract group for the matrix tests (ids ``[task-subtask-method]``
    and ``[task]``), the test itself for everything else."""
    nodeid = nodeid.split("]@")[0] + ("]" if "]@" in nodeid else "")  # a future xdist's group suffix
    if "contract/test_registries.py::test_every_method_runs_on_every_task[" in nodeid:
        task, subtask, _ = nodeid[nodeid.index("[") + 1: nodeid.rindex("]")].split("-", 2)
        return contract_group(task, subtask)
    if "contract/test_registries.py::test_subtasks_that_share_training_evaluate_one_trained_model[" in nodeid:
        return contract_group(nodeid[nodeid.index("[") + 1: nodeid.rindex("]")], None)
    return nodeid
