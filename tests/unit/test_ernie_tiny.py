"""ERNIE-Tiny (Su et al. 2021): each stage's loss on tiny fixed tensors by hand, the TinyBERT layer mapping and
attention scores, the budget split, and the four-stage schedule driven through the harness loop on the smoke GLUE
task (which teacher, which data and which objective at which step; exact resume across a stage boundary).

Breaks tried, each seen failing the test named (then restored):
- attention loss without the padded-key masking -> test_latent_loss_by_hand;
- the hidden-state loss without the projection (raw student states) -> test_latent_loss_by_hand;
- head counts that differ compared without head averaging -> test_latent_loss_by_hand;
- soft-label CE averaged over classes (TinyBERT's ``.mean()``) -> test_soft_label_and_tsd_objective_by_hand;
- TSD without the hard-label term / TAD with the soft term -> test_soft_label_and_tsd_objective_by_hand and
  test_schedule_switches_teacher_data_and_objective_at_the_stage_boundaries;
- attention scores without the 1/sqrt(d) scaling, and hidden states taken with ``output_hidden_states=True``
  (transformers then leaves unpicklable hooks on the model) -> test_attention_scores_are_berts_pre_softmax_scores;
- attention layer map i k instead of (i + 1) k - 1 -> test_layer_map_is_tinyberts_uniform_mapping;
- leftover steps given to the earlier stages -> test_budget_split_by_stage_fractions;
- GED with the pretrained teacher, GED on task data, GED restarting the general corpus at GD's first batch, TSD on
  general data -> test_schedule_switches_teacher_data_and_objective_at_the_stage_boundaries;
- the pretrained-teacher count left out of the method's saved state -> test_resume_across_a_stage_boundary_is_exact.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from bench.api import OptimConfig, TaskEnv, TrainConfig
from bench.methods.ernie_tiny import (ErnieTiny, attention_scores, bert_latents, latent_loss, layer_map,
                                      soft_label_loss, stage_loss, stage_steps)

QUARTERS = (0.25, 0.25, 0.25, 0.25)


# --------------------------------------------------------------------------------------------------
# Budget split and layer mapping
# --------------------------------------------------------------------------------------------------


def test_budget_split_by_stage_fractions():
    assert stage_steps(100, QUARTERS) == [("GD", 25), ("GED", 25), ("TAD", 25), ("TSD", 25)]
    # 250 / 4 = 62.5 each: the two leftover steps go to the later stages.
    assert stage_steps(250, QUARTERS) == [("GD", 62), ("GED", 62), ("TAD", 63), ("TSD", 63)]
    # Under four steps the later stages are kept (TSD trains the head).
    assert stage_steps(2, QUARTERS) == [("TAD", 1), ("TSD", 1)]
    assert stage_steps(1, QUARTERS) == [("TSD", 1)]
    # A zero share drops the stage; 10 x (0.2, 0.8) = 2 + 8.
    assert stage_steps(10, (0.0, 0.0, 0.2, 0.8)) == [("TAD", 2), ("TSD", 8)]
    with pytest.raises(ValueError):
        ErnieTiny.Params(stage_fractions=(0.5, 0.5, 0.0, 0.0))


def test_layer_map_is_tinyberts_uniform_mapping():
    # task_distill.py: k = T / S; hidden states teacher_reps[j k], attention teacher_atts[(i + 1) k - 1].
    assert layer_map(6, 3) == ([0, 2, 4, 6], [1, 3, 5])
    assert layer_map(4, 2) == ([0, 2, 4], [1, 3])
    assert layer_map(12, 4) == ([0, 3, 6, 9, 12], [2, 5, 8, 11])


# --------------------------------------------------------------------------------------------------
# Losses on tiny fixed tensors
# --------------------------------------------------------------------------------------------------


def _projection(weight, bias):
    lin = torch.nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
        lin.bias.copy_(torch.tensor(bias))
    return lin


def test_latent_loss_by_hand():
    # One sequence of 2 tokens, the second padded (attention_mask [1, 0]).
    mask = torch.tensor([[1, 0]])
    # Hidden states: student d = 1, teacher d = 2; W = [[2], [-1]], b = [0.5, 0].
    # W h_s: token 1 -> [2.5, -1], token 2 -> [6.5, -3]; teacher [2, 0], [6, -3]: differences .5, -1, .5, 0;
    # squares .25 + 1 + .25 + 0 = 1.5 over 4 elements = 0.375 (padded positions count, as in TinyBERT's code).
    h_s, h_t = torch.tensor([[[1.0], [3.0]]]), torch.tensor([[[2.0, 0.0], [6.0, -3.0]]])
    w = _projection([[2.0], [-1.0]], [0.5, 0.0])
    # Scores [1, 1 head, 2, 2]: the padded key (column 2) is zeroed in both: student [[1, 0], [2, 0]], teacher
    # [[0, 0], [4, 0]]: squares 1 + 0 + 4 + 0 = 5 over 4 = 1.25 (unmasked it would be (1 + 81 + 4 + 4) / 4).
    a_s = torch.tensor([[[[1.0, 5.0], [2.0, 7.0]]]])
    a_t = torch.tensor([[[[0.0, -4.0], [4.0, 9.0]]]])
    rep, att = latent_loss([h_s], [h_t], [a_s], [a_t], mask, w)
    assert rep.item() == pytest.approx(0.375)
    assert att.item() == pytest.approx(1.25)
    # Two pairs of each add up: a second, identical pair doubles both terms.
    rep2, att2 = latent_loss([h_s, h_s], [h_t, h_t], [a_s, a_s], [a_t, a_t], mask, w)
    assert (rep2.item(), att2.item()) == pytest.approx((0.75, 2.5))
    # Student 2 heads vs teacher 1: the student's head mean [[2, 0], [1, 0]] (after masking) against [[0, 0], [4, 0]]:
    # squares 4 + 0 + 9 + 0 = 13 over 4 = 3.25.
    a_s2 = torch.tensor([[[[1.0, 5.0], [2.0, 7.0]], [[3.0, 1.0], [0.0, 2.0]]]])
    _, att3 = latent_loss([h_s], [h_t], [a_s2], [a_t], mask, w)
    assert att3.item() == pytest.approx(3.25)


def test_soft_label_and_tsd_objective_by_hand():
    # T = 1: teacher [ln 3, 0] -> [3/4, 1/4]; student [0, 0] -> [1/2, 1/2]: CE = -(3/4 + 1/4) ln(1/2) = ln 2.
    zs, zt = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    assert soft_label_loss(zs, zt, 1.0).item() == pytest.approx(math.log(2.0))
    # T = 2: teacher [ln 3 / 2, 0] -> r = sqrt3 / (1 + sqrt3); student [2, 0] / 2 -> s = 1 / (1 + e^-1).
    r, s = math.sqrt(3) / (1 + math.sqrt(3)), 1 / (1 + math.exp(-1))
    expected = -(r * math.log(s) + (1 - r) * math.log(1 - s))
    assert soft_label_loss(torch.tensor([[2.0, 0.0]]), zt, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # Two examples average over the batch: (ln 2 + expected) / 2.
    both = soft_label_loss(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), zt.repeat(2, 1), 2.0)
    s0 = -(r * math.log(0.5) + (1 - r) * math.log(0.5))
    assert both.item() == pytest.approx((s0 + expected) / 2, rel=1e-6)
    # Regression: 0.5 (z_s - z_t)^2 -> 0.5 x 4 = 2.
    assert soft_label_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), 1.0, regression=True).item() == 2.0
    # TSD: latent (0.375 + 1.25) + 0.5 x ln 2 + 2 x hard; the hard term is the plain cross-entropy to label 1.
    hard = F.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1]))  # = ln(1 + e^2)
    rep, att, soft = torch.tensor(0.375), torch.tensor(1.25), torch.tensor(math.log(2.0))
    tsd = stage_loss("TSD", rep, att, soft, hard, soft_weight=0.5, hard_weight=2.0)
    assert tsd.item() == pytest.approx(1.625 + 0.5 * math.log(2.0) + 2 * math.log(1 + math.e ** 2), rel=1e-6)
    # GD, GED, TAD: the latent loss alone, whatever soft/hard values are around.
    for stage in ("GD", "GED", "TAD"):
        assert stage_loss(stage, rep, att, soft, hard, 0.5, 2.0).item() == pytest.approx(1.625)


def test_attention_scores_are_berts_pre_softmax_scores():
    # The scores, masked and softmaxed, are the attention probabilities of transformers' eager BERT.
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(5, 40, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        ref = model(**batch, output_attentions=True, output_hidden_states=True)
        logits, reps, scores = bert_latents(model, batch, [0, 1])
    assert torch.allclose(logits, ref.logits)
    # Hidden states: the embedding output and each layer's output, as transformers' own output_hidden_states.
    assert len(reps) == 3 and all(torch.allclose(a, b) for a, b in zip(reps, ref.hidden_states))
    for got, probs in zip(scores, ref.attentions):
        assert torch.allclose(got.masked_fill(mask[:, None, None, :] == 0, float("-inf")).softmax(-1), probs,
                              atol=1e-6)
    # The model stays picklable (the harness checkpoints the student as a pickled module): no hooks are left on it.
    fresh = BertForSequenceClassification(cfg)
    bert_latents(fresh, batch, [0])
    torch.save(fresh, io.BytesIO())
    # By hand on one block: Q K^T / sqrt(d) with d = 8.
    blk = model.bert.encoder.layer[0].attention.self
    h = reps[0]
    q = blk.query(h).view(2, 5, 2, 8).transpose(1, 2)
    k = blk.key(h).view(2, 5, 2, 8).transpose(1, 2)
    with torch.no_grad():
        assert torch.allclose(attention_scores(blk, h), torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8.0),
                              atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The four stages through the harness loop (smoke GLUE sst2)
# --------------------------------------------------------------------------------------------------


class _Recorded(ErnieTiny):
    """ErnieTiny, with the models' forward calls written down per harness step."""

    def __init__(self, params):
        super().__init__(params)
        self.calls, self.steps, self.step = [], [], -1

    def create_modules(self, ctx):
        super().create_modules(ctx)
        for who, model in (("pretrained", self.pretrained), ("fine-tuned", ctx.teacher), ("student", ctx.student)):
            model.register_forward_hook(lambda m, a, kw, out, who=who: self.calls.append(
                (self.step, who, kw["input_ids"].clone(), kw["attention_mask"].clone(), out.logits.detach().clone())),
                with_kwargs=True)

    def training_step(self, batch, ctx):
        self.step = ctx.step
        losses = super().training_step(batch, ctx)
        self.steps.append({"step": ctx.step, "batch": batch, "loss": losses["student"].item(), **self._last})
        return losses


def _smoke_task(tmp_path):
    from bench.tasks.glue import Glue

    return Glue(Glue.Params(), TaskEnv(tier="smoke", subtask="sst2", data_root=None, cache_dir=tmp_path, quiet=True))


def test_schedule_switches_teacher_data_and_objective_at_the_stage_boundaries(tmp_path):
    from bench.tasks.glue import data as gdata
    from bench.tasks.glue import models as gmodels
    from bench.train import train

    task = _smoke_task(tmp_path)
    # A stand-in for the fine-tuned teacher (an untrained 4-layer smoke teacher, another seed): the schedule, not
    # the teacher's quality, is under test, and the cell's teacher would take 300 training steps.
    finetuned = gmodels.build(gmodels.SMOKE_TEACHERS[0], task.num_labels, len(task.tokenizer), seed=5)
    method = _Recorded(ErnieTiny.Params(soft_weight=0.5, hard_weight=2.0))
    cfg = TrainConfig(steps=8, batch_size=4, eval_batch_size=4, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0))
    _, result = train(method, task, task.student(0), finetuned, cfg, seed=0)
    assert [(g["name"], g["steps"]) for g in result.generations] == [("GD", 2), ("GED", 2), ("TAD", 2), ("TSD", 2)]
    assert result.updates == {"student": 8, "projection": 8}

    # Teacher: the pretrained one (the teacher's config at seed 0, not the stand-in) at steps 0-1, the fine-tuned
    # one from step 2 on; every step runs exactly one teacher.
    teacher_calls = [(s, who) for s, who, *_ in method.calls if who != "student"]
    assert teacher_calls == [(0, "pretrained"), (1, "pretrained")] + [(s, "fine-tuned") for s in range(2, 8)]
    assert method.pretrained is not finetuned and result.teacher_forward_passes == 6
    assert method.record_info()["pretrained_teacher"]["forward_passes"] == 2

    # Data: GD and GED see general text -- sentences generated for the *other* GLUE subtasks -- not the harness's
    # sst2 batch; TAD and TSD see the harness's batch. Teacher and student always see the same inputs.
    general = set()
    for sub in task.subtasks:
        if sub != "sst2":
            for ex in gdata.generate_smoke(sub, 256, 0, seed=0)[0]:
                for text in (ex.text_a, ex.text_b):
                    if text:
                        general.add(tuple(task.tokenizer(text, truncation=True, max_length=32)["input_ids"]))
    by_step = {}
    for s, who, ids, mask, logits in method.calls:
        by_step.setdefault(s, {})[who] = (ids, mask, logits)
    for rec in method.steps:
        s, batch = rec["step"], rec["batch"]
        ids, mask, _ = by_step[s]["student"]
        teacher_ids = next(v for k, v in by_step[s].items() if k != "student")[0]
        assert torch.equal(ids, teacher_ids)
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)]
        if s < 4:
            assert all(r in general for r in rows), f"step {s}: not general text"
        else:
            assert torch.equal(ids, batch["input_ids"]), f"step {s}: not the task batch"
    # GED continues through the general corpus: its batches are not GD's again.
    assert not any(torch.equal(by_step[a]["student"][0], by_step[b]["student"][0])
                   for a in (0, 1) for b in (2, 3) if by_step[a]["student"][0].shape == by_step[b]["student"][0].shape)

    # Objective: latent alone for GD/GED/TAD; TSD adds 0.5 x soft + 2 x hard, recomputed here in plain torch from
    # the logits the models produced and the batch's labels.
    for rec in method.steps:
        s = rec["step"]
        latent = rec["rep_loss"] + rec["att_loss"]
        if s < 6:
            assert "soft_loss" not in rec and rec["loss"] == pytest.approx(latent, rel=1e-5)
            continue
        zs, zt = by_step[s]["student"][2], by_step[s]["fine-tuned"][2]
        soft = -(F.softmax(zt, -1) * F.log_softmax(zs, -1)).sum(-1).mean().item()
        hard = F.cross_entropy(zs, rec["batch"]["labels"]).item()
        assert rec["soft_loss"] == pytest.approx(soft, rel=1e-5) and rec["hard_loss"] == pytest.approx(hard, rel=1e-5)
        assert rec["loss"] == pytest.approx(latent + 0.5 * soft + 2.0 * hard, rel=1e-5)


def test_unsupported_outside_glue_and_without_general_text(tmp_path):
    from bench.tasks.glue import Glue

    method = ErnieTiny(ErnieTiny.Params())

    class NotGlue:
        name = "imagenet"

    assert "GLUE" in method.unsupported(NotGlue())
    assert method.unsupported(_smoke_task(tmp_path)) is None
    small = Glue(Glue.Params(), TaskEnv(tier="small", subtask="sst2", data_root=tmp_path, cache_dir=tmp_path))
    assert "coco_captions" in method.unsupported(small)
    corpus = tmp_path / "general.txt"
    corpus.write_text("a sentence\nanother one\n")
    assert ErnieTiny(ErnieTiny.Params(general_corpus=str(corpus))).unsupported(small) is None
    # Without general stages no general text is needed.
    assert ErnieTiny(ErnieTiny.Params(stage_fractions=(0, 0, 0.5, 0.5))).unsupported(small) is None


def test_resume_across_a_stage_boundary_is_exact(tmp_path):
    # Interrupted after step 5 (checkpoint at step 3, inside GED) and resumed: the same weights and counts as one
    # uninterrupted run (the general corpus position, the projection and the pretrained-teacher count carry over).
    from bench.tasks.glue import models as gmodels
    from bench.train import train

    task = _smoke_task(tmp_path)
    cfg = TrainConfig(steps=8, batch_size=4, eval_batch_size=4, optim=OptimConfig(lr=1e-3))

    def run(**kw):
        method = ErnieTiny(ErnieTiny.Params())
        teacher = gmodels.build(gmodels.SMOKE_TEACHERS[0], task.num_labels, len(task.tokenizer), seed=5)
        model, result = train(method, task, task.student(0), teacher, cfg, seed=0, **kw)
        return method, model, result

    class Stop(Exception):
        pass

    def stop(step, total, losses):
        if step == 5:
            raise Stop

    m0, model0, r0 = run()
    with pytest.raises(Stop):
        run(checkpoint_path=tmp_path / "ck.pt", checkpoint_every=3, on_step=stop)
    m1, model1, r1 = run(checkpoint_path=tmp_path / "ck.pt", checkpoint_every=3)
    assert r1.resumed_from_step == 3
    assert all(torch.equal(a, b) for a, b in zip(model0.state_dict().values(), model1.state_dict().values()))
    assert r1.teacher_forward_passes == r0.teacher_forward_passes == 6
    assert m1.record_info()["pretrained_teacher"]["forward_passes"] == 2
