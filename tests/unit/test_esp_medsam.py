"""ESP-MedSAM (`esp_medsam`): its losses, the Modality Controller's prefix attention, the SPPG / QDMD heads, the
generation flags and the prompt-free Dice/IoU, against values worked out by hand or in plain torch (never through
the method's own helpers); and one short smoke run through the runner."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_thread")

S = 64  # TinyViT needs a multiple of 64


def cfgs():
    from bench.tasks.sam.model import SamConfig

    dec = dict(img_size=S, embed_dim=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=16, iou_head_hidden_dim=16,
               mask_in_chans=4)
    teacher = SamConfig(encoder="vit", vit_dim=16, vit_depth=2, vit_heads=2, vit_window=2, vit_global=(1,), **dec)
    student = SamConfig(encoder="tinyvit", tinyvit_dims=(16, 32, 48), tinyvit_depths=(1, 1, 1),
                        tinyvit_heads=(1, 2, 3), tinyvit_windows=(4, 4, 4), **dec)
    return teacher, student


def heads(**over):
    from bench.methods.segmentation._esp_modules import ESPHeads

    torch.manual_seed(0)
    return ESPHeads(16, depth=1, heads=2, mlp_dim=16, **over)


# --------------------------------------------------------------------------------------------------
# Losses and metrics by hand
# --------------------------------------------------------------------------------------------------


def test_binary_mask_loss_by_hand():
    from bench.methods.segmentation._esp_modules import binary_mask_loss

    p = [0.9, 0.2, 0.6, 0.1]
    g = [1.0, 0.0, 1.0, 0.0]
    inter, sp, sg = 0.9 + 0.6, sum(p), sum(g)
    dice = (2 * inter + 1) / (sp + sg + 1)  # 4 / 4.8
    bce = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.9)) / 4
    focal = 0.8 * (1 - math.exp(-bce)) ** 2 * bce
    want = 0.8 * (1 - dice) + 0.2 * focal
    got = binary_mask_loss(torch.tensor(p).view(1, 1, 2, 2), torch.tensor(g).view(1, 1, 2, 2), 0.8)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # batch sums, not a per-sample mean: two samples give the pooled dice
    two = binary_mask_loss(torch.tensor([[0.9, 0.2], [0.6, 0.1]]).view(2, 1, 1, 2),
                           torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 2), 0.8)
    assert float(two) == pytest.approx(want, rel=1e-6)


def test_sppg_target_is_max_pooling_by_hand_and_the_loss_a_plain_bce():
    from bench.methods.segmentation._esp_modules import sppg_loss, sppg_target

    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, 1] = 1  # top-left cell
    m[0, 0, 3, 3] = 1  # bottom-right cell
    assert sppg_target(m, 2)[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # at S = 64 with a 2 x 2 patch map the cell is 32 px, as max_pool2d(GT, 32, 32) at 1024 px
    big = torch.zeros(1, 1, 64, 64)
    big[0, 0, 31, 32] = 1
    assert sppg_target(big, 2)[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0]).view(1, 1, 2, 2)
    t = [1.0, 0.0, 0.0, 1.0]
    s = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.5, -3.0)]
    want = -sum(ti * math.log(si) + (1 - ti) * math.log(1 - si) for ti, si in zip(t, s)) / 4
    assert float(sppg_loss(logits, m)) == pytest.approx(want, rel=1e-6)


def test_dice_iou_smooth_one_by_hand():
    from bench.methods.segmentation._esp_data import dice_iou

    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    gt = np.array([[1, 0, 0], [0, 1, 1]], bool)
    # |P∩G| = 2, |P| = 3, |G| = 3, |P∪G| = 4
    assert dice_iou(pred, gt) == pytest.approx(((2 * 2 + 1) / (3 + 3 + 1), (2 + 1) / (4 + 1)))
    assert dice_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (1.0, 1.0)


def test_binary_prediction_crops_resizes_and_thresholds():
    from bench.methods.segmentation._esp_data import binary_prediction

    logits = torch.full((1, 1, 8, 8), -5.0)
    logits[..., :2, :] = 5.0  # top half of a 16 x 32 image, which fills rows 0-3 of the 8 x 8 frame
    logits[..., 6:, :] = 5.0  # padding below it: must be cropped away
    out = binary_prediction(logits, (16, 32), 8)
    assert out.shape == (16, 32) and out[:7].all() and not out[9:].any()


# --------------------------------------------------------------------------------------------------
# The Modality Controller
# --------------------------------------------------------------------------------------------------


def tinyvit_attention():
    from bench.methods.segmentation._esp_modules import _tinyvit_classes

    _, attn_cls = _tinyvit_classes()
    torch.manual_seed(3)
    a = attn_cls(8, 4, num_heads=2, attn_ratio=1, resolution=(2, 2))
    with torch.no_grad():
        a.attention_biases.normal_()
    return a


def test_prefix_attention_matches_plain_torch():
    from bench.methods.segmentation._esp_modules import ModalityAttention

    orig = tinyvit_attention()
    m = ModalityAttention(copy.deepcopy(orig))
    with torch.no_grad():
        m.med_attention_biases.fill_(0.7)
    m.med_on = True
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    got = m(x)
    # independent: per head, softmax over [q.p * scale + b, q.k * scale + rel-bias], weights over [p; v]
    xn = F.layer_norm(x, (8,), orig.norm.weight, orig.norm.bias)
    qkv = xn @ orig.qkv.weight.T + orig.qkv.bias  # (3, 4, 2 heads * (4 + 4 + 4))
    rel = orig.attention_biases[:, orig.attention_bias_idxs]  # (2, 4, 4)
    outs = []
    for b in range(3):
        heads_out = []
        for h in range(2):
            chunk = qkv[b, :, h * 12:(h + 1) * 12]
            q, k, v = chunk[:, :4], chunk[:, 4:8], chunk[:, 8:]
            p = m.deep_QKV_embeddings_med[h, 0]
            logits = torch.cat([(q @ p)[:, None] * 0.5 + 0.7, (q @ k.T) * 0.5 + rel[h]], dim=1)  # scale 4**-0.5
            w = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            w = w / w.sum(dim=1, keepdim=True)
            heads_out.append(w @ torch.cat([p[None], v], dim=0))
        outs.append(torch.cat(heads_out, dim=1))
    want = torch.stack(outs) @ orig.proj.weight.T + orig.proj.bias
    assert torch.allclose(got, want, atol=1e-5)
    m.med_on = False
    orig.train()  # (its train() returns None)
    assert torch.equal(m(x), orig(x))


def student_encoder():
    from bench.tasks.sam.model import TinyViTEncoder

    torch.manual_seed(5)
    return TinyViTEncoder(cfgs()[1])


@pytest.mark.parametrize("train", [True, False])
def test_controller_off_is_exactly_the_original_tinyvit(train):
    from bench.methods.segmentation._esp_modules import add_controller

    orig = student_encoder()
    semi = copy.deepcopy(orig)
    assert add_controller(semi) == 2
    med = {k for k in semi.state_dict() if "med" in k}
    assert set(semi.state_dict()) - med == set(orig.state_dict())  # shared keys = TinyViT's keys
    assert all(torch.equal(v, semi.state_dict()[k]) for k, v in orig.state_dict().items())
    orig.train(train)
    semi.train(train)
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(semi(x), orig(x))
        for blk in semi.modules():
            if hasattr(blk, "med_dah"):
                blk.med_on = True
        assert not torch.allclose(semi(x), orig(x))


# --------------------------------------------------------------------------------------------------
# SPPG / QDMD
# --------------------------------------------------------------------------------------------------


def test_no_segmentation_gradient_reaches_the_patch_decoder():
    h = heads()
    emb = torch.randn(2, 16, 4, 4, requires_grad=True)
    pe = torch.randn(1, 16, 4, 4)
    masks, patch = h(emb, pe)
    assert masks.shape == (2, 1, 16, 16) and patch.shape == (2, 1, 2, 2)
    masks.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in h.patch_decoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in h.dense_prompter.parameters())
    h.zero_grad()
    patch.sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in h.patch_decoder.parameters())


def test_the_prompt_is_the_hard_thresholded_patch_map_upsampled_twice():
    h = heads()
    patch = torch.tensor([[[[0.3, -0.2], [-4.0, 9.0]]]])
    with torch.no_grad():
        got = h.prompt(patch, 4)
        hard = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
        assert torch.equal(got, h.dense_prompter(hard.view(1, 1, 4, 4)))


def test_mcls_only_changes_which_query_is_read_out():
    h = heads().eval()
    emb, pe = torch.randn(2, 16, 4, 4), torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        every, patch = h.all_masks(emb, pe)
        assert every.shape == (2, 6, 16, 16) and h.mask_query.weight.shape == (7, 16)
        outs = {}
        for k in range(6):
            outs[k], pk = h(emb, pe, mcls=k)
            assert torch.equal(outs[k], every[:, k:k + 1]) and torch.equal(pk, patch)
        assert not torch.allclose(outs[4], outs[0])
        assert torch.equal(h(emb, pe)[0], outs[4])  # default: microscopy (index 4)
    # one hypernetwork shared by the tokens: mask k = MLP(token_k) . upscaled features, one MLP
    assert sum(isinstance(m, torch.nn.Linear) for m in h.output_hypernetwork.modules()) == 3


# --------------------------------------------------------------------------------------------------
# The method: generations, flags, the medical teacher
# --------------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, teacher, student):
        self.teacher, self.student, self.seed, self.device = teacher, student, 0, "cpu"
        self.step = self.generation = self.generation_step = 0
        self.generation_steps, self.total_steps, self.passes = 2, 6, 0

    def run_teacher(self, fn, n_examples, index=0):
        self.passes += 1
        with torch.no_grad():
            return fn(self.teacher)


@pytest.fixture(scope="module")
def cell():
    from bench.methods.segmentation.esp_medsam import ESPMedSAM
    from bench.tasks.sam.model import build_sam

    t_cfg, s_cfg = cfgs()
    teacher = build_sam(t_cfg, seed=1).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    method = ESPMedSAM(ESPMedSAM.Params(heldout_scenes=0))
    assert [g.steps for g in method.generations(6)] == [2, 2, 2]
    ctx = Ctx(teacher, None)
    student = method.init_student(teacher, build_sam(s_cfg, seed=2), ctx)
    ctx.student = student
    method.create_modules(ctx)
    return method, ctx, teacher


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_generation_flags_and_losses(cell):
    method, ctx, teacher = cell
    student, mt = ctx.student, method.med_teacher
    before = copy.deepcopy(teacher.state_dict())
    batch = {"image": torch.randn(2, 3, S, S), "index": torch.arange(2)}
    # generation 0: the shared backbone only, MC off; the decoder is the teacher's, frozen
    names = trainable(student)
    assert names and all(n.startswith("image_encoder.") and "med" not in n for n in names)
    assert torch.equal(student.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)
    assert set(method.training_step(batch, ctx)) == {"student"} and student.modality is None
    # the medical teacher: frozen ViT copy + trainable controller and heads
    mt_names = trainable(mt)
    assert mt_names and all("med" in n or n.startswith("esp.") for n in mt_names)
    assert all(p.data_ptr() != q.data_ptr() for p in mt.parameters() for q in teacher.parameters())
    # last step of generation 0 -> the student's flags for generation 1 (no student loss there)
    ctx.generation_step = 1
    method.on_step_end(ctx)
    ctx.generation, ctx.generation_step, ctx.step = 1, 0, 2
    losses = method.training_step(batch, ctx)
    assert set(losses) == {"med_teacher"}
    losses["med_teacher"].backward()
    assert all(p.grad is None for n, p in student.named_parameters())
    assert mt.esp.patch_decoder[0].weight.grad is not None
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # ctx.teacher untouched
    # generation 2: only names with "med" train (switched at generation 0's last step), BN in eval mode
    ctx.generation, ctx.step = 2, 4
    names = trainable(student)
    assert names and all("med" in n for n in names)
    assert names == {n for n, _ in student.named_parameters() if "med" in n}
    method.on_generation_start(2, ctx)
    assert all(torch.equal(v, mt.esp.state_dict()[k]) for k, v in student.esp.state_dict().items())
    student.train()
    losses = method.training_step(batch, ctx)
    assert set(losses) == {"student"} and student.modality == 4
    bns = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    # the target is the medical teacher's embedding (counted as a teacher pass), the student's with the MC on
    x = method._microscopy(batch, ctx)["image"]
    with torch.no_grad():
        want = F.mse_loss(student.embed(x), mt.embed(x))
    assert float(losses["student"].detach()) == pytest.approx(float(want), rel=1e-5)


def test_resume_at_both_generation_boundaries_is_exact(tmp_path):
    """Killed at the first step of stage 1 and again at the first step of stage 2, the resumed cell ends with the
    uninterrupted cell's weights (the student's trainable set changes at each boundary)."""
    from bench.api import TaskEnv, TrainConfig
    from bench.methods.segmentation.esp_medsam import ESPMedSAM
    from bench.tasks.sam import Sam
    from bench.tasks.sam.model import build_sam
    from bench.tasks.sam.tiers import SMOKE_OPTIM, smoke_configs
    from bench.train import train

    class Crashing(ESPMedSAM):
        crash_at = None

        def training_step(self, batch, ctx):
            if ctx.step == self.crash_at:
                raise KeyboardInterrupt
            return super().training_step(batch, ctx)

    task = Sam(Sam.Params(train_size=16), TaskEnv("smoke", "box", None, tmp_path / "cache"))
    teacher = build_sam(smoke_configs()[0], seed=1)
    cfg = TrainConfig(steps=6, batch_size=2, eval_batch_size=2, optim=SMOKE_OPTIM)
    params = ESPMedSAM.Params(evaluate_nuclei=False, heldout_scenes=0)

    def run(crash_at=None, ckpt=None):
        m = Crashing(params)
        m.crash_at = crash_at
        return train(m, task, task.student(0), teacher, cfg, seed=0, checkpoint_path=ckpt, checkpoint_every=1)

    full, _ = run()
    ckpt = tmp_path / "state.pt"
    for crash in (2, 4):
        with pytest.raises(KeyboardInterrupt):
            run(crash, ckpt)
    resumed, result = run(None, ckpt)
    assert result.resumed_from_step == 4
    want = full.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_microscopy_scenes_are_a_pure_function_of_seed_step_index():
    from bench.methods.segmentation._esp_data import microscopy_batch

    a, b = microscopy_batch(0, 3, 2, S), microscopy_batch(0, 3, 2, S)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], microscopy_batch(0, 4, 2, S)["image"])
    assert a["image"].shape == (2, 3, S, S) and set(a["mask"].unique().tolist()) == {0.0, 1.0}


# --------------------------------------------------------------------------------------------------
# Smoke run through the runner
# --------------------------------------------------------------------------------------------------


def test_smoke_run_records_the_prompt_free_nuclei_scores(tmp_path, cache_dir):
    from bench.config import Suite, resolve
    from bench.profiles import detect_profile
    from bench.runner import RunOptions, execute
    from bench.store import read_record

    out = tmp_path / "runs"
    suite = Suite(tasks=["sam/point"], methods=["esp_medsam"], seeds=[0], tier="smoke", out=str(out),
                  references=False, train={"steps": 6}, runtime={"measure": False},
                  task_params={"sam": {"teacher_steps": 40}})
    summary = execute(resolve(suite), RunOptions(out=out, cache_dir=cache_dir, data_root=None,
                                                 profile=detect_profile()))
    rec = read_record(summary.outcomes[0].path)
    assert rec["status"] == "ok", rec.get("traceback")
    info = rec["method_info"]
    assert info["teacher"]["chosen"] == "sam_vit_smoke"
    assert [g["steps"] for g in rec["training"]["generations"]] == [2, 2, 2]
    ev = info["nuclei_prompt_free"]
    if "skipped" in ev:
        pytest.skip(ev["skipped"])
    assert ev["image"]["instances"] == 125
    for k in ("medical_teacher", "student_with_controller", "student_without_controller"):
        assert 0.0 <= ev["models"][k]["dice"] <= 1.0 and 0.0 <= ev["models"][k]["iou"] <= 1.0
    assert ev["params"]["modality_controller"] > 0 and ev["params"]["shared_backbone"] > 0
    keys = [set(e) - {"step", "generation"} for e in rec["training"]["loss_log"]]
    assert {"common_kd_mse"} <= keys[0] and any("seg_loss" in k for k in keys) and "mc_kd_mse" in keys[-1]


def test_a_modality_outside_the_queries_is_refused_when_the_suite_resolves(tmp_path):
    from bench import BenchError
    from bench.config import Suite, resolve

    suite = Suite(tasks=["sam"], methods=[{"name": "esp_medsam", "params": {"modality": 6}}], seeds=[0],
                  tier="smoke", out=str(tmp_path / "runs"))
    with pytest.raises(BenchError, match=r"modality 6 must be < num_modalities 6 \(valid: 0\.\.5\)"):
        resolve(suite)
    assert not (tmp_path / "runs").exists()
