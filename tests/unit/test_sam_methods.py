"""MobileSAM (decoupled distillation) and TinySAM (full-stage distillation, hard prompts, W8A8 PTQ) against
values worked out by hand or in plain torch, never through the methods' own helpers; tiny SAM models
(`build_sam` with a 32 px, 16-channel configuration) where a model is needed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench import BenchError

S = 32  # input side of the tiny models


def tiny_cfg(**over):
    from bench.tasks.sam.model import SamConfig

    base = dict(encoder="vit", img_size=S, embed_dim=16, vit_dim=16, vit_depth=1, vit_heads=2, vit_window=0,
                vit_global=(0,), decoder_depth=1, decoder_heads=2, decoder_mlp_dim=16, iou_head_hidden_dim=16,
                mask_in_chans=4)
    base.update(over)
    return SamConfig(**base)


@pytest.fixture(scope="module")
def models():
    from bench.tasks.sam.model import build_sam

    teacher = build_sam(tiny_cfg(vit_dim=24, vit_heads=4), seed=1).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, lambda **over: build_sam(tiny_cfg(**over), seed=2)


class Ctx:
    """The parts of the harness's StepContext the two methods use."""

    def __init__(self, teacher, student, seed=0, step=0, batch=None):
        self.teacher, self.student, self.seed, self.step = teacher, student, seed, step
        self.generation, self.generation_step, self.generation_steps, self.total_steps = 0, step, 10, 10
        self.batch, self.passes = batch, 0

    def run_teacher(self, fn, n_examples, index=0):
        self.passes += 1
        with torch.no_grad():
            return fn(self.teacher)

    def calibration_batches(self, n):
        return [self.batch] * n


def sam_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.zeros(2, 2, S, S)
    gt[0, 0, 4:14, 6:20] = 1
    gt[0, 1, 18:30, 2:12] = 1
    gt[1, 0, 8:24, 8:24] = 1
    return {"image": torch.randn(2, 3, S, S, generator=g), "index": torch.tensor([0, 1]), "gt_masks": gt,
            "valid": torch.tensor([[True, True], [True, False]])}


# --------------------------------------------------------------------------------------------------
# MobileSAM
# --------------------------------------------------------------------------------------------------


def test_mobilesam_copies_and_freezes_the_teachers_decoder(models):
    from bench.methods.segmentation.mobilesam import MobileSAM

    teacher, make = models
    student = make()
    assert not torch.equal(student.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)
    method = MobileSAM(MobileSAM.Params())
    student = method.init_student(teacher, student, Ctx(teacher, student))
    for part in ("prompt_encoder", "mask_decoder"):
        t_state, s_state = getattr(teacher, part).state_dict(), getattr(student, part).state_dict()
        assert t_state.keys() == s_state.keys()
        assert all(torch.equal(t_state[k], s_state[k]) for k in t_state)
        assert not any(p.requires_grad for p in getattr(student, part).parameters())
    assert all(p.requires_grad for p in student.image_encoder.parameters())
    assert method.record_info()["embedding_shape"] == [16, S // 16, S // 16]


def test_mobilesam_loss_is_the_plain_mse_of_the_embeddings(models):
    from bench.methods.segmentation.mobilesam import MobileSAM

    teacher, make = models
    student = make()
    method = MobileSAM(MobileSAM.Params())
    ctx = Ctx(teacher, student)
    method.init_student(teacher, student, ctx)
    batch = sam_batch()
    loss = method.training_step(batch, ctx)["student"]
    with torch.no_grad():
        expected = ((student.embed(batch["image"]) - teacher.embed(batch["image"])) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7) and ctx.passes == 1
    loss.backward()  # gradients reach the encoder only; the copied decoder stays frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.image_encoder.parameters())
    assert all(p.grad is None for p in student.mask_decoder.parameters())


def test_mobilesam_rejects_a_student_with_another_embedding_shape(models):
    from bench.methods.segmentation.mobilesam import MobileSAM

    teacher, make = models
    student = make(embed_dim=32, decoder_mlp_dim=16)
    with pytest.raises(BenchError, match=r"\(32, 2, 2\).*\(16, 2, 2\)"):
        MobileSAM(MobileSAM.Params()).init_student(teacher, student, Ctx(teacher, student))


def test_mobilesam_optional_decoder_finetuning_switches_what_trains(models):
    from bench.methods.segmentation.mobilesam import MobileSAM

    method = MobileSAM(MobileSAM.Params(finetune_decoder=True, finetune_fraction=0.2))
    assert [g.steps for g in method.generations(10)] == [8, 2]
    assert [g.steps for g in MobileSAM(MobileSAM.Params()).generations(10)] == [10]
    teacher, make = models
    student = make()
    ctx = Ctx(teacher, student)
    method.init_student(teacher, student, ctx)
    ctx.generation_steps, ctx.generation_step = 8, 6
    method.on_step_end(ctx)
    assert not any(p.requires_grad for p in student.mask_decoder.parameters())
    ctx.generation_step = 7  # the last distillation step: the next generation trains the decoder only
    method.on_step_end(ctx)
    assert all(p.requires_grad for p in student.mask_decoder.parameters())
    assert not any(p.requires_grad for p in student.image_encoder.parameters())


# --------------------------------------------------------------------------------------------------
# TinySAM: losses
# --------------------------------------------------------------------------------------------------


def test_hard_mask_weight_by_hand():
    from bench.methods.segmentation.tinysam import hard_mask_weight

    w = hard_mask_weight(torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.4, 0.5, 0.6]), eps=0.0)
    # sigmoid(0.8 / 0.4 - 1) = sigmoid(1); equal IoUs -> sigmoid(0) = 0.5; sigmoid(0.3 / 0.6 - 1) = sigmoid(-0.5)
    assert w.tolist() == pytest.approx([0.7310586, 0.5, 0.3775407], abs=1e-6)


def _row_mask(cols, extra=()):
    """5 x 5 logits: +4 on row 0 at ``cols`` (and at ``extra`` (y, x) pixels), -4 elsewhere."""
    m = torch.full((5, 5), -4.0)
    m[0, list(cols)] = 4.0
    for y, x in extra:
        m[y, x] = 4.0
    return m


def _sam_focal_dice_by_hand(logits, gt):
    """SAM's mask loss written out: 20 x sigmoid focal loss (alpha 0.25, gamma 2, mean over pixels) +
    dice loss 1 - (2 sum(p g) + 1) / (sum p + sum g + 1)."""
    p = torch.sigmoid(logits)
    ce = -(gt * torch.log(p) + (1 - gt) * torch.log(1 - p))
    p_t = p * gt + (1 - p) * (1 - gt)
    focal = ((0.25 * gt + 0.75 * (1 - gt)) * ce * (1 - p_t) ** 2).mean()
    dice = 1 - (2 * (p * gt).sum() + 1) / (p.sum() + gt.sum() + 1)
    return float(20 * focal + dice)


def test_full_stage_losses_by_hand():
    from bench.methods.segmentation.tinysam import full_stage_losses

    gt = torch.zeros(1, 2, 5, 5)
    gt[0, 0, 0, :] = 1  # prompt 0: row 0 (5 px); prompt 1 is an invalid (padding) slot
    valid = torch.tensor([[True, False]])
    s_up = torch.full((1, 2, 2, 5, 5), -4.0)
    t_up = torch.full((1, 2, 2, 5, 5), -4.0)
    s_up[0, 0, 0], s_up[0, 0, 1] = _row_mask(range(2)), _row_mask(range(5))  # IoU 2/5 = 0.4 and 1.0
    t_up[0, 0, 0], t_up[0, 0, 1] = _row_mask(range(4)), _row_mask(range(5), [(1, 0)])  # IoU 0.8 and 5/6
    s = SimpleNamespace(masks=torch.zeros(1, 2, 2, 2, 2), iou=torch.tensor([[[0.5, 0.5], [9.0, 9.0]]]),
                        tokens=torch.zeros(1, 2, 3, 2))
    t_masks = torch.full((1, 2, 2, 2, 2), 100.0)
    t_masks[0, 0, 0], t_masks[0, 0, 1] = 1.0, 2.0  # per-mask l1 1 and 2
    t_tokens = torch.full((1, 2, 3, 2), 100.0)
    t_tokens[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # mean |.| = 3.5
    t = SimpleNamespace(masks=t_masks, iou=torch.zeros(1, 2, 2), tokens=t_tokens)
    s_emb, t_emb = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1), torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    eps = 1e-6
    out = full_stage_losses(s, t, s_emb, t_emb, s_up, t_up, gt, valid, eps)
    h0 = 1 / (1 + math.exp(-(0.8 / (0.4 + eps) - 1)))  # = 0.7311 (the brief's example)
    h1 = 1 / (1 + math.exp(-((5 / 6) / (1.0 + eps) - 1)))
    assert out["embedding"].item() == pytest.approx(1.5)
    assert out["token"].item() == pytest.approx(3.5)
    assert out["output"].item() == pytest.approx((h0 * 1 + h1 * 2) / 2, rel=1e-6)
    assert out["hard_weight"].item() == pytest.approx((h0 + h1) / 2, rel=1e-6)
    by_hand = [_sam_focal_dice_by_hand(s_up[0, 0, k], gt[0, 0]) for k in range(2)]
    assert by_hand[1] < by_hand[0]  # the exact mask (IoU 1) is the one back-propagated
    assert out["mask"].item() == pytest.approx(by_hand[1], rel=1e-5)
    assert out["iou"].item() == pytest.approx(abs(0.5 - 1.0), rel=1e-6)  # that mask's IoU error only
    all_k = full_stage_losses(s, t, s_emb, t_emb, s_up, t_up, gt, valid, eps, all_iou=True)
    assert all_k["iou"].item() == pytest.approx((0.1 + 0.5) / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# TinySAM: hard prompt sampling
# --------------------------------------------------------------------------------------------------


def test_iteration_counts_cover_0_to_9_uniformly_and_are_fixed_by_seed_and_step():
    from bench.methods.segmentation.tinysam import draw_iterations, step_generator

    draws = draw_iterations(step_generator(3, 17), (20_000,), 9)
    counts = torch.bincount(draws, minlength=10)
    assert counts.numel() == 10 and draws.min() == 0 and draws.max() == 9
    assert (counts - 2000).abs().max() < 200  # ~4.5 standard deviations of a binomial(20000, 0.1)
    assert torch.equal(draws, draw_iterations(step_generator(3, 17), (20_000,), 9))
    assert not torch.equal(draws, draw_iterations(step_generator(3, 18), (20_000,), 9))
    assert not torch.equal(draws, draw_iterations(step_generator(4, 17), (20_000,), 9))


def test_uniform_point_inside_a_region():
    from bench.methods.segmentation.tinysam import sample_in

    region = torch.zeros(3, 6, 7, dtype=torch.bool)
    region[0, 4, 5] = True  # one pixel: (x, y) = (5, 4)
    region[1, 1:3, 2:4] = True  # four pixels
    xy, ok = sample_in(region, torch.Generator().manual_seed(0))
    assert xy[0].tolist() == [5.0, 4.0] and ok.tolist() == [True, True, False]
    g = torch.Generator().manual_seed(1)
    hits = torch.zeros(6, 7)
    for _ in range(400):
        xy, _ = sample_in(region[1:2], g)
        hits[int(xy[0, 1]), int(xy[0, 0])] += 1
    assert hits[~region[1]].sum() == 0 and (hits[region[1]] > 60).all()  # all four pixels, ~100 each


def test_next_point_lies_in_gt_minus_prediction_or_the_error_region():
    from bench.methods.segmentation.tinysam import error_point

    gt = torch.zeros(4, 8, 8, dtype=torch.bool)
    gt[:, 2:6, 2:6] = True
    pred = torch.zeros_like(gt)
    pred[0, 2:6, 2:4] = True  # under-segmentation: errors are false negatives (columns 4, 5)
    pred[1, 1:7, 1:7] = True  # over-segmentation: errors are false positives (the ring)
    pred[2, 2:6, 4:8] = True  # both: FN at columns 2-3, FP at columns 6-7
    pred[3] = gt[3]  # exact: no error region
    g = torch.Generator().manual_seed(0)
    seen_fp = False
    for _ in range(40):
        # TinySAM's Eq. 8: P_{i+1} in M_gt - M_i, a foreground point; nothing where M_gt - M_i is empty.
        xy, label, ok = error_point(gt, pred, g)
        assert ok.tolist() == [True, False, True, False] and label[[0, 2]].tolist() == [1, 1]
        assert 4 <= xy[0, 0] <= 5 and 2 <= xy[0, 1] <= 5 and 2 <= xy[2, 0] <= 3 and 2 <= xy[2, 1] <= 5
        # SAM's training rule: anywhere in the error region, background points in false positives.
        xy, label, ok = error_point(gt, pred, g, rule="error_region")
        assert ok.tolist() == [True, True, True, False]
        for i in range(3):
            x, y = int(xy[i, 0]), int(xy[i, 1])
            assert gt[i, y, x] != pred[i, y, x]  # inside the error region
            assert label[i].item() == int(gt[i, y, x])  # FN -> foreground (1), FP -> background (0)
        assert label[1] == 0
        seen_fp |= bool(label[2] == 0)
    assert seen_fp  # the mixed case draws from both parts
    # SAM's evaluation click: the empty prediction's error is the whole 4 x 4 square; the farthest pixel from
    # its border, first in row-major order, is (x, y) = (3, 3) (distance 2; (3,3), (3,4), (4,3), (4,4) tie).
    xy, label, ok = error_point(gt[:1], torch.zeros_like(gt[:1]), g, rule="center")
    assert xy[0].tolist() == [3.0, 3.0] and label.tolist() == [1] and ok.tolist() == [True]
    # A padded prompt slot (empty GT) gets no click instead of an error.
    empty = torch.zeros_like(gt[:1])
    xy, label, ok = error_point(torch.cat([gt[:1], empty]), torch.zeros_like(gt[:2]), g, rule="center")
    assert ok.tolist() == [True, False] and xy[0].tolist() == [3.0, 3.0]


def _fake_decode(gt, ious, exact):
    """A decoder whose K = 3 masks are: the gt itself at index ``exact``, empty elsewhere; IoUs ``ious``."""
    calls = []

    def decode(prompts):
        calls.append(prompts)
        b, p = gt.shape[:2]
        masks = torch.full((b, p, 3, *gt.shape[-2:]), -5.0)
        masks[:, :, exact] = gt * 10 - 5
        return SimpleNamespace(masks=masks, iou=torch.tensor(ious).expand(b, p, 3))

    return decode, calls


def test_hard_prompts_iterate_on_the_most_confident_mask_per_drawn_count():
    from bench.methods.segmentation.tinysam import hard_prompts

    gt = torch.zeros(1, 3, 8, 8)
    gt[0, 0, 1:4, 1:4] = 1
    gt[0, 1, 4:8, 4:8] = 1
    valid = torch.tensor([[True, True, False]])
    iterations = torch.tensor([[3, 1, 3]])
    # The most confident mask (index 0) is empty: every correction is a false negative inside the gt.
    decode, calls = _fake_decode(gt, [0.9, 0.1, 0.2], exact=1)
    pr = hard_prompts(decode, lambda low: low, gt, valid, iterations, torch.Generator().manual_seed(0))
    assert len(calls) == 3 and pr.points.shape == (1, 3, 4, 2) and pr.labels.shape == (1, 3, 4)
    assert pr.labels[0, 0].tolist() == [1, 1, 1, 1]  # P_0 + 3 corrections
    assert pr.labels[0, 1].tolist() == [1, 1, -1, -1]  # P_0 + 1 correction, then "not a point" padding
    assert pr.labels[0, 2].tolist() == [-1, -1, -1, -1]  # an invalid slot gets no points
    for p, n in ((0, 4), (1, 2)):
        for x, y in pr.points[0, p, :n].long().tolist():
            assert gt[0, p, y, x] == 1
    # Now the most confident mask (index 1) is exact: no error region, so no correction is added.
    decode, _ = _fake_decode(gt, [0.1, 0.9, 0.2], exact=1)
    pr = hard_prompts(decode, lambda low: low, gt, valid, iterations, torch.Generator().manual_seed(0))
    assert pr.labels[0, 0].tolist() == [1, -1, -1, -1] and pr.labels[0, 1].tolist() == [1, -1, -1, -1]


# --------------------------------------------------------------------------------------------------
# TinySAM: the method on tiny models
# --------------------------------------------------------------------------------------------------


def _record_decodes(model, log, who):
    real = model.decode

    def decode(emb, prompts, multimask=True):
        log.append((who, prompts))
        return real(emb, prompts, multimask)

    model.decode = decode


@pytest.mark.parametrize("sampler", ["student", "teacher"])
def test_tinysam_step_is_deterministic_per_seed_and_step_and_feeds_one_prompt_set_to_both(models, sampler):
    from bench.methods.segmentation.tinysam import TinySAM, draw_iterations, step_generator

    teacher, make = models
    batch = sam_batch()
    rounds = int(draw_iterations(step_generator(0, 5), (2, 2), 9).max())  # sampling rounds of step 5
    losses, students = {}, {}
    for key, seed, step in (("a", 0, 5), ("b", 0, 5), ("c", 0, 6)):
        student = students[key] = make()
        method = TinySAM(TinySAM.Params(sampling_model=sampler))
        ctx = Ctx(teacher, student, seed=seed, step=step)
        method.init_student(teacher, student, ctx)
        log = []
        _record_decodes(teacher, log, "teacher")
        _record_decodes(student, log, "student")
        try:
            losses[key] = method.training_step(batch, ctx)["student"]
        finally:
            del teacher.decode
        last_t = [p for who, p in log if who == "teacher"][-1]
        last_s = [p for who, p in log if who == "student"][-1]
        assert torch.equal(last_t.points, last_s.points) and torch.equal(last_t.labels, last_s.labels)
        if key == "a":  # the sampling model decodes once per round, the other model once (the final set)
            calls = [who for who, _ in log]
            assert calls.count(sampler) == rounds + 1 and len(calls) == rounds + 2
            assert last_t.points.shape[2] == rounds + 1
        assert all(p.requires_grad for p in student.mask_decoder.parameters())  # trained, unlike MobileSAM
    assert torch.equal(losses["a"], losses["b"]) and not torch.equal(losses["a"], losses["c"])
    losses["a"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in students["a"].mask_decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in students["a"].image_encoder.parameters())


# --------------------------------------------------------------------------------------------------
# TinySAM: post-training quantisation
# --------------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    """Big enough layers that the serialization overhead is small against the data."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 128))
        self.head = nn.Linear(128, 4)  # outside the encoder: stays float

    def embed(self, x):
        return self.image_encoder(x)


def test_quantised_weights_are_within_half_a_step_and_the_size_is_a_quarter():
    from bench.methods.segmentation.tinysam import quantize_encoder

    model = _Toy()
    before = {n: m.weight.detach().clone() for n, m in model.image_encoder.named_children()}
    head = model.head.weight.detach().clone()
    calib = torch.randn(8, 256) * 3
    info = quantize_encoder(model, 8, calib)
    for n, m in model.image_encoder.named_children():
        w0 = before[n]
        step = (w0.max(dim=1).values - w0.min(dim=1).values) / 255  # one min-max scale per output channel
        err = (m.weight - w0).abs()
        assert (err <= step[:, None] / 2 + 1e-6).all() and err.max() > 0
        assert all(len(row.unique()) <= 256 for row in m.weight)
    assert torch.equal(model.head.weight, head)
    fp32 = 4 * (256 * 256 + 256 * 128)  # float32 bytes of the quantised weights
    int8 = (256 * 256 + 256 * 128) + 8 * (256 + 128)  # one byte each + float32 (min, step) per channel
    assert info["quantized_layers"] == 2 and info["bits"] == 8 and info["scheme"] == "W8A8"
    assert fp32 <= info["quantized_layers_float32_bytes"] < fp32 * 1.02
    assert int8 <= info["quantized_layers_bytes"] < int8 * 1.05
    assert 0.25 < info["quantized_layers_bytes"] / info["quantized_layers_float32_bytes"] < 0.27
    assert info["size_bytes"] < info["float32_size_bytes"] / 2


def test_activations_are_fake_quantised_at_the_calibrated_absmax_scale():
    from bench.methods.segmentation.tinysam import quantize_encoder

    model = _Toy()
    calib = torch.randn(8, 256) * 3
    quantize_encoder(model, 8, calib)
    first = model.image_encoder[0]
    scale = calib.abs().max() / 127  # the first layer's input is the calibration batch itself
    assert first.act_scale.item() == pytest.approx(scale.item(), rel=1e-6)
    x = torch.randn(4, 256) * 2
    xq = torch.clamp(torch.round(x / scale), -128, 127) * scale
    expected = xq @ first.weight.T + first.bias
    assert torch.allclose(first(x), expected, atol=1e-5)
    assert not torch.allclose(first(x), x @ first.weight.T + first.bias, atol=1e-6)


def test_tinysam_finalize_quantises_the_encoder_and_records_the_size(models):
    from bench.methods.segmentation.tinysam import TinySAM

    teacher, make = models
    student = make()
    method = TinySAM(TinySAM.Params(quant_bits=8, calibration_images=3))
    ctx = Ctx(teacher, student, batch=sam_batch())
    method.init_student(teacher, student, ctx)
    decoder = {k: v.clone() for k, v in student.mask_decoder.state_dict().items()}
    out = method.finalize_student(student, ctx)
    q = method.record_info()["quantization"]
    assert q["bits"] == 8 and q["calibration_images"] == 3 and q["quantized_layers"] > 0
    assert q["size_bytes"] < q["float32_size_bytes"]
    assert all(torch.equal(v, out.mask_decoder.state_dict()[k]) for k, v in decoder.items())  # decoder untouched
    assert out.embed(sam_batch()["image"]).shape == (2, 16, 2, 2)
    assert TinySAM(TinySAM.Params()).finalize_student(student, ctx) is student  # quant_bits None: no-op
