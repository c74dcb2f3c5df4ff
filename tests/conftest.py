"""Shared test setup: offline by construction, temporary caches, and the real data root when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: the Hugging Face libraries are told so before anything imports them.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def find_data_root() -> Path | None:
    root = Path(os.environ.get("BENCH_DATA") or REPO.parent / "shared" / "data")
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = find_data_root()
    if root is None or not (root / "glue").is_dir():
        pytest.skip(f"real data not found (set BENCH_DATA to the data root; looked at {root or REPO.parent / 'shared/data'})")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One teacher cache per test session, so smoke teachers are trained once for all tests."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: fastest for them, and immune to a busy shared CPU
    (two threads on a loaded 2-core machine wait on each other). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def glue_smoke_task(tmp_path_factory):
    """The GLUE SST-2 smoke task (generated data, tiny models; building it trains nothing), shared by the
    measurement tests and the benchmarks."""
    from bench.api import TaskEnv
    from bench.tasks.glue import Glue

    return Glue(Glue.Params(), TaskEnv("smoke", "sst2", None, tmp_path_factory.mktemp("glue-cache")))


@pytest.fixture(scope="module")
def glue_smoke_student(glue_smoke_task):
    """(task, its seed-0 student in eval mode)."""
    return glue_smoke_task, glue_smoke_task.student(0).eval()
