"""ZipIt! (Stoica et al., ICLR 2024): merge models of one architecture trained on different
classes into one multi-task model, without training. The structure merged along
(`merge_spec`) and the merged network (`ZippedClassifier`) are in `dafl.zipped`.

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

from typing import Optional

import torch
from torch import nn

from dafl.errors import ConfigError
from dafl.models import build_model
from dafl.zipped import ZippedClassifier, block_keys, merge_spec


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


class MatchBlocked(ConfigError):
    """ZipIt's alpha/beta rules block every remaining merge before the target width (as in the
    official code: a group inherits its members' blocked pairs, so with three or more models
    a small beta can leave only groups that may not meet)."""


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
            raise MatchBlocked(f"ZipIt cannot reach {keep} features: alpha {alpha} / beta {beta} block every "
                               "remaining merge (a larger beta allows more merges within a model)")
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
    trunk_keys = block_keys(models[0], spec)[:depth]
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
