"""The on-disk cache of task-trained teachers (bench/teachers.py): trained once per identity, found again by
content (not by where a checkpoint is installed), never half-written, and retrained when unreadable (a corrupt entry is replaced, never loaded)."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch

import bench.train
from bench.teachers import cached_teacher, checkpoint_identity, identity_key


def write_checkpoint(folder, weights: bytes) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 4}')
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "sub").mkdir()
    (folder / "sub" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return str(folder)


def test_checkpoint_identity_is_the_content_not_the_install_path(tmp_path):
    a = write_checkpoint(tmp_path / "venv-a" / "site-packages" / "pkg", b"\x00\x01\x02")
    b = write_checkpoint(tmp_path / "venv-b" / "lib" / "pkg", b"\x00\x01\x02")
    changed = write_checkpoint(tmp_path / "venv-c" / "pkg", b"\x00\x01\x03")
    ident_a, ident_b = checkpoint_identity(a), checkpoint_identity(b)
    assert ident_a == ident_b
    assert identity_key({"checkpoint": ident_a}) == identity_key({"checkpoint": ident_b})
    assert checkpoint_identity(changed) != ident_a
    # every file counts, named relative to the folder; the hashes are plain sha256 of the bytes
    assert ident_a == {"folder_sha256": {
        "config.json": hashlib.sha256(b'{"hidden_size": 4}').hexdigest(),
        "model.safetensors": hashlib.sha256(b"\x00\x01\x02").hexdigest(),
        "sub/vocab.txt": hashlib.sha256(b"[PAD]\n[UNK]\n").hexdigest(),
    }}


def test_hub_ids_and_config_built_models_keep_their_identity():
    assert checkpoint_identity("nreimers/MiniLM-L6-H384-uncased") == "nreimers/MiniLM-L6-H384-uncased"
    assert checkpoint_identity(None) is None


@pytest.fixture
def fake_training(monkeypatch):
    """`supervised` replaced by a counter that sets the weights to a known value (no real training)."""
    calls = []

    def supervised(task, model, cfg, *, seed, device="cpu", description=""):
        calls.append(description)
        with torch.no_grad():
            model.weight.fill_(len(calls))
        return model, bench.train.TrainResult(steps=cfg.steps, loss_log=[{"student": 0.5}])

    monkeypatch.setattr(bench.train, "supervised", supervised)
    return calls


def make_task(tmp_path):
    cfg = SimpleNamespace(steps=3)
    return SimpleNamespace(name="toy", env=SimpleNamespace(cache_dir=str(tmp_path), device="cpu"),
                           teacher_training=lambda: cfg, evaluate=lambda model: {"acc": 1.0})


def get(task, identity):
    return cached_teacher(
        task, name="t", label="small-t", identity=identity,
        build=lambda: torch.nn.Linear(2, 2, bias=False),
        save=_save,
        load=lambda folder: _load(folder), description="Training toy teacher")


def _save(model, folder):
    folder.mkdir()
    torch.save(model.state_dict(), folder / "w.pt")


def _load(folder):
    model = torch.nn.Linear(2, 2, bias=False)
    model.load_state_dict(torch.load(folder / "w.pt"))
    return model


def test_trained_once_then_loaded_from_the_cache(tmp_path, fake_training):
    task = make_task(tmp_path)
    first, info = get(task, {"seed": 0})
    assert info["cache"] == "trained" and info["steps"] == 3 and info["eval_metrics"] == {"acc": 1.0}
    again, info2 = get(task, {"seed": 0})
    assert info2["cache"] == "hit" and fake_training == ["Training toy teacher"]
    assert torch.equal(again.weight, first.weight)
    folder = tmp_path / "toy" / "teachers" / f"small-t-{identity_key({'seed': 0})}"
    assert info2["path"] == str(folder)
    assert json.loads((folder / "meta.json").read_text())["identity"] == {"seed": 0}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no temporary folder is left behind"


def test_a_changed_identity_trains_a_new_teacher_beside_the_old(tmp_path, fake_training):
    task = make_task(tmp_path)
    get(task, {"seed": 0})
    _, info = get(task, {"seed": 0, "steps": 4})
    assert info["cache"] == "trained" and len(fake_training) == 2
    assert len(list((tmp_path / "toy" / "teachers").iterdir())) == 2


def test_an_unreadable_entry_is_retrained(tmp_path, fake_training):
    task = make_task(tmp_path)
    _, info = get(task, {"seed": 0})
    folder = tmp_path / "toy" / "teachers" / f"small-t-{identity_key({'seed': 0})}"
    (folder / "w.pt").write_bytes(b"not a checkpoint")
    model, info2 = get(task, {"seed": 0})
    assert info2["cache"] == "trained" and len(fake_training) == 2
    assert torch.all(model.weight == 2)
    assert torch.equal(_load(folder).weight, model.weight), "the retrained teacher replaced the corrupt entry"


def test_concurrent_cells_train_a_cold_teacher_once(tmp_path, monkeypatch):
    """Two cells needing the same cold teacher at once (Ray workers, two runs on one cache): the second waits
    for the first's lock and loads its teacher instead of training another. Threads stand in for processes
    (flock locks are per open file, so two threads conflict as two processes do)."""
    import threading
    import time

    calls = []

    def supervised(task, model, cfg, *, seed, device="cpu", description=""):
        calls.append(description)
        time.sleep(0.5)  # the second cell arrives while the first is training
        with torch.no_grad():
            model.weight.fill_(7.0)
        return model, bench.train.TrainResult(steps=cfg.steps, loss_log=[{"student": 0.5}])

    monkeypatch.setattr(bench.train, "supervised", supervised)
    task, infos = make_task(tmp_path), []

    def cell():
        model, info = get(task, {"seed": 0})
        infos.append((info["cache"], float(model.weight.detach().sum())))

    threads = [threading.Thread(target=cell) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert calls == ["Training toy teacher"]
    assert sorted(infos) == [("hit", 28.0), ("trained", 28.0)]
