"""GLUE examples: the subtask table, readers for the original TSV files, the small-tier split policy and
the smoke-tier generator.

Pure Python on purpose (no torch, no numpy): ``bench ls`` and config validation import this module.

Sources
-------
- GLUE: Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
  Understanding", ICLR 2019 (https://gluebenchmark.com). Label names and their integer order follow the
  Hugging Face dataset ``nyu-mll/glue`` (e.g. MNLI: entailment=0, neutral=1, contradiction=2), so labels
  read here line up with models and caches built from the hub.
- The column layout of each TSV follows the standard GLUE processors: ``run_classifier.py`` of the
  original BERT repository (google-research/bert) and ``transformers.data.processors.glue``. Like them we
  read with ``csv.reader(delimiter="\\t", quotechar=None)`` -- GLUE text contains unbalanced double quotes
  (MRPC dev line 2 starts a field with ``"`` that never closes), so quote handling must be off.
- The files under the data root and their row counts are described in ``shared/data/SOURCES.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# --------------------------------------------------------------------------------------------------
# The subtask table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubtaskSpec:
    """What a GLUE subtask is: its labels, shape and where its files live in the data root."""

    name: str
    #: Directory under ``<data root>/glue`` (the GLUE download's own names).
    dir_name: str
    #: Label names in the integer order of ``nyu-mll/glue``; empty for the regression task STS-B.
    label_names: tuple[str, ...]
    is_regression: bool
    #: Sentence pair (text_a, text_b) or single sentence (text_b is None).
    is_pair: bool
    #: How the label column is written in the TSV: an integer index, a label name, or a float score.
    label_format: Literal["index", "name", "score"]
    #: Logical splits with labels, in the standard layout's file names (``<split>.tsv``).
    splits: tuple[str, ...] = ("train", "dev")
    #: Evaluation set name for each labelled dev split (MNLI scores matched and mismatched separately).
    eval_sets: tuple[tuple[str, str], ...] = (("dev", "dev"),)

    @property
    def num_labels(self) -> int:
        """Output width of a model for this subtask (1 for regression)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def eval_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.eval_sets)


SUBTASKS: dict[str, SubtaskSpec] = {
    s.name: s
    for s in (
        SubtaskSpec("cola", "CoLA", ("unacceptable", "acceptable"), False, False, "index"),
        SubtaskSpec("sst2", "SST-2", ("negative", "positive"), False, False, "index"),
        SubtaskSpec("mrpc", "MRPC", ("not_equivalent", "equivalent"), False, True, "index"),
        SubtaskSpec("stsb", "STS-B", (), True, True, "score"),
        SubtaskSpec("qqp", "QQP", ("not_duplicate", "duplicate"), False, True, "index"),
        SubtaskSpec(
            "mnli",
            "MNLI",
            ("entailment", "neutral", "contradiction"),
            False,
            True,
            "name",
            splits=("train", "dev_matched", "dev_mismatched"),
            eval_sets=(("dev_matched", "matched"), ("dev_mismatched", "mismatched")),
        ),
        SubtaskSpec("qnli", "QNLI", ("entailment", "not_entailment"), False, True, "name"),
        SubtaskSpec("rte", "RTE", ("entailment", "not_entailment"), False, True, "name"),
    )
}

#: STS-B similarity scores are annotated on a 0-5 scale (Cer et al., SemEval-2017 Task 1).
STSB_RANGE = (0.0, 5.0)


def spec(subtask: str) -> SubtaskSpec:
    """The spec of ``subtask``; an unknown name raises with the valid names."""
    try:
        return SUBTASKS[subtask]
    except KeyError:
        raise ValueError(f"unknown GLUE subtask {subtask!r}; valid: {', '.join(SUBTASKS)}") from None


@dataclass(frozen=True)
class Example:
    """One GLUE example. ``label`` is an int index into the subtask's label names, or a float (STS-B).

    ``uid`` is stable across runs (``<subtask>/<file stem>/<row>`` for files, ``smoke/...`` for generated
    data): teacher outputs are cached by it.
    """

    text_a: str
    text_b: str | None
    label: int | float
    uid: str


# --------------------------------------------------------------------------------------------------
# Locating and reading the TSV files
# --------------------------------------------------------------------------------------------------

#: The column layout of each (subtask, layout): (has header, text_a col, text_b col, label col). The
#: standard columns are the ones the standard processors index; ``mnli_1k`` is the TextFooler subset
#: shipped in the data root (``label<TAB>premise<TAB>hypothesis``, no header; see SOURCES.md).
_COLUMNS: dict[tuple[str, str], tuple[bool, int, int | None, int]] = {
    ("cola", "standard"): (False, 3, None, 1),  # source, label, original judgement mark, sentence
    ("sst2", "standard"): (True, 0, None, 1),
    ("mrpc", "standard"): (True, 3, 4, 0),  # Quality, #1 ID, #2 ID, #1 String, #2 String
    ("stsb", "standard"): (True, 7, 8, -1),  # ..., sentence1, sentence2, score (last)
    ("qqp", "standard"): (True, 3, 4, 5),  # id, qid1, qid2, question1, question2, is_duplicate
    ("mnli", "standard"): (True, 8, 9, -1),  # ..., sentence1, sentence2, (label1..5), gold_label
    ("mnli", "mnli_1k"): (False, 1, 2, 0),
    ("qnli", "standard"): (True, 1, 2, -1),  # index, question, sentence, label
    ("rte", "standard"): (True, 1, 2, -1),  # index, sentence1, sentence2, label
}


class DataUnavailable(FileNotFoundError):
    """A subtask (or split) has no usable files under the data root. ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class SplitSource:
    """Which file serves a logical split, and in which layout it is written."""

    subtask: str
    split: str
    path: Path
    #: ``standard`` (the GLUE download's layout) or ``mnli_1k`` (the 1,000-row MNLI dev subsets).
    layout: str

    @property
    def is_subset(self) -> bool:
        return self.layout == "mnli_1k"


@dataclass(frozen=True)
class SplitRead:
    """The examples of one split, the file they came from, and the lines skipped as malformed."""

    examples: list[Example]
    source: SplitSource
    #: 1-based line numbers skipped (only QQP skips, as the standard QQP processor does).
    skipped_lines: tuple[int, ...] = ()


def glue_dir(data_root: Path) -> Path:
    """The GLUE folder of a data root: ``<root>/glue`` (the layout of SOURCES.md), or ``<root>`` itself
    when it already holds the subtask folders."""
    data_root = Path(data_root)
    return data_root / "glue" if (data_root / "glue").is_dir() else data_root


def locate_split(data_root: Path, subtask: str, split: str) -> SplitSource | None:
    """The file for ``split`` of ``subtask``, or None when absent.

    The standard GLUE file is preferred; MNLI dev splits fall back to the 1,000-row subsets
    ``dev_matched_1k.tsv`` / ``dev_mismatched_1k.tsv`` when the full files are missing.
    """
    sp = spec(subtask)
    if split not in sp.splits:
        raise ValueError(
            f"GLUE {subtask} has no labelled split {split!r}; valid: {', '.join(sp.splits)} "
            "(test splits carry no labels and are not read)"
        )
    folder = glue_dir(data_root) / sp.dir_name
    standard = folder / f"{split}.tsv"
    if standard.is_file():
        return SplitSource(subtask, split, standard, "standard")
    if subtask == "mnli" and split != "train":
        subset = folder / f"{split}_1k.tsv"
        if subset.is_file():
            return SplitSource(subtask, split, subset, "mnli_1k")
    return None


def available_splits(data_root: Path, subtask: str) -> dict[str, Path]:
    """Logical split name -> the file that serves it, for the splits present under ``data_root``."""
    found = {s: locate_split(data_root, subtask, s) for s in spec(subtask).splits}
    return {s: src.path for s, src in found.items() if src is not None}


def _label(raw: str, sp: SubtaskSpec, where: str) -> int | float:
    raw = raw.strip()
    if sp.label_format == "score":
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where}: STS-B score {raw!r} is not a number") from None
        if not STSB_RANGE[0] <= value <= STSB_RANGE[1]:
            raise ValueError(f"{where}: STS-B score {value} outside {STSB_RANGE}")
        return value
    if sp.label_format == "name":
        if raw not in sp.label_names:
            raise ValueError(f"{where}: label {raw!r} is not one of {', '.join(sp.label_names)}")
        return sp.label_names.index(raw)
    valid = [str(i) for i in range(len(sp.label_names))]
    if raw not in valid:
        raise ValueError(
            f"{where}: label {raw!r} is not one of {', '.join(valid)} ({', '.join(sp.label_names)})"
        )
    return int(raw)


def read_source(source: SplitSource) -> SplitRead:
    """Parse one TSV file the way the standard GLUE processors do (see the module docstring).

    Texts are kept exactly as written (SST-2 sentences end with a space, MNLI subsets are tokenised with
    spaces): normalising them is the tokenizer's business, and changing them would change fingerprints.
    A short row is an error naming the file and line, except in QQP, whose standard processor skips
    rows it cannot index (the QQP release has a few broken lines).
    """
    sp = spec(source.subtask)
    has_header, col_a, col_b, col_label = _COLUMNS[(source.subtask, source.layout)]
    needed = max(c for c in (col_a, col_b, col_label) if c is not None and c >= 0) + 1
    examples: list[Example] = []
    skipped: list[int] = []
    # utf-8-sig drops the byte-order mark the MRPC files start with, so the first header cell is
    # "Quality" and not "\ufeffQuality"; it is a no-op for the other files.
    with open(source.path, encoding="utf-8-sig", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t", quotechar=None), start=1):
            if has_header and lineno == 1:
                continue
            where = f"{source.path}:{lineno}"
            if len(row) < needed:
                if source.subtask == "qqp":
                    skipped.append(lineno)
                    continue
                raise ValueError(f"{where}: expected at least {needed} tab-separated columns, got {len(row)}")
            row_index = lineno - 2 if has_header else lineno - 1  # 0-based data row
            examples.append(
                Example(
                    text_a=row[col_a],
                    text_b=row[col_b] if col_b is not None else None,
                    label=_label(row[col_label], sp, where),
                    uid=f"{source.subtask}/{source.path.stem}/{row_index}",
                )
            )
    return SplitRead(examples, source, tuple(skipped))


def read_split(data_root: Path, subtask: str, split: str) -> SplitRead:
    """Read ``split`` of ``subtask`` and say which file (and layout) served it."""
    source = locate_split(data_root, subtask, split)
    if source is None:
        folder = glue_dir(data_root) / spec(subtask).dir_name
        raise DataUnavailable(
            f"GLUE {subtask} {split}: no {split}.tsv in {folder}"
            + (f" (nor {split}_1k.tsv)" if subtask == "mnli" and split != "train" else "")
        )
    return read_source(source)


def read_tsv_split(data_root: Path, subtask: str, split: str) -> list[Example]:
    """The examples of ``split`` (``train``, ``dev``; MNLI: ``train``, ``dev_matched``,
    ``dev_mismatched``). Use :func:`read_split` to also learn which file was used."""
    return read_split(data_root, subtask, split).examples


# --------------------------------------------------------------------------------------------------
# Offline availability and the small-tier split policy
# --------------------------------------------------------------------------------------------------

#: Fixed hold-out sizes for subtasks that only have dev data offline. QNLI: 1,000 of the 5,463 dev rows;
#: MNLI: half of each 1,000-row subset, so that 500 + 500 rows remain to train on.
HOLDOUT = {"qnli": 1000, "mnli": 500}

_HUB_HINT = "load it from the Hugging Face hub (nyu-mll/glue) at the full tier, or put the GLUE TSVs there"


def unavailable_reason(data_root: Path | None, subtask: str) -> str | None:
    """Why ``subtask`` cannot run offline at the small tier, or None when it can (possibly with a caveat,
    see :func:`data_caveat`)."""
    sp = spec(subtask)
    if data_root is None:
        return f"GLUE {subtask}: no data root given (--data-root or BENCH_DATA)"
    folder = glue_dir(data_root) / sp.dir_name
    have = available_splits(data_root, subtask)
    dev = [s for s, _ in sp.eval_sets]
    if not have:
        return f"GLUE {subtask}: no files in {folder}; not available offline -- {_HUB_HINT}"
    missing = [s for s in dev if s not in have]
    if missing:
        return f"GLUE {subtask}: no {', '.join(missing)} split in {folder}; {_HUB_HINT}"
    if "train" not in have and subtask not in HOLDOUT:
        return f"GLUE {subtask}: no train.tsv in {folder}; {_HUB_HINT}"
    return None


def data_caveat(data_root: Path, subtask: str) -> str | None:
    """What makes offline scores for ``subtask`` differ from standard GLUE dev scores, or None."""
    sp = spec(subtask)
    have = available_splits(data_root, subtask)
    if "train" in have or subtask not in HOLDOUT:
        return None
    sources = [locate_split(data_root, subtask, s) for s, _ in sp.eval_sets]
    if subtask == "qnli":
        n = len(read_tsv_split(data_root, "qnli", "dev"))
        k = HOLDOUT["qnli"]
        return (
            f"QNLI: only the GLUE dev set ({n:,} rows) is available offline; {k:,} rows held out for "
            f"scoring (fixed permutation), the other {n - k:,} used for training; not comparable with "
            "dev-set scores of models trained on the GLUE train set"
        )
    k = HOLDOUT["mnli"]
    if all(s is not None and s.is_subset for s in sources):
        return (
            "MNLI: 1k-example subsets of dev_matched/dev_mismatched; "
            f"{k} of each used for training, {k} of each held out for scoring; not comparable with "
            "full-dev scores"
        )
    return (
        f"MNLI: no train.tsv; {k} rows of each dev file held out for scoring, the rest used for "
        "training; not comparable with full-dev scores"
    )


@dataclass
class SplitPlan:
    """The training and evaluation examples of one subtask at the small tier."""

    subtask: str
    train: list[Example]
    #: Evaluation sets by name: ``dev``, or ``matched`` and ``mismatched`` for MNLI.
    evals: dict[str, list[Example]]
    #: Plain statement of anything non-standard that was done (None: standard train/dev).
    note: str | None = None
    #: The files read, by logical split name.
    sources: dict[str, SplitSource] = field(default_factory=dict)

    def data_fingerprint(self) -> dict[str, object]:
        """Sizes and content hashes of what is trained and scored on, plus the md5 of every file read
        (comparable with the md5 column of SOURCES.md)."""
        out: dict[str, object] = {
            "train": {"n": len(self.train), "sha256": fingerprint_examples(self.train)},
        }
        for name, exs in self.evals.items():
            out[f"eval/{name}"] = {"n": len(exs), "sha256": fingerprint_examples(exs)}
        out["files"] = {
            f"{src.path.parent.name}/{src.path.name}": file_md5(src.path) for src in self.sources.values()
        }
        if self.note:
            out["note"] = self.note
        return out


def _holdout_indices(n: int, k: int, salt: str) -> set[int]:
    """A fixed set of ``k`` of the row indices ``0..n-1``.

    Rows are ordered by sha256 of ``salt/index`` -- a seeded permutation that depends on no library
    version (unlike ``random.shuffle`` or numpy generators, whose algorithms could change) -- and the
    first ``k`` are held out.
    """
    if not 0 < k < n:
        raise ValueError(f"cannot hold out {k} of {n} rows ({salt})")
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(f"{salt}/{i}".encode()).hexdigest())
    return set(ranked[:k])


def _split_off(examples: list[Example], k: int, salt: str) -> tuple[list[Example], list[Example]]:
    """(rest, held out), both in file order."""
    held = _holdout_indices(len(examples), k, salt)
    rest = [e for i, e in enumerate(examples) if i not in held]
    out = [e for i, e in enumerate(examples) if i in held]
    return rest, out


def small_tier_plan(data_root: Path, subtask: str) -> SplitPlan:
    """The small tier's data for ``subtask``: deterministic, a pure function of the files.

    - train and dev files present: train on train, score on dev (MNLI: on both dev files);
    - QNLI (dev only offline): score on a fixed 1,000 dev rows, train on the other 4,463;
    - MNLI without train (here: the 1k dev subsets): score on a fixed 500 rows of each dev file, train
      on the other 500 + 500;
    - otherwise (QQP here) raise :class:`DataUnavailable` with the reason.
    """
    reason = unavailable_reason(data_root, subtask)
    if reason is not None:
        raise DataUnavailable(reason)
    sp = spec(subtask)
    have = available_splits(data_root, subtask)
    reads = {s: read_split(data_root, subtask, s) for s in have}
    sources = {s: r.source for s, r in reads.items()}
    if "train" in reads:
        evals = {name: reads[split].examples for split, name in sp.eval_sets}
        return SplitPlan(subtask, reads["train"].examples, evals, None, sources)
    train: list[Example] = []
    evals = {}
    for split, name in sp.eval_sets:
        src = sources[split]
        rest, held = _split_off(reads[split].examples, HOLDOUT[subtask], f"{subtask}/{src.path.name}")
        train.extend(rest)
        evals[name] = held
    return SplitPlan(subtask, train, evals, data_caveat(data_root, subtask), sources)


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def fingerprint_examples(examples: Iterable[Example]) -> str:
    """sha256 of a canonical serialisation: one compact JSON array ``[uid, text_a, text_b, label]`` per
    example, newline-terminated, in order. Floats serialise with ``repr`` (shortest round-trip), so the
    hash is stable across platforms."""
    h = hashlib.sha256()
    for e in examples:
        h.update(
            json.dumps(
                [e.uid, e.text_a, e.text_b, e.label], ensure_ascii=False, separators=(",", ":")
            ).encode()
        )
        h.update(b"\n")
    return h.hexdigest()


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """md5 of a file's bytes (the checksum SOURCES.md lists for each data file)."""
    from bench.hashing import file_digest

    return file_digest(path, "md5", chunk)


# --------------------------------------------------------------------------------------------------
# Smoke tier: deterministic synthetic data with the real label spaces
# --------------------------------------------------------------------------------------------------
#
# Each generator draws a label uniformly, writes text whose label follows a simple lexical rule, then
# replaces the label with a different one with probability SMOKE_LABEL_NOISE, so accuracy saturates
# below 1 as on real data. Evaluation sets come from the training distribution, except MNLI
# "mismatched", whose content words come from another topic (real mismatched genres are absent from
# MNLI training data, Williams et al. 2018).
#
# Why pair tasks carry a per-sentence cue: a tiny transformer trained from scratch does not learn to
# match words across the two sentences within a few hundred steps (tried: BERT-style, 2 layers, hidden
# 64-128, 100-600 steps -> chance on MRPC/QQP/STS-B/QNLI). So, where the second text departs from the
# first, its new words come from a separate "other" pool with probability SMOKE_CUE_RATE -- the kind of
# annotation artifact real GLUE pairs carry (hypothesis-only cues, Gururangan et al. 2018) -- and only
# the rest of the signal needs the comparison. Small models learn the cue; bigger ones can learn more.

#: Probability that a smoke label is replaced by a different one (STS-B: Gaussian noise on the score).
SMOKE_LABEL_NOISE = 0.05
SMOKE_STSB_NOISE_STD = 0.25
#: Probability that a departing word of a pair's second text is drawn from the "other" pool.
SMOKE_CUE_RATE = 0.75


def _w(text: str) -> list[str]:
    """``"a b c"`` -> ``["a", "b", "c"]``: word pools written compactly."""
    return text.split()


def _pairs(text: str) -> list[tuple[str, str]]:
    """``"a b, c d"`` -> ``[("a", "b"), ("c", "d")]``: synonym pairs written compactly."""
    return [tuple(p.split()) for p in text.split(", ")]


# Topic A ("everyday"): training data and matched evaluation. Topic B ("technology"): MNLI mismatched.
# "main" pools write first texts; "other" pools (disjoint from "main") supply departing words.
_TOPICS = {
    "a": {
        "main": {
            "subj": _w("cat dog bird horse farmer teacher doctor child baker sailor"),
            "verb": _w("sees likes finds carries paints buys cleans sells opens watches"),
            "obj": _w("ball book apple bread letter basket boat song picture hat"),
            "adj": _w("small old young tall quiet red green little"),
            "place": _w("park farm market school village kitchen river forest"),
        },
        "other": {
            "subj": _w("fox goat miner singer uncle queen"),
            "obj": _w("lamp kettle blanket ladder candle spoon"),
            "adj": _w("sleepy muddy brave clever lazy wet"),
            "place": _w("beach harbor bakery meadow castle cellar"),
        },
    },
    "b": {
        "main": {
            "subj": _w("robot pilot engineer scientist astronaut drone captain programmer satellite rover"),
            "verb": _w("repairs launches tests scans builds charges tracks programs measures detects"),
            "obj": _w("engine laser signal circuit rocket server sensor battery antenna module"),
            "adj": _w("digital orbital metal electric remote solar silver fast"),
            "place": _w("lab station hangar orbit factory tower network reactor"),
        },
        "other": {
            "subj": _w("android mechanic cyborg technician operator inspector"),
            "obj": _w("cable chip drill valve turbine magnet"),
            "adj": _w("wireless nuclear robotic magnetic thermal optical"),
            "place": _w("depot silo airbase dock tunnel garage"),
        },
    },
}

_SST2_POSITIVE = _w("good great wonderful excellent charming delightful brilliant funny moving beautiful")
_SST2_NEGATIVE = _w("bad awful terrible boring dull poor dreadful tedious messy bland")
_SST2_FILLER = _w(
    "the movie film story plot acting was is a and but very quite really with this it of cast ending"
)

# Synonym pairs: a paraphrase keeps every slot's pair and rewords some slots with the other member;
# an unrelated sentence takes other pairs, or (SMOKE_CUE_RATE of the time) words of the "other" pool.
_MRPC = {
    "main": {
        "adj": _pairs("small little, quiet silent, old aged, big large, fast quick, happy glad"),
        "subj": _pairs(
            "child kid, doctor physician, teacher tutor, farmer grower, sailor seaman, baker cook"
        ),
        "verb": _pairs(
            "likes enjoys, finds discovers, buys purchases, watches observes, cleans washes, carries holds"
        ),
        "obj": _pairs("book novel, boat ship, picture photo, song tune, letter note, basket bag"),
    },
    "other": {
        "adj": _w("purple wooden frozen shiny"),
        "subj": _w("wizard pirate knight monk"),
        "verb": _w("hides steals throws burns"),
        "obj": _w("sword crown torch map"),
    },
}
_QQP = {
    "main": {
        "verb": _pairs("fix repair, buy purchase, find locate, clean wash, build make, sell trade"),
        "adj": _pairs("cheap inexpensive, old aged, broken damaged, new fresh, small little, big large"),
        "obj": _pairs("car vehicle, phone mobile, laptop computer, bike bicycle, house home, shirt top"),
    },
    "other": {
        "verb": _w("paint rent insure borrow"),
        "adj": _w("rare tiny heavy antique"),
        "obj": _w("piano tent sofa drum"),
    },
}
_QQP_OPENERS = [_w("how can i"), _w("how do i"), _w("what is the best way to")]

_STSB = {
    "main": {
        "subj": _w("man woman boy girl dog cat player chef"),
        "verb": _w("playing riding cutting eating holding reading cooking slicing"),
        "obj": _w("guitar horse onion apple ball book bread flute"),
        "place": _w("park kitchen street field room garden beach stage"),
    },
    "other": {
        "subj": _w("soldier nurse monkey baby"),
        "verb": _w("washing pushing kicking painting"),
        "obj": _w("carrot violin trumpet pumpkin"),
        "place": _w("desert church forest lake"),
    },
}

_NEGATIONS = ["never", "not"]
_QNLI_WH = [["what", "does", "the"], ["where", "does", "the"], ["why", "does", "the"]]
# Words only templates emit (articles, prepositions), listed so smoke_vocabulary() is complete.
_FUNCTION_WORDS = ["the", "a", "in", "is", "near"]


def _rng(subtask: str, seed: int, split: str) -> random.Random:
    # One independent stream per (subtask, seed, split): eval data do not depend on n_train, and a
    # string-derived integer seed is stable across Python versions and processes (str hash is not).
    digest = hashlib.sha256(f"bench.glue.smoke/{subtask}/{seed}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _noisy(label: int, n_labels: int, rng: random.Random) -> int:
    if rng.random() < SMOKE_LABEL_NOISE:
        return rng.choice([x for x in range(n_labels) if x != label])
    return label


def _depart(rng: random.Random, main: list[str], other: list[str] | None, avoid: str) -> str:
    """A word replacing ``avoid``: from the "other" pool with probability SMOKE_CUE_RATE, else from
    ``main`` (then only the comparison with the first text reveals it)."""
    if other and rng.random() < SMOKE_CUE_RATE:
        return rng.choice(other)
    return rng.choice([w for w in main if w != avoid])


def _sst2(rng: random.Random, topic: dict) -> tuple[str, None, int]:
    label = rng.randrange(2)
    own, opposite = (_SST2_POSITIVE, _SST2_NEGATIVE) if label == 1 else (_SST2_NEGATIVE, _SST2_POSITIVE)
    n_own = rng.randint(1, 3)
    # Sometimes one word of the other polarity, always outnumbered: the majority polarity decides.
    n_opposite = 1 if n_own >= 2 and rng.random() < 0.3 else 0
    words = [rng.choice(_SST2_FILLER) for _ in range(rng.randint(4, 8))]
    for w in [rng.choice(own) for _ in range(n_own)] + [rng.choice(opposite) for _ in range(n_opposite)]:
        words.insert(rng.randrange(len(words) + 1), w)
    return " ".join(words), None, _noisy(label, 2, rng)


def _cola(rng: random.Random, topic: dict) -> tuple[str, None, int]:
    label = rng.randrange(2)
    w = {k: rng.choice(v) for k, v in topic["main"].items()}
    words = ["the", w["adj"], w["subj"], w["verb"], "the", w["obj"]]
    if rng.random() < 0.5:
        words += ["in", "the", w["place"]]
    if label == 0:  # scrambled: the same words in any order but the grammatical one
        original = list(words)
        while words == original:
            rng.shuffle(words)
    return " ".join(words), None, _noisy(label, 2, rng)


def _paraphrase(rng: random.Random, pools: dict, question: bool) -> tuple[str, str, int]:
    main, other = pools["main"], pools["other"]
    slots = sorted(main)
    label = rng.randrange(2)
    pick_a = {k: rng.randrange(len(main[k])) for k in slots}
    form_a = {k: rng.randrange(2) for k in slots}
    words_a = {k: main[k][pick_a[k]][form_a[k]] for k in slots}
    if label == 1:  # the same synonym pairs, at least one slot reworded
        form_b = {k: rng.randrange(2) for k in slots}
        if form_b == form_a:
            k = rng.choice(slots)
            form_b[k] = 1 - form_b[k]
        words_b = {k: main[k][pick_a[k]][form_b[k]] for k in slots}
    elif rng.random() < SMOKE_CUE_RATE:  # unrelated, in words the first texts never use
        words_b = {k: rng.choice(other[k]) for k in slots}
    else:  # unrelated, other synonym pairs of the same pools
        words_b = {
            k: main[k][rng.choice([i for i in range(len(main[k])) if i != pick_a[k]])][rng.randrange(2)]
            for k in slots
        }

    def sentence(w: dict) -> str:
        if not question:  # MRPC: a statement
            return " ".join(["the", w["adj"], w["subj"], w["verb"], "the", w["obj"]])
        # QQP: a question; the opener varies freely in both classes, so it carries no signal.
        return " ".join(rng.choice(_QQP_OPENERS) + [w["verb"], "a", w["adj"], w["obj"]])

    return sentence(words_a), sentence(words_b), _noisy(label, 2, rng)


def _stsb(rng: random.Random, topic: dict) -> tuple[str, str, float]:
    main, other = _STSB["main"], _STSB["other"]
    slots = sorted(main)
    a = {k: rng.choice(main[k]) for k in slots}
    shared = rng.randint(0, len(slots))
    keep = set(rng.sample(slots, shared))
    b = {k: a[k] if k in keep else _depart(rng, main[k], other[k], a[k]) for k in slots}

    def sentence(w: dict) -> str:
        return " ".join(["a", w["subj"], "is", w["verb"], "a", w["obj"], "in", "the", w["place"]])

    # Score = 5 x the fraction of content words shared, plus annotation-like noise, on the 0-5 scale.
    score = 5.0 * shared / len(slots) + rng.gauss(0.0, SMOKE_STSB_NOISE_STD)
    score = round(min(STSB_RANGE[1], max(STSB_RANGE[0], score)), 3)
    return sentence(a), sentence(b), score


def _nli_pair(rng: random.Random, topic: dict, kind: str) -> tuple[str, str]:
    """A premise and a hypothesis that is entailed (an ordered subset of the premise's words),
    contradicted (that subset plus a negation) or neutral (the subset with a content word the premise
    lacks)."""
    main, other = topic["main"], topic["other"]
    w = {k: rng.choice(v) for k, v in main.items()}
    premise = ["the", w["adj"], w["subj"], w["verb"], "the", w["obj"], "in", "the", w["place"]]
    pattern = list(
        rng.choice(
            [
                ["the", "subj", "verb", "the", "obj"],
                ["the", "adj", "subj", "verb", "the", "obj"],
                ["the", "subj", "verb", "the", "obj", "in", "the", "place"],
            ]
        )
    )
    hyp_w = dict(w)
    if kind == "neutral":
        slot = rng.choice([p for p in pattern if p in ("obj", "place")] + ["adj"])
        if slot not in pattern:
            pattern.insert(pattern.index("subj"), slot)
        hyp_w[slot] = _depart(rng, main[slot], other[slot], w[slot])
    hyp = [hyp_w.get(p, p) for p in pattern]
    if kind == "contradiction":
        hyp.insert(pattern.index("verb"), rng.choice(_NEGATIONS))
    return " ".join(premise), " ".join(hyp)


def _mnli(rng: random.Random, topic: dict) -> tuple[str, str, int]:
    label = rng.randrange(3)
    a, b = _nli_pair(rng, topic, SUBTASKS["mnli"].label_names[label])
    return a, b, _noisy(label, 3, rng)


def _rte(rng: random.Random, topic: dict) -> tuple[str, str, int]:
    label = rng.randrange(2)  # 0 entailment, 1 not_entailment (neutral- or contradiction-like)
    kind = "entailment" if label == 0 else rng.choice(["neutral", "contradiction"])
    a, b = _nli_pair(rng, topic, kind)
    return a, b, _noisy(label, 2, rng)


def _qnli(rng: random.Random, topic: dict) -> tuple[str, str, int]:
    main, other = topic["main"], topic["other"]
    label = rng.randrange(2)  # 0 entailment: the sentence is about the question's key word
    key = rng.choice(main["subj"])
    verb = rng.choice(main["verb"])
    question = rng.choice(_QNLI_WH) + [key, verb]
    subj = key if label == 0 else _depart(rng, main["subj"], other["subj"], key)
    # The verb matches half the time in either class: it carries no signal.
    s_verb = verb if rng.random() < 0.5 else rng.choice(main["verb"])
    sentence = ["the", subj, s_verb, "the", rng.choice(main["obj"]), "near", "the", rng.choice(main["place"])]
    return " ".join(question), " ".join(sentence), _noisy(label, 2, rng)


_GENERATORS = {
    "sst2": _sst2,
    "cola": _cola,
    "mrpc": lambda rng, topic: _paraphrase(rng, _MRPC, question=False),
    "qqp": lambda rng, topic: _paraphrase(rng, _QQP, question=True),
    "stsb": _stsb,
    "mnli": _mnli,
    "rte": _rte,
    "qnli": _qnli,
}


def _generate(subtask: str, split: str, n: int, seed: int, topic: str) -> list[Example]:
    rng = _rng(subtask, seed, split)
    gen = _GENERATORS[subtask]
    out = []
    for i in range(n):
        a, b, label = gen(rng, _TOPICS[topic])
        out.append(Example(a, b, label, f"smoke/{subtask}/{seed}/{split}/{i}"))
    return out


def generate_smoke(
    subtask: str, n_train: int, n_eval: int, seed: int = 0
) -> tuple[list[Example], dict[str, list[Example]]]:
    """Synthetic examples with the fields and label space of ``subtask``: ``(train, evals)``.

    ``evals`` is keyed like the real subtask's evaluation sets (``dev``; MNLI ``matched`` and
    ``mismatched``, ``n_eval`` examples each). Deterministic in ``(subtask, seed)``: the first ``k``
    examples of a split do not depend on the requested sizes. The rules:

    - sst2: filler words plus 1-3 sentiment words of the label's polarity (and at most one, outnumbered,
      of the other);
    - cola: ``the ADJ SUBJ VERB the OBJ [in the PLACE]`` is acceptable, any other order of its words not;
    - mrpc/qqp: the second sentence rewords the first with synonyms (equivalent/duplicate) or is unrelated;
    - stsb: score = 5 x the fraction of the four content words the sentences share, plus noise, in [0, 5];
    - mnli/rte: hypothesis = a subset of the premise (entailment), plus a negation (contradiction), or
      with a content word the premise lacks (neutral; RTE folds both into not_entailment);
    - qnli: the sentence does (entailment) or does not mention the question's subject.

    MNLI "mismatched" uses a different topic vocabulary; every label is replaced with probability
    ``SMOKE_LABEL_NOISE`` (see the comments above for the pair tasks' cue).
    """
    spec(subtask)
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"smoke sizes must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    train = _generate(subtask, "train", n_train, seed, "a")
    if subtask == "mnli":
        evals = {
            "matched": _generate(subtask, "matched", n_eval, seed, "a"),
            "mismatched": _generate(subtask, "mismatched", n_eval, seed, "b"),
        }
    else:
        evals = {"dev": _generate(subtask, "dev", n_eval, seed, "a")}
    return train, evals


def _words(obj: object) -> set[str]:
    """All strings inside nested dicts, lists and tuples."""
    if isinstance(obj, str):
        return {obj}
    if isinstance(obj, dict):
        obj = list(obj.values())
    return set().union(*(_words(x) for x in obj)) if obj else set()


def smoke_vocabulary() -> list[str]:
    """Every word the smoke generator can emit, sorted: enough to build a WordPiece vocabulary offline."""
    pools = [
        _TOPICS,
        _MRPC,
        _QQP,
        _STSB,
        _QQP_OPENERS,
        _QNLI_WH,
        _NEGATIONS,
        _FUNCTION_WORDS,
        _SST2_POSITIVE,
        _SST2_NEGATIVE,
        _SST2_FILLER,
    ]
    return sorted(set().union(*(_words(p) for p in pools)))
