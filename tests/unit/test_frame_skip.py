"""Frame skipping (methods/grounding/frame_skip.py): the fill rules against weights worked out by hand, and the
encoder run only on every k-th frame (a recording wrapper around the base encoder)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench import BenchError
from bench.methods.grounding.frame_skip import FrameSkip, FrameSkipModel, fill_features

pytestmark = pytest.mark.usefixtures("one_thread")

S, PATCH = 16, 4
R5 = 1 / math.sqrt(5)


def tiny_teacher(seed: int = 0):
    from bench.tasks.charades_sta.model import ClipConfig, VideoCLIP, build_clip

    cfg = ClipConfig(embed_dim=16, image_size=S, patch_size=PATCH, width=16, layers=1, heads=2, text_width=16,
                     text_layers=1, text_heads=2, context_length=8)
    teacher = VideoCLIP(build_clip(cfg, seed), 8).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def encoded_basis():
    # three encoded frames (0, 3, 6) with features e0, e1, e2 = the unit vectors of R^3; a second clip with
    # the order reversed, so the clips are filled independently
    e = torch.eye(3)
    return torch.stack([e, e.flip(0)])  # (B=2, 3, D=3)


def test_hold_repeats_the_last_encoded_frame():
    enc = encoded_basis()
    # every 3, t = 7: frames 0-2 <- encoded 0, 3-5 <- 1, 6 <- 2; t = 8: frame 7 <- 2 as well
    for t, src in ((7, [0, 0, 0, 1, 1, 1, 2]), (8, [0, 0, 0, 1, 1, 1, 2, 2])):
        out = fill_features(enc, t, 3, "hold")
        assert out.shape == (2, t, 3)
        for b in range(2):
            for f, j in enumerate(src):
                assert torch.equal(out[b, f], enc[b, j]), (t, b, f)


def test_interpolate_blends_the_two_neighbours_and_renormalises():
    enc = encoded_basis()
    out = fill_features(enc, 8, 3, "interpolate")
    # clip 0 (e0, e1, e2 at frames 0, 3, 6), by hand:
    #   frame 1: 2/3 e0 + 1/3 e1 = (2/3, 1/3, 0), norm sqrt(5)/3 -> (2, 1, 0)/sqrt5
    #   frame 2: 1/3 e0 + 2/3 e1 -> (1, 2, 0)/sqrt5
    #   frame 4: (0, 2, 1)/sqrt5; frame 5: (0, 1, 2)/sqrt5
    #   frames 0, 3, 6: e0, e1, e2; frame 7 (after the last encoded): held, e2
    expect = torch.tensor([[1, 0, 0], [2 * R5, R5, 0], [R5, 2 * R5, 0],
                           [0, 1, 0], [0, 2 * R5, R5], [0, R5, 2 * R5],
                           [0, 0, 1], [0, 0, 1]])
    assert torch.allclose(out[0], expect, atol=1e-6)
    # clip 1 has the features in reverse order (e2, e1, e0): the same weights on the flipped axes
    assert torch.allclose(out[1], expect.flip(-1), atol=1e-6)
    # with t = 7 the last frame is encoded, nothing after it
    assert torch.allclose(fill_features(enc, 7, 3, "interpolate")[0], expect[:7], atol=1e-6)


def test_interpolate_holds_after_the_last_encoded_frame_when_it_is_not_the_last_frame():
    # every 3, t = 5: encoded frames 0 and 3; frame 4 has no right neighbour -> e1 (not 2/3 e1 + 1/3 e0 etc.)
    e = torch.eye(2)[None]
    out = fill_features(e, 5, 3, "interpolate")[0]
    assert torch.allclose(out, torch.tensor([[1, 0], [2 / math.sqrt(5), 1 / math.sqrt(5)],
                                             [1 / math.sqrt(5), 2 / math.sqrt(5)], [0, 1], [0, 1]]), atol=1e-6)


class Counting:
    """Records what the base encoder is run on."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, images):
        self.calls.append(images.clone())
        return self.fn(images)


def test_encode_video_runs_the_encoder_only_on_every_kth_frame():
    teacher = tiny_teacher()
    model = FrameSkip(FrameSkip.Params(every=3)).init_student(teacher, None, SimpleNamespace(seed=0))
    assert isinstance(model, FrameSkipModel) and model.fill == "interpolate"  # the default
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 7, 3, S, S, generator=g)
    spy = Counting(model.base.encode_frames)
    model.base.encode_frames = spy
    with torch.no_grad():
        out = model.encode_video(frames)
        (seen,) = spy.calls  # one batched call
        assert seen.shape[0] == 2 * 3  # 2 clips x frames 0, 3, 6
        assert torch.equal(seen, frames[:, [0, 3, 6]].flatten(0, 1))
        full = torch.stack([teacher.encode_frames(frames[:, f]) for f in range(7)], dim=1)
    for f in (0, 3, 6):
        assert torch.allclose(out[:, f], full[:, f], atol=1e-6), f
    # the skipped frames: normalise(2/3 e0 + 1/3 e3), normalise(1/3 e0 + 2/3 e3), ... from the teacher's features
    for f, (a, b, w) in {1: (0, 3, 1 / 3), 2: (0, 3, 2 / 3), 4: (3, 6, 1 / 3), 5: (3, 6, 2 / 3)}.items():
        ref = F.normalize((1 - w) * full[:, a] + w * full[:, b], dim=-1)
        assert torch.allclose(out[:, f], ref, atol=1e-5), f
        assert not torch.allclose(out[:, f], full[:, f], atol=1e-3), f  # not the skipped frame's own feature
    assert model.reduced_mask(7).tolist() == [False, True, True, False, True, True, False]


def test_hold_model_and_flags():
    teacher = tiny_teacher()
    model = FrameSkip(FrameSkip.Params(every=2, fill="hold")).init_student(teacher, None, SimpleNamespace(seed=0))
    frames = torch.randn(1, 5, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.encode_video(frames)
        for f, src in enumerate([0, 0, 2, 2, 4]):
            assert torch.allclose(out[:, f], teacher.encode_frames(frames[:, src]), atol=1e-6), f
    assert FrameSkip.training_free is True
    assert FrameSkip.Params().every == 3 and FrameSkip.Params().fill == "interpolate"
    three = FrameSkip(FrameSkip.Params()).init_student(teacher, None, SimpleNamespace(seed=0))
    assert three.schedule()["reduced_fraction"] == pytest.approx(2 / 3, abs=1e-12)
    assert model.schedule()["reduced_fraction"] == 0.5
    with pytest.raises(RuntimeError):
        FrameSkip(FrameSkip.Params()).training_step({}, None)
    with pytest.raises(BenchError, match="VideoCLIP"):
        FrameSkip(FrameSkip.Params()).init_student(torch.nn.Linear(2, 2), None, SimpleNamespace(seed=0))
    assert not any(p.requires_grad for p in three.parameters())
