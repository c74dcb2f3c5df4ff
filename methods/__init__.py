"""Distillation methods, one module per method (installed as bench.methods)."""
