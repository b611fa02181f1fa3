"""ZipIt! (Stoica et al., ICLR 2024): merge models of one architecture trained on different
classes into one multi-task model, without training (DESIGN.md section 7).

1. `feature_correlations`: run unlabeled images through every model; at each merge space
   (an activation that feeds weight layers) stack the models' features and correlate them.
2. A matcher turns each correlation matrix into a merge matrix M (C x nC, averaging each
   group of features) and an unmerge matrix U (nC x C, copying a group back to its
   members): `zip_match` (greedy, within or across models), `permutation_match`
   (Hungarian, Git Re-Basin style) or `identity_match` (plain weight averaging).
3. `merge_state`: every weight of a merged layer becomes sum_k M_out^k W_k U_in^k.
4. `ZippedClassifier`: the first `depth` blocks merged (the trunk), the rest of each model
   kept as its own tail, fed U^k h; depth 0 is the ensemble.
5. `reset_batchnorm` recomputes BatchNorm statistics of the merged layers on the images.

Head calibration: heads trained apart have unrelated logit scales. Each head's logits get
a scale and a shift (`calibrate_heads`), fitted on the unlabeled merge images: first
standardised (zero mean, unit variance per head), then tuned to maximise the mutual
information between image and predicted class (confident predictions, balanced classes).
Calibrated logits are placed at their global class indices (overlapping classes averaged)
and one softmax over all classes compares the heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dafl.errors import ConfigError
from dafl.models import CifarResNet, LeNet5, build_model


# ----------------------------------------------------------------------------- merge specs


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


# ----------------------------------------------------------------------------- correlations


@torch.no_grad()
def feature_correlations(models: list[nn.Module], batches, spaces: Optional[list[str]] = None
                         ) -> dict[str, torch.Tensor]:
    """Correlation matrix (nC x nC, float64) of the stacked features of all `models` at every
    merge space, over `batches` of images (conv pixels count as samples). A feature that
    never varies (a dead unit) correlates 0 with live features and 1 with other dead ones:
    on these images they are interchangeable."""
    specs = [merge_spec(m) for m in models]
    spaces = spaces or list(specs[0].channels)
    captured: list[dict[str, list[torch.Tensor]]] = [{s: [] for s in spaces} for _ in models]
    handles = []
    for k, spec in enumerate(specs):
        for space in spaces:
            for module, transform in spec.features[space]:
                def hook(_module, _inputs, output, k=k, space=space, transform=transform):
                    out = transform(output)
                    captured[k][space].append(out.movedim(1, -1).reshape(-1, out.shape[1]) if out.dim() > 2 else out)
                handles.append(module.register_forward_hook(hook))
    sums = {s: None for s in spaces}
    try:
        training = [m.training for m in models]
        for m in models:
            m.eval()
        for images in batches:
            for k, m in enumerate(models):
                m(images)
            for space in spaces:
                x = torch.cat([torch.cat(captured[k][space]) for k in range(len(models))], dim=1).double()
                for k in range(len(models)):
                    captured[k][space].clear()
                acc = sums[space]
                moments = (x.sum(0), x.T @ x, x.shape[0])
                sums[space] = moments if acc is None else (acc[0] + moments[0], acc[1] + moments[1], acc[2] + moments[2])
        for m, was in zip(models, training):
            m.train(was)
    finally:
        for h in handles:
            h.remove()
    correlations = {}
    for space, (total, outer, count) in sums.items():
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        live = std > 1e-8 * max(1.0, float(std.max()))
        corr = torch.zeros_like(cov)
        both_live = live[:, None] & live[None, :]
        corr[both_live] = (cov / torch.outer(std, std).clamp_min(1e-300))[both_live]
        corr[~live[:, None] & ~live[None, :]] = 1.0  # constant on every image: indistinguishable here
        corr.fill_diagonal_(1.0)
        correlations[space] = corr.clamp(-1, 1)
    return correlations


# ----------------------------------------------------------------------------- matchers


def groups_to_matrices(groups: list[list[int]], features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge matrix M (groups x features): each merged feature is the mean of its group;
    unmerge matrix U (features x groups): each original feature copies its group."""
    unmerge = torch.zeros(features, len(groups))
    for g, members in enumerate(groups):
        unmerge[members, g] = 1.0
    merge = (unmerge / unmerge.sum(0, keepdim=True)).T
    return merge, unmerge


def _same_index_bonus(total: int, n_models: int) -> torch.Tensor:
    """1e-6 where two features of different models share an index: dead units tie with
    each other (correlation 1), and this pairs them like weight averaging does instead of
    arbitrarily, without changing any real ordering."""
    index = torch.arange(total) % (total // n_models)
    model = torch.arange(total) // (total // n_models)
    return 1e-6 * ((index[:, None] == index[None, :]) & (model[:, None] != model[None, :])).double()


def zip_match(corr: torch.Tensor, n_models: int, alpha: float = 0.3, beta: float = 0.125,
              target: Optional[int] = None, same_index_tiebreak: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ZipIt! matching (Stoica et al. 2024, the official `match_tensors_zipit` rules)
    of n x C features down to `target` (default C): repeatedly merge the most correlated pair
    of groups, across models or within one.

    - A merged group's similarities are the elementwise minimum of its two members', times
      `alpha`; with `alpha` 0 they are not scaled, but the group may no longer merge with any
      feature of its two members' models.
    - A group carries the model label of its lowest-index member, so a cross-model group
      (A_i, B_j) counts as A's: merging another A feature into it is a within-A merge.
    - Each model starts with a budget of int((removed // n) * beta) within-model merges,
      removed = n x C - target. A within-model merge spends one, and only then, when the
      budget is spent (<= 0), are that model's within merges blocked: a budget of 0 still
      allows one.

    `same_index_tiebreak` adds 1e-6 where features of different models share an index, so
    exact ties (dead units, correlation 1) pair like weight averaging (off in the official
    code)."""
    if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
        raise ConfigError(f"ZipIt alpha and beta must lie in [0, 1], got alpha {alpha}, beta {beta}")
    total = corr.shape[0]
    if total % n_models:
        raise ConfigError(f"{total} features do not split over {n_models} models")
    size = total // n_models
    keep = target or size  # merged features left at the end (one model's width by default)
    sim = corr.detach().to("cpu", torch.float64).clone()
    if same_index_tiebreak:
        sim += _same_index_bonus(total, n_models)
    sim.fill_diagonal_(float("-inf"))
    label = torch.arange(total) // size  # each group's model: that of its lowest-index member
    alive = torch.ones(total, dtype=torch.bool)
    budget = [int((total - keep) // n_models * beta + 1e-4)] * n_models
    groups: dict[int, list[int]] = {i: [i] for i in range(total)}  # row index -> member features
    while len(groups) > keep:
        if sim.max() == float("-inf"):
            raise ConfigError(f"ZipIt cannot reach {keep} features: alpha {alpha} / beta {beta} block every "
                              "remaining merge")
        i, j = divmod(int(sim.argmax()), total)
        i, j = min(i, j), max(i, j)
        label_i, label_j = int(label[i]), int(label[j])
        groups[i] += groups.pop(j)
        row = torch.minimum(sim[i], sim[j])
        if alpha > 0:
            row = row * alpha
        else:  # no scaling: instead the group never meets its members' models again
            row[alive & ((label == label_i) | (label == label_j))] = float("-inf")
        sim[i, :], sim[:, i] = row, row
        sim[i, i] = float("-inf")
        sim[j, :], sim[:, j] = float("-inf"), float("-inf")  # row j is gone
        alive[j] = False
        if label_i == label_j:
            budget[label_i] -= 1
            if budget[label_i] <= 0:
                own = alive & (label == label_i)
                sim[own[:, None] & own[None, :]] = float("-inf")
    groups = [groups[r] for r in sorted(groups)]
    return groups_to_matrices(groups, total)


def permutation_match(corr: torch.Tensor, n_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's features matched one-to-one to model 0's by the Hungarian algorithm on
    their cross-correlation (Git Re-Basin style); matched features are averaged."""
    from scipy.optimize import linear_sum_assignment

    size = corr.shape[0] // n_models
    groups = [[i] for i in range(size)]
    sim = corr.detach().to("cpu", torch.float64) + _same_index_bonus(corr.shape[0], n_models)
    for k in range(1, n_models):
        block = sim[:size, k * size:(k + 1) * size].numpy()
        rows, cols = linear_sum_assignment(block, maximize=True)
        for r, c in zip(rows, cols):
            groups[r].append(k * size + int(c))
    return groups_to_matrices(groups, corr.shape[0])


def identity_match(corr: torch.Tensor, n_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature i of every model merged with feature i of the others: weight averaging."""
    size = corr.shape[0] // n_models
    return groups_to_matrices([[k * size + i for k in range(n_models)] for i in range(size)], corr.shape[0])


MATCHERS = {"zipit": zip_match, "permutation": permutation_match, "average": identity_match}


# ----------------------------------------------------------------------------- merging


def _per_model(matrix: torch.Tensor, n_models: int, axis: int) -> list[torch.Tensor]:
    return list(matrix.chunk(n_models, dim=axis))


def merge_tensor(tensors: list[torch.Tensor], merge: torch.Tensor, unmerge: Optional[torch.Tensor],
                 repeat: int = 1) -> torch.Tensor:
    """sum_k M^k W_k U^k over the models: M^k (C x C_k) acts on axis 0 (the layer's output
    features), U^k (C_k x C) on axis 1 (its inputs; `repeat` inputs per feature for a
    flattened map). Without `unmerge` the input axis is shared (the image, or a vector
    such as a bias or BatchNorm parameter has none)."""
    n = len(tensors)
    merges = _per_model(merge, n, 1)
    unmerges = _per_model(unmerge, n, 0) if unmerge is not None else None
    total = None
    for k, w in enumerate(tensors):
        w = w.double()
        if unmerges is not None:
            u = unmerges[k].double()
            shaped = w.reshape(w.shape[0], u.shape[0], repeat, *w.shape[2:])
            w = torch.einsum("oirhw,ij->ojrhw" if w.dim() == 4 else "oir,ij->ojr",
                             shaped, u).reshape(w.shape[0], u.shape[1] * repeat, *w.shape[2:])
        w = torch.tensordot(merges[k].double(), w, dims=([1], [0]))
        total = w if total is None else total + w
    return total.float()


def merge_state(models: list[nn.Module], matches: dict[str, tuple[torch.Tensor, torch.Tensor]], depth: int
                ) -> dict[str, torch.Tensor]:
    """State dict of the merged trunk (parameters of blocks[:depth], merged with the
    per-space `matches`), keyed as in the base architecture."""
    spec = merge_spec(models[0])
    states = [m.state_dict() for m in models]
    trunk_keys = _block_keys(models[0], spec)[:depth]
    merged = {}
    for keys in trunk_keys:
        for key in keys:
            if key not in spec.params:  # num_batches_tracked and the like: take the first model's
                merged[key] = states[0][key].clone()
                continue
            out_space, in_space, repeat = spec.params[key]
            merge = matches[out_space][0]  # trunk blocks never hold the head, so out_space is set
            unmerge = matches[in_space][1] if in_space is not None else None
            merged[key] = merge_tensor([s[key] for s in states], merge, unmerge, repeat)
    return merged


def _block_keys(net: nn.Module, spec: MergeSpec) -> list[list[str]]:
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
        log_scale = torch.zeros(len(heads), requires_grad=True)
        shift = torch.zeros(len(heads), requires_grad=True)

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


def build_zipped(models: list[nn.Module], class_lists: list[list[int]], base_arch: str, depth: int,
                 method: str = "zipit", correlations: Optional[dict[str, torch.Tensor]] = None,
                 alpha: float = 0.3, beta: float = 0.125, in_channels: int = 1, image_size: int = 32,
                 num_classes: Optional[int] = None, same_index_tiebreak: bool = False) -> ZippedClassifier:
    """Merge `models` (same architecture; model k classifies `class_lists[k]`) with
    `method` ('zipit', 'permutation' or 'average') up to `depth` blocks. BatchNorm
    statistics and head calibration are left to the caller (`reset_batchnorm`,
    `calibrate_heads`), which needs images."""
    if method not in MATCHERS:
        raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(MATCHERS)}")
    if len(models) != len(class_lists):
        raise ConfigError(f"{len(models)} models but {len(class_lists)} class lists")
    zipped = ZippedClassifier(base_arch, class_lists, depth, in_channels, num_classes, image_size)
    spec = merge_spec(models[0])
    merged_spaces = sorted({s for writes in spec.block_writes[:depth] for s in writes})
    if merged_spaces and correlations is None:
        raise ConfigError("merging at depth > 0 needs feature correlations")
    matches = {}
    for space in merged_spaces:
        corr = correlations[space]
        if method == "zipit":
            matches[space] = zip_match(corr, len(models), alpha, beta, same_index_tiebreak=same_index_tiebreak)
        else:
            matches[space] = MATCHERS[method](corr, len(models))
    if depth:
        trunk_state = merge_state(models, matches, depth)
        base = build_model(base_arch, in_channels=in_channels, num_classes=len(class_lists[0]), image_size=image_size)
        base.load_state_dict({**base.state_dict(), **trunk_state})
        zipped.trunk.load_state_dict(nn.Sequential(*merge_spec(base).blocks[:depth]).state_dict())
        zipped.set_unmerge(matches[zipped.cut_space][1])
    for tail, model in zip(zipped.tails, models):
        tail.load_state_dict(nn.Sequential(*merge_spec(model).blocks[depth:]).state_dict())
    return zipped


@torch.no_grad()
def reset_batchnorm(zipped: ZippedClassifier, batches) -> int:
    """Recompute the running statistics of every BatchNorm whose input the merge changed
    (the trunk's, and the tails' when depth > 0) as exact averages over `batches`.
    Returns how many layers were reset."""
    modules = list(zipped.trunk.modules()) + (list(zipped.tails.modules()) if zipped.depth else [])
    layers = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    saved = [(m.momentum, m.training) for m in layers]
    was = zipped.training
    zipped.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    for images in batches:
        zipped(images)
    for m, (momentum, _) in zip(layers, saved):
        m.momentum = momentum
        m.eval()
    zipped.train(was)
    return len(layers)
