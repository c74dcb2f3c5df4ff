"""Run records: one JSON document per cell, written atomically; checkpoints beside them.

Layout under the output directory::

    records/<task>/<subtask>/<method>__<tier>__<profile>__s<seed>.json
    checkpoints/<cell id>/state.pt          (only while a cell is unfinished)
    leaderboard-<task>-<tier>-<profile>.md / .csv

A record is written with write-to-temporary + fsync + ``os.replace``, so a run killed at any moment
leaves either the previous record or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from bench import BenchError

RECORD_SCHEMA_VERSION = 1


@dataclass(frozen=True, order=True)
class Cell:
    """The identity of one run: (task, subtask, method, tier, profile, seed)."""

    task: str
    subtask: str
    method: str
    tier: str
    profile: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task}.{self.subtask}--{self.method}--{self.tier}--{self.profile}--s{self.seed}"

    @property
    def relpath(self) -> Path:
        return Path("records", self.task, self.subtask, f"{self.method}__{self.tier}__{self.profile}__s{self.seed}.json")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; records and tables are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BenchError(f"no record at {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path}: corrupt record (not valid JSON: {exc}); delete it and rerun the cell") from exc
    if not isinstance(data, dict) or "cell" not in data or "status" not in data:
        raise BenchError(f"{path}: not a bench run record (missing 'cell' or 'status')")
    return data


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def record_path(self, cell: Cell) -> Path:
        return self.root / cell.relpath

    def checkpoint_dir(self, cell: Cell) -> Path:
        return self.root / "checkpoints" / cell.id

    def trained_path(self, cell: Cell, key: str) -> Path:
        """Where the model trained for ``cell`` is kept when its task's subtasks share one training
        (`bench.api.Task.shared_training`); ``key`` hashes the cell's configuration without its subtask."""
        return self.root / "trained" / cell.task / f"{cell.method}__{cell.tier}__{cell.profile}__s{cell.seed}__{key}.pt"

    def load(self, cell: Cell) -> dict[str, Any] | None:
        path = self.record_path(cell)
        if not path.exists():
            return None
        try:
            return read_record(path)
        except BenchError:
            return None  # a foreign or damaged file: the cell is redone and the file replaced

    def finished(self, cell: Cell, config_hash: str) -> dict[str, Any] | None:
        """The record of this cell if it finished with the same resolved configuration."""
        rec = self.load(cell)
        if rec and rec.get("status") == "ok" and rec.get("config_hash") == config_hash:
            return rec
        return None

    def write(self, cell: Cell, record: dict[str, Any]) -> Path:
        path = self.record_path(cell)
        atomic_write_json(path, record)
        return path

    def records(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        base = self.root / "records"
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*.json")):
            try:
                yield path, read_record(path)
            except BenchError:
                continue


def find_record(ref: str, roots: list[Path]) -> Path:
    """Resolve ``bench show RUN``: a path to a record, or a cell id searched under ``roots``."""
    p = Path(ref)
    if p.is_file():
        return p
    for root in roots:
        for path in (root / "records").rglob("*.json") if (root / "records").is_dir() else []:
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get("cell_id") == ref:
                return path
    where = ", ".join(str(r) for r in roots)
    raise BenchError(f"no run record {ref!r}: give a path to a record JSON or a cell id "
                     f"(like glue.sst2--taid--smoke--<profile>--s0) found under {where}")
