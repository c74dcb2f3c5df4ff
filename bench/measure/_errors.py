"""Exceptions raised by the measurement probes (no torch import here)."""

from __future__ import annotations


class MeasurementError(RuntimeError):
    """A measurement could not be taken (child process failed or timed out, op without a formula, ...).

    The harness stores the failing measurement as ``null`` with this message as the reason
    (DESIGN.md, "Records"); it is not a user-input error, so it does not derive from `BenchError`.
    """


class UncountedOpsError(MeasurementError):
    """`count_flops(..., strict=True)` saw matmul/conv/attention-like ops that have no FLOP formula."""

    def __init__(self, ops: list[str]) -> None:
        self.ops = list(ops)
        super().__init__(
            "FLOP count is incomplete: these matmul/conv/attention-like ops ran but have no FLOP "
            f"formula: {', '.join(self.ops)}. Register a formula in bench/measure/flops.py "
            "(_EXTRA_FORMULAS) or run the model on a path whose ops are counted."
        )
