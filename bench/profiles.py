"""Hardware profiles: the declared machine a row's efficiency numbers belong to.

Without ``--profile`` an ad-hoc profile is derived from the detected machine; its id names the device,
the thread count and a short hash of the hardware fingerprint, so rows from different machines never
share a profile id by accident.
"""

from __future__ import annotations

from typing import Any

from bench import BenchError


def detect_profile() -> dict[str, Any]:
    from bench.measure.hardware import fingerprint, fingerprint_id

    fp = fingerprint()
    device = "cuda" if fp.get("cuda_available") else "cpu"
    threads = fp.get("torch_threads") or 1
    return {
        "id": f"auto-{device}-{threads}t-{fingerprint_id(fp)[:6]}",
        "kind": "auto",
        "device": device,
        "dtype": "float32",
        "threads": threads,
        "latency_batch_sizes": [1],
        "throughput_batch_size": 32,
        "verified": True,
        "hardware": fp,
    }


def select_profile(profile_id: str | None) -> dict[str, Any]:
    if profile_id is None:
        return detect_profile()
    raise BenchError(f"unknown hardware profile {profile_id!r}; omit --profile to derive one from this machine")
