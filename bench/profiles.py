"""Hardware profiles: the declared machine a row's efficiency numbers belong to.

A profile is data (``leaderboards/profiles/<id>.yaml``, strict schema below): which device it is, how
to recognise it, the threads, dtype and batch sizes measurements use, and its declared peak dense
FLOP/s and memory (never hard-coded in code). ``bench run --profile ID`` checks the detected hardware
against the profile and refuses on a mismatch unless ``--allow-mismatch`` is given; such rows are
marked unverified in records and tables. Without ``--profile`` an ad-hoc profile is derived from the
detected machine; its id names the device, thread count and a short hash of the hardware fingerprint,
so rows from different machines never share a profile id by accident.

Profiles are looked up in ``$BENCH_PROFILES`` (a folder), then ``./leaderboards/profiles``, then the
``leaderboards/profiles`` folder of the checkout bench runs from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import bench
from bench import BenchError

SCHEMA_VERSION = 1


class Timing(BaseModel):
    """Latency protocol: warm-up calls, then timed blocks until both minimums are met."""

    model_config = ConfigDict(extra="forbid")
    min_run_time: float = Field(1.0, gt=0, description="seconds of timed blocks, at least")
    min_count: int = Field(10, ge=1, description="timed blocks, at least")
    warmup: int = Field(10, ge=0, description="untimed calls first")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="short id used in record paths")
    description: str = ""
    device: Literal["cpu", "cuda", "mps"]
    name_pattern: str = Field(".*", description="regex matched against the CPU model (cpu) or each GPU name")
    device_count: int = Field(1, ge=1, description="GPUs (cuda/mps); 1 for cpu")
    cpu_count: int | None = Field(None, ge=1, description="logical CPUs available to the process; null: any")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int = Field(ge=1, description="torch intra-op threads for training and measurement")
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    throughput_batch_size: int = Field(32, ge=1)
    peak_flops: dict[str, float] = Field(description="declared peak dense FLOP/s per dtype (datasheet)")
    memory_bytes: int = Field(gt=0, description="RAM (cpu) or memory per device (cuda/mps)")
    timing: Timing = Field(default_factory=Timing)
    source: str = Field("", description="where the declared numbers come from")

    @field_validator("name_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v

    @field_validator("peak_flops")
    @classmethod
    def _dtypes(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - {"float32", "tfloat32", "bfloat16", "float16", "int8", "float8"}
        if bad:
            raise ValueError(f"unknown dtypes {sorted(bad)}; valid: float32, tfloat32, bfloat16, float16, int8, float8")
        if any(x <= 0 for x in v.values()):
            raise ValueError("peak FLOP/s must be positive")
        return v


def search_path() -> list[Path]:
    paths = []
    if os.environ.get("BENCH_PROFILES"):
        paths.append(Path(os.environ["BENCH_PROFILES"]))
    paths.append(Path.cwd() / "leaderboards" / "profiles")
    paths.append(Path(bench.__file__).resolve().parent.parent / "leaderboards" / "profiles")
    return list(dict.fromkeys(p.resolve() for p in paths))


def load_profile_file(path: Path) -> Profile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not valid YAML: {exc}") from exc
    try:
        prof = Profile.model_validate(data)
    except ValidationError as exc:
        from bench.config import format_validation_error

        raise BenchError(f"{path}: invalid profile\n" + format_validation_error(exc, "", Profile)) from exc
    if prof.id != path.stem:
        raise BenchError(f"{path}: profile id {prof.id!r} must equal the file name {path.stem!r}")
    return prof


def available_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in search_path():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def mismatches(prof: Profile, fp: dict[str, Any]) -> list[str]:
    """What about the detected hardware ``fp`` differs from the declared profile (empty: it matches)."""
    problems = []
    kind = fp.get("device_kind", "cpu")
    if prof.device != kind:
        problems.append(f"device: profile declares {prof.device}, this machine runs on {kind}")
        return problems
    pattern = re.compile(prof.name_pattern, re.IGNORECASE)
    if prof.device == "cpu":
        if not pattern.search(fp.get("cpu_model") or ""):
            problems.append(f"CPU model {fp.get('cpu_model')!r} does not match {prof.name_pattern!r}")
        cpus = fp.get("affinity_cpu_count") or fp.get("logical_cores")
        if prof.cpu_count is not None and cpus != prof.cpu_count:
            problems.append(f"logical CPUs: profile declares {prof.cpu_count}, this process may use {cpus}")
        if cpus and prof.threads > cpus:
            problems.append(f"threads: profile uses {prof.threads}, only {cpus} CPUs are available")
    else:
        gpus = fp.get("gpus") or []
        if len(gpus) < prof.device_count:
            problems.append(f"GPUs: profile declares {prof.device_count}, found {len(gpus)}")
        for g in gpus[: prof.device_count]:
            if not pattern.search(g.get("name", "")):
                problems.append(f"GPU {g.get('name')!r} does not match {prof.name_pattern!r}")
    return problems


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
        "peak_flops": {},
        "memory_bytes": fp.get("ram_bytes") if device == "cpu" else (fp.get("gpus") or [{}])[0].get("total_memory_bytes"),
        "timing": Timing().model_dump(),
        "verified": True,
        "mismatches": [],
        "hardware": fp,
        "run_device": device,
    }


def select_profile(profile_id: str | None, allow_mismatch: bool = False) -> dict[str, Any]:
    """The profile a run measures under, as recorded in every row (declared fields + the check)."""
    if profile_id is None:
        return detect_profile()
    profiles = available_profiles()
    if profile_id not in profiles:
        import difflib

        close = difflib.get_close_matches(profile_id, list(profiles), n=2, cutoff=0.5)
        hint = f" — did you mean {' or '.join(close)}?" if close else ""
        raise BenchError(f"unknown hardware profile {profile_id!r}{hint} Valid profiles: "
                         f"{', '.join(sorted(profiles)) or '(none found)'}; searched {', '.join(map(str, search_path()))}")
    prof = load_profile_file(profiles[profile_id])
    from bench.measure.hardware import fingerprint

    fp = fingerprint()
    problems = mismatches(prof, fp)
    if problems and not allow_mismatch:
        raise BenchError(f"this machine does not match hardware profile {prof.id!r}: " + "; ".join(problems)
                         + ". Run without --profile (an ad-hoc profile is derived from this machine), pick a "
                           "matching profile, or pass --allow-mismatch (rows are then marked unverified)")
    # On a mismatch the run still has to happen on the device this machine has.
    run_device = prof.device if prof.device == fp.get("device_kind", "cpu") else fp.get("device_kind", "cpu")
    return {**prof.model_dump(), "kind": "declared", "verified": not problems, "mismatches": problems,
            "hardware": fp, "path": str(profiles[profile_id]), "run_device": run_device}
