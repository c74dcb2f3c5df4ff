"""Hardware profiles: the shipped files validate, and the hardware check catches what differs."""

from __future__ import annotations

import pytest

from bench import BenchError
from bench.profiles import Profile, available_profiles, load_profile_file, mismatches, select_profile

REQUIRED = {"cpu-2core", "cpu-generic", "a100-80gb", "h100-sxm", "h200", "l4", "rtx4090"}

CPU_2 = {"device_kind": "cpu", "cpu_model": "AMD EPYC", "logical_cores": 2, "affinity_cpu_count": 2, "gpus": []}
CPU_16 = {**CPU_2, "logical_cores": 16, "affinity_cpu_count": 16}
H200 = {"device_kind": "cuda", "cpu_model": "Intel Xeon", "affinity_cpu_count": 16,
        "gpus": [{"name": "NVIDIA H200", "total_memory_bytes": 150_000_000_000}]}


def test_required_profiles_ship_and_validate():
    found = available_profiles()
    assert REQUIRED <= set(found)
    for name in REQUIRED:
        prof = load_profile_file(found[name])
        assert prof.id == name and prof.peak_flops and prof.memory_bytes > 0 and prof.source


def test_gpu_profiles_declare_their_dtype_peak():
    for name in ("a100-80gb", "h100-sxm", "h200", "l4", "rtx4090"):
        prof = load_profile_file(available_profiles()[name])
        assert prof.device == "cuda" and prof.dtype in prof.peak_flops


def test_matching_and_mismatching_hardware():
    profs = {n: load_profile_file(p) for n, p in available_profiles().items()}
    assert mismatches(profs["cpu-2core"], CPU_2) == []
    assert any("logical CPUs" in m for m in mismatches(profs["cpu-2core"], CPU_16))
    assert mismatches(profs["cpu-generic"], CPU_16) == []
    assert any("device" in m for m in mismatches(profs["h200"], CPU_2))
    assert mismatches(profs["h200"], H200) == []
    assert any("does not match" in m for m in mismatches(profs["a100-80gb"], H200))
    assert any("does not match" in m for m in mismatches(profs["h100-sxm"], H200))


def test_profile_schema_is_strict():
    base = dict(id="x", device="cpu", threads=1, peak_flops={"float32": 1e9}, memory_bytes=1)
    Profile.model_validate(base)
    with pytest.raises(Exception, match="extra"):
        Profile.model_validate({**base, "gpu": "a"})
    with pytest.raises(Exception, match="regular expression"):
        Profile.model_validate({**base, "name_pattern": "("})
    with pytest.raises(Exception, match="unknown dtypes"):
        Profile.model_validate({**base, "peak_flops": {"fp33": 1.0}})


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(BenchError, match="did you mean h200") as err:
        select_profile("h20")
    assert "cpu-2core" in str(err.value)


def test_auto_profile_describes_this_machine():
    prof = select_profile(None)
    assert prof["kind"] == "auto" and prof["verified"] and prof["id"].startswith("auto-")
    assert prof["threads"] >= 1 and prof["hardware"]["cpu_model"]
