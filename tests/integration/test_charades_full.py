"""The charades_sta full tier on a tiny local "Charades": two videos written with PyAV, annotation files in the
Charades-STA format, and an open_clip ViT-B-32 saved as a local checkpoint file (random weights: the test is about
the path — decoding, frame sampling, loading with weights_only, grounding — not the numbers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench import BenchError
from bench.api import TaskEnv
from bench.cli import app

av = pytest.importorskip("av")
open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_video(path: Path, seconds: float, fps: int = 10, size: tuple[int, int] = (64, 48)) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(int(seconds * fps)):
            img = np.zeros((size[1], size[0], 3), np.uint8)
            img[..., 0] = (k * 20) % 256  # a changing colour: real motion between frames
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def charades(tmp_path_factory):
    root = tmp_path_factory.mktemp("charades")
    videos = root / "videos"
    videos.mkdir()
    _write_video(videos / "AAAAA.mp4", 2.5)
    _write_video(videos / "BBBBB.mp4", 4.0)
    ann = root / "ann"
    ann.mkdir()
    (ann / "charades_sta_test.txt").write_text("AAAAA 0.0 1.2##person opens a door.\n"
                                               "AAAAA 1.0 2.5##person sits down.\n"
                                               "BBBBB 0.5 3.0##person holds a cup.\n")
    (ann / "charades_sta_train.txt").write_text("BBBBB 0.0 3.5##person drinks from a cup.\n")
    clip = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    weights = root / "vit_b_32.pt"
    torch.save(clip.state_dict(), weights)
    return root, videos, ann, weights


def _task(charades, **extra):
    from bench.tasks.charades_sta import CharadesSTA

    root, videos, ann, weights = charades
    params = CharadesSTA.Params(videos_dir=str(videos), annotations_dir=str(ann), clip_weights=str(weights), **extra)
    return CharadesSTA(params, TaskEnv("full", "test", None, root / "cache"))


def test_full_tier_decodes_at_3_fps_loads_the_checkpoint_and_grounds(charades):
    task = _task(charades)
    assert task.unavailable() is None
    frames, duration = task._full.video("AAAAA")
    assert duration == pytest.approx(2.5)
    assert frames.shape == (8, 224, 224, 3)  # k / 3 < 2.5 for k = 0..7
    teacher = task.teacher()
    ref = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    ref.load_state_dict(torch.load(charades[3], weights_only=True))
    assert torch.equal(teacher.clip.visual.conv1.weight, ref.visual.conv1.weight)
    metrics = task.evaluate(teacher)
    assert set(metrics) == {m.name for m in task.metrics()}
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["teacher_cosine"] == pytest.approx(1.0, abs=1e-5)
    clip = task.train_data().batch([0])
    assert clip["frames"].shape == (1, 4, 3, 224, 224)


def test_full_tier_bad_inputs_name_what_is_wrong(charades, tmp_path):
    root, videos, ann, weights = charades
    bad = tmp_path / "ann"
    bad.mkdir()
    (bad / "charades_sta_test.txt").write_text("AAAAA 0.0 1.2##person opens a door.\nZZZZZ 0.0 1.0##person runs.\n")
    with pytest.raises(BenchError, match=r"charades_sta_test.txt, line 2: video 'ZZZZZ'"):
        _task((root, videos, bad, weights))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, wrong)
    task = _task((root, videos, ann, wrong))
    with pytest.raises(BenchError, match="does not load into ViT-B-32"):
        task.teacher()
    res = CliRunner().invoke(app, ["run", "--methods", "frame_skip", "--task", "charades_sta", "--tier", "full",
                                   "--set", f"charades_sta.videos_dir={tmp_path / 'nope'}",
                                   "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "charades_sta.videos_dir" in res.output
    assert not (tmp_path / "runs").exists()
