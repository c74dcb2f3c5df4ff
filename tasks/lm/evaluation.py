"""Evaluation of an in-memory causal LM through lm-evaluation-harness (EleutherAI lm-eval >= 0.4.3).

How (docs/reference/lmeval.md §2 and §4, checked against lm-eval 0.4.13):

* The model object is wrapped as ``HFLM(pretrained=<model>, tokenizer=<tokenizer object>)``: no save/load
  round trip, and the tokenizer is passed as an object (otherwise HFLM would ask the hub for one).
* Local task definitions: one YAML file per task and one JSONL file of documents per task, written under
  ``<cache dir>/lm/lm_eval_tasks/<content hash>/`` from the tier's files (GLUE dev TSVs -> the stock GLUE
  multiple-choice prompts; held-out text -> ``loglikelihood_rolling``, lm-eval's perplexity task type, with
  ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``). Data files are absolute paths
  (lm-eval resolves relative ``data_files`` against the working directory), ``dataset_path: json``, and
  the ``datasets`` cache is kept inside the same folder.
* ``TaskManager(include_path=folder, include_defaults=False)`` indexes only those files (indexing lm-eval's
  ~15k stock tasks costs ~12 s); the full tier adds the stock tasks named in the suite
  (``include_defaults=True``; they need the hub or its cache).
* ``simple_evaluate(..., bootstrap_iters=0, log_samples=False)``: the bootstrapped stderr of ``mcc``/``f1``
  takes minutes (lmeval.md §2); bench computes its own intervals over seeds. lm-eval's seeds
  (0/1234/1234/1234) are its defaults; the caller's random states are restored afterwards.
* Fully offline below the full tier: nothing here names a hub resource, and ``HF_DATASETS_OFFLINE`` /
  ``HF_HUB_OFFLINE`` are set for the duration of the call when the tier is not full.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError

from .data import PROMPTS

if TYPE_CHECKING:
    from torch import nn

PPL_TASK = "heldout"
#: lm-eval metric preferred as a stock task's score, in order.
STOCK_METRIC_ORDER = ("acc_norm", "acc", "exact_match", "mcc", "f1")


def task_name(key: str, name: str) -> str:
    return f"bench_lm_{key}_{name}"


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def write_tasks(root: Path, prompt_sets: dict[str, list[dict[str, Any]]], heldout: list[str],
                description: str = "") -> tuple[Path, dict[str, str]]:
    """Write the YAML + JSONL task files (once per content) and return (folder, set name -> lm-eval task name)."""
    payload = {"prompts": prompt_sets, "heldout": heldout, "description": description, "format": 1}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(root) / key
    names = {name: task_name(key, name) for name in prompt_sets}
    if heldout:
        names[PPL_TASK] = task_name(key, PPL_TASK)
    if (folder / "done").is_file():
        return folder, names
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cache = folder / "hf_datasets"

    def jsonl(name: str, rows: list[dict[str, Any]]) -> Path:
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return folder / f"{name}.jsonl"  # the final path (after the rename below)

    for name, rows in prompt_sets.items():
        p = PROMPTS[name]
        data = jsonl(name, rows)
        metrics = "\n".join(f"  - metric: {m}" for m in p.metrics)
        (tmp / f"{name}.yaml").write_text(
            f"task: {names[name]}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {_yaml_str(str(data))}\n  cache_dir: {_yaml_str(str(cache))}\n"
            f"output_type: multiple_choice\n"
            f"validation_split: validation\n"
            + (f"description: {_yaml_str(description)}\n" if description else "")
            + f"doc_to_text: {_yaml_str(p.template)}\n"
            f"doc_to_target: label\n"
            f"doc_to_choice: {json.dumps(list(p.choices))}\n"
            f"metric_list:\n{metrics}\n"
            f"metadata:\n  version: 1.0\n", encoding="utf-8")
    if heldout:
        data = jsonl(PPL_TASK, [{"text": t} for t in heldout])
        (tmp / f"{PPL_TASK}.yaml").write_text(
            f"task: {names[PPL_TASK]}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {_yaml_str(str(data))}\n  cache_dir: {_yaml_str(str(cache))}\n"
            f"output_type: loglikelihood_rolling\n"
            f"test_split: test\n"
            f"doc_to_text: \"\"\n"
            f"doc_to_target: \"{{{{text}}}}\"\n"
            f"metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
            f"metadata:\n  version: 1.0\n", encoding="utf-8")
    (tmp / "done").write_text("ok\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote the same content first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, names


#: Module-level switches read once at import by huggingface_hub and datasets (the environment variables
#: alone are too late when those modules were imported before). ``HF_UPDATE_DOWNLOAD_COUNTS``: datasets
#: otherwise sends a HEAD request to S3 on every ``load_dataset("json", ...)`` to count downloads.
_OFFLINE_SWITCHES = (("huggingface_hub.constants", "HF_HUB_OFFLINE", True),
                     ("datasets.config", "HF_HUB_OFFLINE", True), ("datasets.config", "HF_DATASETS_OFFLINE", True),
                     ("datasets.config", "HF_UPDATE_DOWNLOAD_COUNTS", False))


@contextlib.contextmanager
def _offline(enabled: bool):
    """No network for the duration: the offline environment variables and the libraries' own switches."""
    import importlib

    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    saved = []
    if enabled:
        for k in keys:
            os.environ[k] = "1"
        for module, attr, value in _OFFLINE_SWITCHES:
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            if hasattr(mod, attr):
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, value)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets print progress bars and warnings; keep them for an error message only."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def run_lm_eval(model: nn.Module, tokenizer: Any, folder: Path | None, tasks: list[str], *, batch_size: int,
                max_length: int, offline: bool, include_defaults: bool = False) -> dict[str, Any]:
    """``simple_evaluate`` of the in-memory ``model`` on ``tasks``; returns lm-eval's ``results`` dict."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise BenchError("the lm task evaluates through lm-evaluation-harness: pip install 'bench[lm]' "
                         "(lm-eval>=0.4.3)") from exc
    from bench.train import _rng_state, _set_rng_state

    state = _rng_state()
    was_training = model.training
    model.eval()
    with _offline(offline), _quiet() as log, _no_cwd_git_hash():
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            tm = TaskManager(include_path=str(folder) if folder else None, include_defaults=include_defaults)
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, bootstrap_iters=0,
                                          log_samples=False, verbosity="ERROR")
        except Exception as exc:
            tail = log.getvalue()[-2000:]
            raise RuntimeError(f"lm-eval failed: {type(exc).__name__}: {exc}\n--- lm-eval output (tail) ---\n{tail}") from exc
        finally:
            model.train(was_training)
            _set_rng_state(state)
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    return {"results": out["results"], "versions": out.get("versions", {}), "lm_eval_version": out.get("lm_eval_version")}


@contextlib.contextmanager
def _no_cwd_git_hash():
    """lm-eval's ``simple_evaluate`` runs ``git describe`` in the *current directory* for its results'
    ``git_hash`` (the user's folder, not the evaluated code; outside a checkout git prints "fatal: not a
    git repository" on the terminal). bench records its own commit in every record, so the lookup is
    skipped while bench evaluates."""
    import lm_eval.evaluator as evaluator

    saved = getattr(evaluator, "get_git_commit_hash", None)
    if saved is None:
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


def _get(res: dict[str, Any], task: str, metric: str) -> float:
    value = (res.get(task) or {}).get(f"{metric},none")
    return float(value) if isinstance(value, (int, float)) else math.nan


def glue_prompt_metrics(results: dict[str, Any], names: dict[str, str]) -> dict[str, float]:
    """bench's metric names from lm-eval's results of the local tasks."""
    out: dict[str, float] = {}
    if PPL_TASK in names:
        t = names[PPL_TASK]
        out["perplexity"] = _get(results, t, "word_perplexity")
        out["bits_per_byte"] = _get(results, t, "bits_per_byte")
    for name in names:
        if name == PPL_TASK:
            continue
        t = names[name]
        if name == "mrpc":
            out["mrpc_f1"] = _get(results, t, "f1")
            out["mrpc_acc"] = _get(results, t, "acc")
        elif name == "cola":
            out["cola"] = _get(results, t, "mcc")
        else:
            out[name] = _get(results, t, "acc")
    return out


def prompt_average(metrics: dict[str, float], sets: list[str]) -> float:
    """The GLUE rule over the prompt sets present: MRPC = mean(F1, acc), MNLI = mean(matched, mismatched),
    then the unweighted mean (Wang et al. 2019; T5's grouping of MNLI-m/mm)."""
    scores = []
    for name in sets:
        if name == "mrpc":
            scores.append((metrics["mrpc_f1"] + metrics["mrpc_acc"]) / 2)
        elif name == "mnli":
            scores.append((metrics["mnli"] + metrics["mnli_mm"]) / 2 if "mnli_mm" in metrics else metrics["mnli"])
        elif name == "mnli_mm" and "mnli" in sets:
            continue
        else:
            scores.append(metrics[name])
    return sum(scores) / len(scores) if scores else math.nan


def stock_score(results: dict[str, Any], task: str) -> float:
    for metric in STOCK_METRIC_ORDER:
        v = _get(results, task, metric)
        if not math.isnan(v):
            return v
    return math.nan
