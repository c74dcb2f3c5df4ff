"""``bench leaderboard build``: read run records from folders, build every table (`bench.leaderboard`) and
write them in every format — markdown and JSON per task family, CSV per table (`bench.table`), Pareto
plots (`bench.plots`) and one offline HTML page (`bench.html`).

The modules import one way: this publisher uses the table builder and the renderers; the builder
(`bench.leaderboard`) uses only the table model (`bench.table`); the renderers use only the table model.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.leaderboard import TIER_NOTES, _Rec, compact_record, dedupe, tables_of
from bench.table import Table, to_csv, to_dict, to_markdown


def record_files(roots: Sequence[Path]) -> list[str]:
    """Record JSON files under each root: a run folder (its ``records/``), a records folder, or a file."""
    files: list[str] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            files.append(str(root))
        elif (root / "records").is_dir():
            files.extend(_walk(root / "records"))
        elif root.is_dir():
            files.extend(_walk(root))
        else:
            raise BenchError(
                f"--from {root}: no such file or folder (give a run folder such as runs/, its records/ "
                "folder, or a record JSON file)"
            )
    return files


def _walk(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.endswith(".json") and not f.startswith(".")
        )
    return out


def load_records(roots: Sequence[Path], compact: bool = False) -> tuple[list[Any], list[str]]:
    """Every run record under ``roots`` and the JSON files that were skipped as not records (with why).

    With ``compact``, each record is reduced to what the tables need as soon as it is parsed: 10,000 full
    records are about half a gigabyte of Python objects, and the garbage collector's passes over them,
    not the parsing, dominated the build time. The collector is paused while records are read (JSON has
    no reference cycles to collect)."""
    import gc

    try:  # orjson parses records faster than the standard library
        from orjson import loads as fast_loads
    except ImportError:
        fast_loads = json.loads
    records, skipped = [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for path in record_files(roots):
            try:
                with open(path, "rb") as fh:
                    blob = fh.read()
                try:
                    data = fast_loads(blob)
                except ValueError:  # e.g. NaN, which Python's json writes and orjson refuses
                    data = json.loads(blob)
            except (OSError, ValueError) as exc:
                skipped.append(f"{path}: not readable JSON ({type(exc).__name__})")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("cell"), dict) or "status" not in data:
                skipped.append(f"{path}: not a bench run record")
                continue
            try:
                records.append(compact_record(data) if compact else data)
            except (KeyError, TypeError, ValueError) as exc:
                skipped.append(f"{path}: malformed record ({type(exc).__name__}: {exc})")
    finally:
        if enabled:
            gc.enable()
    return records, skipped


@dataclass
class BuildResult:
    tables: list[Table]
    files: list[Path]
    skipped: list[str]
    duplicates: list[str]


def select(
    records: list[_Rec],
    roots: Sequence[Path],
    tasks: list[str] | None,
    profiles: list[str] | None,
    tiers: list[str] | None,
) -> list[_Rec]:
    """Apply the --task/--profile/--tier filters; an unknown value is a BenchError naming the valid ones."""
    where = ", ".join(str(r) for r in roots)
    if not records:
        raise BenchError(
            f"no run records under {where} (bench run writes them to <out>/records/<task>/<subtask>/"
            "*.json; give --from a run folder, its records/ folder or record files)"
        )
    for name, wanted, get in (
        ("--task", tasks, lambda r: r.task),
        ("--profile", profiles, lambda r: r.profile),
        ("--tier", tiers, lambda r: r.tier),
    ):
        if not wanted:
            continue
        present = sorted({get(r) for r in records})
        unknown = [w for w in wanted if w not in present]
        if unknown:
            import difflib

            hints = [
                f"{u!r}"
                + (
                    f" (did you mean {', '.join(close)}?)"
                    if (close := difflib.get_close_matches(u, present, n=2, cutoff=0.5))
                    else ""
                )
                for u in unknown
            ]
            raise BenchError(
                f"{name} {', '.join(hints)}: no records with that value under {where}. "
                f"Values present: {', '.join(present)}"
            )
        records = [r for r in records if get(r) in wanted]
        if not records:  # the filters together exclude everything
            raise BenchError(f"no records under {where} match the filters given")
    return records


def build_leaderboards(
    roots: Sequence[Path],
    out: Path,
    *,
    tasks: list[str] | None = None,
    profiles: list[str] | None = None,
    tiers: list[str] | None = None,
    command: str | None = None,
    plots: bool = True,
) -> BuildResult:
    """Read records, build every table, and write markdown/JSON per family, CSV per table, plots and HTML.

    Everything is computed (and every filter checked) before the first file is written, so bad input
    writes nothing."""
    from bench.store import atomic_write_bytes

    recs, skipped = load_records(roots, compact=True)
    unique, dupes = dedupe(select(recs, roots, tasks, profiles, tiers))
    tables = tables_of(unique, None)
    written: list[Path] = []
    plot_files: dict[str, dict[str, dict[str, bytes]]] = {}
    if plots:
        try:
            from bench import plots as lplots
        except ImportError as exc:  # matplotlib is in the report extra
            note = (
                f"Pareto plots not drawn: {exc.name or 'matplotlib'} is not installed "
                "(pip install 'bench[report]')."
            )
            for t in tables:
                t.plot_note = note
        else:
            for t in tables:
                rendered = lplots.render_table(t)
                plot_files[t.slug] = rendered
                t.plots = {
                    kind: {fmt: f"plots/{t.slug}-{kind}.{fmt}" for fmt in files}
                    for kind, files in rendered.items()
                }
                if not rendered:
                    t.plot_note = (
                        "No Pareto plot: no row has both a quality score and the efficiency numbers."
                    )
    by_task: dict[str, list[Table]] = defaultdict(list)
    for t in tables:
        by_task[t.task].append(t)
    header = _header(command)
    outputs: list[tuple[Path, str | bytes]] = []
    for task, ts in by_task.items():
        n = sum(t.n_records for t in ts)
        tiers = sorted(
            {t.tier for t in ts}, key=lambda x: list(TIER_NOTES).index(x) if x in TIER_NOTES else 9
        )
        intro = (
            f"{len(ts)} table(s) from {n} run records: one per tier and hardware profile. Data: "
            f"[{task}.json]({task}.json); CSV per table; all tables on one page: [index.html](index.html)."
        )
        if tiers == ["smoke"]:
            intro += (
                "\n\n**Smoke tier only**: generated data and tiny random-initialised models. These "
                "tables show "
                "that the harness runs end to end and what it reports; they say nothing about how "
                "the methods "
                "compare on real data."
            )
        md = [header, f"# {task} leaderboard", "", intro, ""]
        for t in ts:
            md.append(f"CSV: [{t.slug}.csv]({t.slug}.csv)\n")
            md.append(to_markdown(t, heading="##"))
        outputs.append((out / f"{task}.md", "\n".join(md)))
        outputs.append(
            (
                out / f"{task}.json",
                json.dumps(
                    {
                        "schema_version": 1,
                        "generated_by": command,
                        "task": task,
                        "tables": [to_dict(t) for t in ts],
                    },
                    indent=1,
                    allow_nan=False,
                    default=str,
                )
                + "\n",
            )
        )
        for t in ts:
            outputs.append((out / f"{t.slug}.csv", to_csv(t)))
    for slug, kinds in plot_files.items():
        for kind, files in kinds.items():
            for fmt, data in files.items():
                outputs.append((out / "plots" / f"{slug}-{kind}.{fmt}", data))
    from bench import html

    outputs.append((out / "index.html", html.page(tables, plot_files, command)))
    for path, content in outputs:
        atomic_write_bytes(path, content if isinstance(content, bytes) else content.encode("utf-8"))
        written.append(path)
    return BuildResult(tables, written, skipped, dupes)


def _header(command: str | None) -> str:
    cmd = command or "bench leaderboard build"
    return (
        "<!-- Generated by bench from run records. Do not edit by hand: regenerate with the command "
        "below. -->\n"
        f"Regenerate with: `{cmd}`\n"
    )


