"""The coco_fid task's own choices: generated images get the real images' JPEG encoding at the small tier,
and the smoke tier never calls its number an FID."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from bench.api import TaskEnv


def test_generated_images_get_the_cifar_copys_jpeg_encoding(data_root):
    from PIL import Image

    from bench.tasks.coco_fid import JPEG_QUALITY, jpeg_roundtrip

    zf = zipfile.ZipFile(data_root / "cifar10" / "cifar10_jpeg.zip")
    name = next(n for n in zf.namelist() if n.endswith(".jpg"))
    real = Image.open(io.BytesIO(zf.read(name)))
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = jpeg_roundtrip(fake, JPEG_QUALITY)
    assert out.shape == fake.shape and out.dtype == np.uint8 and not np.array_equal(out, fake)
    buf = io.BytesIO()
    Image.fromarray(fake[0]).save(buf, "JPEG", quality=JPEG_QUALITY)
    again = Image.open(buf)
    assert again.quantization == real.quantization  # the same tables, hence the same quantisation
    from PIL import JpegImagePlugin

    assert JpegImagePlugin.get_sampling(again) == JpegImagePlugin.get_sampling(real)


def test_smoke_tier_labels_its_distance_as_not_fid(tmp_path):
    from bench.tasks.coco_fid import CocoFID

    task = CocoFID(CocoFID.Params(), TaskEnv("smoke", "val", None, tmp_path))
    names = [m.name for m in task.metrics()]
    assert "fid" not in names and names[0] == "fd_smoke"
    assert task.aggregate_name == "FD_smoke" and "NOT an FID" in task.aggregate_rule
    assert task.score_protocol() == {}


def test_small_tier_declares_the_jpeg_round_trip_in_its_evaluation_spec(data_root, tmp_path):
    from bench.tasks.coco_fid import CocoFID

    task = CocoFID(CocoFID.Params(), TaskEnv("small", "val", data_root, tmp_path))
    assert task._eval_spec()["jpeg_quality"] == 75 and [m.name for m in task.metrics()][0] == "fid"
    with pytest.raises(Exception, match="unknown subtask"):
        CocoFID(CocoFID.Params(), TaskEnv("small", "test", data_root, tmp_path))
