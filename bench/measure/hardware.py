"""The hardware fingerprint recorded on every run record.

Fields follow measurement.md §1.5 (optimum-benchmark's ``get_system_info``: CPU model from
``/proc/cpuinfo``, core count, RAM, platform, python) plus what §1.5 notes it does *not* record and §7.1
asks for (threads, driver/CUDA/cuDNN versions, per-GPU memory and capability), and the CPUs this process
may actually run on (``os.sched_getaffinity``), which in containers is often fewer than the machine has.

`fingerprint_id` hashes only the fields that identify the *hardware* (CPU model and counts, RAM rounded to
GiB, GPU names, memory and capability), not software versions or per-run settings, so the same machine
keeps its id across torch upgrades and thread settings, and profiles can be matched against it (§7.1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["IDENTITY_FIELDS", "fingerprint", "fingerprint_id"]

#: Fields of `fingerprint` that identify the hardware (see `fingerprint_id`).
IDENTITY_FIELDS = ("device_kind", "machine", "cpu_model", "physical_cores", "logical_cores", "ram_gib",
                   "gpu_count", "gpus")
_GPU_IDENTITY_FIELDS = ("name", "total_memory_gib", "capability")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                # x86 says "model name"; some ARM kernels say "Hardware" or "Processor"
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> int | None:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    # Linux without psutil: distinct (physical id, core id) pairs
    try:
        cores, phys = set(), "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    cores.add((phys, value.strip()))
        return len(cores) or None
    except OSError:
        return None


def _total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_limits() -> dict[str, Any]:
    """cgroup v2 CPU quota and memory limit: what a container may really use (None when unlimited)."""
    limits: dict[str, Any] = {"cgroup_cpu_limit": None, "cgroup_memory_limit_bytes": None}
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            limits["cgroup_cpu_limit"] = int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            value = f.read().strip()
        if value != "max":
            limits["cgroup_memory_limit_bytes"] = int(value)
    except (OSError, ValueError):
        pass
    return limits


def _nvidia_driver_version() -> str | None:
    """The NVIDIA driver version (torch exposes only the CUDA runtime version)."""
    try:
        import pynvml  # optional

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing or NVML unusable: try nvidia-smi
        log.debug("pynvml could not report the driver version", exc_info=True)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _gpu_info(torch) -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_available": False, "gpu_count": 0, "gpus": [], "cuda_version": None,
                            "cudnn_version": None, "driver_version": None}
    try:
        available = torch.cuda.is_available()
    except Exception:  # a broken driver must not break the record
        log.debug("torch.cuda.is_available() failed", exc_info=True)
        available = False
    if not available:
        return info
    info["cuda_available"] = True
    info["cuda_version"] = torch.version.cuda or getattr(torch.version, "hip", None)
    try:
        info["cudnn_version"] = torch.backends.cudnn.version()
    except Exception:  # optional field
        log.debug("cuDNN version unavailable", exc_info=True)
    info["driver_version"] = _nvidia_driver_version()
    count = torch.cuda.device_count()
    info["gpu_count"] = count
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        info["gpus"].append({
            "index": i,
            "name": props.name,
            "total_memory_bytes": int(props.total_memory),
            "total_memory_gib": round(props.total_memory / 2**30),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": getattr(props, "multi_processor_count", None),
        })
    return info


def fingerprint() -> dict[str, Any]:
    """Describe this machine and software stack as a JSON-able dict (see the module docstring)."""
    import torch

    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS/Windows
        affinity = None
    ram = _total_ram_bytes()
    gpu = _gpu_info(torch)
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    fp: dict[str, Any] = {
        "device_kind": "cuda" if gpu["cuda_available"] else "cpu",
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "physical_cores": _physical_cores(),
        "logical_cores": os.cpu_count(),
        "affinity_cpus": affinity,
        "affinity_cpu_count": len(affinity) if affinity is not None else os.cpu_count(),
        "ram_bytes": ram,
        # rounded for the identity hash: MemTotal moves by a few MB across kernels and boots
        "ram_gib": round(ram / 2**30) if ram else None,
        **_cgroup_limits(),
        "os": platform.system(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mps_available": mps,
        **gpu,
    }
    return fp


def fingerprint_id(fp: dict[str, Any]) -> str:
    """A short stable hash (12 hex digits) of the hardware-identifying fields of ``fp``."""
    identity = {k: fp.get(k) for k in IDENTITY_FIELDS}
    identity["gpus"] = [{k: g.get(k) for k in _GPU_IDENTITY_FIELDS} for g in fp.get("gpus") or []]
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
