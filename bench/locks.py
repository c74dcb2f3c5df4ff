"""One process at a time for work several processes may want at once (a cold teacher, FID reference features,
a teacher-pairs store): an exclusive ``flock`` on a lock file beside the cache. The second process waits, then
finds the result in the cache instead of computing it again. Lock files are kept (removing one races with a
process about to open it); without ``fcntl`` (not POSIX) nothing is locked and the writers' atomic renames keep
one result."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def exclusive(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, kept afterwards: removing a lock file races with a
    process about to open it); log ``waiting`` once when another process holds it. No lock without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent processes may both compute; atomic renames keep one result
        yield
        return
    from bench import progress

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.log(waiting)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_or_compute(lock: Path, waiting: str, read: Callable[[], T | None], compute: Callable[[], T]) -> T:
    """``read()`` (None: not cached), else ``compute()`` under the lock, after reading once more: the process
    this one waited for may have written the result meanwhile."""
    found = read()
    if found is not None:
        return found
    with exclusive(lock, waiting):
        found = read()
        return found if found is not None else compute()
