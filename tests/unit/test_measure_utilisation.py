"""Utilisation (achieved FLOP/s over the declared peak) divides by the peak of the dtype the model actually
ran in: the harness times float32 models, so a GPU profile declaring bfloat16 must not lend its 15x larger
bfloat16 peak to a float32 measurement."""

from __future__ import annotations

import torch

from bench.measure.efficiency import _param_dtype, utilisation

H200 = {"dtype": "bfloat16", "throughput_batch_size": 4,
        "peak_flops": {"float32": 6.7e13, "bfloat16": 9.894e14}}
EFF = {"flops_per_sample": 1e9, "latency": {"batch_4": {"samples_per_s": 2000.0}}}


def test_the_peak_of_the_measured_dtype_applies():
    u = utilisation(EFF, H200, _param_dtype(torch.nn.Linear(2, 2)))
    assert u["dtype"] == "float32" and u["profile_dtype"] == "bfloat16"
    assert u["achieved_flops_per_s"] == 2e12
    assert u["fraction_of_peak"] == 2e12 / 6.7e13  # 0.0299, not 2e12 / 9.894e14 = 0.0020


def test_a_bfloat16_model_is_held_to_the_bfloat16_peak():
    u = utilisation(EFF, H200, _param_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16)))
    assert u["dtype"] == "bfloat16" and u["fraction_of_peak"] == 2e12 / 9.894e14


def test_no_throughput_timing_no_utilisation():
    assert utilisation({"flops_per_sample": 1e9, "latency": {}}, H200) is None
