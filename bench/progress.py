"""A tiny progress-reporting hook, so tasks and the training loop can show bars without knowing the UI.

The CLI installs a reporter backed by rich; library use and tests get the silent default.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Protocol


class Reporter(Protocol):
    def start(self, description: str, total: int | None) -> int: ...

    def advance(self, handle: int, completed: int, info: str = "") -> None: ...

    def stop(self, handle: int) -> None: ...

    def log(self, message: str) -> None: ...


class Silent:
    """The default reporter: no bars, no messages (library use, tests); a base for reporters that show some."""

    def start(self, description: str, total: int | None) -> int:
        return 0

    def advance(self, handle: int, completed: int, info: str = "") -> None:
        pass

    def stop(self, handle: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass


_reporter: Reporter = Silent()


def set_reporter(reporter: Reporter | None) -> None:
    global _reporter
    _reporter = reporter if reporter is not None else Silent()


def log(message: str) -> None:
    _reporter.log(message)


@contextmanager
def bar(description: str, total: int | None) -> Iterator[Callable[[int, str], None]]:
    """``with bar("Training", 100) as update: update(step, "loss 0.3")``."""
    handle = _reporter.start(description, total)
    try:
        yield lambda completed, info="": _reporter.advance(handle, completed, info)
    finally:
        _reporter.stop(handle)
