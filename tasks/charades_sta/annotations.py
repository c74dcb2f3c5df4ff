"""Charades-STA annotation files: queries, video durations, and the moment statistics of the real data.

Files (``/work/shared/data/charades_sta``, see ``SOURCES.md``): ``charades_sta_{train,test}.txt`` from
microsoft/2D-TAN @ 2f7410f, one query per line ``VIDEO_ID START END##sentence`` (seconds), and
``video_durations.csv`` (columns ``id,length,split``; ``length`` in seconds, from Charades_v1).

What is an error and what is not:

* Errors (:class:`bench.BenchError`, naming the file, the 1-based line, the bad text and what is valid): a
  line without ``##``, not exactly three fields before it, a time that is not a finite number or is
  negative, an empty sentence, ``start > end``, a query whose video has no duration (:func:`check_videos`);
  in the durations file a missing column, a repeated id or a length that is not a number > 0.
* Not errors: a moment ending after the video does (562 of the 3,720 test queries, 1,805 of the 12,408 train
  queries) or starting after it (3 train queries). The protocol clamps moments to ``[0, duration]``;
  :func:`clamp_counts` reports how many were clamped.
* ``start > end`` occurs 4 times in the official *train* file (lines 8252, 8440, 9623, 9624; 2D-TAN's loader
  drops them). It is an error unless ``read_queries(..., allow_inverted=True)``. The test file has none.
* Blank lines are skipped (line numbers still count them). Sentences are kept as written, stripped of
  surrounding whitespace (the trailing period stays).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from bench import BenchError

FORMAT = "VIDEO_ID START END##sentence"


@dataclass(frozen=True)
class Query:
    video: str
    start: float
    end: float
    sentence: str
    line: int  # 1-based line number in the annotation file


class MomentStats(NamedTuple):
    """Per query, after clamping to its video: the duration (s), start / duration and length / duration."""
    durations: np.ndarray
    rel_start: np.ndarray
    rel_length: np.ndarray


def _show(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise BenchError(f"{path}: {what} is not UTF-8 text ({e})") from None


def _time(token: str, name: str, where: str) -> float:
    try:
        value = float(token)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BenchError(f"{where}: {name} time {token!r} is not valid; times are finite, non-negative "
                         f"seconds such as 24.3")
    return value


def parse_query(text: str, line: int, path: str | Path = "<annotations>",
                allow_inverted: bool = False) -> Query:
    """One annotation line (without its newline) as a :class:`Query`."""
    where = f"{path}, line {line}"
    if "##" not in text:
        raise BenchError(f"{where}: missing '##' between the moment and the sentence in {_show(text)}; "
                         f"expected {FORMAT!r}")
    head, sentence = text.split("##", 1)
    fields = head.split()
    if len(fields) != 3:
        raise BenchError(f"{where}: expected 'VIDEO_ID START END' before '##', got {_show(head)} "
                         f"({len(fields)} fields) in {_show(text)}")
    video, s_tok, e_tok = fields
    start = _time(s_tok, "start", f"{where} ({_show(text)})")
    end = _time(e_tok, "end", f"{where} ({_show(text)})")
    if start > end and not allow_inverted:
        raise BenchError(f"{where}: start {s_tok} is after end {e_tok} in {_show(text)}; a moment needs "
                         f"start <= end (read_queries(..., allow_inverted=True) keeps such lines)")
    sentence = sentence.strip()
    if not sentence:
        raise BenchError(f"{where}: empty sentence after '##' in {_show(text)}; expected {FORMAT!r}")
    return Query(video, start, end, sentence, line)


def read_queries(path: str | Path, *, allow_inverted: bool = False) -> list[Query]:
    """All queries of a ``charades_sta_{train,test}.txt`` file, in file order."""
    path = Path(path)
    queries = []
    for n, text in enumerate(_read_text(path, "Charades-STA annotation file").splitlines(), start=1):
        if text.strip():
            queries.append(parse_query(text, n, path, allow_inverted))
    if not queries:
        raise BenchError(f"{path}: no queries; expected lines {FORMAT!r}")
    return queries


def read_durations(path: str | Path) -> dict[str, float]:
    """``video id -> length in seconds`` from ``video_durations.csv`` (columns ``id`` and ``length``)."""
    path = Path(path)
    reader = csv.DictReader(_read_text(path, "video durations file").splitlines())
    columns = reader.fieldnames or []
    if "id" not in columns or "length" not in columns:
        raise BenchError(f"{path}, line 1: header {','.join(columns)!r} lacks the columns 'id' and 'length' "
                         f"(expected e.g. 'id,length,split')")
    out: dict[str, float] = {}
    for row in reader:
        where = f"{path}, line {reader.line_num}"
        vid = (row.get("id") or "").strip()
        raw = (row.get("length") or "").strip()
        if not vid:
            raise BenchError(f"{where}: empty video id in row {row!r}")
        try:
            length = float(raw)
        except ValueError:
            length = math.nan
        if not math.isfinite(length) or length <= 0:
            raise BenchError(f"{where}: length {raw!r} of video {vid!r} is not valid; "
                             f"lengths are seconds > 0")
        if vid in out:
            raise BenchError(f"{where}: video {vid!r} is listed twice; each id must appear once")
        out[vid] = length
    if not out:
        raise BenchError(f"{path}: no rows after the header")
    return out


def check_videos(queries: Sequence[Query], durations: dict[str, float], path: str | Path,
                 durations_path: str | Path = "the durations file") -> None:
    """Raise at the first query (of the annotation file ``path``) whose video has no duration."""
    for q in queries:
        if q.video not in durations:
            raise BenchError(f"{path}, line {q.line}: video {q.video!r} has no length in {durations_path}; "
                             f"every query's video must be an 'id' there ({len(durations)} ids)")


def clamp(q: Query, duration: float) -> tuple[float, float]:
    """The query's moment clamped to ``[0, duration]``."""
    return min(max(q.start, 0.0), duration), min(max(q.end, 0.0), duration)


def clamp_counts(queries: Sequence[Query], durations: dict[str, float]) -> dict[str, int]:
    """How many moments the protocol's clamping changes: ``end_clamped`` (end > duration), ``start_clamped``
    (start > duration) and ``inverted`` (start > end, kept only with ``allow_inverted``)."""
    check_videos(queries, durations, "the queries")
    d = [durations[q.video] for q in queries]
    return {"end_clamped": sum(q.end > x for q, x in zip(queries, d)),
            "start_clamped": sum(q.start > x for q, x in zip(queries, d)),
            "inverted": sum(q.start > q.end for q in queries)}


def moment_stats(queries: Sequence[Query], durations: dict[str, float]) -> MomentStats:
    """Duration, relative start and relative length of each query's clamped moment (for synthetic videos).
    Queries whose moment is inverted (``start > end``) are left out."""
    check_videos(queries, durations, "the queries")
    dur, rs, rl = [], [], []
    for q in queries:
        if q.start > q.end:
            continue
        d = durations[q.video]
        s, e = clamp(q, d)
        dur.append(d)
        rs.append(s / d)
        rl.append((e - s) / d)
    return MomentStats(np.array(dur, dtype=np.float64), np.array(rs, dtype=np.float64),
                       np.array(rl, dtype=np.float64))
