"""The command line as a user meets it: bad input exits 2 with a useful message and writes nothing;
help and listing stay light (no torch import); validate and show work on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app

REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_unknown_method_suggests_and_lists(tmp_path):
    out = tmp_path / "runs"
    res = invoke("run", "--methods", "tiad", "--task", "glue", "--out", str(out))
    assert res.exit_code == 2
    assert "did you mean taid" in res.output
    for name in ("kd", "minima", "student", "taid", "teacher"):
        assert name in res.output
    assert not out.exists()


def test_out_of_bounds_parameter_names_field_and_bounds(tmp_path):
    out = tmp_path / "runs"
    res = invoke("run", "--methods", "taid,minima", "--task", "glue", "--set", "taid.t_start=2", "--out", str(out))
    assert res.exit_code == 2
    assert "taid.t_start" in res.output
    assert "0 <= value < 1" in res.output and "default 0.4" in res.output
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--set", "taid.nope=1"], "taid.nope: unknown field"),
    (["--set", "kd.temperature=2"], "method 'kd' is not part of this run"),
    (["--set", "bogus=1"], "unknown key 'bogus'"),
    (["--task", "glue/sst3"], "did you mean sst2"),
    (["--task", "gleu"], "did you mean glue"),
    (["--seeds", "a,b"], "--seeds"),
    (["--tier", "huge"], "tier"),
    (["--data-root", "/nonexistent/dir"], "data root"),
])
def test_bad_input_exits_2_without_writing(tmp_path, args, needle):
    out = tmp_path / "runs"
    base = ["run", "--methods", "taid", "--task", "glue", "--out", str(out)]
    if "--task" in args:
        base = ["run", "--methods", "taid", "--out", str(out)]
    res = invoke(*base, *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not out.exists()


def test_validate_reports_problems_in_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("schema_version: 1\ntasks: [glue/sst2, glue/rte]\nmethods: [kd, {name: taid, params: {t_start: 0.2}}]\n"
                    "seeds: [0, 1]\n")
    res = invoke("validate", str(good))
    assert res.exit_code == 0 and "16 cells" in res.output  # 2 subtasks x (teacher, student, kd, taid) x 2 seeds
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [glue]\nmethods: [taid]\nsteps: 10\n")
    res = invoke("validate", str(bad))
    assert res.exit_code == 2 and "steps: unknown field" in res.output and "valid fields" in res.output
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("tasks: !!python/object:os.system [glue]\nmethods: [taid]\n")
    res = invoke("validate", str(tagged))
    assert res.exit_code == 2 and "not valid YAML" in res.output
    binary = tmp_path / "s.yaml"
    binary.write_bytes(b"\xff\xfe")  # a UTF-16 byte-order mark: not UTF-8 text
    for cmd in (("validate", str(binary)), ("run", "--suite", str(binary), "--out", str(tmp_path / "runs"))):
        res = invoke(*cmd)
        assert res.exit_code == 2 and "not UTF-8 text" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


def test_shipped_suites_validate():
    suites = sorted((REPO / "leaderboards" / "suites").glob("*.yaml"))
    assert suites
    for path in suites:
        res = invoke("validate", str(path))
        assert res.exit_code == 0, (path, res.output)


CHECK_NO_TORCH = """
import sys
from typer.testing import CliRunner
from bench.cli import app
for args in (["--help"], ["ls"], ["ls", "methods"], ["run", "--help"]):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (args, res.output)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy", "pandas"))
print("HEAVY", heavy)
"""


def test_help_and_ls_do_not_import_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHECK_NO_TORCH], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_ls_lists_methods_with_summaries():
    res = invoke("ls", "methods")
    assert res.exit_code == 0
    assert "taid" in res.output and "Shing" in res.output
    res = invoke("ls", "tasks")
    assert "glue" in res.output and "sst2" in res.output


def test_show_unknown_and_corrupt_records(tmp_path):
    res = invoke("show", "nope--x", "--out", str(tmp_path))
    assert res.exit_code == 2 and "no run record" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = invoke("show", str(bad))
    assert res.exit_code == 2 and "corrupt record" in res.output
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"cell": {}, "status": "ok"})[:-1])
    assert invoke("show", str(rec)).exit_code == 2
