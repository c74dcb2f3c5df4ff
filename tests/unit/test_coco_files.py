"""COCO files (tasks/coco_fid/coco.py): the COCO-30k caption CSV and its errors, val2014 paths, and DMD2's
centre-crop + Lanczos preprocessing."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from bench.tasks.coco_fid import coco
from PIL import Image

from bench import BenchError


def test_the_real_coco_30k_caption_file(data_root):
    path = data_root / coco.CAPTIONS_FILE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    assert hashlib.md5(path.read_bytes()).hexdigest() == coco.CAPTIONS_MD5
    rows = coco.load_captions(path)
    assert len(rows) == 30_000 and len({i for i, _ in rows}) == 30_000
    assert rows[0] == (521669, "Someone is holding a phone while watching a video on it.")
    # 97 captions hold a quoted newline; trailing spaces are kept byte for byte.
    assert sum("\n" in text for _, text in rows) == 97
    assert dict(rows)[526459] == "That is a picture of an outside locale. \n"
    assert dict(rows)[313428] == "a bed sits under neath a glass fish tank "
    assert all(isinstance(i, int) and text.strip() for i, text in rows)


def test_quoted_commas_quotes_and_newlines_parse(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('image_id,text\n1,"a cat, a dog"\n2,"two\nlines "\n3,"say ""hi"""\n4,plain \n', encoding="utf-8")
    assert coco.load_captions(path) == [(1, "a cat, a dog"), (2, "two\nlines "), (3, 'say "hi"'), (4, "plain ")]


@pytest.mark.parametrize("content, where, what", [
    ("", "empty", "empty"),
    ("id,caption\n1,a cat\n", "line 1", "header is 'id,caption'"),
    ('{"image_id": 1, "text": "a cat"}\n', "line 1", "looks like JSON lines"),
    ("image_id,text\n1,a cat\nx12,a dog\n", "line 3", "'x12' is not a non-negative integer"),
    ("image_id,text\n1,a cat\n-4,a dog\n", "line 3", "not a non-negative integer"),
    ('image_id,text\n1,"two\nlines"\n2,a,b\n', "line 4", "3 field"),
    ("image_id,text\n1,a cat\n2, \n", "line 3", "empty caption"),
    ('image_id,text\n1,"never closed\n', "line 2", "malformed CSV"),
    ("image_id,text\n", "image_id,text", "no caption rows"),
])
def test_bad_caption_files_name_the_file_line_and_what_is_valid(tmp_path, content, where, what):
    path = tmp_path / "captions.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BenchError) as err:
        coco.load_captions(path)
    message = str(err.value)
    assert str(path) in message and where in message and what in message
    assert "header image_id,text" in message  # what a valid file looks like


def test_a_jsonl_caption_file_and_a_missing_one(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(json.dumps({"image_id": i, "text": "a cat"}) for i in range(3)), encoding="utf-8")
    with pytest.raises(BenchError, match=r"captions\.jsonl, line 1: .*JSON lines"):
        coco.load_captions(path)
    with pytest.raises(BenchError, match="nope.csv: caption file not found"):
        coco.load_captions(tmp_path / "nope.csv")
    (tmp_path / "latin1.csv").write_bytes("image_id,text\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(BenchError, match="not UTF-8"):
        coco.load_captions(tmp_path / "latin1.csv")


def test_val2014_paths(tmp_path):
    (tmp_path / "val2014").mkdir()
    name = "COCO_val2014_000000000042.jpg"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "val2014" / name)
    assert coco.val2014_image_path(tmp_path, 42) == tmp_path / "val2014" / name
    assert coco.val2014_image_path(tmp_path / "val2014", 42) == tmp_path / "val2014" / name
    with pytest.raises(BenchError) as err:
        coco.val2014_image_path(tmp_path, 7)
    assert str(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg") in str(err.value)
    assert str(tmp_path / "COCO_val2014_000000000007.jpg") in str(err.value)
    imgs = coco.val2014_images(tmp_path, [42, 42], size=32)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8 and imgs[0, 16, 16, 0] > 150


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (501, 374), (640, 427), (101, 98), (256, 256)])
def test_center_crop_resize_is_dmd2s_transform(size):
    """DMD2 (main/coco_eval/coco_evaluator.py): torchvision center_crop to min(w, h), then PIL Lanczos."""
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    theirs = TF.center_crop(img, min(img.size)).resize((256, 256), Image.LANCZOS)
    ours = coco.center_crop_resize(img, 256)
    assert ours.size == (256, 256) and ours.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_center_crop_keeps_the_centre_and_converts_to_rgb():
    # A 60 x 20 grey image whose middle 20 x 20 square is white: the crop is exactly that square.
    a = np.zeros((20, 60), dtype=np.uint8)
    a[:, 20:40] = 255
    out = coco.center_crop_resize(Image.fromarray(a), 20)
    assert out.mode == "RGB" and np.asarray(out).min() == 255
