"""Task families, one package per family (installed as bench.tasks)."""
