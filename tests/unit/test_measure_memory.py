"""Peak memory in an isolated child: activations of known size show up, weights show up in model_bytes,
and failures come back as clear errors instead of hangs.

The models and forward functions live at module level so the child can unpickle them by reference.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from bench.measure import MeasurementError
from bench.measure import memory as memory_mod
from bench.measure.memory import clear_refs_supported, measure_peak_memory

MiB = 2**20
WEIGHT_FLOATS = 16 * MiB  # 64 MiB of weights
ACTIVATION_FLOATS = 64 * MiB  # 256 MiB of activation


class Allocates(nn.Module):
    """A model whose forward materialises ``n`` float32 values (and touches every page)."""

    def __init__(self, n: int, weights: int = WEIGHT_FLOATS) -> None:
        super().__init__()
        self.n = n
        self.weight = nn.Parameter(torch.ones(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.full((self.n,), 1.0)
        return big.sum() + self.weight[:1].sum() + x.sum()


def run(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"])


def fail(model: nn.Module, batch: dict) -> None:
    raise ValueError("boom from the forward")


def sleep_forever(model: nn.Module, batch: dict) -> None:
    time.sleep(600)


INPUTS = {"x": torch.ones(4, 8)}

pytestmark = pytest.mark.skipif(os.name != "posix", reason="isolated memory probe needs fork/spawn on POSIX")


@pytest.mark.skipif(not clear_refs_supported(), reason="/proc/self/clear_refs not writable here")
def test_doubling_the_activation_adds_its_size_and_weights_show_in_model_bytes():
    small = measure_peak_memory(Allocates(ACTIVATION_FLOATS), run, INPUTS, threads=1)
    large = measure_peak_memory(Allocates(2 * ACTIVATION_FLOATS), run, INPUTS, threads=1)
    expected = ACTIVATION_FLOATS * 4  # the extra 64 Mi floats = 256 MiB
    assert large["peak_bytes"] - small["peak_bytes"] == pytest.approx(expected, rel=0.15)
    assert small["peak_bytes"] >= expected  # weights + activation at least
    for result in (small, large):
        assert result["model_bytes"] == pytest.approx(WEIGHT_FLOATS * 4, rel=0.15)
        assert result["working_bytes"] >= expected * 0.9
        assert result["exact"] is True and "clear_refs" in result["method"]
        assert result["start_method"] == "forkserver"
        # measured in a child, never in the test process
        assert result["pid"] != os.getpid()


def test_child_error_comes_back_with_its_traceback():
    with pytest.raises(MeasurementError) as info:
        measure_peak_memory(Allocates(1, weights=8), fail, INPUTS)
    text = str(info.value)
    assert "peak memory of Allocates on cpu failed" in text
    assert "ValueError: boom from the forward" in text and "Traceback" in text


def test_hung_child_is_killed_after_timeout():
    start = time.monotonic()
    with pytest.raises(MeasurementError, match="timed out"):
        measure_peak_memory(Allocates(1, weights=8), sleep_forever, INPUTS, timeout=4)
    assert time.monotonic() - start < 15


def test_unsupported_device_is_a_clear_error():
    with pytest.raises(MeasurementError, match="not supported"):
        measure_peak_memory(Allocates(1, weights=8), run, INPUTS, device="mps")


def test_unpicklable_forward_is_a_clear_error():
    with pytest.raises(MeasurementError, match="not picklable"):
        measure_peak_memory(Allocates(1, weights=8), lambda m, b: m(b["x"]), INPUTS)


def test_fallback_without_clear_refs_uses_ru_maxrss_in_a_spawned_child(monkeypatch):
    monkeypatch.setattr(memory_mod, "clear_refs_supported", lambda: False)
    result = measure_peak_memory(Allocates(ACTIVATION_FLOATS), run, INPUTS, threads=1, timeout=120)
    assert result["start_method"] == "spawn"
    assert result["exact"] is False and "ru_maxrss" in result["method"]
    assert result["peak_bytes"] >= ACTIVATION_FLOATS * 4 * 0.9
    assert result["pid"] != os.getpid()


@pytest.mark.parametrize("platform, factor", [("linux", 1024), ("darwin", 1)])
def test_ru_maxrss_units_are_normalised(monkeypatch, platform, factor):
    import resource

    class Usage:
        ru_maxrss = 1000

    monkeypatch.setattr(memory_mod.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: Usage())
    assert memory_mod._ru_maxrss_bytes() == 1000 * factor


class _FakeAllocator:
    """torch.cuda's allocator counters, simulated: loading the model allocates 1,000 bytes, the call a
    transient 300 on top (freed afterwards); 50 bytes are allocated before anything (another tenant)."""

    def __init__(self) -> None:
        self.allocated, self.peak, self.events = 50, 50, []

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def reset_peak_memory_stats(self, *a) -> None:
        self.events.append("reset")
        self.peak = self.allocated


def test_cuda_path_reports_peak_of_the_call_minus_what_was_allocated_before(monkeypatch, tmp_path):
    """The CUDA branch (no GPU here): counters reset after the load, so the peak is the call's; the
    figures are differences against what was allocated before the model (checked on a simulated allocator)."""
    from bench.measure import memory as M

    fake = _FakeAllocator()

    class Model(torch.nn.Module):
        def forward(self, x):
            fake.alloc(300)  # activations
            fake.events.append("call")
            fake.allocated -= 300
            return x

    def fake_load(path, **kw):
        assert kw.get("map_location") == "cuda:0"
        fake.alloc(1000)
        fake.events.append("load")
        return Model()

    cuda = torch.cuda
    for name, fn in {"synchronize": lambda *a: None, "set_device": lambda *a: None,
                     "memory_allocated": lambda *a: fake.allocated, "max_memory_allocated": lambda *a: fake.peak,
                     "max_memory_reserved": lambda *a: 2048, "reset_peak_memory_stats": fake.reset_peak_memory_stats,
                     "get_device_name": lambda *a: "Fake GPU"}.items():
        monkeypatch.setattr(cuda, name, fn)
    monkeypatch.setattr(torch, "load", fake_load)
    monkeypatch.setattr(M, "_to_device", lambda inputs, device: inputs)

    out = M._cuda_child("model.pt", {"x": torch.zeros(1)}, lambda m, b: m(b["x"]), "cuda:0")
    assert fake.events == ["reset", "load", "reset", "call"]
    assert out["model_bytes"] == 1000 and out["peak_bytes"] == 1300 and out["working_bytes"] == 300
    assert out["baseline_bytes"] == 50 and out["exact"] is True and out["gpu_name"] == "Fake GPU"
