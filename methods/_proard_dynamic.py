"""ProARD's dynamic network for the imagenet task's CIFAR ResNets (`bench.methods.proard`).

ProARD (Mousavi, Mousavi & Daneshtalab, arXiv 2506.07666, IJCNN 2025) makes the robust teacher's architecture
elastic in width, depth and expansion, once-for-all style (Cai et al., ICLR 2020), and trains every sub-network
with shared weights. The official code (hamidmousavi0/ProARD @ 3f602f2) does this for a bottleneck ResNet-50
(``proard/classification/elastic_nn/networks/dyn_resnets.py``, ``modules/dynamic_layers.py`` and
``modules/dynamic_op.py``); this module does the same for the basic-block CIFAR ResNets of He et al. 2016 that the
imagenet task trains as teachers (`bench.tasks.imagenet.nets.CifarResNet`), built from a trained teacher's weights:

* **width** — the output channels of each stage: ``make_divisible(width x w)`` for w in the width multipliers
  (code: ``stage_width_list`` x ``width_mult_list``); the first channels of every weight are kept (``DynamicConv2d.
  get_active_filter``: ``weight[:out, :in]``). Every block of a stage has the stage's width (``set_active_subnet``).
  The stem's output follows stage 0's width, since stage 0's first block adds its input unchanged (identity
  shortcut); the code's ResNet-50 stem has widths of its own (and a projection into stage 0).
* **expansion** — the channels between a block's two convolutions (the bottleneck's middle channels in the code):
  ``make_divisible(round(active width x e / max(e)))``. The code's ratios (0.2, 0.25, 0.35) are relative to a
  bottleneck's output; here the largest ratio is the teacher's block (middle = output width), the others keep the
  code's proportions to it.
* **depth** — the first ``base + d`` blocks of each stage run, ``base = blocks - max(depth list)``
  (``runtime_depth``; trailing blocks are skipped); choices below one block are dropped.
* batch norm over the first channels of its parameters and running statistics (``DynamicBatchNorm2d``);
  the classifier reads the first input features (``DynamicLinearLayer``).

`DynamicCifarResNet.subnet` copies the active sub-network's slices into a plain network (`StaticCifarResNet`,
``get_active_subnet``); `recalibrate_bn` recomputes its batch-norm statistics on training images as
``set_running_statistics`` does (``elastic_nn/utils.py``: the average over batches, weighted by batch size, of each
batch's mean and biased variance); `reorganize_middle` sorts a block's middle channels by importance before the
expansion stages (``re_organize_middle_weights``).
"""

from __future__ import annotations

import random
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(v: float, divisor: int) -> int:
    """OFA's ``make_divisible`` (``proard/utils/pytorch_modules.py``): the nearest multiple of ``divisor`` (at least
    ``divisor``), one step up when rounding lost more than 10 %."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def sliced_bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Batch norm over the first ``x.shape[1]`` channels of ``bn`` (``DynamicBatchNorm2d.bn_forward``): in training
    the running statistics of those channels are updated in place."""
    c = x.shape[1]
    if c == bn.num_features:
        return bn(x)
    factor = 0.0
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked += 1
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                        bn.training or not bn.track_running_stats, factor, bn.eps)


def copy_bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d) -> None:
    """The first channels of ``source`` into ``target`` (``copy_bn`` of ``dynamic_layers.py``)."""
    c = target.num_features
    with torch.no_grad():
        target.weight.copy_(source.weight[:c])
        target.bias.copy_(source.bias[:c])
        target.running_mean.copy_(source.running_mean[:c])
        target.running_var.copy_(source.running_var[:c])
        target.num_batches_tracked.copy_(source.num_batches_tracked)


class DynamicBasicBlock(nn.Module):
    """He et al.'s basic block at its largest size, run at any (input, middle, output) channel prefix."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratios: list[float], divisor: int) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.expand_ratios, self.divisor = sorted(expand_ratios), divisor
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.identity = stride == 1 and cin == cout
        if not self.identity:
            self.sc_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.sc_bn = nn.BatchNorm2d(cout)
        self.active_expand = max(self.expand_ratios)

    def middle(self, out: int) -> int:
        """Middle channels at output width ``out`` and the active expansion (``active_middle_channels``)."""
        return min(self.cout, make_divisible(round(out * self.active_expand / max(self.expand_ratios)), self.divisor))

    def forward(self, x: torch.Tensor, out: int) -> torch.Tensor:
        cin, mid = x.shape[1], self.middle(out)
        h = F.relu(sliced_bn(self.bn1, F.conv2d(x, self.conv1.weight[:mid, :cin], None, self.stride, 1)))
        h = sliced_bn(self.bn2, F.conv2d(h, self.conv2.weight[:out, :mid], None, 1, 1))
        s = x if self.identity else sliced_bn(self.sc_bn, F.conv2d(x, self.sc_conv.weight[:out, :cin], None,
                                                                    self.stride))
        return F.relu(h + s)


class DynamicCifarResNet(nn.Module):
    """A CIFAR ResNet (3 stages of ``blocks`` basic blocks) with elastic width, depth and expansion.

    The active sub-network is a config ``{"w": [width index per stage], "d": [blocks per stage],
    "e": [expansion ratio per block]}`` (the code's ``set_active_subnet(d, e, w)``)."""

    def __init__(self, stage_widths: list[int], blocks: int, num_classes: int, width_mults: list[float],
                 expand_ratios: list[float], depth_list: list[int], divisor: int = 1) -> None:
        super().__init__()
        self.width_mults = sorted(width_mults)
        self.expand_ratios = sorted(expand_ratios)
        self.divisor = divisor
        self.blocks_per_stage = blocks
        base = blocks - max(depth_list)
        self.depth_options = sorted({base + d for d in depth_list if base + d >= 1})
        #: Output channels per stage for each width multiplier (ascending; the last is the full width).
        self.width_options = [[min(w, make_divisible(w * m, divisor)) for m in self.width_mults] for w in stage_widths]
        self.stem = nn.Conv2d(3, stage_widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stage_widths[0])
        layers, stage_of, cin = [], [], stage_widths[0]
        for s, cout in enumerate(stage_widths):
            for b in range(blocks):
                layers.append(DynamicBasicBlock(cin, cout, 2 if (b == 0 and s > 0) else 1, self.expand_ratios, divisor))
                stage_of.append(s)
                cin = cout
        self.blocks = nn.ModuleList(layers)
        self.stage_of = stage_of
        self.fc = nn.Linear(cin, num_classes)
        self.active_width = [len(self.width_mults) - 1] * len(stage_widths)
        self.active_depth = [blocks] * len(stage_widths)
        #: Dropout before the classifier in training (``DynamicLinearLayer(dropout_rate=...)``).
        self.dropout = 0.0

    @classmethod
    def from_cifar_resnet(cls, net: nn.Module, width_mults: list[float], expand_ratios: list[float],
                          depth_list: list[int], divisor: int = 1) -> DynamicCifarResNet:
        """The elastic version of a `bench.tasks.imagenet.nets.CifarResNet`, holding a copy of its weights."""
        stages: list[int] = []
        for blk in net.blocks:
            if not stages or blk.conv1.out_channels != stages[-1]:
                stages.append(blk.conv1.out_channels)
        blocks = len(net.blocks) // len(stages)
        dyn = cls(stages, blocks, net.fc.out_features, width_mults, expand_ratios, depth_list, divisor)
        with torch.no_grad():
            dyn.stem.weight.copy_(net.stem[0].weight)
            dyn.stem_bn.load_state_dict(net.stem[1].state_dict())
            for mine, theirs in zip(dyn.blocks, net.blocks):
                mine.conv1.weight.copy_(theirs.conv1.weight)
                mine.bn1.load_state_dict(theirs.bn1.state_dict())
                mine.conv2.weight.copy_(theirs.conv2.weight)
                mine.bn2.load_state_dict(theirs.bn2.state_dict())
                if not mine.identity:
                    mine.sc_conv.weight.copy_(theirs.shortcut[0].weight)
                    mine.sc_bn.load_state_dict(theirs.shortcut[1].state_dict())
            dyn.fc.load_state_dict(net.fc.state_dict())
        return dyn

    # --- the active sub-network ------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.width_options)

    def stage_blocks(self, s: int) -> list[int]:
        return [i for i, st in enumerate(self.stage_of) if st == s]

    def max_config(self) -> dict[str, list]:
        return {"w": [len(self.width_mults) - 1] * self.n_stages, "d": [self.blocks_per_stage] * self.n_stages,
                "e": [max(self.expand_ratios)] * len(self.blocks)}

    def set_active(self, config: dict[str, list]) -> None:
        w, d, e = config["w"], config["d"], config["e"]
        if len(w) != self.n_stages or len(d) != self.n_stages or len(e) != len(self.blocks):
            raise ValueError(f"config {config} does not fit {self.n_stages} stages of {self.blocks_per_stage} blocks")
        bad = ([x for x in w if not 0 <= x < len(self.width_mults)] + [x for x in d if x not in self.depth_options]
               + [x for x in e if x not in self.expand_ratios])
        if bad:
            raise ValueError(f"config {config}: {bad} not among widths 0..{len(self.width_mults) - 1}, "
                             f"depths {self.depth_options}, expansions {self.expand_ratios}")
        self.active_width, self.active_depth = list(w), list(d)
        for blk, ratio in zip(self.blocks, e):
            blk.active_expand = ratio

    def active_config(self) -> dict[str, list]:
        return {"w": list(self.active_width), "d": list(self.active_depth), "e": [b.active_expand for b in self.blocks]}

    def sample(self, rng: random.Random, widths: list[int], depths: list[int], expands: list[float]) -> dict[str, list]:
        """A random sub-network among the allowed choices, as ``sample_active_subnet`` draws it: an expansion per
        block, then a depth per stage, then a width per stage, each uniform."""
        e = [rng.choice(expands) for _ in self.blocks]
        d = [rng.choice(depths) for _ in range(self.n_stages)]
        w = [rng.choice(widths) for _ in range(self.n_stages)]
        return {"w": w, "d": d, "e": e}

    def active_blocks(self) -> list[tuple[int, int]]:
        """(block index, output width) of the blocks that run, in order."""
        out = []
        for s in range(self.n_stages):
            width = self.width_options[s][self.active_width[s]]
            out += [(i, width) for i in self.stage_blocks(s)[:self.active_depth[s]]]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c0 = self.width_options[0][self.active_width[0]]
        x = F.relu(sliced_bn(self.stem_bn, F.conv2d(x, self.stem.weight[:c0], None, 1, 1)))
        for i, width in self.active_blocks():
            x = self.blocks[i](x, width)
        x = F.dropout(x.mean((2, 3)), self.dropout, self.training)
        return F.linear(x, self.fc.weight[:, :x.shape[1]], self.fc.bias)

    def subnet(self) -> StaticCifarResNet:
        """The active sub-network as a plain network holding copies of the weight slices (``get_active_subnet``)."""
        c0 = self.width_options[0][self.active_width[0]]
        spec, cin = [], c0
        for i, width in self.active_blocks():
            spec.append((cin, self.blocks[i].middle(width), width, self.blocks[i].stride, self.blocks[i].identity))
            cin = width
        net = StaticCifarResNet(c0, spec, self.fc.out_features)
        with torch.no_grad():
            net.stem[0].weight.copy_(self.stem.weight[:c0])
            copy_bn(net.stem[1], self.stem_bn)
            for blk, (i, _) in zip(net.blocks, self.active_blocks()):
                src = self.blocks[i]
                blk.conv1.weight.copy_(src.conv1.weight[:blk.mid, :blk.cin])
                copy_bn(blk.bn1, src.bn1)
                blk.conv2.weight.copy_(src.conv2.weight[:blk.cout, :blk.mid])
                copy_bn(blk.bn2, src.bn2)
                if not blk.identity:
                    blk.shortcut[0].weight.copy_(src.sc_conv.weight[:blk.cout, :blk.cin])
                    copy_bn(blk.shortcut[1], src.sc_bn)
            net.fc.weight.copy_(self.fc.weight[:, :cin])
            net.fc.bias.copy_(self.fc.bias)
        return net


class StaticBlock(nn.Module):
    """A basic block with ``mid`` channels between its convolutions (a sub-network's block)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, identity: bool) -> None:
        super().__init__()
        self.cin, self.mid, self.cout, self.identity = cin, mid, cout, identity
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if identity else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                                     nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class StaticCifarResNet(nn.Module):
    """A sampled ProARD student: stem, the kept blocks ``(cin, mid, cout, stride, identity)``, pooling, classifier."""

    def __init__(self, stem_out: int, spec: list[tuple[int, int, int, int, bool]], num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_out, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_out), nn.ReLU())
        self.blocks = nn.Sequential(*(StaticBlock(*s) for s in spec))
        self.fc = nn.Linear(spec[-1][2] if spec else stem_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


# --------------------------------------------------------------------------------------------------
# Channel sorting before the expansion stages, and batch-norm recalibration of a sub-network
# --------------------------------------------------------------------------------------------------


def reorganize_middle(block: DynamicBasicBlock, boundaries: Iterable[int]) -> list[int]:
    """Sort ``block``'s middle channels by importance, the L1 norm of the second convolution's weights that read
    each channel (``re_organize_middle_weights``), most important first, within the segments that ``boundaries``
    (channel counts) cut: a channel never crosses a boundary, so the channels the smaller expansions of earlier
    stages used stay in front (the code's offsets of -1e5 per segment). Returns the order applied."""
    imp = block.conv2.weight.detach().abs().sum((0, 2, 3))
    cuts = sorted(set(boundaries))
    segment = [sum(i >= c for c in cuts) for i in range(len(imp))]
    order = sorted(range(len(imp)), key=lambda i: (segment[i], -float(imp[i])))
    idx = torch.tensor(order, device=imp.device)
    with torch.no_grad():
        block.conv1.weight.copy_(block.conv1.weight[idx])
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(block.bn1, name)
            t.copy_(t[idx])
        block.conv2.weight.copy_(block.conv2.weight[:, idx])
    return order


def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every batch norm's running mean and variance of ``model`` to the averages, over ``batches`` and weighted
    by batch size, of the batch mean and biased batch variance of its input, each layer seeing inputs normalised
    with batch statistics (``set_running_statistics``). Returns the number of images used."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: dict[int, list[Any]] = {id(m): [0.0, 0.0, 0] for m in bns}

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        mean = x.mean((0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean((0, 2, 3))
        acc = sums[id(m)]
        acc[0] = acc[0] + mean * x.shape[0]
        acc[1] = acc[1] + var * x.shape[0]
        acc[2] += x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    was = model.training
    n = 0
    try:
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x)
                n += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    with torch.no_grad():
        for m in bns:
            s_mean, s_var, count = sums[id(m)]
            if count:
                m.running_mean.copy_(s_mean / count)
                m.running_var.copy_(s_var / count)
    return n
