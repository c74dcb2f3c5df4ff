"""The full tier's CLIP score: open_clip from a local checkpoint (a tiny architecture registered here, random
weights), the mean image-caption cosine similarity checked against the model's own embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed (pip install open_clip_torch)")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "bench-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder))
    torch.manual_seed(0)
    model = open_clip.create_model("bench-tiny-clip")
    torch.save(model.state_dict(), folder / "weights.pt")
    return "bench-tiny-clip", str(folder / "weights.pt")


def test_clip_score_is_the_mean_cosine_of_each_image_with_its_caption(tiny_clip):
    import torch
    from PIL import Image

    from bench.tasks.coco_fid.clip_score import clip_score

    name, weights = tiny_clip
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    captions = ["a red bus on a street", "two dogs", "a plate of food"]
    got = clip_score(images, captions, name, weights, batch_size=2)
    model, _, pre = open_clip.create_model_and_transforms(name, pretrained=weights)
    tok = open_clip.get_tokenizer(name)
    with torch.no_grad():
        cos = []
        for im, cap in zip(images, captions):
            a = model.encode_image(pre(Image.fromarray(im))[None])[0]
            b = model.encode_text(tok([cap]))[0]
            cos.append(float(a @ b / (a.norm() * b.norm())))
    assert got == pytest.approx(sum(cos) / 3, abs=1e-5)
    # pairing matters: the same images against shuffled captions score differently
    assert clip_score(images, captions[::-1], name, weights) != pytest.approx(got, abs=1e-6)


def test_clip_score_is_declared_only_with_local_weights(tiny_clip, tmp_path):
    from bench import BenchError
    from bench.api import TaskEnv
    from bench.tasks.coco_fid import CocoFID

    _, weights = tiny_clip
    with_clip = CocoFID(CocoFID.Params(clip_weights=weights), TaskEnv("full", "val", None, tmp_path))
    assert "clip_score" in [m.name for m in with_clip.metrics()]
    without = CocoFID(CocoFID.Params(), TaskEnv("full", "val", None, tmp_path))
    assert "clip_score" not in [m.name for m in without.metrics()]
    with pytest.raises(BenchError, match="is not a file"):
        CocoFID.Params(clip_weights=str(tmp_path / "missing.bin"))
