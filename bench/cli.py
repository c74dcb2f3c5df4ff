"""The ``bench`` command line.

Start-up imports only typer, rich, pydantic and bench's light modules: ``bench --help`` and
``bench ls`` never import torch. Bad input exits with code 2 and writes nothing; a run with failed
cells exits with code 1 after writing every record and the leaderboard.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from bench import BenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Declarative benchmark suite and leaderboard harness for knowledge distillation.\n\n"
         "Example: [bold]bench run --methods taid,minima --task glue[/bold] (smoke tier, offline, minutes on a CPU).",
)
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def _fail(exc: BenchError) -> typer.Exit:
    from rich.markup import escape

    # escaped: a message may hold brackets that are not markup, e.g. pip install 'bench[ray]'
    console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, highlight=False)
    return typer.Exit(2)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@app.command("ls")
def ls(what: str = typer.Argument("all", help="methods, tasks, all, or one method's or task's name "
                                                "(lists its parameters, their defaults and ranges)")) -> None:
    """List the registered methods and tasks (built-in and plugins), without importing them; with a name,
    list that method's or task's parameters (set them with --set NAME.PARAM=VALUE)."""
    from rich.table import Table

    from bench import registry

    if what not in ("all", "methods", "tasks"):
        if what in registry.methods or what in registry.tasks:
            _ls_params(what)
            return
        raise _fail(BenchError(f"bench ls {what!r}: expected methods, tasks, all, or one of "
                               f"{', '.join(registry.methods.names() + registry.tasks.names())}"))
    try:
        if what in ("all", "methods"):
            t = Table(title="methods", title_justify="left")
            for col in ("name", "domains", "summary"):
                t.add_column(col)
            for name in registry.methods.names():
                info = registry.methods.describe(name)
                t.add_row(name, ", ".join(info.get("domains") or []), info.get("summary", ""))
            out_console.print(t)
        if what in ("all", "tasks"):
            t = Table(title="tasks", title_justify="left")
            for col in ("name", "domain", "subtasks", "summary"):
                t.add_column(col)
            for name in registry.tasks.names():
                info = registry.tasks.describe(name)
                t.add_row(name, str(info.get("domain") or ""), ", ".join(info.get("subtasks") or []),
                          info.get("summary", ""))
            out_console.print(t)
    except BenchError as exc:
        raise _fail(exc) from None


def _ls_params(name: str) -> None:
    """The parameters of method or task ``name`` (both, when a method and a task share the name)."""
    from rich.table import Table

    from bench import registry
    from bench.config import describe_field

    for kind, reg in (("method", registry.methods), ("task", registry.tasks)):
        if name not in reg:
            continue
        try:
            cls = reg.get(name)
        except BenchError as exc:
            raise _fail(exc) from None
        doc = (cls.__doc__ or "").strip().splitlines()
        t = Table(title=f"{kind} {name}: {doc[0] if doc else ''}", title_justify="left")
        t.add_column("parameter (--set " + name + ".PARAM=VALUE)")
        for field in cls.Params.model_fields:
            t.add_row(describe_field(cls.Params, field))
        if not cls.Params.model_fields:
            t.add_row("(no parameters)")
        out_console.print(t)


def _task_specs(items: List[str]) -> list[str]:
    """``--task glue/sst2,rte --task other`` -> [glue/sst2,rte, other]: after a ``task/subtask`` spec,
    comma-separated names that are not tasks continue its subtask list."""
    from bench import registry

    specs: list[str] = []
    for item in items:
        for part in _split(item):
            if specs and "/" in specs[-1] and "/" not in part and part not in registry.tasks:
                specs[-1] += "," + part
            else:
                specs.append(part)
    return specs


def _build_suite(suite_file: Optional[Path], methods: Optional[str], task: Optional[List[str]], tier: Optional[str],
                 seeds: Optional[str], steps: Optional[int], data_root: Optional[str], out: Optional[str],
                 sets: List[str], profile: Optional[str]):
    from pydantic import ValidationError

    from bench.config import Suite, apply_overrides, format_validation_error, load_suite

    if suite_file is not None:
        suite = load_suite(suite_file)
        data = suite.model_dump()
    else:
        if not methods or not task:
            raise BenchError("bench run needs --methods and --task (e.g. --methods taid,minima --task glue), "
                             "or --suite FILE")
        data = {}
    if methods:
        data["methods"] = _split(methods)
    if task:
        data["tasks"] = _task_specs(task)
    for key, value in (("tier", tier), ("data_root", data_root), ("out", out), ("profile", profile)):
        if value is not None:
            data[key] = value
    if seeds is not None:
        try:
            data["seeds"] = [int(s) for s in _split(seeds)]
        except ValueError:
            raise BenchError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if steps is not None:
        data.setdefault("train", {})["steps"] = steps
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        raise BenchError("invalid run options\n" + format_validation_error(exc, "", Suite)) from None
    return apply_overrides(suite, sets)


@app.command()
def run(
    methods: Optional[str] = typer.Option(None, "--methods", "-m", help="Comma-separated method names (see bench ls)."),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t",
                                             help="Task, or task/subtask[,subtask] (e.g. glue, glue/sst2,rte)."),
    suite: Optional[Path] = typer.Option(None, "--suite", help="A suite YAML file (see leaderboards/suites/)."),
    tier: Optional[str] = typer.Option(None, "--tier", help="smoke (generated data, default), small (real data from "
                                                          "--data-root) or full (paper-scale; downloads)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default 0)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per cell (default: the task's budget)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder with real data (small tier); "
                                                                      "default $BENCH_DATA."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder for records and tables (default runs/)."),
    sets: List[str] = typer.Option([], "--set", help="Override key=value: <method>.<param>, <task>.<param>, "
                                                     "train.<field>, runtime.<field> or a suite field. Repeatable."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Hardware profile id (default: derived from this "
                                                                  "machine)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Run even if this machine does not match "
                                                                        "--profile; rows are marked unverified."),
    force: bool = typer.Option(False, "--force", help="Redo cells that already have a finished record."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache for trained teachers "
                                                                       "(default $BENCH_CACHE or ~/.cache/bench)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    executor: str = typer.Option("local", "--executor", help="Where cells run: local (one after another in this "
                                                             "process) or ray (each cell a Ray task; needs "
                                                             "pip install 'bench\\[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --executor ray: the cluster to "
                                                                          "connect to (auto, HOST:PORT or "
                                                                          "ray://HOST:10001); default: start a "
                                                                          "local one on this machine's cores."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Processes per cell: above 1, each cell trains "
                                                                   "data-parallel (CPU: gloo; CUDA: nccl, one GPU "
                                                                   "per process), same global batch and budget."),
) -> None:
    """Train and evaluate every (method, task, subtask, seed) cell, record it, and print the leaderboard."""
    from bench.config import resolve
    from bench.executors import check_executor
    from bench.runner import check_data_root, default_cache_dir

    try:
        check_executor(executor, ray_address)
        s = _build_suite(suite, methods, task, tier, seeds, steps, data_root, out, sets, profile)
        resolved = resolve(s)
        root = check_data_root(data_root or os.environ.get("BENCH_DATA") or s.data_root)
        from bench.profiles import select_profile

        # On a remote Ray cluster this machine only schedules: each worker checks its own hardware instead.
        prof = select_profile(s.profile, allow_mismatch=allow_mismatch or ray_address is not None)
        if nproc_per_node != 1:
            from bench import distributed, registry

            distributed.check(nproc_per_node, executor, [registry.methods.get(m) for m in resolved.method_params],
                              [registry.tasks.get(t) for t, _ in resolved.tasks])
    except BenchError as exc:
        raise _fail(exc) from None
    code = _execute(resolved, root, cache_dir or default_cache_dir(), prof, force, quiet, executor=executor,
                    ray_address=ray_address, allow_mismatch=allow_mismatch, nproc_per_node=nproc_per_node)
    raise typer.Exit(code)


def _invocation() -> str | None:
    """This process's command line as a user would retype it (``bench run ...``), or None when bench was not
    started as a command (e.g. called through typer's test runner inside another program)."""
    import shlex

    if Path(sys.argv[0]).name not in ("bench", "__main__.py", "cli.py"):
        return None
    return shlex.join(["bench", *sys.argv[1:]])


def _execute(resolved, root, cache_dir: Path, prof: dict[str, Any], force: bool, quiet: bool,
             print_tables: bool = True, executor: str = "local", ray_address: str | None = None,
             allow_mismatch: bool = False, nproc_per_node: int = 1) -> int:
    from bench import leaderboard, progress, table as tables
    from bench.executors import execute
    from bench.runner import RunOptions

    out = Path(resolved.suite.out)
    opts = RunOptions(out=out, cache_dir=Path(cache_dir), data_root=root, profile=prof, force=force,
                      device=prof.get("run_device") or prof.get("device", "cpu"), nproc_per_node=nproc_per_node,
                      invocation=_invocation())
    reporter = None if quiet else (_RichReporter(console) if console.is_terminal else _PlainReporter(console))
    progress.set_reporter(reporter)
    try:
        if reporter:
            reporter.open()
        summary = execute(resolved, opts, executor, ray_address, allow_mismatch=allow_mismatch, quiet=quiet)
    except BenchError as exc:
        raise _fail(exc) from None
    finally:
        if reporter:
            reporter.close()
        progress.set_reporter(None)
    from bench.store import read_record

    records = [read_record(o.path) for o in summary.outcomes]
    order = list(resolved.method_params)
    for table in leaderboard.build_tables(records, order) if print_tables else []:
        md, csv_path = tables.write(table, out)
        sys.stdout.write(tables.to_markdown(table) + "\n")
        sys.stdout.flush()
        console.print(f"wrote {md} and {csv_path}")
    reused = sum(o.reused for o in summary.outcomes)
    counts = {s: sum(o.status == s for o in summary.outcomes) for s in ("ok", "skipped", "failed")}
    console.print(f"{len(summary.outcomes)} cells: {counts['ok']} ok ({reused} reused from earlier records), "
                  f"{counts['skipped']} skipped, {counts['failed']} failed. Records under {out / 'records'}")
    for o in summary.failed:
        console.print(f"[red]failed[/red] {o.cell.id}: {o.reason}  (bench show {o.path})", highlight=False)
    return 1 if summary.failed else 0


class _RichReporter:
    """Progress bars on stderr (rich); a cell's bar disappears when the cell is done."""

    def __init__(self, con: Console) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=con, transient=False)
        self._top: int | None = None

    def open(self) -> None:
        self.progress.start()

    def close(self) -> None:
        self.progress.stop()

    def start(self, description: str, total: int | None) -> int:
        handle = self.progress.add_task(description, total=total, info="")
        if self._top is None:
            self._top = handle
        return handle

    def advance(self, handle: int, completed: int, info: str = "") -> None:
        self.progress.update(handle, completed=completed, info=info)

    def stop(self, handle: int) -> None:
        if handle != self._top:
            self.progress.remove_task(handle)

    def log(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)


class _PlainReporter:
    """Progress for logs (CI, redirected output): a line at start, every 10%, and at the end of each bar."""

    def __init__(self, con: Console) -> None:
        import time

        self.console, self.clock = con, time.perf_counter
        self.bars: dict[int, list] = {}
        self._next = 0

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def start(self, description: str, total: int | None) -> int:
        self._next += 1
        self.bars[self._next] = [description, total, self.clock(), 0]
        if self._next > 1:
            self.log(f"{description} ...")
        return self._next

    def advance(self, handle: int, completed: int, info: str = "") -> None:
        bar = self.bars[handle]
        description, total, _, last = bar
        if handle == 1:  # the overall bar: one line per finished cell
            self.log(f"[{completed}/{total}] {info}")
        elif total and completed * 10 // total > last:
            bar[3] = completed * 10 // total
            self.log(f"  {description}: {completed}/{total} {info}")

    def stop(self, handle: int) -> None:
        description, _, t0, _ = self.bars.pop(handle)
        if handle > 1:
            self.log(f"  done in {self.clock() - t0:.1f} s: {description}")

    def log(self, message: str) -> None:
        from rich.text import Text

        self.console.print(Text.from_markup(message).plain, highlight=False, markup=False, soft_wrap=True)


@app.command()
def validate(file: Path = typer.Argument(..., help="Suite YAML file.")) -> None:
    """Check a suite file: schema, names, parameters. Exits 2 naming what is wrong."""
    from bench.config import load_suite, resolve

    try:
        suite = load_suite(file)
        resolved = resolve(suite)
    except BenchError as exc:
        raise _fail(exc) from None
    n_sub = sum(len(s) for _, s in resolved.tasks)
    n = n_sub * len(resolved.method_params) * len(suite.seeds)
    out_console.print(f"{file}: OK — {n} cells ({n_sub} subtasks x {len(resolved.method_params)} methods x "
                      f"{len(suite.seeds)} seeds), tier {suite.tier}")


@app.command()
def show(
    run_ref: str = typer.Argument(..., metavar="RUN", help="A record path, or a cell id found under --out."),
    out: List[Path] = typer.Option([Path("runs")], "--out", "-o", help="Where to look for a cell id."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON."),
) -> None:
    """Show one run record: status, metrics, efficiency, training cost, provenance."""
    from bench.store import find_record, read_record

    try:
        path = find_record(run_ref, list(out))
        rec = read_record(path)
    except BenchError as exc:
        raise _fail(exc) from None
    if as_json:
        out_console.print_json(json.dumps(rec, default=str))
        return
    c = rec["cell"]
    lines = [f"[bold]{rec['cell_id']}[/bold]  ({path})",
             f"status: {rec['status']}" + (f" — {rec['reason']}" if rec.get("reason") else "")]
    if rec["status"] == "ok":
        lines.append("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in rec["metrics"].items())
                     + f"; {rec['aggregate']['name']} subtask score {rec['score']:.4f}")
        eff = rec.get("efficiency") or {}
        lines.append(f"params {eff.get('params')}, FLOPs/sample {eff.get('flops_per_sample')} ({eff.get('input')})")
        for name, lat in (eff.get("latency") or {}).items():
            if lat:
                lines.append(f"latency {name}: median {lat['median_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms, "
                             f"IQR/median {lat['spread']:.1%}{' (noisy)' if lat.get('noisy') else ''}")
        for name, mem in (eff.get("memory") or {}).items():
            if mem:
                lines.append(f"peak memory {name}: {mem['peak_bytes'] / 2**20:.1f} MiB ({mem.get('method', '')})")
        for k, v in (eff.get("errors") or {}).items():
            lines.append(f"[yellow]{k} not measured:[/yellow] {v}")
        tr = rec.get("training") or {}
        lines.append(f"training: {tr.get('steps')} steps, {tr.get('samples')} samples, {tr.get('wall_s')} s, "
                     f"teacher forward passes {tr.get('teacher_forward_passes')}")
        for note in rec.get("notes") or []:
            lines.append(f"note: {note}")
    lines.append(f"tier {c['tier']}, profile {c['profile']}, seed {c['seed']}, config {rec.get('config_hash')}, "
                 f"git {(rec.get('git') or {}).get('commit')}{' (dirty)' if (rec.get('git') or {}).get('dirty') else ''}")
    if rec.get("traceback"):
        lines.append(rec["traceback"])
    out_console.print("\n".join(lines), highlight=False)


@app.command()
def reproduce(
    run_ref: str = typer.Argument(..., metavar="RUN", help="A record path, or a cell id found under --from."),
    search: List[Path] = typer.Option([Path("runs")], "--from", help="Where to look for a cell id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the re-run (default: a new temporary "
                                                                 "folder)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Data root for small-tier records "
                                                                      "(default $BENCH_DATA)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Teacher cache (default $BENCH_CACHE or "
                                                                       "~/.cache/bench)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Re-run even if this machine does not "
                                                                        "match the record's declared profile."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Re-run the cell a record describes and print each metric's difference (exit 1 if any differs)."""
    import tempfile

    from bench.config import resolve
    from bench.reproduce import compare, provenance_notes, suite_from_record
    from bench.runner import check_data_root, default_cache_dir
    from bench.store import Cell, Store, find_record, read_record

    try:
        path = find_record(run_ref, list(search))
        old = read_record(path)
        target = out or Path(tempfile.mkdtemp(prefix="bench-reproduce-"))
        suite = suite_from_record(old, target)
        resolved = resolve(suite)
        root = check_data_root(data_root or os.environ.get("BENCH_DATA"))
        from bench.profiles import select_profile

        prof = select_profile(suite.profile, allow_mismatch=allow_mismatch)
    except BenchError as exc:
        raise _fail(exc) from None
    console.print(f"reproducing {old['cell_id']} from {path} into {target}")
    code = _execute(resolved, root, cache_dir or default_cache_dir(), prof, True, quiet, print_tables=False)
    c = old["cell"]
    new_path = Store(target).record_path(Cell(c["task"], c["subtask"], c["method"], c["tier"], prof["id"], c["seed"]))
    new = read_record(new_path)
    if new["status"] != "ok":
        console.print(f"[red]the re-run failed:[/red] {new.get('reason')}")
        raise typer.Exit(1)
    rows, exact = compare(old, new)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'quantity':<{width}}  {'original':>14}  {'reproduced':>14}  difference"]
    for name, a, b, diff in rows:
        fa = f"{a:.6g}" if isinstance(a, float) else str(a)
        fb = f"{b:.6g}" if isinstance(b, float) else str(b)
        lines.append(f"{name:<{width}}  {fa:>14}  {fb:>14}  {diff}")
    sys.stdout.write("\n".join(lines) + "\n")
    for note in provenance_notes(old, new):
        console.print(f"note: {note}", highlight=False)
    console.print("every quality metric, parameter count and FLOP count reproduced exactly" if exact
                  else "[yellow]some quantities differ (see above)[/yellow]")
    raise typer.Exit(0 if exact and code == 0 else 1)


# --------------------------------------------------------------------------------------------------
# Leaderboards and the CI regression gate (heavy imports inside the functions: bench --help stays light)
# --------------------------------------------------------------------------------------------------

leaderboard_app = typer.Typer(no_args_is_help=True, help="Leaderboard tables from run records.")
app.add_typer(leaderboard_app, name="leaderboard")


def _quote(arg: Any) -> str:
    import shlex

    return shlex.quote(str(arg))


@leaderboard_app.command("build")
def leaderboard_build(
    sources: List[Path] = typer.Option([Path("runs")], "--from",
                                       help="Run folder(s), records/ folder(s) or record files. Repeatable."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Only these task families."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Only these hardware profiles."),
    tier: Optional[str] = typer.Option(None, "--tier", help="Only these tiers, comma-separated."),
    out: Path = typer.Option(Path("leaderboards"), "--out", "-o", help="Where tables, plots and page go."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the Pareto plots."),
) -> None:
    """Build one table per task family, tier and profile: <task>.md and .json, a CSV per table, Pareto
    plots (PNG, SVG) and one self-contained HTML page (index.html). Exit 2 on bad input, writing nothing."""
    from bench.publish import build_leaderboards

    parts = ["bench leaderboard build", *(f"--from {_quote(s)}" for s in sources)]
    for flag, value in (("--task", task), ("--profile", profile), ("--tier", tier)):
        if value:
            parts.append(f"{flag} {_quote(value)}")
    parts.append(f"--out {_quote(out)}")
    if no_plots:
        parts.append("--no-plots")
    try:
        result = build_leaderboards(sources, out, tasks=_split(task) or None,
                                    profiles=_split(profile) or None, tiers=_split(tier) or None,
                                    command=" ".join(parts), plots=not no_plots)
    except BenchError as exc:
        raise _fail(exc) from None
    for note in result.skipped[:10]:
        console.print(f"[yellow]ignored[/yellow] {note}", highlight=False)
    if len(result.skipped) > 10:
        console.print(f"[yellow]ignored[/yellow] {len(result.skipped) - 10} more files that are not records")
    if result.duplicates:
        console.print(f"[yellow]{len(result.duplicates)} cells have several records; the newest was "
                      f"used[/yellow] (e.g. {result.duplicates[0]})", highlight=False)
    for t in result.tables:
        console.print(f"{t.task} — tier {t.tier}, profile {t.profile}: {len(t.rows)} rows from {t.n_records} "
                      "records", highlight=False)
    console.print(f"wrote {len(result.files)} files under {out} (open {out / 'index.html'})", highlight=False)


@app.command()
def gate(
    baseline: Path = typer.Option(..., "--baseline",
                                  help="Baseline JSON (e.g. leaderboards/baselines/ci-smoke.json)."),
    current: Optional[List[Path]] = typer.Option(
        None, "--current", help="Run folder(s) or records to gate (default: the suite's out, else runs)."),
    suite: Optional[Path] = typer.Option(
        None, "--suite", help="Suite whose gate rules apply (default: the rules stored in the baseline)."),
    only: Optional[str] = typer.Option(
        None, "--only", help="Gate only these metrics: quality, params, flops, latency, memory."),
    summary: Optional[Path] = typer.Option(
        None, "--summary", help="Markdown for a pull-request comment (default <current>/gate-summary.md)."),
    report: Optional[Path] = typer.Option(
        None, "--report", help="JSON report (default <current>/gate-report.json)."),
    update_baseline: bool = typer.Option(
        False, "--update-baseline", help="Write a new baseline from the current runs instead of gating."),
) -> None:
    """Compare current run records with a baseline under the suite's per-metric rules. Exit 1 on a
    regression, 0 otherwise, 2 on bad input (nothing written)."""
    from bench import gate as g
    from bench.publish import load_records
    from bench.store import atomic_write_text

    try:
        rules, suite_info, roots = None, None, list(current or [])
        if suite is not None:
            from bench.config import load_suite

            s = load_suite(suite)
            rules, suite_info = s.gate, {"name": s.name, "file": str(suite)}
            roots = roots or [Path(s.out)]
        roots = roots or [Path("runs")]
        wanted = _split(only) if only is not None else None
        if wanted is not None:
            bad = [m for m in wanted if m not in g.METRICS]
            if bad or not wanted:
                raise BenchError(f"--only {only!r}: unknown metric(s) {', '.join(bad) or '(none given)'}; "
                                 f"valid: {', '.join(g.METRICS)}")
        base = None
        if not update_baseline or baseline.exists():
            try:
                base = g.load_baseline(baseline)
            except BenchError:
                if not update_baseline:
                    raise
        if rules is None:
            rules = g.baseline_rules(base, baseline) if base is not None else g.GateRules()
            suite_info = (base or {}).get("suite")
        where = ", ".join(str(r) for r in roots)
        records, _skipped = load_records(roots)
        if not records:
            raise BenchError(f"no run records under {where} (bench run writes them to <out>/records/; give "
                             "--current a run folder, its records/ folder or record files)")
        if update_baseline:
            cmd = " ".join(["bench gate", f"--baseline {_quote(baseline)}",
                            *(f"--current {_quote(r)}" for r in roots),
                            *([f"--suite {_quote(suite)}"] if suite else []), "--update-baseline"])
            data = g.make_baseline(records, rules, suite_info, where, cmd)
            atomic_write_text(baseline, json.dumps(data, indent=1, allow_nan=False) + "\n")
            console.print(f"wrote baseline {baseline}: {len(data['cells'])} cells from {where}",
                          highlight=False)
            return
        cur = g.entries(records, where)
        rep = g.compare(base, cur, rules, wanted, str(baseline), where)
    except BenchError as exc:
        raise _fail(exc) from None
    text = g.to_markdown(rep)
    folder = roots[0] if roots[0].is_dir() else roots[0].parent
    summary_path, report_path = summary or folder / "gate-summary.md", report or folder / "gate-report.json"
    atomic_write_text(summary_path, text)
    atomic_write_text(report_path, json.dumps(g.json_safe(rep.as_dict()), indent=1, allow_nan=False) + "\n")
    sys.stdout.write(text)
    sys.stdout.flush()
    console.print(f"wrote {summary_path} and {report_path}", highlight=False)
    raise typer.Exit(1 if rep.regressions else 0)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; finished cells are recorded, an unfinished one resumes from its checkpoint")
        sys.exit(130)


if __name__ == "__main__":
    main()
