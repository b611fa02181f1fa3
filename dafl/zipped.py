"""The structure ZipIt! merges along, and the merged network it builds.

`merge_spec` names, for each supported architecture (LeNet-5, the CIFAR ResNets), its
blocks and merge spaces (activations that feed weight layers) and, for every weight, the
spaces it reads and writes. `ZippedClassifier` is a merged multi-task classifier: built
from metadata alone, it loads from a safetensors file like any registered network. The
merging itself (correlations, matching, merged weights) is `dafl.zipit`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dafl.errors import ConfigError
from dafl.models import CifarResNet, LeNet5, build_model



@dataclass
class MergeSpec:
    """How one network decomposes for merging.

    blocks: modules run in order (net(x) == blocks[-1](...blocks[0](x))); the last is the
        classification head, never merged. Depth d merges blocks[:d].
    block_space: the space of the activation each block outputs (None for the head).
    block_writes: the spaces whose weights each block holds (merged when the block is).
    params: state-dict key -> (output space, input space, input repeat): which axis of the
        tensor lives in which space; `repeat` > 1 when a linear layer reads a flattened
        C x H x W map (channel-major), so one channel is `repeat` inputs.
    features: space -> (module, transform) pairs whose outputs are that space's features.
    channels: space -> number of features.
    """
    blocks: list[nn.Module]
    block_space: list[Optional[str]]
    block_writes: list[list[str]]
    params: dict[str, tuple[Optional[str], Optional[str], int]]
    features: dict[str, list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]]
    channels: dict[str, int] = field(default_factory=dict)


def _lenet_spec(net: LeNet5) -> MergeSpec:
    f, c = net.features, net.classifier
    blocks = [nn.Sequential(*f[0:4]), nn.Sequential(*f[4:8]), nn.Sequential(*f[8:11], nn.Flatten()),
              nn.Sequential(*c[0:2]), c[2]]
    spaces = ["conv1", "conv2", "conv3", "fc1"]
    spatial = net.feature_dim // f[8].out_channels
    params = {}
    for conv_index, bn_index, space, source in ((0, 1, "conv1", None), (4, 5, "conv2", "conv1"),
                                                (8, 9, "conv3", "conv2")):
        params[f"features.{conv_index}.weight"] = (space, source, 1)
        params[f"features.{conv_index}.bias"] = (space, None, 1)
        if isinstance(f[bn_index], nn.BatchNorm2d):
            for name in ("weight", "bias", "running_mean", "running_var"):
                params[f"features.{bn_index}.{name}"] = (space, None, 1)
    params.update({"classifier.0.weight": ("fc1", "conv3", spatial), "classifier.0.bias": ("fc1", None, 1),
                   "classifier.2.weight": (None, "fc1", 1), "classifier.2.bias": (None, None, 1)})
    identity = lambda t: t  # noqa: E731
    features = {"conv1": [(f[3], identity)], "conv2": [(f[7], identity)], "conv3": [(f[10], identity)],
                "fc1": [(c[1], identity)]}
    channels = {"conv1": f[0].out_channels, "conv2": f[4].out_channels, "conv3": f[8].out_channels,
                "fc1": c[0].out_features}
    return MergeSpec(blocks, [*spaces, None], [[s] for s in spaces] + [[]], params, features, channels)


def _resnet_spec(net: CifarResNet) -> MergeSpec:
    """One shared space per residual stream (stage): the stem, every block's second conv
    and the downsample path all write into it; each block's inner activation is its own."""
    identity = lambda t: t  # noqa: E731
    params: dict[str, tuple[Optional[str], Optional[str], int]] = {}

    def conv_bn(conv: str, bn: str, out: str, source: Optional[str]):
        params[f"{conv}.weight"] = (out, source, 1)
        for name in ("weight", "bias", "running_mean", "running_var"):
            params[f"{bn}.{name}"] = (out, None, 1)

    conv_bn("conv1", "bn1", "stream1", None)
    features = {"stream1": [(net.relu, identity)]}
    channels = {"stream1": net.conv1.out_channels}
    writes = [["stream1"]]
    previous = "stream1"
    for s in range(1, 5):
        stream, stage = f"stream{s}", getattr(net, f"layer{s}")
        stage_writes = [stream]
        features.setdefault(stream, [])
        for j, block in enumerate(stage):
            mid = f"layer{s}.{j}.mid"
            conv_bn(f"layer{s}.{j}.conv1", f"layer{s}.{j}.bn1", mid, previous if j == 0 else stream)
            conv_bn(f"layer{s}.{j}.conv2", f"layer{s}.{j}.bn2", stream, mid)
            if block.downsample is not None:
                conv_bn(f"layer{s}.{j}.downsample.0", f"layer{s}.{j}.downsample.1", stream, previous)
            features[mid] = [(block.bn1, F.relu)]
            features[stream].append((block, identity))
            channels[mid] = block.conv1.out_channels
            stage_writes.append(mid)
        channels[stream] = stage[0].conv2.out_channels
        writes.append(stage_writes)
        previous = stream
    params.update({"fc.weight": (None, "stream4", 1), "fc.bias": (None, None, 1)})
    blocks = [nn.Sequential(net.conv1, net.bn1, net.relu), net.layer1, net.layer2, net.layer3, net.layer4,
              nn.Sequential(net.avgpool, nn.Flatten(), net.fc)]
    return MergeSpec(blocks, ["stream1", "stream1", "stream2", "stream3", "stream4", None], writes + [[]],
                     params, features, channels)


def merge_spec(net: nn.Module) -> MergeSpec:
    if isinstance(net, LeNet5):
        return _lenet_spec(net)
    if isinstance(net, CifarResNet):
        return _resnet_spec(net)
    raise ConfigError(f"ZipIt supports lenet5, lenet5_bn, lenet5_half(_bn), resnet18, resnet34; "
                      f"not {type(net).__name__}")


def max_depth(net: nn.Module) -> int:
    """Depth of a full zip: every block but the head."""
    return len(merge_spec(net).blocks) - 1



def block_keys(net: nn.Module, spec: MergeSpec) -> list[list[str]]:
    """State-dict keys held by each block."""
    owner = {}
    for name, module in net.named_modules():
        owner[id(module)] = name
    keys = []
    for block in spec.blocks:
        block_keys = []
        for sub_name, sub in block.named_modules():
            name = owner.get(id(sub))
            if name is None:
                continue
            for local in list(sub._parameters) + list(sub._buffers):
                if getattr(sub, local) is not None:
                    full = f"{name}.{local}" if name else local
                    if full not in block_keys:
                        block_keys.append(full)
        keys.append(block_keys)
    return keys



class ZippedClassifier(nn.Module):
    """A merged multi-task classifier: `trunk` = the first `depth` blocks with merged
    weights; `tails[k]` = model k's remaining blocks, fed U^k h (its own features rebuilt
    from the merged ones); heads calibrated and placed at their global class indices.

    Built from metadata alone (`base_arch`, `class_lists`, `depth`), so it saves and loads
    as a safetensors file like any registered classifier (arch 'zipit')."""

    def __init__(self, base_arch: str, class_lists: list[list[int]], depth: int, in_channels: int = 1,
                 num_classes: Optional[int] = None, image_size: int = 32):
        super().__init__()
        if len(class_lists) < 2:
            raise ConfigError("merging needs at least two models")
        self.base_arch, self.class_lists, self.depth = base_arch, [list(c) for c in class_lists], depth
        self._shape = {"in_channels": in_channels, "image_size": image_size}
        self.num_classes = num_classes or (max(max(c) for c in class_lists) + 1)
        make = lambda n: build_model(base_arch, in_channels=in_channels, num_classes=n, image_size=image_size)  # noqa
        probe = make(len(class_lists[0]))
        spec = merge_spec(probe)
        if not 0 <= depth < len(spec.blocks):
            raise ConfigError(f"depth must be 0..{len(spec.blocks) - 1} for {base_arch}, got {depth}")
        self.trunk = nn.Sequential(*spec.blocks[:depth])
        self.tails = nn.ModuleList(nn.Sequential(*merge_spec(make(len(c))).blocks[depth:]) for c in class_lists)
        self.cut_space = spec.block_space[depth - 1] if depth else None
        width = spec.channels[self.cut_space] if depth else 1
        self.register_buffer("unmerge", torch.stack([torch.eye(width)] * len(class_lists)))
        self.register_buffer("head_scale", torch.ones(len(class_lists)))
        self.register_buffer("head_shift", torch.zeros(len(class_lists)))
        index = torch.zeros(len(class_lists), self.num_classes)
        for k, classes in enumerate(class_lists):
            index[k, classes] = 1.0
        self.register_buffer("placement", index, persistent=False)

    def _tail_inputs(self, h: torch.Tensor) -> list[torch.Tensor]:
        if not self.depth:
            return [h] * len(self.tails)
        flat = h.reshape(h.shape[0], self.unmerge.shape[1], -1)  # channel-major, any spatial size
        return [torch.einsum("jc,ncr->njr", u, flat).reshape(h.shape) for u in self.unmerge]

    def head_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Raw logits of every head (its own classes) and every tail's penultimate features."""
        h = self.trunk(x)
        logits, features = [], []
        for tail, hk in zip(self.tails, self._tail_inputs(h)):
            for block in tail[:-1]:
                hk = block(hk)
            features.append(hk.flatten(1))
            logits.append(tail[-1](hk))
        return logits, features

    def forward(self, x: torch.Tensor, return_features: bool = False):
        heads, features = self.head_logits(x)
        total = x.new_zeros(x.shape[0], self.num_classes)
        for k, (logits, classes) in enumerate(zip(heads, self.class_lists)):
            total[:, classes] += logits * self.head_scale[k] + self.head_shift[k]
        total = total / self.placement.sum(0).clamp_min(1)
        return (total, torch.cat(features, 1)) if return_features else total

    @torch.no_grad()
    def single_network(self) -> nn.Module:
        """A full merge (every block but the heads merged) as one network of the base
        architecture whose one head gives every class: the same function in eval mode. Each
        head reads its own features rebuilt from the merged ones (U^k), so its weight becomes
        W_k U^k, then takes its calibration and its place among the classes."""
        net = build_model(self.base_arch, num_classes=self.num_classes, **self._shape)
        spec = merge_spec(net)
        if self.depth != len(spec.blocks) - 1:
            raise ConfigError(f"only a full ZipIt merge (depth {len(spec.blocks) - 1}) is one network; this one has "
                              f"depth {self.depth}")
        for block, merged in zip(spec.blocks, self.trunk):
            block.load_state_dict(merged.state_dict())
        head = [m for m in spec.blocks[-1].modules() if isinstance(m, nn.Linear)][-1]
        count = self.placement.sum(0).clamp_min(1)[:, None]
        head.weight.zero_()
        head.bias.zero_()
        for k, (tail, classes) in enumerate(zip(self.tails, self.class_lists)):
            own = [m for m in tail[-1].modules() if isinstance(m, nn.Linear)][-1]
            head.weight[classes] += own.weight @ self.unmerge[k] * self.head_scale[k] / count[classes]
            head.bias[classes] += (own.bias * self.head_scale[k] + self.head_shift[k]) / count[classes, 0]
        return net.eval()

    def set_unmerge(self, unmerge: torch.Tensor) -> None:
        """U (nC x C) of the cut space, split per model."""
        self.unmerge.copy_(torch.stack(unmerge.chunk(len(self.tails), dim=0)))

    def calibrate_heads(self, batches, steps: int = 200) -> dict[str, float]:
        """Fit each head's logit scale and shift on unlabeled images (no labels): start from
        standardised logits (zero mean, unit variance per head), then maximise the mutual
        information between image and predicted class, H(mean p) - mean H(p): predictions
        confident, classes balanced. That fixes which head wins where (every argmax). The
        information alone would also make every head ever more confident, so one common
        positive factor then brings the heads' spreads back to the geometric mean of the
        teachers' own (same argmaxes, the teachers' temperature): KD targets stay soft. The
        tasks' own decisions are untouched. Returns the information before and after the
        fit (nats)."""
        was = self.training
        self.eval()
        with torch.no_grad():
            heads = [torch.cat(parts) for parts in zip(*(self.head_logits(images)[0] for images in batches))]
        mean = torch.stack([h.mean() for h in heads])
        std = torch.stack([h.std(unbiased=False).clamp_min(1e-6) for h in heads])
        common = std.log().mean().exp()
        log_scale = torch.zeros(len(heads), device=mean.device, requires_grad=True)
        shift = torch.zeros(len(heads), device=mean.device, requires_grad=True)

        def information() -> torch.Tensor:
            scale = log_scale.exp() / std
            total = heads[0].new_zeros(heads[0].shape[0], self.num_classes)
            for k, (h, classes) in enumerate(zip(heads, self.class_lists)):
                total[:, classes] += (h - mean[k]) * scale[k] + shift[k] - shift[0]
            probs = (total / self.placement.sum(0).clamp_min(1)).softmax(1)
            mean_probs = probs.mean(0)
            return -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum() + (
                probs * probs.clamp_min(1e-12).log()).sum(1).mean()

        with torch.no_grad():
            before = float(information())
        optimizer = torch.optim.Adam([log_scale, shift], lr=0.05)
        for _ in range(steps):
            optimizer.zero_grad()
            (-information()).backward()
            optimizer.step()
        with torch.no_grad():
            # One positive factor for all calibrated logits leaves every argmax as fitted and
            # resets the temperature: the heads' spreads get the teachers' geometric mean.
            factor = common / log_scale.mean().exp()
            scale = factor * log_scale.exp() / std
            self.head_scale.copy_(scale)
            self.head_shift.copy_(-mean * scale + factor * (shift - shift[0]))
        self.train(was)
        with torch.no_grad():
            after = float(information())
        return {"information_before": before, "information_after": after}
