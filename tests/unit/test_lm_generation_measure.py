"""bench.measure.generation: time to first token and tokens/s from the latency protocol, on a fake clock
(each generate call advances it by 10 ms of prefill plus 5 ms per generated token)."""

from __future__ import annotations

import pytest
import torch

from bench.measure.generation import flops_per_token, measure_generation, tokens_per_sample


def test_ttft_and_tokens_per_second_by_hand():
    now = [0.0]
    calls = []

    def clock() -> float:
        return now[0]

    def generate(model, inputs, max_new_tokens):
        calls.append(max_new_tokens)
        now[0] += 0.010 + 0.005 * max_new_tokens

    model = torch.nn.Linear(2, 2)
    inputs = {"input_ids": torch.zeros(2, 7, dtype=torch.long)}
    out = measure_generation(model, generate, inputs, new_tokens=8, threads=1, min_run_time=0.0, min_count=3,
                             warmup=1, clock=clock)
    # TTFT: 10 + 5 = 15 ms; 8 tokens: 10 + 40 = 50 ms
    assert out["ttft_ms"] == pytest.approx(15.0)
    assert out["generation_ms"] == pytest.approx(50.0)
    # batch 2 x 8 tokens / 0.050 s = 320 tokens/s; decoding: 2 x 7 / (0.050 - 0.015) = 400 tokens/s
    assert out["tokens_per_s"] == pytest.approx(320.0)
    assert out["decode_tokens_per_s"] == pytest.approx(400.0)
    assert out["ms_per_token"] == pytest.approx(5.0)
    assert (out["batch_size"], out["prompt_tokens"], out["new_tokens"]) == (2, 7, 8)
    assert set(calls) == {1, 8} and model.training  # train mode restored


def test_flops_per_token():
    inputs = {"input_ids": torch.zeros(2, 64, dtype=torch.long), "attention_mask": torch.ones(2, 64)}
    assert tokens_per_sample(inputs) == 64
    assert flops_per_token(6400, inputs) == 100.0
    assert flops_per_token(None, inputs) is None


def test_new_tokens_must_be_positive():
    with pytest.raises(ValueError):
        measure_generation(torch.nn.Linear(1, 1), lambda *a, **k: None, {"input_ids": torch.zeros(1, 2)},
                           new_tokens=0, threads=1)
