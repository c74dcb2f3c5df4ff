"""The sam task: official checkpoint layout through the full-tier loader, SAM's loss against hand-worked
values, the smoke task's batches, forward shapes and protocols against oracle models, the small tier's real
data (needs_data)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench import BenchError
from bench.api import Outputs, TaskEnv
from bench.tasks.sam import Sam
from bench.tasks.sam.losses import mask_ious, sam_focal_dice, sam_label_loss, sam_mask_loss
from bench.tasks.sam.model import Decoded, SamConfig, build_sam

pytestmark = pytest.mark.usefixtures("one_thread")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------------
# (a) official checkpoint layout, loaded through the full tier
# --------------------------------------------------------------------------------------------------


def _write_coco_root(root, scenes):
    """A COCO 2017 root (val2017/*.png-as-.jpg-named files are not needed: PNG keeps pixels exact) of scenes."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for k, sc in enumerate(scenes, start=1):
        name = f"{k:012d}.png"
        Image.fromarray(sc.image).save(root / "val2017" / name)
        images.append({"id": k, "file_name": name, "height": sc.image.shape[0], "width": sc.image.shape[1]})
        for j, inst in enumerate(sc.instances):
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            x1, y1, x2, y2 = inst.box
            crowd = int(k == 1 and j == 0)  # one crowd region: never prompted, an ignore region for COCOeval
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": inst.category_id, "iscrowd": crowd,
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                         "area": float(inst.mask.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    return gt


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    from bench.tasks.sam.data import shapes_scene

    from bench.tasks.sam.data import Instance, Scene

    scenes = []
    for i in range(3):  # 40 x 64 (h x w): the protocol must crop the input frame's padding rows
        sc = shapes_scene(np.random.default_rng([5, i]), 64, 4)
        keep = [inst.mask[:40] for inst in sc.instances if inst.mask[:40].sum() >= 4]
        insts = []
        for k, m in enumerate(keep):
            ys, xs = np.nonzero(m)
            insts.append(Instance(m, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                                  1 + k % 3, k + 1))
        scenes.append(Scene(np.ascontiguousarray(sc.image[:40]), insts, i + 1))
    root = tmp_path_factory.mktemp("coco")
    gt = _write_coco_root(root, scenes)
    return root, gt


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """segment_anything's own SAM ViT-B (build_sam_vit_b: 1024 px, 12 blocks, the official key layout) with
    random weights, saved as a state-dict file like the released sam_vit_b_01ec64.pth."""
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    state = build_sam_vit_b().state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b.pth"
    torch.save(state, path)
    return path, state


def _full(coco_root, tmp_path, **params) -> Sam:
    return Sam(Sam.Params(coco_root=str(coco_root[0]), **params), TaskEnv("full", "box", None, tmp_path / "cache"))


def test_official_vit_b_checkpoint_loads_through_the_full_tier(vit_b_checkpoint, coco_root, tmp_path):
    path, state = vit_b_checkpoint
    task = _full(coco_root, tmp_path, teacher_checkpoint=str(path), teacher_arch="vit_b")
    teacher = task.teacher()
    own = teacher.state_dict()
    assert set(own) == set(state)  # the same keys, no more (pixel_mean/std are not persistent in Sam either)
    assert all(torch.equal(own[k], state[k]) for k in state)
    info = task.teacher_info()
    assert info["trained_by"] == "provided" and info["tensors"] == len(state)
    assert info["n_params"] == sum(v.numel() for k, v in state.items() if "gaussian_matrix" not in k)


def test_full_tier_pool_offers_the_vit_b_base_checkpoint_to_slimsam(vit_b_checkpoint, coco_root, tmp_path,
                                                                    monkeypatch):
    """With a ViT-H teacher and SlimSAM's ViT-B ``base_checkpoint``, the pool holds both official models and SlimSAM
    (which prunes and distils from SAM-B) picks the ViT-B one, loaded from the base checkpoint."""
    from bench.methods.segmentation.slimsam import SlimSAM
    from bench.tasks.sam import full

    path, state = vit_b_checkpoint
    real = full.probe_sam_checkpoint
    # No ViT-H file here: skip the probe of the teacher's file only (its loading is tested above with ViT-B).
    monkeypatch.setattr(full, "probe_sam_checkpoint",
                        lambda p, cfg, field: None if field == "sam.teacher_checkpoint" else real(p, cfg, field))
    task = _full(coco_root, tmp_path, teacher_checkpoint=str(path), teacher_arch="vit_h", student_arch="vit_b",
                 base_checkpoint=str(path))
    pool = task.teacher_pool()
    assert [c.name for c in pool] == ["sam_vit_h", "sam_vit_b"]
    assert pool[0].n_params > 600e6 and 90e6 < pool[1].n_params < 95e6
    assert SlimSAM(SlimSAM.Params()).select_teacher(pool, task.student_params()) == "sam_vit_b"
    base = task.teacher("sam_vit_b").state_dict()
    assert all(torch.equal(base[k], state[k]) for k in state)
    assert task.teacher_info("sam_vit_b")["arch"] == "vit_b"


def test_checkpoint_with_a_missing_key_is_refused_before_any_cell(vit_b_checkpoint, coco_root, tmp_path):
    path, state = vit_b_checkpoint
    bad = {k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(BenchError, match=r"1 missing keys \['mask_decoder.iou_token.weight'\]"):
        _full(coco_root, tmp_path, teacher_checkpoint=str(tmp_path / "missing.pth"), teacher_arch="vit_b")
    # the same file as a ViT-L checkpoint: every shape and most keys are wrong, and the error says which
    with pytest.raises(BenchError, match="unexpected keys|missing keys"):
        _full(coco_root, tmp_path, teacher_checkpoint=str(path), teacher_arch="vit_l")


def test_checkpoint_errors_name_the_problem(tmp_path):
    from bench.tasks.sam.full import load_sam_checkpoint, probe_sam_checkpoint

    cfg = SamConfig(encoder="vit", img_size=64, embed_dim=32, vit_dim=32, vit_depth=1, vit_heads=2, vit_window=0,
                    vit_global=(), decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32)
    state = build_sam(cfg, seed=0).state_dict()
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(BenchError, match="text.pth"):
        probe_sam_checkpoint(tmp_path / "text.pth", cfg, "sam.teacher_checkpoint")
    with pytest.raises(BenchError, match="not a file"):
        probe_sam_checkpoint(tmp_path / "absent.pth", cfg, "sam.teacher_checkpoint")
    # weights_only=True: a checkpoint that needs arbitrary unpickling is refused, not executed
    torch.save({"model": state, "extra": nn.Linear(1, 1)}, tmp_path / "pickled.pth")
    with pytest.raises(BenchError, match="weights_only"):
        probe_sam_checkpoint(tmp_path / "pickled.pth", cfg, "sam.teacher_checkpoint")
    extra = {**state, "image_encoder.extra.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(BenchError, match=r"1 unexpected keys \['image_encoder.extra.weight'\]"):
        load_sam_checkpoint(build_sam(cfg, seed=1), tmp_path / "extra.pth", "sam.teacher_checkpoint")
    wrong = {**state, "mask_decoder.iou_token.weight": torch.zeros(1, 16)}
    torch.save(wrong, tmp_path / "shape.pth")
    with pytest.raises(BenchError, match=r"mask_decoder.iou_token.weight \(1, 16\) vs \(1, 32\)"):
        load_sam_checkpoint(build_sam(cfg, seed=1), tmp_path / "shape.pth", "sam.teacher_checkpoint")
    torch.save({"model": state}, tmp_path / "enveloped.pth")  # {"model": state_dict} envelopes are unwrapped
    model = build_sam(cfg, seed=1)
    load_sam_checkpoint(model, tmp_path / "enveloped.pth", "sam.teacher_checkpoint")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_coco_root_without_annotations_is_a_bad_input(tmp_path):
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    with pytest.raises(BenchError, match="annotations/instances_val2017.json"):
        Sam(Sam.Params(coco_root=str(tmp_path / "coco")), TaskEnv("full", "box", None, tmp_path))
    task = Sam(Sam.Params(), TaskEnv("full", "box", None, tmp_path))
    assert "sam.coco_root" in task.unavailable()


def test_encoders_build_at_stride_16_and_lite0_sees_its_own_normalisation():
    from bench.tasks.imagenet.models import lite0_from_package
    from bench.tasks.sam.model import normalise

    five_m = build_sam(SamConfig.tinyvit_5m(256).model_copy(update={"embed_dim": 64, "decoder_heads": 2,
                                                                     "decoder_mlp_dim": 64}), seed=0).eval()
    with torch.no_grad():
        assert five_m.embed(torch.zeros(1, 3, 256, 256)).shape == (1, 64, 16, 16)
    with pytest.raises(BenchError, match="stage strides"):  # 4 stages whose last merge would halve again
        build_sam(SamConfig(encoder="tinyvit", img_size=64, embed_dim=32, tinyvit_dims=(8, 16, 24, 32),
                            tinyvit_depths=(1, 1, 1, 1), tinyvit_heads=(1, 1, 1, 1), tinyvit_windows=(2, 2, 2, 2)))
    cfg = SamConfig(encoder="lite0", img_size=64, embed_dim=32, pretrained=True, decoder_heads=2, decoder_mlp_dim=64,
                    iou_head_hidden_dim=32)
    model = build_sam(cfg, seed=0)
    ref = lite0_from_package(1000).net
    assert torch.equal(model.image_encoder.conv_stem.weight, ref.conv_stem.weight)
    assert torch.equal(model.image_encoder.blocks[6][0].conv_pwl.weight, ref.blocks[6][0].conv_pwl.weight)
    pixels = torch.randint(0, 256, (1, 3, 4, 4)).float()
    enc = model.image_encoder
    assert torch.allclose(normalise(pixels) * enc.in_scale + enc.in_shift, (pixels - 127) / 128, atol=1e-5)
    assert model.embed(torch.zeros(1, 3, 64, 64)).shape == (1, 32, 4, 4)
    assert "in_scale" not in model.state_dict()  # no persistent state beyond the three parts


def test_importing_mobile_sam_leaves_timms_tiny_vit_alone():
    import timm
    from timm.models import _registry

    import bench.tasks.sam.model  # noqa: F401 - the import under test

    assert _registry._model_to_module["tiny_vit_5m_224"] == "tiny_vit"
    assert "tiny_vit_5m_224.dist_in22k_ft_in1k" in timm.list_pretrained("tiny_vit_5m*")


# --------------------------------------------------------------------------------------------------
# (b) SAM's loss, worked by hand
# --------------------------------------------------------------------------------------------------


def _focal_by_hand(x: float, g: int) -> float:
    p = _sigmoid(x)
    ce = -math.log(p) if g else -math.log(1 - p)
    p_t = p if g else 1 - p
    return (0.25 if g else 0.75) * (1 - p_t) ** 2 * ce


def test_focal_dice_against_hand_computation():
    logits = torch.tensor([[[0.0, 2.0]], [[-1.0, 3.0]]])  # (N=2, 1, 2)
    gt = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    expected = []
    for xs, gs in (([0.0, 2.0], [1, 0]), ([-1.0, 3.0], [1, 1])):
        focal = sum(_focal_by_hand(x, g) for x, g in zip(xs, gs)) / 2
        ps = [_sigmoid(x) for x in xs]
        dice = 1 - (2 * sum(p * g for p, g in zip(ps, gs)) + 1) / (sum(ps) + sum(gs) + 1)
        expected.append(20 * focal + dice)
    # first mask by hand: x=0, g=1: 0.25 * 0.5^2 * ln 2 = 0.0433217; x=2, g=0: p = 0.8807971,
    # 0.75 * p^2 * ln(1 + e^2) = 1.2375586; dice 1 - 2 / (0.5 + 0.8807971 + 1 + 1) = 0.4084235
    assert expected[0] == pytest.approx(20 * (0.0433217 + 1.2375586) / 2 + 0.4084235, abs=1e-5)
    assert sam_focal_dice(logits, gt).tolist() == pytest.approx(expected, rel=1e-6)


def test_mask_ious_binarise_at_zero():
    logits = torch.tensor([[[1.0, -1.0], [2.0, -3.0]], [[-1.0, -1.0], [-1.0, -1.0]], [[0.5, 0.5], [0.5, 0.0]]])
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    # {(0,0),(1,0)} vs {(0,0),(0,1)}: 1 / 3; both empty: 0 (union clamped to 1); three pixels (logit 0 is out)
    # vs one: 1 / 3
    assert mask_ious(logits, gt).tolist() == pytest.approx([1 / 3, 0.0, 1 / 3])


def test_only_the_lowest_loss_mask_is_back_propagated():
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    logits = torch.tensor([[[[5.0, 5.0], [-5.0, -5.0]],  # right mask
                            [[-5.0, -5.0], [5.0, 5.0]],  # the opposite
                            [[0.0, 0.0], [0.0, 0.0]]]], requires_grad=True)
    iou_pred = torch.tensor([[0.2, 0.9, 0.5]], requires_grad=True)
    loss = sam_mask_loss(logits, iou_pred, gt)
    per = [sum(_focal_by_hand(float(x), int(g)) for x, g in zip(logits[0, k].flatten().tolist(),
                                                                  gt.flatten().tolist())) / 4 * 20 for k in range(3)]
    for k in range(3):
        ps = [_sigmoid(float(x)) for x in logits[0, k].flatten().tolist()]
        per[k] += 1 - (2 * (ps[0] + ps[1]) + 1) / (sum(ps) + 2 + 1)
    assert int(np.argmin(per)) == 0
    # mask 0 binarised is exactly the ground truth: actual IoU 1, so the IoU term is (0.2 - 1)^2
    assert loss.item() == pytest.approx(min(per) + (0.2 - 1.0) ** 2, rel=1e-5)
    loss.sum().backward()
    assert logits.grad[0, 0].abs().sum() > 0
    assert torch.equal(logits.grad[0, 1:], torch.zeros(2, 2, 2))  # the other masks get nothing
    assert iou_pred.grad[0].tolist() == pytest.approx([2 * (0.2 - 1.0), 0.0, 0.0])
    iou_pred.grad = None
    sam_mask_loss(logits, iou_pred, gt, supervise_all_iou=True).sum().backward()
    # all three IoU predictions supervised (averaged): actual IoUs 1, 0 and 0 (logit 0 is not > 0: empty)
    assert iou_pred.grad[0].tolist() == pytest.approx([2 * (0.2 - 1.0) / 3, 2 * 0.9 / 3, 2 * 0.5 / 3])


def test_label_loss_averages_valid_prompts_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 3, 4, 4)
    iou = torch.rand(1, 2, 3)
    gt = (torch.rand(1, 2, 8, 8) > 0.5).float()  # at twice the logits' side: the loss upsamples
    out = Outputs(logits=logits, extras={"iou": iou})
    one = sam_label_loss(out, {"gt_masks": gt, "valid": torch.tensor([[True, False]])})
    garbage = logits.clone()
    garbage[0, 1] = 100.0
    again = sam_label_loss(Outputs(logits=garbage, extras={"iou": iou}),
                           {"gt_masks": gt, "valid": torch.tensor([[True, False]])})
    assert one.item() == pytest.approx(again.item())
    up = torch.nn.functional.interpolate(logits[0, :1].reshape(3, 1, 4, 4), (8, 8), mode="bilinear",
                                         align_corners=False)
    assert one.item() == pytest.approx(sam_mask_loss(up.reshape(1, 3, 8, 8), iou[0, :1], gt[0, :1]).item(), rel=1e-6)
    none = sam_label_loss(out, {"gt_masks": gt, "valid": torch.zeros(1, 2, dtype=torch.bool)})
    assert none.item() == 0.0


# --------------------------------------------------------------------------------------------------
# (c) the smoke task
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sam-cache")
    return {sub: Sam(Sam.Params(), TaskEnv("smoke", sub, None, cache)) for sub in ("box", "point")}


def test_training_batches_agree_with_their_masks(smoke):
    task = smoke["box"]
    split = task.train_data()
    b = split.batch([3, 0, 7, 5])
    s, p = task.img_size, task.prompts
    assert (s, p) == (64, 4)
    assert b["image"].shape == (4, 3, s, s) and b["gt_masks"].shape == (4, p, s, s)
    assert b["boxes"].shape == (4, p, 4) and b["points"].shape == (4, p, 1, 2)
    assert b["point_labels"].tolist() == [[[1]] * p] * 4 and b["index"].tolist() == [3, 0, 7, 5]
    assert b["valid"].dtype == torch.bool and b["valid"].any(1).all()
    for i in range(4):
        for j in range(p):
            m = b["gt_masks"][i, j].numpy() > 0.5
            if not b["valid"][i, j]:
                assert not m.any()
                continue
            ys, xs = np.nonzero(m)
            assert b["boxes"][i, j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            x, y = b["points"][i, j, 0].tolist()
            assert m[int(y), int(x)]
    again = split.batch([3, 0, 7, 5])
    assert all(torch.equal(b[k], again[k]) for k in b)  # a pure function of the indices (exact resume)


def test_the_task_teacher_sees_point_prompts_on_half_its_batches(smoke):
    from bench.tasks.sam.batches import MixedPrompts

    mixed = MixedPrompts(smoke["box"].train_data(), every=2)
    assert "boxes" in mixed.batch([2, 1]) and "boxes" not in mixed.batch([1, 2])
    assert "points" in mixed.batch([1, 2])


def test_forward_shapes_and_prompt_choice(smoke):
    task = smoke["box"]
    model = task.student(0)
    b = task.train_data().batch([0, 1])
    out = task.forward(model, b)
    s, c = task.img_size, task.embed_dim
    assert out.logits.shape == (2, task.prompts, 3, s // 4, s // 4)
    assert out.extras["iou"].shape == (2, task.prompts, 3)
    assert out.extras["tokens"].shape == (2, task.prompts, 7, c)  # IoU + 4 mask tokens + 2 prompt tokens
    assert out.features.shape == (2, c, s // 16, s // 16)
    points_only = {k: v for k, v in b.items() if k != "boxes"}
    assert not torch.allclose(task.forward(model, points_only).logits, out.logits)  # points were used
    assert torch.isfinite(task.label_loss(out, b))
    # the tokens are the two-way transformer's own output: re-run it and compare
    from bench.tasks.sam.model import Prompts

    seen = []
    model.mask_decoder.transformer.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    dec = model.decode(model.embed(b["image"][:1]), Prompts(boxes=b["boxes"][:1]))
    assert torch.equal(dec.tokens[0], seen[-1])


def test_components_and_probes(smoke):
    task = smoke["box"]
    model = task.student(0).eval()
    assert [(c.name, c.per) for c in task.components()] == [("encoder", "image"), ("decoder", "prompt")]
    emb = task.component_forward(model, "encoder", task.component_inputs("encoder", 2))
    assert emb.shape == (2, task.embed_dim, 4, 4)
    dec = task.component_forward(model, "decoder", task.component_inputs("decoder", 3))
    assert dec.masks.shape == (3, 1, 3, 16, 16)
    assert task.forward(model, task.example_inputs(2)).logits.shape == (2, 1, 3, 16, 16)
    batch = task.example_batch(2)
    assert torch.isfinite(task.label_loss(task.forward(model.train(), batch), batch))
    n = {"encoder": sum(p.numel() for p in model.image_encoder.parameters())}
    assert task.student_params() == sum(p.numel() for p in model.parameters()) > n["encoder"]


class Oracle(nn.Module):
    """A stand-in model whose decoder looks the prompt up among the evaluation instances and returns logits
    +10 inside a chosen mask, -10 outside, at the input side (so post-processing is exact for S x S images).

    ``kind``: "gt" (mask 0 is the ground truth, predicted IoU highest), "fill" (the prompt box filled),
    "hidden" (the ground truth is mask 2 but mask 0, empty, has the highest predicted IoU), "half" (every
    other prompt gets the ground truth with predicted IoU 0.9, the rest an empty mask with predicted IoU 0.2)."""

    def __init__(self, task: Sam, kind: str) -> None:
        from bench.tasks.sam.prompts import sam_input

        from pycocotools import mask as mask_utils

        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.img_size, self.kind = task.img_size, kind
        images, _ = task._eval_sets["main"]
        self.inputs = [torch.from_numpy(sam_input(im.pixels(task.img_size), task.img_size)) for im in images]
        self.masks = [[(inst.box, inst.point, mask_utils.decode(inst.rle).astype(bool)) for inst in im.instances]
                      for im in images]

        self.prompted = 0

    def embed(self, images):
        ids = [next(k for k, x in enumerate(self.inputs) if torch.equal(x, im)) for im in images]
        return torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1)

    def decode(self, emb, prompts, multimask=True):
        s = self.img_size
        masks, ious = [], []
        for b in range(emb.shape[0]):
            table = self.masks[int(emb[b].item())]
            rows, rowi = [], []
            n = (prompts.boxes if prompts.boxes is not None else prompts.points).shape[1]
            for j in range(n):
                self.prompted += 1
                if prompts.boxes is not None:
                    box = prompts.boxes[b, j].tolist()
                    gt = next(m for bx, _, m in table if np.allclose(bx, box))
                else:
                    pt = prompts.points[b, j, 0].tolist()
                    gt = next(m for _, p, m in table if p is not None and np.allclose(p, pt))
                out = np.zeros((3, s, s), bool)
                gt = np.pad(gt, ((0, s - gt.shape[0]), (0, s - gt.shape[1])))  # the input frame pads bottom-right
                if self.kind == "gt":
                    out[0], iou = gt, [0.9, 0.1, 0.1]
                elif self.kind == "fill":
                    x1, y1, x2, y2 = (int(v) for v in box)
                    out[0, y1:y2, x1:x2], iou = True, [0.9, 0.1, 0.1]
                elif self.kind == "half":
                    self.count = getattr(self, "count", -1) + 1
                    if self.count % 2 == 0:
                        out[0], iou = gt, [0.9, 0.1, 0.1]
                    else:
                        iou = [0.2, 0.1, 0.1]
                else:
                    out[2], iou = gt, [0.9, 0.1, 0.5]
                rows.append(torch.from_numpy(out).float() * 20 - 10)
                rowi.append(iou)
            masks.append(torch.stack(rows))
            ious.append(torch.tensor(rowi))
        return Decoded(masks=torch.stack(masks), iou=torch.stack(ious), tokens=torch.zeros(1))


def test_evaluate_gives_one_for_a_model_that_predicts_the_ground_truth(smoke):
    box, point = smoke["box"], smoke["point"]
    got = box.evaluate(Oracle(box, "gt"))
    assert set(got) == {m.name for m in box.metrics()}
    assert got["box_miou"] == pytest.approx(1.0) and got["mask_ap"] == pytest.approx(1.0)
    assert got["mask_ap50"] == pytest.approx(1.0) and got["mask_ap75"] == pytest.approx(1.0)
    got = point.evaluate(Oracle(point, "gt"))
    assert set(got) == {m.name for m in point.metrics()}
    assert got == {"point_miou": pytest.approx(1.0), "point_miou_oracle": pytest.approx(1.0)}
    # the most confident mask is scored, the best of three only as the oracle
    got = point.evaluate(Oracle(point, "hidden"))
    assert got["point_miou"] == 0.0 and got["point_miou_oracle"] == pytest.approx(1.0)
    assert box.evaluate(Oracle(box, "hidden"))["mask_ap"] == 0.0


def _cocoeval_ap(gt: dict, dets: list[dict]) -> float:
    """pycocotools' own COCOeval segm AP of ``dets`` (RLEs with bytes counts), nothing of bench's in between."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dets), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return float(ev.stats[0])


def test_mask_ap_scores_the_kept_mask_by_its_predicted_iou(smoke):
    from pycocotools import mask as mask_utils

    task = smoke["box"]
    images, gt = task._eval_sets["main"]
    dets, k = [], 0
    for im in images:
        for inst in im.instances:  # the order the protocol prompts them in (it prompts every instance)
            m = mask_utils.decode(inst.rle) if k % 2 == 0 else np.zeros(im.hw, np.uint8)
            dets.append({"image_id": im.image_id, "category_id": inst.category_id, "score": 0.9 if k % 2 == 0 else 0.2,
                         "segmentation": mask_utils.encode(np.asfortranarray(m))})
            k += 1
    expected = _cocoeval_ap(gt, dets)
    got = task.evaluate(Oracle(task, "half"))
    assert got["mask_ap"] == pytest.approx(expected)
    assert 0.4 < got["mask_ap"] < 0.6  # half found, all ranked first: ~0.5; unranked it would be far lower
    assert got["box_miou"] == pytest.approx(np.mean([1.0 if i % 2 == 0 else 0.0 for i in range(k)]))


def test_box_fill_floor_against_numpy(smoke):
    from pycocotools import mask as mask_utils

    task = smoke["box"]
    images, gt = task._eval_sets["main"]
    ious, dets = [], []
    for im in images:
        for inst in im.instances:
            m = mask_utils.decode(inst.rle).astype(bool)
            ys, xs = np.nonzero(m)
            fill = np.zeros_like(m)
            fill[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            ious.append((m & fill).sum() / (m | fill).sum())
            rle = mask_utils.encode(np.asfortranarray(fill.astype(np.uint8)))
            dets.append({"image_id": im.image_id, "category_id": inst.category_id, "segmentation": rle, "score": 1.0})
    ap = _cocoeval_ap(gt, dets)
    got = task.evaluate(Oracle(task, "fill"))
    assert got["box_miou"] == pytest.approx(float(np.mean(ious)))
    assert got["box_fill_miou"] == pytest.approx(float(np.mean(ious)))
    assert got["box_fill_ap"] == pytest.approx(ap)
    assert got["mask_ap"] == pytest.approx(ap)
    assert 0.2 < got["box_fill_miou"] < 0.9  # generated shapes are not boxes


def test_smoke_teacher_is_trained_once_and_cached(tmp_path):
    env = TaskEnv("smoke", "box", None, tmp_path)
    task = Sam(Sam.Params(teacher_steps=3, eval_images=2), env)
    teacher = task.teacher()
    info = task.teacher_info()
    assert info["cache"] == "trained" and info["steps"] == 3 and info["final_train_loss"] > 0
    assert set(info["eval_metrics"]) == {m.name for m in task.metrics()}
    again = Sam(Sam.Params(teacher_steps=3, eval_images=2), TaskEnv("smoke", "point", None, tmp_path))
    reloaded = again.teacher()
    assert again.teacher_info()["cache"] == "hit"
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reloaded.state_dict().values()))
    other = Sam(Sam.Params(teacher_steps=4, eval_images=2), env)
    assert other._teacher_specs()[0].name == "sam_vit_smoke"
    assert other.teacher_pool()[0].n_params == sum(p.numel() for p in teacher.parameters())


def test_small_tier_without_data_root_says_why(tmp_path):
    for sub in ("box", "point"):
        reason = Sam(Sam.Params(), TaskEnv("small", sub, None, tmp_path)).unavailable()
        assert "coco_val_subset/instances.json" in reason and "cifar10" in reason


def test_full_tier_protocol_on_a_coco_root(coco_root, tmp_path):
    """COCO val2017 layout, ground-truth boxes and a detections file (TinySAM's format, scores kept)."""
    root, gt = coco_root
    task = Sam(Sam.Params(coco_root=str(root), img_size=64), TaskEnv("full", "box", None, tmp_path))
    oracle = Oracle(task, "gt")
    got = task.evaluate(oracle)
    assert got["box_miou"] == pytest.approx(1.0) and got["mask_ap"] == pytest.approx(1.0)
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and oracle.prompted == len(gt["annotations"]) - 1  # one pass: mIoU and AP
    # detections (a non-crowd instance each, scores of their own, one with a wrong class ranked first)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.3 + 0.01 * i}
            for i, a in enumerate(gt["annotations"]) if not a["iscrowd"]]
    # the last in file order but ranked first by its score: without the detector's scores it would rank last
    cat = dets[-1]["category_id"]
    dets[-1] = {**dets[-1], "category_id": next(c for c in (1, 2, 3) if c != cat), "score": 0.99}
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    with_dets = Sam(Sam.Params(coco_root=str(root), img_size=64, boxes_json=str(tmp_path / "dets.json")),
                    TaskEnv("full", "box", None, tmp_path))
    got = with_dets.evaluate(Oracle(with_dets, "gt"))
    masks = {(a["image_id"], tuple(a["bbox"])): {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
             for a in gt["annotations"]}
    expected = _cocoeval_ap(gt, [{**d, "segmentation": masks[d["image_id"], tuple(d["bbox"])]} for d in dets])
    assert got["box_miou"] == pytest.approx(1.0) and got["mask_ap"] == pytest.approx(expected) and expected < 1.0
    point = Sam(Sam.Params(coco_root=str(root), img_size=64), TaskEnv("full", "point", None, tmp_path))
    assert point.evaluate(Oracle(point, "gt"))["point_miou"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# (d) the small tier on the real data
# --------------------------------------------------------------------------------------------------


@pytest.mark.needs_data
def test_small_tier_real_masks(data_root, tmp_path):
    from pycocotools.coco import COCO

    task = Sam(Sam.Params(eval_images=3, train_size=8), TaskEnv("small", "box", data_root, tmp_path))
    assert task.unavailable() is None
    images, gt = task._eval_sets["main"]
    raw = json.loads((data_root / "coco_val_subset" / "instances.json").read_text())
    first = sorted(im["id"] for im in raw["images"])[:3]
    assert [im.image_id for im in images] == first
    coco = COCO()
    coco.dataset = raw
    coco.createIndex()
    ious = []
    for iid in first:
        info = coco.imgs[iid]
        for ann in coco.imgToAnns[iid]:
            if ann["iscrowd"]:
                continue
            m = coco.annToMask(ann).astype(bool)
            x, y, w, h = ann["bbox"]
            yy, xx = np.mgrid[0:info["height"], 0:info["width"]] + 0.5
            fill = (xx >= x) & (xx <= x + w) & (yy >= y) & (yy <= y + h)
            ious.append((m & fill).sum() / (m | fill).sum())
    pan = task._eval_sets["panoptic"][0]
    assert [len(im.instances) for im in pan] and all(im.source == "coco_panoptic_sample" for im in pan)
    floor = task._box_fill
    n_sub, n_pan = len(ious), sum(1 for im in pan for i in im.instances if not i.iscrowd)
    # box_fill_miou pools the subset's and the panoptic images' instances
    sub_mean = float(np.mean(ious))
    pan_sum = floor["box_fill_miou"] * (n_sub + n_pan) - sub_mean * n_sub
    assert 0 < pan_sum / n_pan < 1
    assert n_sub == sum(1 for im in images for i in im.instances if not i.iscrowd)
    from bench.tasks.sam import protocol

    assert protocol.miou(protocol.box_fill(images)) == pytest.approx(sub_mean)
    b = task.train_data().batch([0, 1])
    for i in range(2):
        for j in np.nonzero(b["valid"][i].numpy())[0]:
            x, y = b["points"][i, j, 0].tolist()
            assert b["gt_masks"][i, j, int(y), int(x)] == 1
    import importlib.metadata

    try:
        importlib.metadata.version("stardist")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("stardist (the DSB nuclei image) is not installed: pip install --no-deps stardist")
    point = Sam(Sam.Params(eval_images=2), TaskEnv("small", "point", data_root, tmp_path))
    assert point.unavailable() is None
    nuclei = point._eval_sets["nuclei"][0]
    assert len(nuclei) == 1 and len(nuclei[0].instances) == 125
    assert {m.name for m in point.metrics()} == {"point_miou", "point_miou_oracle", "point_miou_nuclei"}
