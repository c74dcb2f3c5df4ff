"""Text of the lm task: training documents by domain, held-out text, and the GLUE-style prompt sets.

Pure Python (no torch): ``bench ls`` and config validation may import it.

* **Prompts** (``PROMPTS``): the zero-shot multiple-choice prompts of lm-evaluation-harness's stock GLUE
  tasks (``lm_eval/tasks/glue/*/default.yaml`` of lm-eval 0.4.13: the same ``doc_to_text``, choices and
  metrics; label index = choice index, as in ``nyu-mll/glue``), for SST-2, CoLA, MRPC, RTE, QNLI and
  MNLI (matched and mismatched). ``doc_to_text`` here renders the same string as lm-eval's template,
  so training documents written in a prompt's format are the format the evaluation scores.
* **smoke**: examples from the GLUE family's generator (``bench.tasks.glue.data.generate_smoke``: the
  real label spaces, deterministic), one domain per GLUE subtask, each training document a prompt
  followed by its answer; held-out text from another seed of the same generator.
* **small**: the GLUE TSVs under the data root. Domains sst2, cola, mrpc, rte (prompt + gold answer from
  the train files) and stsb (its train sentence pairs as plain text); a fixed part of each domain's train
  file is held out as that domain's validation text (DDK). Perplexity is scored on the STS-B *dev*
  sentence pairs (text no cell trains on); the prompt sets are the dev files (QNLI and MNLI have no
  train files offline, so they are zero-shot).
* **full**: a ``datasets`` corpus named in the task's parameters (see ``full_corpus``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.tasks.glue import data as gdata

# --------------------------------------------------------------------------------------------------
# GLUE-style prompts (lm-eval 0.4.13, lm_eval/tasks/glue)
# --------------------------------------------------------------------------------------------------


def _mnli_hypothesis(h: str) -> str:
    # lm_eval/tasks/glue/mnli/utils.py doc_to_text: strip, and end with a period.
    h = h.strip()
    return h + ("" if h.endswith(".") else ".")


@dataclass(frozen=True)
class Prompt:
    """One GLUE-style prompt set: fields of a row, the prompt template, choices and lm-eval metrics."""

    name: str  # the set's name, also its metric prefix
    subtask: str  # GLUE subtask the rows come from
    fields: tuple[str, ...]
    template: str  # lm-eval's doc_to_text, as a Jinja template over ``fields``
    choices: tuple[str, ...]
    metrics: tuple[str, ...]  # lm-eval metric names
    eval_set: str = "dev"  # evaluation set of the GLUE subtask (MNLI: matched / mismatched)

    def row(self, ex: gdata.Example) -> dict[str, Any]:
        values = [ex.text_a, ex.text_b]
        out = {f: v for f, v in zip(self.fields, values)}
        if self.subtask == "mnli":
            out["hypothesis"] = _mnli_hypothesis(out["hypothesis"])
        out["label"] = int(ex.label)
        return out

    def text(self, row: dict[str, Any]) -> str:
        s = self.template
        for f in self.fields:
            s = s.replace("{{" + f + "}}", str(row[f]))
        return s

    def document(self, ex: gdata.Example) -> str:
        """A training document: the prompt, lm-eval's target delimiter " ", and the gold answer."""
        row = self.row(ex)
        return self.text(row) + " " + self.choices[row["label"]]


PROMPTS: dict[str, Prompt] = {p.name: p for p in (
    Prompt("sst2", "sst2", ("sentence",), "{{sentence}}\nQuestion: Is this sentence positive or negative?\nAnswer:",
           ("negative", "positive"), ("acc",)),
    Prompt("cola", "cola", ("sentence",), "{{sentence}}\nQuestion: Does this sentence make sense?\nAnswer:",
           ("no", "yes"), ("mcc",)),
    Prompt("mrpc", "mrpc", ("sentence1", "sentence2"),
           "Sentence 1: {{sentence1}}\nSentence 2: {{sentence2}}\nQuestion: Do both sentences mean the same thing?"
           "\nAnswer:", ("no", "yes"), ("acc", "f1")),
    Prompt("rte", "rte", ("sentence1", "sentence2"), "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
           ("True", "False"), ("acc",)),
    Prompt("qnli", "qnli", ("question", "sentence"),
           "{{question}}\n{{sentence}}\nQuestion: Does this response answer the question?\nAnswer:", ("yes", "no"),
           ("acc",)),
    Prompt("mnli", "mnli", ("premise", "hypothesis"),
           "{{premise}}\nQuestion: {{hypothesis}} True, False or Neither?\nAnswer:", ("True", "Neither", "False"),
           ("acc",), eval_set="matched"),
    Prompt("mnli_mm", "mnli", ("premise", "hypothesis"),
           "{{premise}}\nQuestion: {{hypothesis}} True, False or Neither?\nAnswer:", ("True", "Neither", "False"),
           ("acc",), eval_set="mismatched"),
)}
#: GLUE subtasks whose prompt is a training domain (they have train files; QNLI and MNLI do not offline).
SMALL_PROMPTED_DOMAINS = ("sst2", "cola", "mrpc", "rte")
SMOKE_DOMAINS = ("sst2", "cola", "mrpc", "rte", "qnli", "mnli")

# --------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Everything textual a tier needs."""

    domains: tuple[str, ...]
    #: training documents per domain (each becomes EOS-separated text, packed into blocks per domain)
    train: dict[str, list[str]]
    #: held-out documents per domain (DDK's per-domain validation text)
    validation: dict[str, list[str]]
    #: held-out text scored for perplexity
    heldout: list[str]
    #: GLUE-style prompt sets: name -> rows (lm-eval JSONL rows)
    prompt_sets: dict[str, list[dict[str, Any]]]
    #: labelled prompts a method may train on (step-by-step): (uid, prompt text, answer)
    labelled: list[tuple[str, str, str]] = field(default_factory=list)
    source: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file -> md5
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for d in self.domains:
            h.update(d.encode())
            for doc in self.train[d]:
                h.update(b"\x00" + doc.encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        def sha(obj: Any) -> str:
            return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]

        return {
            "source": self.source,
            "train": {"n": sum(len(v) for v in self.train.values()), "sha256": self.fingerprint(),
                      "per_domain": {d: len(self.train[d]) for d in self.domains}},
            "validation": {d: len(v) for d, v in self.validation.items()},
            "heldout": {"n": len(self.heldout), "sha256": sha(self.heldout)},
            "prompt_sets": {k: {"n": len(v), "sha256": sha(v)} for k, v in self.prompt_sets.items()},
            **({"files": self.files} if self.files else {}),
        }


def _shuffled(items: list, salt: str) -> list:
    out = list(items)
    random.Random(int(hashlib.sha256(salt.encode()).hexdigest()[:12], 16)).shuffle(out)
    return out


def smoke_corpus(docs_per_domain: int, val_docs: int, eval_size: int, heldout_per_domain: int) -> Corpus:
    """Generated GLUE-style documents (see the module docstring); deterministic."""
    train, validation, prompt_sets, labelled, heldout = {}, {}, {}, [], []
    for sub in SMOKE_DOMAINS:
        prompt = PROMPTS[sub]
        examples, evals = gdata.generate_smoke(sub, docs_per_domain + val_docs, eval_size, seed=0)
        train[sub] = [prompt.document(e) for e in examples[:docs_per_domain]]
        validation[sub] = [prompt.document(e) for e in examples[docs_per_domain:]]
        labelled += [(e.uid, prompt.text(prompt.row(e)), prompt.choices[int(e.label)])
                     for e in examples[:docs_per_domain]]
        held, _ = gdata.generate_smoke(sub, heldout_per_domain, 0, seed=1)
        heldout += [prompt.document(e) for e in held]
        for p in PROMPTS.values():
            if p.subtask == sub:
                prompt_sets[p.name] = [p.row(e) for e in evals["dev" if sub != "mnli" else p.eval_set]]
    return Corpus(SMOKE_DOMAINS, train, validation, heldout, prompt_sets, labelled,
                  source="generated (tasks/lm/data.py smoke_corpus over tasks/glue/data.py generate_smoke)")


def small_corpus(data_root: Path, docs_per_domain: int, val_docs: int, eval_limit: int) -> Corpus:
    """The GLUE TSVs under ``data_root`` (see the module docstring)."""
    train, validation, prompt_sets, labelled, files = {}, {}, {}, [], {}
    domains = (*SMALL_PROMPTED_DOMAINS, "stsb")
    for sub in domains:
        read = gdata.read_split(data_root, sub, "train")
        files[str(read.source.path)] = gdata.file_md5(read.source.path)
        examples = _shuffled(read.examples, f"lm-small-{sub}")
        held, rest = examples[:val_docs], examples[val_docs:val_docs + docs_per_domain]
        if sub == "stsb":
            render: Callable[[gdata.Example], str] = lambda e: f"{e.text_a.strip()}\n{e.text_b.strip()}"
        else:
            render = PROMPTS[sub].document
            p = PROMPTS[sub]
            labelled += [(e.uid, p.text(p.row(e)), p.choices[int(e.label)]) for e in rest]
        train[sub] = [render(e) for e in rest]
        validation[sub] = [render(e) for e in held]
    stsb_dev = gdata.read_split(data_root, "stsb", "dev")
    files[str(stsb_dev.source.path)] = gdata.file_md5(stsb_dev.source.path)
    # STS-B repeats some sentence pairs across its splits: a dev pair that is also a training document is
    # not held out, so it is left out of the perplexity text.
    trained = set(train["stsb"]) | set(validation["stsb"])
    heldout = [d for d in (f"{e.text_a.strip()}\n{e.text_b.strip()}" for e in stsb_dev.examples)
               if d not in trained][:eval_limit]
    for p in PROMPTS.values():
        split = "dev" if p.subtask != "mnli" else f"dev_{p.eval_set}"
        read = gdata.read_split(data_root, p.subtask, split)
        files[str(read.source.path)] = gdata.file_md5(read.source.path)
        prompt_sets[p.name] = [p.row(e) for e in read.examples[:eval_limit]]
    notes = [(f"lm small tier: GLUE-prompt scores on the first {eval_limit} dev examples of each set (RTE has "
              f"277, MRPC 408); QNLI and MNLI (1k subsets) are zero-shot (no train file offline); perplexity on the "
              f"first {len(heldout)} STS-B dev sentence pairs that are not also training documents")]
    return Corpus(domains, train, validation, heldout, prompt_sets, labelled,
                  source=f"GLUE TSVs under {data_root}", files=files, notes=notes)


def small_unavailable(data_root: Path | None) -> str | None:
    """Why the small tier cannot run, or None."""
    if data_root is None:
        return "the lm small tier needs a data root with the GLUE TSVs (--data-root or BENCH_DATA)"
    needed = [(s, "train") for s in (*SMALL_PROMPTED_DOMAINS, "stsb")] + [("stsb", "dev")]
    needed += [(p.subtask, "dev" if p.subtask != "mnli" else f"dev_{p.eval_set}") for p in PROMPTS.values()]
    missing = [f"{s}/{split}" for s, split in needed if gdata.locate_split(data_root, s, split) is None]
    if missing:
        return (f"the lm small tier needs GLUE files under {gdata.glue_dir(data_root)}; missing: "
                f"{', '.join(missing)}")
    return None


def full_corpus(dataset: str, config: str | None, split: str, eval_split: str, text_field: str,
                domain_field: str | None, max_docs: int | None, val_docs: int, eval_limit: int,
                cache_dir: str | None = None) -> Corpus:
    """A Hugging Face ``datasets`` corpus: documents from ``split`` (grouped by ``domain_field`` when given),
    ``val_docs`` of each domain held out, perplexity text from ``eval_split``."""
    from datasets import load_dataset

    from bench import BenchError

    try:
        ds = load_dataset(dataset, config, split=split, cache_dir=cache_dir)
        ev = load_dataset(dataset, config, split=eval_split, cache_dir=cache_dir)
    except Exception as exc:
        raise BenchError(f"the lm full tier could not load {dataset!r} ({config}) splits {split}/{eval_split} "
                         f"({type(exc).__name__}: {exc}); use --tier small offline") from exc
    if text_field not in ds.column_names:
        raise BenchError(f"lm.text_field {text_field!r} is not a column of {dataset}; columns: {ds.column_names}")
    by_domain: dict[str, list[str]] = {}
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        text = str(row[text_field])
        if not text.strip():
            continue
        by_domain.setdefault(str(row[domain_field]) if domain_field else "all", []).append(text)
    domains = tuple(sorted(by_domain))
    train = {d: by_domain[d][val_docs:] for d in domains}
    validation = {d: by_domain[d][:val_docs] for d in domains}
    heldout = [str(r[text_field]) for r in ev if str(r[text_field]).strip()][:eval_limit]
    return Corpus(domains, train, validation, heldout, {}, [], source=f"hf:{dataset}/{config or ''}:{split}")
