"""Where a run's cells execute: ``local`` (the default) or ``ray``.

``local`` is `bench.runner.execute`: the cells one after another in this process.

``ray`` (``bench run --executor ray [--ray-address ADDR]``, the ``bench[ray]`` extra) runs each cell as a Ray
task (https://docs.ray.io/en/latest/ray-core/tasks.html) with the resources its hardware profile declares: the
profile's ``threads`` CPUs and, for a ``cuda`` profile, one GPU. The driver (this process) resolves every cell
and decides, with the same `bench.runner.plan_cell` as the local executor, which are skipped (their records
written here) and which finished earlier with the same resolved configuration (reused); only the rest are
submitted, and Ray is not started when nothing is left. A worker runs its cell with `bench.runner.run_one` —
the local executor's own function, so it checks again whether the cell has meanwhile been finished by another
worker, trains with the checkpoints of `bench.train`, and writes the record atomically into the same run store
(``--out``: a local folder, or a shared filesystem when the cluster has several machines; ``--cache-dir`` and
``--data-root`` likewise). A worker that dies mid-cell (killed, out of memory, node lost) is retried by Ray up to
`MAX_RETRIES` times and resumes from the cell's last checkpoint; exceptions raised by the cell are not retried
(``retry_exceptions=False``): they are recorded as a failed cell, as by the local executor. A cell whose
retries are exhausted gets a failed record written by the driver. The driver shows cells done/total and each
failure (`bench.progress`); the CLI then prints the same leaderboard as after a local run.

Deviations from "each cell one Ray task", and hardware:
- The subtasks of a task that share one training (`bench.api.Task.shared_training`, e.g. sam's box and point
  prompts) run in one Ray task per (method, seed), in subtask order, so the model is trained once and the later
  subtasks evaluate it, exactly as locally.
- A worker fingerprints its own machine: records carry the worker's hardware, and a worker that does not match
  the declared profile fails its cells (unless ``--allow-mismatch``) instead of filing numbers under a profile
  they were not measured on. With ``--ray-address`` the driver's own machine is not checked against
  ``--profile`` (it only schedules); without a declared profile the profile is derived from the driver's machine
  and a worker on different hardware is refused.

Workers need the same bench installation (Ray's ``runtime_env`` is not used to ship code); each record's
versions and git fields say what actually ran.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from bench import BenchError, progress

EXECUTORS = ("local", "ray")
#: Ray retries of a cell whose worker process died (system failures only; see the module docstring).
MAX_RETRIES = 3
#: Environment variables a remote worker gets from the driver (`bench.runner.ENV_VARS` less the device mask,
#: which Ray sets per task).
_FORWARDED = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED", "BENCH_DATA", "BENCH_CACHE")


def check_executor(name: str, ray_address: str | None) -> None:
    """Reject an unknown executor, ``--ray-address`` without Ray, and ``--executor ray`` where Ray is not
    installed (`bench.BenchError`: the CLI exits 2 before anything runs). Imports nothing heavy."""
    if name not in EXECUTORS:
        raise BenchError(f"--executor {name!r}: unknown executor; valid: {', '.join(EXECUTORS)}")
    if ray_address is not None and name != "ray":
        raise BenchError("--ray-address is only used with --executor ray")
    if name == "ray" and find_spec("ray") is None:
        raise BenchError("--executor ray needs Ray, which is not installed: pip install 'bench[ray]'")


def execute(resolved: Any, opts: Any, executor: str = "local", ray_address: str | None = None,
            allow_mismatch: bool = False, quiet: bool = False) -> Any:
    """Run every cell of ``resolved`` with ``executor``; returns `bench.runner.RunSummary`."""
    check_executor(executor, ray_address)
    if executor == "local":
        from bench.runner import execute as local

        return local(resolved, opts)
    return execute_ray(resolved, opts, ray_address, allow_mismatch=allow_mismatch, quiet=quiet)


@dataclass
class _Unit:
    """The cells one Ray task runs (one, or a shared training's subtasks) and their resolved configurations."""

    cells: list[Any] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)


def execute_ray(resolved: Any, opts: Any, address: str | None = None, *, allow_mismatch: bool = False,
                quiet: bool = False) -> Any:
    """The ``ray`` executor (see the module docstring). ``address``: a running cluster to connect to (as
    ``ray.init(address=...)`` takes it: ``auto``, ``HOST:PORT``, ``ray://HOST:10001``); None starts a local
    cluster on this machine's cores and stops it at the end."""
    import ray

    from bench import runner
    from bench.store import Store

    opts = replace(opts, out=Path(opts.out).expanduser().resolve(),
                   cache_dir=Path(opts.cache_dir).expanduser().resolve())
    started = False
    if address is not None:  # connect first: a wrong address is an error before anything is written
        started = _init(ray, address, quiet)
    store = Store(opts.out)
    provenance = runner.run_provenance(opts)
    run_started = datetime.now(timezone.utc).replace(microsecond=0).isoformat(timespec="seconds")
    order, outcomes, units = [], {}, {}
    total = runner.count_cells(resolved)
    try:
        with progress.bar("Cells", total) as overall:
            for cell, task in runner.cells(resolved, opts):
                order.append(cell)
                planned = runner.plan_cell(cell, task, resolved, opts, store, provenance)
                if isinstance(planned, runner.Outcome):
                    outcomes[cell] = planned
                    overall(len(outcomes), cell.id + (" (reused)" if planned.reused else f" {planned.status}"))
                    continue
                key = (cell.task, cell.method, cell.seed) if type(task).shared_training else cell
                unit = units.setdefault(key, _Unit())
                unit.cells.append(cell)
                unit.configs.append(planned.config)
            if units:
                if address is None:
                    started = _init(ray, None, quiet, need_cpus=_cpus(opts))
                    if _gpus(opts, None) and ray.cluster_resources().get("GPU", 0) < 1:
                        raise BenchError("the profile runs cells on a GPU, but Ray finds none on this machine")
                _run_units(ray, list(units.values()), resolved, opts, store, provenance, run_started, allow_mismatch,
                           address, outcomes, overall, total)
    finally:
        if started:
            ray.shutdown()
    summary = runner.RunSummary()
    summary.outcomes = [outcomes[c] for c in order]
    return summary


def _cpus(opts: Any) -> int:
    return max(1, int(opts.profile.get("threads") or 1))


def _gpus(opts: Any, address: str | None) -> int:
    """GPUs per cell: one where the profile's device is a GPU (the training loop runs on one device; a cell on
    several would run under torchrun). A local cluster runs on this machine's device (``opts.device``: the
    profile's, or this machine's under ``--allow-mismatch``); a remote one on the profile's."""
    device = opts.profile.get("device") if address is not None else opts.device
    return 1 if device == "cuda" else 0


def _machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init(ray: Any, address: str | None, quiet: bool, need_cpus: int = 1) -> bool:
    """Connect to ``address`` or start a local cluster; True when this call did it (and must shut it down)."""
    import logging

    if ray.is_initialized():  # a caller (a notebook, a test) already connected this process: use that
        return False
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": not quiet}
    if address is None:
        cores = _machine_cores()
        if need_cpus > cores:
            raise BenchError(f"the profile runs each cell on {need_cpus} threads (CPUs), but this machine has "
                             f"{cores} cores: a local Ray cluster could never place a cell; use a profile with "
                             f"fewer threads or --ray-address of a cluster with larger nodes")
        ray.init(address="local", num_cpus=cores, include_dashboard=False, **kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BenchError(f"--ray-address {address!r}: cannot connect to a Ray cluster ({exc})") from None
    return True


def _run_units(ray: Any, units: list[_Unit], resolved: Any, opts: Any, store: Any, provenance: dict[str, Any],
               run_started: str, allow_mismatch: bool, address: str | None, outcomes: dict, overall: Any,
               total: int) -> None:
    """Submit every unit, then collect outcomes as workers finish (updating the progress bar)."""
    cpus, gpus = _cpus(opts), _gpus(opts, address)
    _warn_unplaceable(ray, cpus, gpus)
    task_opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": MAX_RETRIES,
                                 "retry_exceptions": False}
    if address is not None:  # a local cluster's workers inherit this process's environment
        env = {k: os.environ[k] for k in _FORWARDED if k in os.environ}
        if env:
            task_opts["runtime_env"] = {"env_vars": env}
    remote = ray.remote(_run_unit)
    shared_resolved, shared_opts = ray.put(resolved), ray.put(opts)  # stored once, not once per task
    pending = {}
    for unit in units:
        ref = remote.options(name=f"bench:{unit.cells[0].id}", **task_opts).remote(
            unit.cells, shared_resolved, shared_opts, allow_mismatch)
        pending[ref] = unit
    n_cells = sum(len(u.cells) for u in units)
    progress.log(f"submitted {n_cells} cell{'s' if n_cells != 1 else ''} as {len(units)} Ray "
                 f"task{'s' if len(units) != 1 else ''} ({cpus} CPU{'s' if cpus != 1 else ''}"
                 f"{f', {gpus} GPU' if gpus else ''} each; cluster: {_describe(ray)})")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)  # a timeout keeps Ctrl-C responsive
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    results = ray.get(ref)
                    for o in results:  # the worker's log said so too, but Ray may not show it (--quiet)
                        if o.status == "failed":
                            progress.log(f"[red]failed[/red] {o.cell.id}: {o.reason}")
                except ray.exceptions.RayError as exc:
                    results = [_lost(cell, config, exc, store, opts, provenance, run_started)
                               for cell, config in zip(unit.cells, unit.configs)]
                for o in results:
                    outcomes[o.cell] = o
                    overall(len(outcomes), f"{o.cell.id} {'(reused)' if o.reused else o.status}"
                                           f" ({total - len(outcomes)} cells queued or running)")
    except BaseException:  # interrupted: stop the workers; unfinished cells resume from their checkpoints
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to stop
                pass
        raise


def _warn_unplaceable(ray: Any, cpus: int, gpus: int) -> None:
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        progress.log(f"[yellow]no node of the Ray cluster has {cpus} CPUs{f' and {gpus} GPU' if gpus else ''} now; "
                     f"the cells wait until one joins[/yellow]")


def _describe(ray: Any) -> str:
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node{'s' if nodes != 1 else ''}, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def _lost(cell: Any, config: dict[str, Any], exc: BaseException, store: Any, opts: Any,
          provenance: dict[str, Any], run_started: str) -> Any:
    """The outcome of a cell whose Ray task did not return (its worker died more than `MAX_RETRIES` times, or
    the task was cancelled): the record a worker wrote for it in this run if there is one (the cells of a
    shared training before the one that was lost), else a failed record written here."""
    from bench.config import config_hash
    from bench.runner import Outcome, record_failure

    rec = store.load(cell)
    if (rec and rec.get("status") in ("ok", "failed") and rec.get("config_hash") == config_hash(config)
            and str(rec.get("created") or "") >= run_started):
        return Outcome(cell, rec["status"], store.record_path(cell), reason=rec.get("reason"))
    import ray

    first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else ""
    what = f"{type(exc).__name__}{': ' + first if first else ''}"
    if isinstance(exc, ray.exceptions.RayTaskError):  # raised in the task, outside the cell's own handling
        error = BenchError(f"the Ray task running this cell raised {what}")
    else:
        error = BenchError(f"the Ray task running this cell did not finish (its worker was lost; Ray retries "
                           f"that {MAX_RETRIES} times): {what}; its checkpoint is kept, a rerun resumes it")
    return record_failure(cell, opts, store, config, provenance, error, tb=str(exc))


# --------------------------------------------------------------------------------------------------
# On the worker
# --------------------------------------------------------------------------------------------------


class _WorkerLog(progress.Silent):
    """A worker's `bench.progress` reporter: silent bars, messages to stderr (Ray shows them on the driver)."""

    def log(self, message: str) -> None:
        from rich.text import Text

        print(Text.from_markup(message).plain, file=sys.stderr, flush=True)


def _run_unit(cells: list[Any], resolved: Any, opts: Any, allow_mismatch: bool) -> list[Any]:
    """One Ray task: run ``cells`` (one, or a shared training's subtasks in order) with `bench.runner.run_one`
    on this worker's machine; return their outcomes."""
    from bench import runner
    from bench.store import Store

    progress.set_reporter(_WorkerLog())
    opts, refusal = _worker_options(opts, allow_mismatch)
    store = Store(opts.out)
    provenance = runner.run_provenance(opts)
    runner.set_threads(opts.profile)
    out = []
    tasks: dict[tuple[str, str], Any] = {}
    for cell in cells:
        if refusal is not None:
            out.append(runner.record_failure(cell, opts, store, None, provenance, BenchError(refusal), tb=""))
            continue
        key = (cell.task, cell.subtask)
        if key not in tasks:
            tasks[key] = runner.make_task(resolved, opts, cell.task, cell.subtask)
        t0 = time.perf_counter()
        outcome = runner.run_one(cell, tasks[key], resolved, opts, store, provenance)
        progress.log(f"{cell.id}: {outcome.status}{' (reused)' if outcome.reused else ''} in "
                     f"{time.perf_counter() - t0:.1f} s on {os.uname().nodename}")
        out.append(outcome)
    return out


def _worker_options(opts: Any, allow_mismatch: bool) -> tuple[Any, str | None]:
    """``opts`` with the profile checked against, and recording, this worker's own hardware; and the reason
    to refuse the cells when the worker does not match the profile (None: it matches, or mismatches are
    allowed)."""
    from bench.measure.hardware import fingerprint, fingerprint_id
    from bench.profiles import Profile, mismatches

    fp = fingerprint()
    prof = dict(opts.profile)
    kind = fp.get("device_kind", "cpu")
    if prof.get("kind") == "declared":
        declared = Profile.model_validate({k: prof[k] for k in Profile.model_fields if k in prof})
        problems = mismatches(declared, fp)
        device = declared.device if declared.device == kind else kind
        fix = "pass --allow-mismatch (rows are then marked unverified) or run on nodes that match"
    else:
        same = fingerprint_id(fp) == fingerprint_id(prof.get("hardware") or {})
        problems = [] if same else ["its hardware differs from the driver's, which the derived profile describes"]
        device = opts.device
        fix = "pass --profile ID naming the workers' hardware profile"
    prof.update(hardware=fp, verified=not problems, mismatches=problems, run_device=device)
    refusal = None
    if problems and not allow_mismatch:
        refusal = (f"Ray worker {os.uname().nodename} does not match hardware profile {prof['id']!r}: "
                   + "; ".join(problems) + f"; {fix}")
    return replace(opts, profile=prof, device=device), refusal
