"""The imagenet family's data: the standard class order, ImageFolder scanning and its errors, timm's
per-model evaluation preprocessing, CIFAR-10 extraction, the smoke generator, and the decoded cache."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bench.tasks.imagenet import data as idata
from bench.tasks.imagenet.models import LITE0_DATA_CONFIG
from PIL import Image

from bench import BenchError


def _image(path: Path, colour=(200, 30, 30), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_wordnet_ids_index_into_the_standard_1000_class_order():
    synsets = idata.imagenet_synsets()
    assert len(synsets) == 1000 and list(synsets) == sorted(synsets)
    assert synsets[0] == "n01440764" and synsets[281] == "n02123045"  # tench; tabby cat
    # A root holding two of the classes still indexes them in the 1,000-way space.
    space = idata.class_space(["n02123045", "n01440764"])
    assert space == synsets
    # Other folder names: their sorted order (CIFAR-10's names sort into its label order).
    assert idata.class_space(["truck", "airplane", "cat"]) == ("airplane", "cat", "truck")


def test_scan_reads_the_standard_layout(tmp_path):
    _image(tmp_path / "val" / "n02123045" / "b.JPEG")
    _image(tmp_path / "val" / "n02123045" / "a.jpg")
    _image(tmp_path / "val" / "n01440764" / "x.png")
    (tmp_path / "val" / "n01440764" / "notes.txt").write_text("not an image")
    index = idata.scan(tmp_path, "val")
    assert index.files == ("n01440764/x.png", "n02123045/a.jpg", "n02123045/b.JPEG")
    assert index.labels == (0, 281, 281) and len(index.classes) == 1000
    assert len(index.fingerprint()) == 64


def test_scan_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(BenchError, match="no val/ folder"):
        idata.scan(tmp_path, "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(BenchError, match="no class folders"):
        idata.scan(tmp_path, "val")
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(BenchError, match="no images"):
        idata.scan(tmp_path, "val")
    _image(tmp_path / "val" / "cat" / "0.jpg")
    with pytest.raises(BenchError, match="not in the training classes"):
        idata.scan(tmp_path, "val", classes=("dog",))


def test_evaluation_preprocessing_is_timms_for_the_models_data_config():
    # crop_pct .875 at 224: resize the short side to floor(224 / .875) = 256 (bicubic), centre-crop 224.
    t = idata.eval_transform(LITE0_DATA_CONFIG)
    names = [type(x).__name__ for x in t.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and t.transforms[0].size == 256
    assert str(t.transforms[0].interpolation).lower().endswith("bicubic")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    out = t(img)
    assert out.shape == (3, 224, 224) and 0.0 <= out.min() and out.max() <= 1.0, "no normalisation: the model's own"


def test_training_preprocessing_is_random_resized_crop_and_flip_only():
    t = idata.train_transform(LITE0_DATA_CONFIG)
    names = [type(x).__name__ for x in t.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and names[1] == "RandomHorizontalFlip"
    assert not any("Jitter" in n or "Augment" in n or "Erasing" in n for n in names)


def _cifar_zip(path: Path, corrupt: bool = False) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="JPEG")
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for cls in ("cat", "airplane"):
                zf.writestr(f"{split}/{cls}/0000.jpg", buf.getvalue())
    if corrupt:
        raw = bytearray(path.read_bytes())
        raw[40:60] = b"\x00" * 20
        path.write_bytes(bytes(raw))
    return path


def test_cifar_zip_is_extracted_once_into_an_imagefolder_root(tmp_path):
    zp = _cifar_zip(tmp_path / "c.zip")
    root = idata.extract_cifar(zp, tmp_path / "cache")
    assert (root / ".complete").exists()
    index = idata.scan(root, "train")
    assert index.classes == ("airplane", "cat") and index.labels == (0, 1)
    mtime = (root / ".complete").stat().st_mtime_ns
    assert idata.extract_cifar(zp, tmp_path / "cache") == root and (root / ".complete").stat().st_mtime_ns == mtime


def test_a_corrupt_zip_is_a_clear_error(tmp_path):
    zp = _cifar_zip(tmp_path / "c.zip", corrupt=True)
    with pytest.raises(BenchError, match="c.zip"):
        idata.extract_cifar(zp, tmp_path / "cache")


def test_materialised_split_matches_decoding_and_is_cached(tmp_path):
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        _image(tmp_path / "root" / "test" / f"c{i}" / "0.png", colour, size=(32, 32))
    index = idata.scan(tmp_path / "root", "test")
    cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    split = idata.materialize(index, cfg, tmp_path / "cache")
    batch = split.batch([0, 1])
    assert batch["labels"].tolist() == [0, 1] and batch["index"].tolist() == [0, 1]
    assert torch.allclose(batch["pixels"][0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(batch["pixels"][1, :, 5, 5], torch.tensor([0.0, 0.0, 1.0]))
    assert len(list((tmp_path / "cache" / "imagenet" / "decoded").glob("*.npy"))) == 1
    again = idata.materialize(index, cfg, tmp_path / "cache")
    assert torch.equal(again.batch([0, 1])["pixels"], batch["pixels"])


def test_smoke_images_are_deterministic_and_balanced_enough():
    a, ya = idata.generate_smoke(64, 16, seed=1)
    b, yb = idata.generate_smoke(64, 16, seed=1)
    assert np.array_equal(a, b) and ya == yb and a.shape == (64, 16, 16, 3) and a.dtype == np.uint8
    assert len(set(ya)) == 10
    c, _ = idata.generate_smoke(64, 16, seed=2)
    assert not np.array_equal(a, c)
