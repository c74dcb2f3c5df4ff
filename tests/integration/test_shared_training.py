"""Subtasks that are protocols of one trained model (``Task.shared_training``: sam's box and point prompts)
share one training per configuration: what is reused, what ``--force`` retrains, and what a changed budget
retrains."""

from __future__ import annotations

import pytest

from bench.config import Suite, resolve
from bench.profiles import detect_profile
from bench.runner import RunOptions, execute
from bench.store import read_record

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, cache_dir, steps: int = 3, force: bool = False) -> dict[str, dict]:
    suite = Suite(tasks=["sam"], methods=["student"], seeds=[0], tier="smoke", out=str(out),
                  train={"steps": steps}, runtime={"measure": False}, references=False,
                  task_params={"sam": {"eval_images": 2}})
    summary = execute(resolve(suite), RunOptions(out=out, cache_dir=cache_dir, data_root=None,
                                                 profile=detect_profile(), force=force))
    assert not summary.failed
    return {o.cell.subtask: read_record(o.path) for o in summary.outcomes}


def test_box_and_point_evaluate_one_trained_student(tmp_path, cache_dir):
    out = tmp_path / "runs"
    first = _run(out, cache_dir)
    box, point = first["box"]["training"]["shared"], first["point"]["training"]["shared"]
    assert box["reused"] is False and box["trained_in"] == first["box"]["cell_id"]
    assert point == {**box, "reused": True}
    assert first["point"]["training"]["loss_log"] == first["box"]["training"]["loss_log"]
    files = sorted((out / "trained" / "sam").iterdir())
    assert len(files) == 1 and box["key"] in files[0].name
    stamp = files[0].stat().st_mtime_ns

    # --force retrains once (the box cell) and the point cell evaluates that fresh model.
    forced = _run(out, cache_dir, force=True)
    assert forced["box"]["training"]["shared"]["reused"] is False
    assert forced["point"]["training"]["shared"]["reused"] is True
    assert forced["box"]["created"] >= first["box"]["created"] and files[0].stat().st_mtime_ns != stamp

    # Another budget is another training: a new key, trained again.
    longer = _run(out, cache_dir, steps=4)
    assert longer["box"]["training"]["shared"]["reused"] is False
    assert longer["box"]["training"]["shared"]["key"] != box["key"]
    assert longer["point"]["training"]["steps"] == 4
    assert len(list((out / "trained" / "sam").iterdir())) == 2


def test_the_teacher_row_records_whether_it_beats_the_no_model_floor(tmp_path, cache_dir):
    suite = Suite(tasks=["sam/box"], methods=["teacher"], seeds=[0], tier="smoke", out=str(tmp_path),
                  runtime={"measure": False}, references=False, task_params={"sam": {"eval_images": 2}})
    summary = execute(resolve(suite), RunOptions(out=tmp_path, cache_dir=cache_dir, data_root=None,
                                                 profile=detect_profile()))
    assert not summary.failed
    rec = read_record(summary.outcomes[0].path)
    m, q = rec["metrics"], rec["teacher_quality"]
    below = [b for b in q["below_floor"] if b["metric"] == "box_miou"]
    assert q["weak"] is bool(q["below_floor"])
    assert bool(below) is (m["box_miou"] <= m["box_fill_miou"])
    assert all(b["value"] == m[b["metric"]] and b["floor_value"] == m[b["floor"]] for b in q["below_floor"])
