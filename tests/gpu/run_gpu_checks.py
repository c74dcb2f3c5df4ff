"""GPU-verified measurement (issue 14, item 3): one prepared script for a machine with a CUDA GPU.

    python tests/gpu/run_gpu_checks.py --out gpu-out [--profile h200] [--data-root ../shared/data]

It is not collected by pytest (no ``test_`` prefix): the default test run has no GPU. It runs in well under
10 minutes on one H200 so that it can be rerun, and writes everything it measured to ``--out``:
``checks.json`` (each check, its numbers and pass/fail) and the records of its bench runs under
``runs-smoke/`` and ``runs-small/``. Exit 0 when every check passed, 1 when one failed, 2 without a GPU.

Checks, in order:

1. **profile** — this machine against the declared profile (``leaderboards/profiles/<profile>.yaml``): the
   fingerprint and the mismatches ``bench.profiles`` finds (none expected on the profile's machine).
2. **cuda_latency** — ``bench.measure.latency`` on a CUDA matmul of known FLOPs with CUDA events: the
   median must agree with host timing around ``torch.cuda.synchronize`` (within 10 %), and the implied
   FLOP/s must lie between 1 % and 100 % of the profile's declared peak for the dtype.
3. **cuda_memory** — ``bench.measure.memory`` on a CUDA layer whose output size is known: the peak
   (``max_memory_allocated`` after ``reset_peak_memory_stats``) must cover the output and exceed it by
   less than the input, output and a 64 MiB cuBLAS workspace allowance.
4. **training_mfu** — the FLOPs-based MFU of training steps of the GLUE smoke student at the profile's
   throughput batch: the harness's counted training FLOPs per sample × samples per second (CUDA events over
   20 steps after 5 warm-up steps) ÷ each declared peak (the float32 one applies: the harness trains in
   float32); checked to be positive and below the largest declared peak.
5. **smoke_matrix** — ``bench run --methods kd,taid --task glue/sst2,rte --profile <profile>`` on the GPU:
   every cell ok, records carry CUDA latency (``cuda events``) and exact CUDA memory.
6. **small_cell** — one small-tier cell, ``bench run --methods kd --task glue/sst2 --tier small``, when the
   data root is present (skipped, saying so, otherwise).

``--cpu`` runs the same script on the CPU with the ``cpu-generic`` profile (no CUDA checks' tolerances
apply: the CUDA-only checks and the small cell are skipped) so that the script itself can be tried on a
machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _bench(args: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from bench.cli import main; main()", *args], env=env,
                          cwd=REPO, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t0, (proc.stdout + proc.stderr)[-4000:]


def check_profile(profile_id: str) -> dict[str, Any]:
    from bench.measure.hardware import fingerprint
    from bench.profiles import available_profiles, load_profile_file, mismatches

    prof = load_profile_file(available_profiles()[profile_id])
    fp = fingerprint()
    problems = mismatches(prof, fp)
    return {"ok": not problems, "profile": profile_id, "mismatches": problems,
            "gpus": fp.get("gpus"), "cuda_version": fp.get("cuda_version"), "driver": fp.get("driver_version")}


def check_cuda_latency(profile: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    from bench.measure.latency import measure_latency

    dtype = getattr(torch, profile.get("dtype", "float32"))
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n ** 3
    events = measure_latency(lambda: a @ b, threads=1, batch_size=1, min_run_time=1.0, min_count=20, warmup=10,
                             device=device)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):  # host clock around a synchronised call: the reference for the events
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    host_ms = sorted(times)[len(times) // 2]
    ms = events["median_ms"]
    achieved = flops / (ms / 1e3)
    peak = (profile.get("peak_flops") or {}).get(profile.get("dtype", "float32"))
    frac = achieved / peak if peak else None
    agree = abs(ms - host_ms) / host_ms
    return {"ok": agree <= 0.10 and frac is not None and 0.01 <= frac <= 1.0, "events_median_ms": ms,
            "host_sync_median_ms": host_ms, "relative_difference": agree, "method": events.get("method"),
            "achieved_flops_per_s": achieved, "declared_peak_flops_per_s": peak, "fraction_of_peak": frac}


def check_cuda_memory(device: str) -> dict[str, Any]:
    import torch

    from bench.measure.memory import measure_peak_memory

    here = str(Path(__file__).resolve().parent)  # the child imports _probe (the forward) by name
    sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    from _probe import forward_x

    batch, width = 4096, 4096
    layer = torch.nn.Linear(width, width, bias=False)
    x = torch.randn(batch, width)
    out_bytes = batch * width * 4
    in_bytes = batch * width * 4
    mem = measure_peak_memory(layer, forward_x, {"x": x}, device=device)
    working = mem["working_bytes"]
    slack = in_bytes + out_bytes + 64 * 2 ** 20
    return {"ok": bool(mem.get("exact")) and out_bytes <= working <= out_bytes + slack, "working_bytes": working,
            "output_bytes": out_bytes, "allowance_bytes": slack, "model_bytes": mem["model_bytes"],
            "expected_model_bytes": width * width * 4, "method": mem.get("method")}


def check_training_mfu(profile: dict[str, Any], device: str) -> dict[str, Any]:
    import tempfile

    import torch

    from bench.api import TaskEnv
    from bench.measure.efficiency import training_flops_per_sample
    from bench.tasks.glue import Glue

    task = Glue(Glue.Params(), TaskEnv("smoke", "sst2", None, Path(tempfile.mkdtemp()), device=device))
    model = task.student(0).to(device).train()
    flops = training_flops_per_sample(model, task, device)
    bs = int(profile.get("throughput_batch_size") or 32)
    batch = {k: v.to(device) for k, v in task.example_batch(bs).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = task.label_loss(task.forward(model, batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    cuda = device.startswith("cuda")
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = time.perf_counter() - t0
    achieved = flops * bs * 20 / seconds
    peaks = profile.get("peak_flops") or {}
    mfu = {dtype: achieved / peak for dtype, peak in peaks.items() if peak}
    return {"ok": bool(mfu) and 0 < achieved <= max(peaks.values()), "training_flops_per_sample": flops,
            "batch_size": bs, "seconds_20_steps": seconds, "achieved_flops_per_s": achieved,
            "declared_peak_flops_per_s": peaks, "mfu": mfu, "profile_dtype": profile.get("dtype"),
            "note": "the harness trains in float32 on every device (TF32 only where torch enables it by default: "
                    "cuDNN convolutions); the MFU against the float32 (and tfloat32) peak is the one that applies"}


def check_runs(args: argparse.Namespace, env: dict[str, str], out: Path, cuda: bool) -> dict[str, Any]:
    results = {}
    smoke = out / "runs-smoke"
    rc, wall, tail = _bench(["run", "--methods", "kd,taid", "--task", "glue/sst2,rte", "--profile", args.profile,
                             "--out", str(smoke), "--cache-dir", str(out / "cache"), "--quiet"], env)
    recs = [json.loads(p.read_text()) for p in (smoke / "records").rglob("*.json")] if smoke.exists() else []
    ok = rc == 0 and len(recs) == 8 and all(r["status"] == "ok" for r in recs)
    if ok and cuda:
        lat = [r["efficiency"]["latency"] for r in recs]
        mem = [r["efficiency"]["memory"] for r in recs]
        ok = all("cuda" in str(b.get("method", "")) for lt in lat for b in lt.values()) and \
            all(m.get("exact") for mm in mem for m in mm.values())
    results["smoke_matrix"] = {"ok": ok, "rc": rc, "wall_s": wall, "cells": len(recs), "tail": None if ok else tail}
    data = Path(args.data_root)
    if not cuda:
        results["small_cell"] = {"ok": True, "skipped": "--cpu: the small-tier cell is the GPU's to run"}
        return results
    if not (data / "glue").is_dir():
        results["small_cell"] = {"ok": True, "skipped": f"no data root at {data} (pass --data-root)"}
        return results
    small = out / "runs-small"
    rc, wall, tail = _bench(["run", "--methods", "kd", "--task", "glue/sst2", "--tier", "small", "--profile",
                             args.profile, "--data-root", str(data), "--out", str(small), "--cache-dir",
                             str(out / "cache"), "--quiet"], env)
    recs = [json.loads(p.read_text()) for p in (small / "records").rglob("*.json")] if small.exists() else []
    results["small_cell"] = {"ok": rc == 0 and recs and all(r["status"] == "ok" for r in recs), "rc": rc,
                             "wall_s": wall, "cells": len(recs),
                             "scores": {r["cell_id"]: r.get("score") for r in recs}, "tail": tail if rc else None}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-out", help="folder for checks.json and the runs' records")
    parser.add_argument("--profile", default="h200", help="declared hardware profile to check against")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"), help="real data for the small cell")
    parser.add_argument("--cpu", action="store_true", help="try the script on the CPU (cpu-generic profile)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("no CUDA GPU on this machine: this script checks the GPU paths (use --cpu to try it on the CPU)",
              file=sys.stderr)
        return 2
    if args.cpu:
        args.profile = "cpu-generic"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")})
    from bench.profiles import available_profiles, load_profile_file

    profile = load_profile_file(available_profiles()[args.profile]).model_dump()
    device = "cuda" if cuda else "cpu"
    checks: dict[str, Any] = {}
    steps = [("profile", lambda: check_profile(args.profile))]
    if cuda:
        steps += [("cuda_latency", lambda: check_cuda_latency(profile, device)),
                  ("cuda_memory", lambda: check_cuda_memory(device))]
    steps += [("training_mfu", lambda: check_training_mfu(profile, device))]
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            checks[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a failed check, reported with its error
            checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        checks[name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {'ok' if checks[name]['ok'] else 'FAILED'}", flush=True)
    for name, res in check_runs(args, env, out, cuda).items():
        checks[name] = res
        print(f"{name}: {'ok' if res['ok'] else 'FAILED'}", flush=True)
    (out / "checks.json").write_text(json.dumps({"device": device, "profile": args.profile, "checks": checks},
                                                indent=2, default=str))
    print(f"wrote {out / 'checks.json'}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
