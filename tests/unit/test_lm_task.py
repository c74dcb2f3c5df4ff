"""The lm task: prompts identical to lm-eval's stock GLUE tasks, the causal shift of the flattened outputs,
packing, tiers, and the small-tier corpus built from the real GLUE files (no dev text trained on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from bench.tasks.lm import LM, pack
from bench.tasks.lm import data as ldata

from bench.api import TaskEnv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return LM(LM.Params(), TaskEnv(tier="smoke", subtask="corpus", data_root=None,
                                   cache_dir=tmp_path_factory.mktemp("lm-task")))


class _TagLoader(yaml.SafeLoader):
    pass


_TagLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


@pytest.mark.parametrize("name", ["sst2", "cola", "mrpc", "rte", "qnli"])
def test_prompts_are_lm_eval_s_stock_glue_prompts(name):
    import lm_eval

    stock = yaml.load((Path(lm_eval.__file__).parent / "tasks" / "glue" / name / "default.yaml").read_text(),
                      Loader=_TagLoader)
    p = ldata.PROMPTS[name]
    assert p.template == stock["doc_to_text"]
    assert list(p.choices) == stock["doc_to_choice"]
    assert sorted(p.metrics) == sorted(m["metric"] for m in stock["metric_list"])


def test_mnli_prompt_renders_like_lm_eval_s_function():
    from lm_eval.tasks.glue.mnli.utils import doc_to_text

    doc = {"premise": "A man sleeps .", "hypothesis": " He is awake "}
    ex = type("E", (), {"text_a": doc["premise"], "text_b": doc["hypothesis"], "label": 2})()
    row = ldata.PROMPTS["mnli"].row(ex)
    assert ldata.PROMPTS["mnli"].text(row) == doc_to_text(doc)
    assert ldata.PROMPTS["mnli"].document(ex).endswith("Answer: False")


def test_outputs_are_shifted_and_flattened_like_the_reference_code(task):
    model = task.student(0).eval()
    batch = task.train_data().batch([0, 3])
    batch["labels"][1, 5:] = -100  # a partly masked example
    out = task.forward(model, batch)
    assert out.logits.shape == (sum(task.scored_rows(batch)), task.vocab) == (63 + 4, task.vocab)
    full = model(input_ids=batch["input_ids"]).logits
    # row r of example 0 is the logits at position r, predicting token r + 1
    assert torch.allclose(out.logits[:63], full[0, :63], atol=1e-6)
    # the label loss is Hugging Face's own shifted causal-LM loss
    hf = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert task.label_loss(out, batch).item() == pytest.approx(hf.item(), rel=1e-5)


def test_packing_joins_documents_with_eos_and_never_mixes_domains():
    blocks = pack({0: [[1, 2, 3], [4, 5]], 1: [[6, 7, 8, 9, 10, 11]]}, 3, eos=0)
    assert blocks.blocks == [[1, 2, 3], [0, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert blocks.domains == [0, 0, 1, 1]


def test_smoke_data_domains_and_shapes(task):
    dom = task.data_domains()
    assert dom.names == ldata.SMOKE_DOMAINS and len(dom.train_domain) == len(task.train_data())
    assert set(dom.validation) == set(dom.names)
    assert all(len(b) == task.max_length for b in task.train_data().blocks)
    prompts, n = task.generation_inputs(2)
    assert prompts["input_ids"].shape == (2, task.max_length // 2) and n == 16
    assert task.example_batch(2)["labels"].shape == (2, task.max_length)


def test_metrics_declare_one_primary_and_the_columns(task):
    ms = task.metrics()
    assert [m.name for m in ms if m.primary] == ["prompt_avg"]
    cols = [m.name for m in ms if m.column]
    assert cols == ["perplexity", "sst2", "cola", "mrpc_f1", "rte", "qnli", "mnli", "mnli_mm"]
    ppl = next(m for m in ms if m.name == "perplexity")
    assert ppl.higher_is_better is False and ppl.scale == 1.0


def test_tokenizer_is_deterministic_and_cached(task, tmp_path):
    from bench.tasks.lm import models as lmodels

    texts = [d for dom in task.corpus.domains for d in task.corpus.train[dom]]
    assert lmodels.train_tokenizer(texts, 512).get_vocab() == task.tokenizer.get_vocab()
    assert list((Path(task.env.cache_dir) / "lm" / "tokenizers").glob("smoke-*.json"))


def test_unavailable_reasons(tmp_path):
    small = LM(LM.Params(), TaskEnv(tier="small", subtask="corpus", data_root=None, cache_dir=tmp_path))
    assert "data root" in small.unavailable()
    full = LM(LM.Params(), TaskEnv(tier="full", subtask="corpus", data_root=None, cache_dir=tmp_path))
    assert "teacher_checkpoint" in full.unavailable()
    assert LM(LM.Params(), TaskEnv(tier="smoke", subtask="corpus", data_root=None, cache_dir=tmp_path)).unavailable() is None


@pytest.mark.needs_data
def test_small_corpus_trains_on_train_files_only(data_root):
    corpus = ldata.small_corpus(data_root, docs_per_domain=4000, val_docs=64, eval_limit=500)
    assert corpus.domains == ("sst2", "cola", "mrpc", "rte", "stsb")
    assert {d: len(v) for d, v in corpus.validation.items()} == {d: 64 for d in corpus.domains}
    assert len(corpus.train["rte"]) == 2490 - 64 and len(corpus.train["sst2"]) == 4000
    assert set(corpus.prompt_sets) == set(ldata.PROMPTS)
    assert len(corpus.prompt_sets["rte"]) == 277 and len(corpus.prompt_sets["qnli"]) == 500
    train_text = "\n".join(doc for d in corpus.domains for doc in corpus.train[d])
    # no dev sentence (prompt sets) and no held-out perplexity text is in the training documents
    for row in corpus.prompt_sets["sst2"][:200]:
        assert row["sentence"].strip() not in train_text
    for doc in corpus.heldout[:100]:
        assert doc not in train_text
    assert corpus.train["sst2"][0].endswith(("Answer: positive", "Answer: negative"))
    assert ldata.small_unavailable(data_root) is None
