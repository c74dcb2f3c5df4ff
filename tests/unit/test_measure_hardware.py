"""Hardware fingerprint: the fields are there, JSON-serialisable, and the id is stable and hardware-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.measure.hardware import IDENTITY_FIELDS, fingerprint, fingerprint_id

REQUIRED = {
    "device_kind", "cpu_model", "machine", "physical_cores", "logical_cores", "affinity_cpus",
    "affinity_cpu_count", "ram_bytes", "ram_gib", "os", "platform", "python_version", "torch_version",
    "torch_threads", "cuda_available", "gpu_count", "gpus", "cuda_version", "cudnn_version",
    "driver_version",
}


def test_fingerprint_fields_and_json():
    fp = fingerprint()
    assert REQUIRED <= set(fp)
    assert set(IDENTITY_FIELDS) <= set(fp)
    assert fp["device_kind"] in ("cpu", "cuda")
    assert fp["logical_cores"] >= 1 and fp["ram_bytes"] > 0 and fp["cpu_model"]
    assert fp["torch_threads"] >= 1
    if hasattr(os, "sched_getaffinity"):
        assert fp["affinity_cpus"] == sorted(os.sched_getaffinity(0))
    assert fp["gpu_count"] == len(fp["gpus"])
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_id_is_stable_and_ignores_volatile_fields():
    a, b = fingerprint(), fingerprint()
    assert fingerprint_id(a) == fingerprint_id(b)
    assert len(fingerprint_id(a)) == 12
    changed_software = {**a, "torch_version": "0.0.0", "torch_threads": 99, "python_version": "2.7",
                        "affinity_cpus": [0], "ram_bytes": (a["ram_bytes"] or 0) + 12345}
    assert fingerprint_id(changed_software) == fingerprint_id(a)
    assert fingerprint_id({**a, "cpu_model": "Some Other CPU"}) != fingerprint_id(a)
    gpu = {"name": "NVIDIA H100", "total_memory_gib": 80, "capability": "9.0", "index": 0}
    with_gpu = {**a, "device_kind": "cuda", "gpu_count": 1, "gpus": [gpu]}
    other_driver = {**with_gpu, "driver_version": "1.2.3", "gpus": [{**gpu, "multiprocessors": 132}]}
    assert fingerprint_id(with_gpu) == fingerprint_id(other_driver) != fingerprint_id(a)


def test_package_import_does_not_import_torch():
    """DESIGN.md style rule 4: `import bench.measure` stays cheap; names resolve lazily."""
    root = Path(__file__).resolve().parents[2]
    code = ("import sys, bench.measure as m; assert 'torch' not in sys.modules, 'torch imported'; "
            "f = m.count_flops; print(f.__module__)")
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bench.measure.flops"
