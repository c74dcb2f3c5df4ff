"""GLUE examples (bench.tasks.glue.data): parsing of the real TSVs, the small-tier split plan, fingerprints
and the smoke-tier generator.

Tests marked ``needs_data`` read the real files from the data root (``BENCH_DATA``, else
``<repo>/../shared/data``; see shared/data/SOURCES.md) and skip when it is absent. The expected rows and
first examples below were checked by hand against the files (``head``, ``wc -l``, ``cut``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from bench.tasks.glue import data as D

needs_data = pytest.mark.needs_data


# --------------------------------------------------------------------------------------------------
# The subtask table
# --------------------------------------------------------------------------------------------------


def test_subtask_table_matches_glue_and_the_hub_label_order():
    assert set(D.SUBTASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"}
    s = D.SUBTASKS
    assert s["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert s["qnli"].label_names == s["rte"].label_names == ("entailment", "not_entailment")
    assert s["cola"].label_names == ("unacceptable", "acceptable")
    assert s["sst2"].label_names == ("negative", "positive")
    assert s["mrpc"].label_names == ("not_equivalent", "equivalent")
    assert s["qqp"].label_names == ("not_duplicate", "duplicate")
    assert s["stsb"].is_regression and s["stsb"].num_labels == 1
    assert [n for n, x in s.items() if x.is_regression] == ["stsb"]
    assert {n for n, x in s.items() if not x.is_pair} == {"cola", "sst2"}
    assert {n: x.dir_name for n, x in s.items()} == {
        "cola": "CoLA",
        "sst2": "SST-2",
        "mrpc": "MRPC",
        "stsb": "STS-B",
        "qqp": "QQP",
        "mnli": "MNLI",
        "qnli": "QNLI",
        "rte": "RTE",
    }
    assert s["mnli"].eval_names == ("matched", "mismatched") and s["rte"].eval_names == ("dev",)


def test_unknown_subtask_and_split_name_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid: cola, sst2"):
        D.spec("wnli")
    with pytest.raises(ValueError, match="valid: train, dev_matched, dev_mismatched"):
        D.read_tsv_split(tmp_path, "mnli", "dev")


# --------------------------------------------------------------------------------------------------
# The real files
# --------------------------------------------------------------------------------------------------

ROWS = [
    ("sst2", "train", 67_349),
    ("sst2", "dev", 872),
    ("cola", "train", 8_551),
    ("cola", "dev", 1_043),
    ("mrpc", "train", 3_668),
    ("mrpc", "dev", 408),
    ("rte", "train", 2_490),
    ("rte", "dev", 277),
    ("stsb", "train", 5_749),
    ("stsb", "dev", 1_500),
    ("qnli", "dev", 5_463),
    ("mnli", "dev_matched", 1_000),
    ("mnli", "dev_mismatched", 1_000),
]


@needs_data
@pytest.mark.parametrize("subtask, split, n", ROWS)
def test_row_counts_match_sources(data_root, subtask, split, n):
    exs = D.read_tsv_split(data_root, subtask, split)
    assert len(exs) == n
    assert len({e.uid for e in exs}) == n
    assert all(isinstance(e.text_a, str) and e.text_a for e in exs)
    assert all((e.text_b is not None) == D.SUBTASKS[subtask].is_pair for e in exs)


# The md5 column of SOURCES.md: the files are the ones the counts and first rows below describe.
MD5 = {
    "SST-2/train.tsv": "2923754b672f7ec42a27bafabdfd5e3c",
    "SST-2/dev.tsv": "268856b487b2a31a28c0a93daaff7288",
    "CoLA/train.tsv": "c79d4693b8681800338aa044bf9e797b",
    "CoLA/dev.tsv": "c5475ccefc9e7ca0917294b8bbda783c",
    "MRPC/train.tsv": "ce85e419c7df081267c9e01415f86fd7",
    "MRPC/dev.tsv": "cbf6fb5d759c11c9cda50c7c876a3c81",
    "RTE/train.tsv": "d2844f558d111a16503144bb37a8165f",
    "RTE/dev.tsv": "973cb4178d4534cf745a01c309d4a66c",
    "STS-B/train.tsv": "4f7a86dde15fe4832c18e5b970998672",
    "STS-B/dev.tsv": "5f4d6b0d2a5f268b1b56db773ab2f1fe",
    "QNLI/dev.tsv": "3f9bee4d3ed4554cea548df75bd94ec7",
    "MNLI/dev_matched_1k.tsv": "7167b27891dee81587865ffcf1b12776",
    "MNLI/dev_mismatched_1k.tsv": "c336447198796bc935dd96e9a9d00573",
}


@needs_data
def test_file_md5_matches_sources(data_root):
    for rel, md5 in MD5.items():
        assert D.file_md5(data_root / "glue" / rel) == md5, rel


FIRST = [
    # (subtask, split, text_a, text_b, label)
    ("cola", "train", "Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
    ("cola", "dev", "The sailors rode the breeze clear of the rocks.", None, 1),
    # SST-2 sentences are tokenised and end with a space; the standard processor keeps them as written.
    ("sst2", "dev", "it 's a charming and often affecting journey . ", None, 1),
    ("sst2", "train", "when are bears bears and ", None, 1),
    (
        "mrpc",
        "train",
        'Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.',
        (
            'Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting '
            "his evidence."
        ),
        1,
    ),
    # An unbalanced double quote: only quotechar=None keeps this row (and the rest of the file) intact.
    (
        "mrpc",
        "dev",
        "He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
        '"The foodservice pie business does not fit our long-term growth strategy.',
        1,
    ),
    (
        "rte",
        "train",
        "No Weapons of Mass Destruction Found in Iraq Yet.",
        "Weapons of Mass Destruction Found in Iraq.",
        1,
    ),
    ("stsb", "train", "A plane is taking off.", "An air plane is taking off.", 5.0),
    ("stsb", "dev", "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
    (
        "qnli",
        "dev",
        "What came into force after the new constitution was herald?",
        "As of that day, the new constitution heralding the Second Republic came into force.",
        0,
    ),
    (
        "mnli",
        "dev_matched",
        (
            "In Temple Bar , the bookshop at the Gallery of Photography carries a large selection of "
            "photographic publications , and the Flying Pig is a secondhand bookshop ."
        ),
        "There is a bookshop at the gallery .",
        0,
    ),
    (
        "mnli",
        "dev_mismatched",
        "You ca n't take it with you -- neither can I , unfortunately .",
        "You are not able to bring it with you .",
        0,
    ),
]


@needs_data
@pytest.mark.parametrize("subtask, split, text_a, text_b, label", FIRST)
def test_first_example(data_root, subtask, split, text_a, text_b, label):
    e = D.read_tsv_split(data_root, subtask, split)[0]
    assert (e.text_a, e.text_b, e.label) == (text_a, text_b, label)
    assert type(e.label) is type(label)


@needs_data
def test_second_examples_and_label_mapping(data_root):
    # Labels written as names map to the hub order: MNLI row 3 of dev_matched_1k is "neutral" -> 1,
    # dev_mismatched_1k row 3 is "contradiction" -> 2; QNLI row 2 is not_entailment -> 1.
    assert D.read_tsv_split(data_root, "mnli", "dev_matched")[2].label == 1
    assert D.read_tsv_split(data_root, "mnli", "dev_mismatched")[2].label == 2
    assert D.read_tsv_split(data_root, "qnli", "dev")[1].label == 1
    assert D.read_tsv_split(data_root, "stsb", "train")[1].label == pytest.approx(3.8)
    assert D.read_tsv_split(data_root, "sst2", "dev")[1] == D.Example(
        "unflinchingly bleak and desperate ", None, 0, "sst2/dev/1"
    )


@needs_data
@pytest.mark.parametrize(
    "subtask, split, counts",
    [
        ("cola", "train", {1: 6023, 0: 2528}),
        ("sst2", "dev", {1: 444, 0: 428}),
        ("mrpc", "dev", {1: 279, 0: 129}),
        ("rte", "train", {0: 1249, 1: 1241}),
        ("qnli", "dev", {0: 2702, 1: 2761}),
        ("mnli", "dev_matched", {0: 373, 1: 311, 2: 316}),
    ],
)
def test_label_counts(data_root, subtask, split, counts):
    assert Counter(e.label for e in D.read_tsv_split(data_root, subtask, split)) == counts


@needs_data
def test_mrpc_bom_is_stripped(data_root):
    for split in ("train", "dev"):
        exs = D.read_tsv_split(data_root, "mrpc", split)
        assert all("\ufeff" not in e.text_a + e.text_b for e in exs)
        assert {e.label for e in exs} == {0, 1}
    assert (data_root / "glue" / "MRPC" / "train.tsv").read_bytes()[:3] == b"\xef\xbb\xbf"  # it is there


@needs_data
def test_stsb_labels_are_floats_in_range(data_root):
    for split in ("train", "dev"):
        labels = [e.label for e in D.read_tsv_split(data_root, "stsb", split)]
        assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in labels)
        assert min(labels) == 0.0 and max(labels) == 5.0
    dev = [e.label for e in D.read_tsv_split(data_root, "stsb", "dev")]
    assert sum(dev) / len(dev) == pytest.approx(2.3639, abs=1e-3)


@needs_data
def test_available_splits_and_layouts(data_root):
    glue = data_root / "glue"
    assert D.available_splits(data_root, "qnli") == {"dev": glue / "QNLI" / "dev.tsv"}
    assert D.available_splits(data_root, "qqp") == {}
    assert D.available_splits(data_root, "mnli") == {
        "dev_matched": glue / "MNLI" / "dev_matched_1k.tsv",
        "dev_mismatched": glue / "MNLI" / "dev_mismatched_1k.tsv",
    }
    assert set(D.available_splits(data_root, "rte")) == {"train", "dev"}
    read = D.read_split(data_root, "mnli", "dev_matched")
    assert read.source.layout == "mnli_1k" and read.source.is_subset
    assert D.read_split(data_root, "rte", "dev").source.layout == "standard"
    # The GLUE folder itself works as a root too.
    assert D.available_splits(glue, "rte") == D.available_splits(data_root, "rte")


@needs_data
def test_unavailable_reasons(data_root):
    for t in ("cola", "sst2", "mrpc", "stsb", "mnli", "qnli", "rte"):
        assert D.unavailable_reason(data_root, t) is None, t
    reason = D.unavailable_reason(data_root, "qqp")
    assert "qqp" in reason and "QQP" in reason and "nyu-mll/glue" in reason
    assert "no data root" in D.unavailable_reason(None, "sst2")
    assert "1k-example subsets" in D.data_caveat(data_root, "mnli")
    assert "only the GLUE dev set" in D.data_caveat(data_root, "qnli")
    assert D.data_caveat(data_root, "rte") is None
    with pytest.raises(D.DataUnavailable, match="no train.tsv"):
        D.read_tsv_split(data_root, "qnli", "train")


# --------------------------------------------------------------------------------------------------
# The small-tier split plan
# --------------------------------------------------------------------------------------------------


@needs_data
def test_small_plan_qnli(data_root):
    plan = D.small_tier_plan(data_root, "qnli")
    assert len(plan.train) == 4_463 and list(plan.evals) == ["dev"] and len(plan.evals["dev"]) == 1_000
    train_ids, eval_ids = {e.uid for e in plan.train}, {e.uid for e in plan.evals["dev"]}
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == {e.uid for e in D.read_tsv_split(data_root, "qnli", "dev")}
    assert "1,000 rows held out" in plan.note and "4,463" in plan.note
    # Held-out rows keep file order; the choice is pinned (a change here changes every QNLI score).
    assert [e.uid for e in plan.evals["dev"][:3]] == ["qnli/dev/2", "qnli/dev/5", "qnli/dev/7"]
    assert D.fingerprint_examples(plan.evals["dev"]) == (
        "733d6f187dde37621dd9c5fff749682f856a3cbfcda5aa82e3b0ec200a29eff5"
    )


@needs_data
def test_small_plan_mnli(data_root):
    plan = D.small_tier_plan(data_root, "mnli")
    assert len(plan.train) == 1_000
    assert list(plan.evals) == ["matched", "mismatched"]
    assert len(plan.evals["matched"]) == len(plan.evals["mismatched"]) == 500
    train_ids = {e.uid for e in plan.train}
    m_ids = {e.uid for e in plan.evals["matched"]}
    mm_ids = {e.uid for e in plan.evals["mismatched"]}
    assert not (train_ids & m_ids) and not (train_ids & mm_ids) and not (m_ids & mm_ids)
    # 500 training rows from each file.
    assert Counter(u.split("/")[1] for u in train_ids) == {"dev_matched_1k": 500, "dev_mismatched_1k": 500}
    assert all(u.startswith("mnli/dev_matched_1k/") for u in m_ids)
    assert all(u.startswith("mnli/dev_mismatched_1k/") for u in mm_ids)
    assert plan.note == (
        "MNLI: 1k-example subsets of dev_matched/dev_mismatched; 500 of each used for training, 500 of each "
        "held out for scoring; not comparable with full-dev scores"
    )
    assert {s.layout for s in plan.sources.values()} == {"mnli_1k"}
    assert D.fingerprint_examples(plan.evals["matched"]) == (
        "e7dabda96fe92de8d3a4da91968195a00915916457004ebbe02c551beed99707"
    )
    assert D.fingerprint_examples(plan.evals["mismatched"]) == (
        "7d59c32bbd561477b4147efd9431412aeae8484366847ea565398a570df55366"
    )


@needs_data
def test_small_plan_is_deterministic_and_standard_where_files_exist(data_root):
    a, b = D.small_tier_plan(data_root, "mnli"), D.small_tier_plan(data_root, "mnli")
    assert a.data_fingerprint() == b.data_fingerprint()
    rte = D.small_tier_plan(data_root, "rte")
    assert (len(rte.train), len(rte.evals["dev"]), rte.note) == (2_490, 277, None)
    fp = rte.data_fingerprint()
    assert fp["files"] == {"RTE/train.tsv": MD5["RTE/train.tsv"], "RTE/dev.tsv": MD5["RTE/dev.tsv"]}
    assert fp["train"]["n"] == 2_490 and fp["eval/dev"]["n"] == 277


@needs_data
def test_small_plan_qqp_is_unavailable(data_root):
    with pytest.raises(D.DataUnavailable, match="not available offline"):
        D.small_tier_plan(data_root, "qqp")


# --------------------------------------------------------------------------------------------------
# Layouts the data root here does not have: written to tmp_path
# --------------------------------------------------------------------------------------------------


def _write(path: Path, lines: list[str], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())


def _mnli_row(i: int, a: str, b: str, label: str) -> str:
    # Standard MNLI: index promptID pairID genre parse1 parse2 bparse1 bparse2 sentence1 sentence2
    # label1 [label2..label5] gold_label
    return "\t".join([str(i), "p", "q", "fiction", "(", "(", "(", "(", a, b, label, label])


def test_standard_mnli_files_are_preferred(tmp_path):
    mnli = tmp_path / "glue" / "MNLI"
    columns = [
        "index",
        "promptID",
        "pairID",
        "genre",
        "sentence1_binary_parse",
        "sentence2_binary_parse",
        "sentence1_parse",
        "sentence2_parse",
        "sentence1",
        "sentence2",
        "label1",
        "gold_label",
    ]
    head = "\t".join(columns)
    _write(mnli / "dev_matched.tsv", [head, _mnli_row(0, "A b.", "C d.", "neutral")])
    _write(mnli / "dev_matched_1k.tsv", ["entailment\tx\ty"])
    _write(mnli / "dev_mismatched_1k.tsv", ["contradiction\tx y\tz"])
    read = D.read_split(tmp_path, "mnli", "dev_matched")
    assert read.source.layout == "standard" and read.source.path.name == "dev_matched.tsv"
    assert read.examples == [D.Example("A b.", "C d.", 1, "mnli/dev_matched/0")]
    mm = D.read_split(tmp_path, "mnli", "dev_mismatched")
    assert mm.source.layout == "mnli_1k"
    assert mm.examples == [D.Example("x y", "z", 2, "mnli/dev_mismatched_1k/0")]


def test_qqp_skips_malformed_lines_like_the_standard_processor(tmp_path):
    _write(
        tmp_path / "QQP" / "dev.tsv",
        [
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "0\t1\t2\tHow do I x?\tHow can I x?\t1",
            "1\t3\t4\tbroken line without the rest",
            "2\t5\t6\tWhat is y?\tWhere is z?\t0",
        ],
    )
    read = D.read_split(tmp_path, "qqp", "dev")
    assert [e.label for e in read.examples] == [1, 0]
    assert read.skipped_lines == (3,)
    assert read.examples[1].uid == "qqp/dev/2"


def test_bom_header_and_bad_rows_are_reported(tmp_path):
    _write(
        tmp_path / "MRPC" / "dev.tsv",
        ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tA\tB"],
        bom=True,
    )
    assert D.read_tsv_split(tmp_path, "mrpc", "dev") == [D.Example("A", "B", 1, "mrpc/dev/0")]
    _write(tmp_path / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA\tB\tmaybe"])
    with pytest.raises(ValueError, match=r"RTE/dev.tsv:2: label 'maybe' is not one of entailment"):
        D.read_tsv_split(tmp_path, "rte", "dev")
    _write(tmp_path / "CoLA" / "dev.tsv", ["src\t1\t\tFine.", "src\t0"])
    with pytest.raises(ValueError, match=r"CoLA/dev.tsv:2: expected at least 4"):
        D.read_tsv_split(tmp_path, "cola", "dev")
    _write(tmp_path / "STS-B" / "dev.tsv", ["h"] + ["\t".join(["0"] * 7 + ["A", "B", "5.5"])])
    with pytest.raises(ValueError, match="outside"):
        D.read_tsv_split(tmp_path, "stsb", "dev")


def test_unavailable_when_dev_missing(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA\tB\tentailment"])
    assert "no dev split" in D.unavailable_reason(tmp_path, "rte")
    with pytest.raises(D.DataUnavailable):
        D.small_tier_plan(tmp_path, "rte")


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def test_fingerprint_is_a_hash_of_a_canonical_serialisation(tmp_path):
    e = D.Example("a", None, 1, "u")
    assert D.fingerprint_examples([e]) == hashlib.sha256(b'["u","a",null,1]\n').hexdigest()
    f = D.Example("b", "c", 2.5, "v")
    assert D.fingerprint_examples([e, f]) != D.fingerprint_examples([f, e])  # order matters
    assert D.fingerprint_examples([e]) != D.fingerprint_examples([D.Example("a", None, 0, "u")])
    assert D.fingerprint_examples([]) == hashlib.sha256(b"").hexdigest()
    p = tmp_path / "x.txt"
    p.write_bytes(b"hello")
    assert D.file_md5(p) == hashlib.md5(b"hello").hexdigest()


# --------------------------------------------------------------------------------------------------
# Smoke tier
# --------------------------------------------------------------------------------------------------

ALL = sorted(D.SUBTASKS)


@pytest.mark.parametrize("subtask", ALL)
def test_smoke_is_deterministic_and_seeded(subtask):
    a = D.generate_smoke(subtask, 50, 20, seed=0)
    assert a == D.generate_smoke(subtask, 50, 20, seed=0)
    b = D.generate_smoke(subtask, 50, 20, seed=1)
    assert [e.text_a for e in a[0]] != [e.text_a for e in b[0]]
    # Prefix-stable: asking for more examples does not change the first ones, nor the eval sets.
    c = D.generate_smoke(subtask, 80, 20, seed=0)
    assert c[0][:50] == a[0] and c[1] == a[1]


def test_smoke_fingerprint_is_pinned():
    # The smoke data are part of every smoke-tier result: changing the generator must be deliberate.
    train, _ = D.generate_smoke("sst2", 10, 5)
    assert D.fingerprint_examples(train) == "86719c34af058f501ab0bbe88dfe3cf6a378484bd380c170a2c2f3fc9a048d1b"


@pytest.mark.parametrize("subtask", ALL)
def test_smoke_fields_and_label_spaces(subtask):
    sp = D.SUBTASKS[subtask]
    train, evals = D.generate_smoke(subtask, 400, 100)
    assert list(evals) == (["matched", "mismatched"] if subtask == "mnli" else ["dev"])
    assert len(train) == 400 and all(len(v) == 100 for v in evals.values())
    everything = train + [e for v in evals.values() for e in v]
    assert len({e.uid for e in everything}) == len(everything)
    for e in everything:
        assert isinstance(e.text_a, str) and e.text_a
        assert (e.text_b is not None) == sp.is_pair
        if sp.is_regression:
            assert isinstance(e.label, float) and 0.0 <= e.label <= 5.0
        else:
            assert type(e.label) is int and 0 <= e.label < sp.num_labels
    if not sp.is_regression:  # every class occurs, roughly balanced
        counts = Counter(e.label for e in train)
        assert set(counts) == set(range(sp.num_labels))
        assert min(counts.values()) > 400 / sp.num_labels * 0.7


@pytest.mark.parametrize("subtask", ALL)
def test_smoke_vocabulary_covers_every_word(subtask):
    vocab = D.smoke_vocabulary()
    assert vocab == sorted(set(vocab))
    assert vocab == D.smoke_vocabulary()
    for seed in range(3):
        train, evals = D.generate_smoke(subtask, 300, 100, seed=seed)
        words = {
            w
            for e in train + [x for v in evals.values() for x in v]
            for t in (e.text_a, e.text_b or "")
            for w in t.split()
        }
        assert words <= set(vocab), words - set(vocab)


def test_smoke_mnli_mismatched_uses_another_topic():
    train, evals = D.generate_smoke("mnli", 500, 200)

    def words(exs):
        return {w for e in exs for w in e.text_a.split()}

    shared = words(train) & words(evals["mismatched"])
    assert shared <= {"the", "in"}  # only function words carry over
    assert words(evals["matched"]) <= words(train) | {"the", "in"}


def test_smoke_rules_hold_before_noise():
    # With the label noise off, each rule decides its label exactly.
    D_noise = D.SMOKE_LABEL_NOISE
    try:
        D.SMOKE_LABEL_NOISE = 0.0
        for e in D.generate_smoke("mnli", 300, 0)[0]:
            a, b = set(e.text_a.split()), e.text_b.split()
            negated = bool(set(b) & {"never", "not"})
            assert negated == (e.label == 2)
            if e.label == 0:
                assert set(b) <= a
            if e.label == 1:
                assert not set(b) <= a
        for e in D.generate_smoke("qnli", 300, 0)[0]:
            key = e.text_a.split()[3]
            assert (key in e.text_b.split()) == (e.label == 0)
        for e in D.generate_smoke("cola", 300, 0)[0]:
            w = e.text_a.split()
            if e.label == 1:  # the ADJ SUBJ VERB the OBJ [in the PLACE]
                assert w[0] == w[4] == "the" and (len(w) == 6 or w[6:8] == ["in", "the"])
    finally:
        D.SMOKE_LABEL_NOISE = D_noise
    for e in D.generate_smoke("stsb", 300, 0)[0]:
        # "a SUBJ is VERB a OBJ in the PLACE": content words at 1, 3, 5, 8.
        a, b = e.text_a.split(), e.text_b.split()
        shared = sum(a[i] == b[i] for i in (1, 3, 5, 8))
        assert abs(e.label - 5.0 * shared / 4) <= 1.25  # Gaussian noise, std 0.25


@pytest.mark.parametrize(
    "subtask, floor",
    [("sst2", 0.85), ("mnli", 0.75), ("rte", 0.8), ("qnli", 0.75), ("mrpc", 0.75), ("qqp", 0.75)],
)
def test_smoke_is_learnable_by_a_bag_of_words_model(subtask, floor):
    """A linear model on word counts (text_a and text_b apart) beats chance by far (CoLA is left out: its
    rule is word order, which word counts cannot see). The real smoke students are tiny transformers,
    which these rules are meant for (see the smoke comments in data.py)."""
    pytest.importorskip("sklearn")
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, evals = D.generate_smoke(subtask, 2000, 500)
    va = CountVectorizer(token_pattern=r"\S+").fit([e.text_a for e in train])
    vb = (
        CountVectorizer(token_pattern=r"\S+").fit([e.text_b or "." for e in train])
        if train[0].text_b
        else None
    )

    def features(exs):
        xa = va.transform([e.text_a for e in exs])
        return hstack([xa, vb.transform([e.text_b for e in exs])]).tocsr() if vb else xa

    model = LogisticRegression(max_iter=2000).fit(features(train), [e.label for e in train])
    for name, exs in evals.items():
        acc = model.score(features(exs), [e.label for e in exs])
        # MNLI mismatched words are unseen in training; only the negation cue transfers.
        assert acc >= (0.5 if name == "mismatched" else floor), (name, acc)
