"""A run record's efficiency block -> the leaderboard's efficiency cells, in display units.

`bench.leaderboard` builds its efficiency columns from these: the four every table has (parameters,
GFLOPs, latency, peak memory), those of generative lm students (per token), and those of a task's separately
costed components (segmentation: the image encoder per image, the decoder per prompt; ``Task.components``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def first_batch(block: dict | None) -> tuple[str | None, dict | None]:
    """The smallest batch size's entry of ``efficiency.latency``/``memory`` (keys ``batch_<n>``)."""
    if not block:
        return None, None
    keys = [k for k in block if k.startswith("batch_") and k[6:].isdigit()]
    if not keys:
        return None, None
    key = min(keys, key=lambda k: int(k[6:]))
    return key, block.get(key)


def efficiency_columns(rec: dict[str, Any]) -> dict[str, float | None]:
    """The four efficiency numbers of one record, in display units (None where not measured)."""
    eff = rec.get("efficiency") or {}
    _, lat = first_batch(eff.get("latency"))
    _, mem = first_batch(eff.get("memory"))
    params, flops = eff.get("params"), eff.get("flops_per_sample")
    peak = (mem or {}).get("peak_bytes")
    out = {
        "params_M": params / 1e6 if params is not None else None,
        "gflops": flops / 1e9 if flops is not None else None,
        "latency_ms": (lat or {}).get("median_ms"),
        "peak_mem_MB": peak / 2**20 if peak is not None else None,
    }
    if "flops_per_token" in eff or "generation" in eff:  # generative students (lm domain)
        gen = eff.get("generation") or {}
        fpt = eff.get("flops_per_token")
        out.update(mflops_per_token=fpt / 1e6 if fpt is not None else None, tokens_per_s=gen.get("tokens_per_s"),
                   ttft_ms=gen.get("ttft_ms"))
    for name, comp in (eff.get("components") or {}).items():  # segmentation: encoder per image, decoder per prompt
        prefix = f"{COMPONENT_PREFIX}{name}.{comp.get('per', 'sample')}."
        c_params, c_flops = comp.get("params"), comp.get("flops")
        out[prefix + "params_M"] = c_params / 1e6 if c_params is not None else None
        out[prefix + "gflops"] = c_flops / 1e9 if c_flops is not None else None
        out[prefix + "latency_ms"] = (comp.get("latency") or {}).get("median_ms")
    return out


#: Keys of component efficiency cells (``Task.components``): ``component.<name>.<per>.<quantity>``.
COMPONENT_PREFIX = "component."
_COMPONENT_QUANTITIES = {
    "params_M": ("{name} params (M)", "parameters of the model's {name}, in millions"),
    "gflops": ("{name} GFLOPs/{per}", "GFLOPs of the {name} per {per} (2 FLOPs per multiply-accumulate)"),
    "latency_ms": ("{name} ms/{per}", "median latency of the {name} for one {per} at batch 1, in ms"),
}


def component_column_specs(keys: Iterable[str]) -> list[tuple[str, str, str]]:
    """(key, label, unit) of the component efficiency cells among ``keys``, in first-seen order."""
    out = []
    for key in dict.fromkeys(keys):
        if not key.startswith(COMPONENT_PREFIX):
            continue
        name, per, quantity = key[len(COMPONENT_PREFIX):].rsplit(".", 2)
        label, unit = _COMPONENT_QUANTITIES[quantity]
        out.append((key, label.format(name=name, per=per), unit.format(name=name, per=per)))
    return out


EFFICIENCY = (
    ("params_M", "params (M)", "parameters of the evaluated model, in millions", False),
    (
        "gflops",
        "GFLOPs",
        (
            "GFLOPs per sample at the task's declared input shape (2 FLOPs per multiply-accumulate, "
            "attention included)"
        ),
        False,
    ),
    (
        "latency_ms",
        "latency (ms)",
        ("median latency of one call at batch 1, in ms, under the profile's threads and timing protocol"),
        False,
    ),
    (
        "peak_mem_MB",
        "peak mem (MiB)",
        "peak inference memory at batch 1 in MiB, measured in an isolated process",
        False,
    ),
)


#: Efficiency columns of generative students, shown only in tables whose records have them.
GENERATION_EFFICIENCY = (
    ("mflops_per_token", "MFLOPs/token", "MFLOPs per token at the declared input shape (FLOPs per sample / tokens)",
     False),
    ("tokens_per_s", "tokens/s", "generated tokens per second at batch 1 (greedy, prefill included; "
     "bench.measure.generation)", True),
    ("ttft_ms", "TTFT (ms)", "time to first token at batch 1, in ms (prompt forward + one decoding step)", False),
)
