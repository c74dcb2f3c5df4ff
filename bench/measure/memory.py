"""Peak memory of one inference call, measured in an isolated child process.

Why a child process (measurement.md §6): on CPU nothing in-process is both exact and resettable.
``tracemalloc`` does not see torch's CPU allocator at all (pytorch/pytorch#91823), RSS sampling misses
short spikes (optimum-benchmark polls every 10 ms, §1.3), and the kernel high-water mark
(``ru_maxrss`` = ``VmHWM``) is exact but remembers everything the process ever did. So every measurement
runs in a fresh process whose high-water mark we control.

How (chosen after experiments on the development machine):

- **forkserver** (`multiprocessing.get_context("forkserver")`) with ``set_forkserver_preload(["torch",
  ...])``: one server process per parent, started lazily, imports torch once (≈ 2-3 s) and never allocates
  big tensors or runs OpenMP regions (forking after OpenMP has run is unsafe). Each measurement is a cheap
  fork of that clean server, so it neither inherits the parent's heap nor pays the torch import again.
- In the child, the kernel high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs`` (Linux;
  verified on the development machine), and ``VmRSS``/``VmHWM`` are read from ``/proc/self/status``:

  1. import what unpickling will need, load the inputs, then reset the mark and read ``VmRSS`` as the
     **baseline** (inputs are the caller's data, not the model's cost);
  2. ``torch.load`` the model (written by the parent with ``torch.save``) → ``model_bytes`` = RSS − baseline;
  3. reset the mark again (so load-time transients of the zip reader do not count), run
     ``forward(model, inputs)`` once under ``torch.inference_mode()``, read ``VmHWM``;
  4. ``peak_bytes`` = VmHWM − baseline (weights + working memory); ``working_bytes`` = VmHWM − RSS after
     load.

- **Fallback** where ``/proc/self/clear_refs`` is not writable (macOS, locked-down kernels): a freshly
  *spawned* process and ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS —
  normalised here, §6). That mark cannot be reset, so it also covers the interpreter start and the
  torch import; the ``method`` field says so and ``exact`` is False.
- **CUDA** (written, not run on the development machine): ``torch.cuda.reset_peak_memory_stats()`` and a
  synchronize, then ``max_memory_allocated()`` minus what was allocated before the model was loaded
  (§1.3, §6: exact and resettable); reserved memory is reported too, and host RSS as a secondary field.
  NVML process memory is not used: in containers it reports host PIDs (§1.3).

The probe runs **one** call (the first call, as a deployed process would see it, including one-time
allocations such as oneDNN primitive caches and OpenMP thread stacks) and is separate from the latency
probe, so neither disturbs the other (optimum-benchmark does the same, §1.3).

Errors in the child come back as `MeasurementError` with the child's traceback; a child that hangs is
killed after ``timeout`` seconds and one that dies (e.g. the OOM killer, exit code -9) is reported with its
exit code — the parent never waits forever.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import pickle
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.measure._errors import MeasurementError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["clear_refs_supported", "measure_peak_memory", "run_isolated"]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"

# The one forkserver of this process. multiprocessing keeps a single forkserver per process anyway;
# what we remember is which modules it was asked to preload, because preloading only takes effect when
# the server starts (modules asked for later are imported in each child, before its baseline).
_server_lock = threading.Lock()
_server_preload: tuple[str, ...] | None = None


# --------------------------------------------------------------------------------------------------
# Isolated execution (generic plumbing; the memory probe below uses it, latency could too)
# --------------------------------------------------------------------------------------------------


def clear_refs_supported() -> bool:
    """Whether this platform lets a process reset its own RSS high-water mark (Linux /proc)."""
    return sys.platform.startswith("linux") and os.access(_CLEAR_REFS, os.W_OK)


def _forkserver_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    global _server_preload
    ctx = multiprocessing.get_context("forkserver")
    with _server_lock:
        if _server_preload is None:
            # Takes effect when the server starts, i.e. at the first Process.start() below. If someone
            # else in this process already started the forkserver, the preload is ignored; correctness
            # does not depend on it (children import what they need before their baseline).
            ctx.set_forkserver_preload(list(preload))
            _server_preload = tuple(preload)
    return ctx


def _child_main(conn, target: Callable[..., Any], args: tuple) -> None:
    """Entry point of the child: run ``target(*args)`` and send ("ok", result) or ("error", traceback)."""
    try:
        result = target(*args)
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 -- report everything, SystemExit included, to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(
    target: Callable[..., Any],
    args: tuple = (),
    *,
    what: str = "isolated measurement",
    preload: Sequence[str] = ("torch",),
    timeout: float = 300.0,
    start_method: str = "forkserver",
) -> Any:
    """Run ``target(*args)`` in a child process and return its (picklable) result.

    ``start_method`` is ``"forkserver"`` (default; see the module docstring) or ``"spawn"`` (a fresh
    interpreter: slower, needed where a fork of a shared server is unsuitable). ``target`` must be a
    module-level function and ``args`` picklable. As for any spawn/forkserver child, the parent's
    ``__main__`` is re-imported in the child under the name ``__mp_main__``, so a main script needs the usual
    ``if __name__ == "__main__":`` guard and must be a file (not stdin). Raises `MeasurementError` naming ``what`` if the child
    raises (with its traceback), dies, or runs longer than ``timeout`` seconds (then it is killed).
    """
    if start_method == "forkserver":
        ctx = _forkserver_context(preload)
    else:
        ctx = multiprocessing.get_context(start_method)
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(sender, target, args), name=f"bench-{what}", daemon=True)
    try:
        process.start()
    except Exception as exc:  # typically a pickling error in target/args
        receiver.close()
        sender.close()
        raise MeasurementError(f"{what}: could not start the child process: {exc!r}") from exc
    sender.close()  # keep only the child's copy, so EOF is seen if the child dies
    received = False
    try:
        if not receiver.poll(timeout):
            raise MeasurementError(f"{what}: timed out after {timeout:g} s in the child process; killed it")
        try:
            status, payload = receiver.recv()
            received = True
        except EOFError:
            process.join(5)
            raise MeasurementError(
                f"{what}: the child process died without reporting (exit code {process.exitcode}; "
                "a negative code is the signal that killed it, -9 is often the out-of-memory killer)"
            ) from None
    finally:
        receiver.close()
        if received:
            process.join(5)  # it has reported and is exiting
        if process.is_alive():  # hung, or slow to exit: never leave it behind
            process.kill()
            process.join(5)
    if status == "error":
        raise MeasurementError(f"{what} failed in the child process:\n{payload}")
    return payload


# --------------------------------------------------------------------------------------------------
# Reading process memory (child side)
# --------------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` from /proc/self/status, in bytes (the file reports kB = KiB)."""
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise MeasurementError(f"{field} not found in {_STATUS}")


def _reset_high_water_mark() -> None:
    # "5" resets the peak RSS (VmHWM) to the current RSS (Linux Documentation/filesystems/proc.rst).
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")


def _current_rss() -> int:
    if sys.platform.startswith("linux"):
        return _proc_status_bytes("VmRSS")
    import psutil

    return int(psutil.Process().memory_info().rss)


def _ru_maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # KiB on Linux and the BSDs, bytes on macOS (getrusage(2) on each; measurement.md §6)
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _import_all(modules: Iterable[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MeasurementError(f"could not import {name!r} in the measurement child: {exc}") from exc


def _to_device(inputs: dict, device: str) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _memory_child(
    model_path: str,
    inputs_path: str,
    forward_bytes: bytes,
    modules: tuple[str, ...],
    device: str,
    threads: int | None,
    use_clear_refs: bool,
    train: bool = False,
) -> dict[str, Any]:
    """The measurement itself, run in the child. See the module docstring for the steps."""
    # What the child inherited from the forkserver (torch, the preloaded modules) is live, not garbage: freezing it
    # lets the collection before the baseline walk only what this child creates (it costs 0.1-0.25 s otherwise).
    gc.freeze()
    _import_all(modules)  # everything unpickling will import, so imports are not charged to the model
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    forward = pickle.loads(forward_bytes)
    inputs = torch.load(inputs_path, weights_only=False)
    if device.startswith("cuda"):
        return _cuda_child(model_path, inputs, forward, device, train)

    gc.collect()
    if use_clear_refs:
        try:
            _reset_high_water_mark()
        except OSError:
            use_clear_refs = False  # parent said it would work; degrade to the unresettable mark
    baseline = _current_rss()
    hwm_before_load = _proc_status_bytes("VmHWM") if use_clear_refs else _ru_maxrss_bytes()

    t0 = time.perf_counter()
    model = torch.load(model_path, weights_only=False, map_location="cpu")  # we wrote it ourselves
    model.eval()
    load_s = time.perf_counter() - t0
    after_load = _current_rss()
    load_peak = (_proc_status_bytes("VmHWM") if use_clear_refs else _ru_maxrss_bytes()) - baseline
    if use_clear_refs:
        _reset_high_water_mark()  # load-time transients (zip reader buffers) are not inference memory

    _call(model, inputs, forward, train)
    hwm = _proc_status_bytes("VmHWM") if use_clear_refs else _ru_maxrss_bytes()

    if use_clear_refs:
        method = ("isolated forkserver child; VmHWM reset via /proc/self/clear_refs before load and "
                  "before the call; peak = VmHWM - VmRSS baseline before model load")
    else:
        method = ("isolated spawned child; peak = ru_maxrss - RSS baseline before model load; ru_maxrss "
                  "cannot be reset, so it also covers interpreter start-up and imports (an upper bound)")
    return {
        "device": "cpu",
        "mode": "train" if train else "inference",
        "peak_bytes": hwm - baseline,
        "model_bytes": after_load - baseline,
        "working_bytes": hwm - after_load,
        "baseline_bytes": baseline,
        "load_peak_bytes": load_peak,
        "hwm_before_load_bytes": hwm_before_load,
        "exact": use_clear_refs,
        "method": method,
        "load_s": load_s,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
    }


def _call(model: Any, inputs: dict, forward: Callable, train: bool) -> None:
    """One inference call, or one training step: ``forward`` returns the loss, then backward and an AdamW
    step (whose two moment buffers are allocated at the first step, as in a real run)."""
    import torch

    if not train:
        with torch.inference_mode():
            out = forward(model, inputs)
        del out
        return
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    loss = forward(model, inputs)
    loss.backward()
    optimizer.step()
    del loss, optimizer


def _cuda_child(model_path: str, inputs: dict, forward: Callable, device: str, train: bool = False) -> dict[str, Any]:
    """CUDA allocator counters (exact and resettable, §6). Not exercised on the development machine."""
    import torch

    dev = torch.device(device)
    if dev.index is not None:
        torch.cuda.set_device(dev.index)
    inputs = _to_device(inputs, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    host_baseline = _current_rss()
    torch.cuda.reset_peak_memory_stats()

    model = torch.load(model_path, weights_only=False, map_location=device)
    model.eval()
    torch.cuda.synchronize()
    after_load = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # peak of the call only, not of the load

    _call(model, inputs, forward, train)
    torch.cuda.synchronize()
    peak_allocated = torch.cuda.max_memory_allocated()
    peak_reserved = torch.cuda.max_memory_reserved()
    host_peak = (_proc_status_bytes("VmHWM") if sys.platform.startswith("linux") else _ru_maxrss_bytes())
    return {
        "device": device,
        "mode": "train" if train else "inference",
        "peak_bytes": peak_allocated - before,
        "model_bytes": after_load - before,
        "working_bytes": peak_allocated - after_load,
        "baseline_bytes": before,
        "reserved_peak_bytes": peak_reserved,
        "host_peak_rss_bytes": host_peak - host_baseline,
        "exact": True,
        "method": ("isolated forkserver child; torch.cuda.max_memory_allocated after "
                   "reset_peak_memory_stats + synchronize, minus allocated before model load"),
        "pid": os.getpid(),
        "gpu_name": torch.cuda.get_device_name(),
    }


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _modules_to_import(model: nn.Module, forward: Callable, preload: Sequence[str]) -> tuple[str, ...]:
    """Modules the child must import before its baseline: preloads, and the modules defining the model's
    (sub)module classes and the forward callable (so unpickling them imports nothing new)."""
    names = list(preload)
    names += sorted({type(m).__module__ for m in model.modules()})
    owner = getattr(forward, "__self__", None)
    for obj in (forward, type(owner) if owner is not None else None):
        module = getattr(obj, "__module__", None)
        if module and module not in ("__main__", "__mp_main__"):
            names.append(module)
    return tuple(dict.fromkeys(n for n in names if n and n not in ("__main__", "builtins")))


def measure_peak_memory(
    model: nn.Module,
    forward: Callable[[nn.Module, dict], Any],
    inputs: dict,
    *,
    device: str = "cpu",
    preload: Sequence[str] = ("torch",),
    timeout: float = 300.0,
    threads: int | None = None,
    workdir: str | os.PathLike | None = None,
    train: bool = False,
) -> dict[str, Any]:
    """Peak memory of one ``forward(model, inputs)`` call under ``torch.inference_mode``, in a child.

    With ``train=True`` the measured call is one training step instead: ``forward`` must return the
    loss; the child runs it in train mode, back-propagates and takes one AdamW step, so the peak covers
    weights, gradients, the optimiser's two moment buffers and the activations kept for backward.

    ``forward`` must be picklable (a module-level function, or a bound method of a picklable object such
    as a Task); ``inputs`` is a dict of tensors (its batch size is the caller's to record). ``preload``
    names modules the forkserver imports once (e.g. ``("torch", "transformers")``); it only matters the
    first time the server starts. ``threads`` sets ``torch.set_num_threads`` in the child (per-thread
    scratch buffers make peak memory depend slightly on it). The model and inputs are written with
    ``torch.save`` to a temporary directory (``workdir`` if given) that is removed afterwards.

    Returns a JSON-able dict: ``peak_bytes`` (VmHWM − baseline: weights + working memory), ``model_bytes``,
    ``working_bytes``, ``baseline_bytes``, ``exact``, ``method``, ``device`` and a few diagnostic fields
    (see `_memory_child` / `_cuda_child`). Raises `MeasurementError` on any failure.
    """
    import torch

    if not (device == "cpu" or device.startswith("cuda")):
        # MPS and other backends have no resettable peak counter (measurement.md §6), and measuring host
        # RSS would silently describe a CPU run instead.
        raise MeasurementError(f"peak memory on device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    try:
        forward_bytes = pickle.dumps(forward)
    except Exception as exc:
        raise MeasurementError(
            f"peak memory: forward {forward!r} is not picklable ({exc}); pass a module-level function "
            "or a bound method of a picklable object"
        ) from exc
    modules = _modules_to_import(model, forward, preload)

    use_clear_refs = clear_refs_supported()
    cuda = device.startswith("cuda")
    # The forkserver path needs a resettable mark on CPU; CUDA counters are resettable anyway.
    start_method = "forkserver" if (cuda or use_clear_refs) and sys.platform != "win32" else "spawn"

    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=workdir) as tmp:
        model_path = str(Path(tmp) / "model.pt")
        inputs_path = str(Path(tmp) / "inputs.pt")
        try:
            torch.save(model, model_path)
            torch.save(inputs, inputs_path)
        except Exception as exc:
            raise MeasurementError(
                f"peak memory: could not save the model or inputs for the child process ({exc!r}); the "
                "model must be picklable (module-level classes, no lambdas or hooks holding closures)"
            ) from exc
        result = run_isolated(
            _memory_child,
            (model_path, inputs_path, forward_bytes, modules, device, threads,
             use_clear_refs and start_method == "forkserver", train),
            what=f"peak memory of {type(model).__name__} on {device}",
            preload=preload,
            timeout=timeout,
            start_method=start_method,
        )
    result["start_method"] = start_method
    return result
