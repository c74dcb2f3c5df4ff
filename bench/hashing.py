"""File checksums for data fingerprints and teacher identities: one streaming reader for every task (md5 where
SOURCES.md lists md5 sums, sha256 elsewhere)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def update_from_file(h: "hashlib._Hash", path: str | Path, chunk: int = 1 << 20) -> None:
    """Feed the bytes of ``path`` into the hash object ``h``, ``chunk`` bytes at a time."""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes."""
    h = hashlib.new(algorithm)
    update_from_file(h, path, chunk)
    return h.hexdigest()
