"""Generation speed of a language model: time to first token and tokens per second.

These are the latency figures of the lm domain (HF's LLM-Perf leaderboard and optimum-benchmark report
the same pair: prefill latency / time to first token, and decode throughput). Both are timed with the
same protocol, threads and clocks as every other latency in bench (`bench.measure.latency`): warm-up,
blocks until both a minimum time and a minimum count are reached, median and spread.

* **TTFT** (time to first token): the median time of one ``generate`` call asked for exactly one new token
  on the declared prompts: the prompt's forward pass (prefill) plus one sampling step.
* **Generation time**: the median time of one ``generate`` call asked for exactly ``new_tokens`` tokens
  (no early stop: the task's ``generate`` forces the length).
* ``tokens_per_s`` = batch x new_tokens / generation time (end-to-end generation throughput, prefill
  included); ``decode_tokens_per_s`` = batch x (new_tokens - 1) / (generation time - TTFT), the rate of
  the incremental decoding steps alone; ``ms_per_token`` is the inverse of the latter per sequence.

``flops_per_token`` divides the FLOPs of one sample at the task's declared input shape (counted by
`bench.measure.flops`) by the tokens in that sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench.measure.latency import measure_latency

if TYPE_CHECKING:
    from torch import nn


def tokens_per_sample(inputs: dict) -> int:
    """Tokens in one sample of a batch of token inputs (attended positions; all of ``input_ids`` without a mask)."""
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    total = int(mask.sum()) if mask is not None else int(ids.numel())
    return max(1, total // max(1, int(ids.shape[0])))


def flops_per_token(flops_per_sample: int | None, inputs: dict) -> float | None:
    """FLOPs of one sample divided by its tokens (None when the FLOPs are unknown)."""
    if flops_per_sample is None:
        return None
    return flops_per_sample / tokens_per_sample(inputs)


def _summary(lat: dict[str, Any]) -> dict[str, Any]:
    keep = ("median_ms", "p90_ms", "mean_ms", "iqr_ms", "spread", "noisy", "n_blocks", "first_call_ms")
    return {k: lat[k] for k in keep if k in lat}


def measure_generation(model: nn.Module, generate: Callable[..., Any], inputs: dict, *, new_tokens: int,
                       threads: int, device: str = "cpu", min_run_time: float = 1.0, min_count: int = 10,
                       warmup: int = 3, **kwargs: Any) -> dict[str, Any]:
    """Time ``generate(model, inputs, max_new_tokens=n)`` for n = 1 and n = ``new_tokens`` (greedy, in
    eval mode under ``torch.inference_mode``); see the module docstring for the derived numbers."""
    import torch

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    batch_size = int(inputs["input_ids"].shape[0])
    prompt_tokens = int(inputs["input_ids"].shape[1])
    was_training = model.training
    model.eval()

    def call(n: int) -> Callable[[], None]:
        def fn() -> None:
            with torch.inference_mode():
                generate(model, inputs, max_new_tokens=n)
        return fn

    protocol = dict(threads=threads, batch_size=batch_size, min_run_time=min_run_time, min_count=min_count,
                    warmup=warmup, device=device, **kwargs)
    try:
        first = measure_latency(call(1), **protocol)
        full = measure_latency(call(new_tokens), **protocol) if new_tokens > 1 else first
    finally:
        model.train(was_training)
    ttft_s = first["median_ms"] / 1e3
    gen_s = full["median_ms"] / 1e3
    decode_s = gen_s - ttft_s
    decode_rate = batch_size * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None
    return {
        "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "threads": first["threads"], "device": device,
        "ttft_ms": first["median_ms"],
        "generation_ms": full["median_ms"],
        "tokens_per_s": batch_size * new_tokens / gen_s if gen_s > 0 else None,
        "decode_tokens_per_s": decode_rate,
        "ms_per_token": (decode_s / (new_tokens - 1) * 1e3) if new_tokens > 1 and decode_s > 0 else None,
        "noisy": bool(first.get("noisy") or full.get("noisy")),
        "ttft": _summary(first), "generation": _summary(full),
        "method": ("greedy generate() with the length forced; " + first["method"]),
    }
