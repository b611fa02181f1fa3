"""ZipIt merging: exactness on identical and permuted models, the merge formula on
hand-made matrices, matching rules, partial zip, BatchNorm reset, save/load."""
import pytest
import torch

from dafl.models import build_model
from dafl.errors import ConfigError
from dafl.zipit import (build_zipped, feature_correlations, groups_to_matrices, merge_state, merge_tensor,
                        permutation_match, reset_batchnorm, zip_match, MatchBlocked)
from dafl.zipped import ZippedClassifier, max_depth, merge_spec

# ResNet-18 is merged exactly too, in about two minutes on 2 CPU cores: `make test-slow`.
ARCHS = ["lenet5", "lenet5_bn", pytest.param("resnet18", marks=pytest.mark.slow)]


def _model(arch: str, seed: int, num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    channels = 3 if arch.startswith("resnet") else 1
    net = build_model(arch, in_channels=channels, num_classes=num_classes)
    for bn in net.modules():  # running statistics that are not the identity
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _images(arch: str, seed: int = 1) -> torch.Tensor:
    # Enough samples per feature for a full-rank correlation in every space (ResNet's conv
    # pixels are samples too; its last stage sees 4x4 pixels per image).
    n, channels = (80, 3) if arch.startswith("resnet") else (384, 1)
    return torch.randn(n, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def _permuted_copy(net: torch.nn.Module, arch: str, seed: int) -> tuple[torch.nn.Module, dict]:
    """The same function with every hidden feature space shuffled."""
    generator = torch.Generator().manual_seed(seed)
    spec = merge_spec(net)
    perms = {s: torch.eye(c)[torch.randperm(c, generator=generator)] for s, c in spec.channels.items()}
    state = merge_state([net], {s: (p, p.T) for s, p in perms.items()}, depth=max_depth(net))
    head = {k: v for k, v in net.state_dict().items() if k not in state}
    for key, (out_space, in_space, repeat) in spec.params.items():
        if out_space is None:  # the head: inputs permuted, outputs (classes) not
            head[key] = merge_tensor([net.state_dict()[key]], torch.eye(net.state_dict()[key].shape[0]),
                                     perms[in_space].T if in_space else None, repeat)
    copy = build_model(arch, in_channels=next(net.parameters()).shape[1], num_classes=5)
    copy.load_state_dict({**state, **head})
    return copy.eval(), perms


@pytest.mark.parametrize("arch", ARCHS)
def test_zip_of_a_model_with_itself_is_the_model(arch):
    a = _model(arch, 0)
    x = _images(arch)
    correlations = feature_correlations([a, a], [x])
    expected = a(x)
    for depth in range(max_depth(a) + 1):
        zipped = build_zipped([a, a], [list(range(5))] * 2, arch, depth, "zipit", correlations,
                              in_channels=x.shape[1]).eval()
        heads, _ = zipped.head_logits(x)
        for logits in heads:
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["zipit", "permutation"])
def test_a_permuted_copy_is_matched_back_exactly(arch, method):
    a = _model(arch, 0)
    b, perms = _permuted_copy(a, arch, seed=3)
    x = _images(arch)
    torch.testing.assert_close(b(x), a(x), atol=1e-4, rtol=1e-4)  # the copy computes the same function
    correlations = feature_correlations([a, b], [x])
    for space, perm in perms.items():
        match = zip_match if method == "zipit" else permutation_match
        merge, unmerge = match(correlations[space], 2)
        size = perm.shape[0]
        corr = correlations[space]
        # Dead units (zero on every image) correlate 1 with each other and may pair in any
        # order; every live feature i of A must pair with the feature of B it became.
        dead = {i for i in range(size) if any(corr[i, j] == 1 for j in range(size) if j != i)}
        pairs = {tuple(unmerge[:, g].nonzero().flatten().tolist()) for g in range(size)}
        expected = {(i, size + int(perm[:, i].argmax())) for i in range(size) if i not in dead}
        assert len(dead) < size // 2 and expected <= pairs, space
    zipped = build_zipped([a, b], [list(range(5))] * 2, arch, max_depth(a), method, correlations,
                          in_channels=x.shape[1]).eval()
    for logits in zipped.head_logits(x)[0]:
        torch.testing.assert_close(logits, a(x), atol=1e-4, rtol=1e-4)


def test_weight_averaging_is_not_exact_on_a_permuted_copy():
    """The permutation test above can fail: averaging feature i with feature i is wrong."""
    a = _model("lenet5", 0)
    b, _ = _permuted_copy(a, "lenet5", seed=3)
    x = _images("lenet5")
    zipped = build_zipped([a, b], [list(range(5))] * 2, "lenet5", max_depth(a), "average",
                          feature_correlations([a, b], [x])).eval()
    assert (zipped.head_logits(x)[0][0] - a(x)).abs().max() > 1e-2


def test_merged_weights_follow_the_formula_on_hand_made_matrices():
    w_a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w_b = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    # Groups: {A0, B1} and {A1, B0}, so M averages those pairs and U copies them back.
    merge, unmerge = groups_to_matrices([[0, 3], [1, 2]], 4)
    assert merge.tolist() == [[0.5, 0.0, 0.0, 0.5], [0.0, 0.5, 0.5, 0.0]]
    assert unmerge.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    merged = merge_tensor([w_a, w_b], merge, unmerge)
    # Row 0 = (A row 0 + B row 1) / 2, columns mapped the same way: merged input 0 is
    # A's input 0 and B's input 1.  A: [[1, 2]] -> [1, 2]; B row 1 [7, 8] -> [8, 7].
    # Row 1 = (A row 1 [3, 4] + B row 0 [5, 6] -> [6, 5]) / 2.
    assert merged.tolist() == [[4.5, 4.5], [4.5, 4.5]]
    # Conv weights: the same on channel axes, kernels untouched.
    k_a, k_b = torch.arange(8.0).view(2, 2, 1, 2), 10 + torch.arange(8.0).view(2, 2, 1, 2)
    merged = merge_tensor([k_a, k_b], merge, unmerge)
    expected = sum(m @ k.flatten(2).transpose(0, 2) @ u for m, k, u in
                   zip(merge.chunk(2, 1), (k_a, k_b), unmerge.chunk(2, 0)))  # per kernel tap
    torch.testing.assert_close(merged, expected.transpose(0, 2).reshape(2, 2, 1, 2))
    # A bias (no input axis): M_A b_A + M_B b_B = [(1 + 4) / 2, (2 + 3) / 2].
    assert merge_tensor([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])], merge, None).tolist() == [2.5, 2.5]


def _symmetric(size: int, pairs: dict[tuple[int, int], float]) -> torch.Tensor:
    """A correlation matrix: 1 on the diagonal, the given pairs, 0 elsewhere."""
    corr = torch.eye(size, dtype=torch.float64)
    for (i, j), value in pairs.items():
        corr[i, j] = corr[j, i] = value
    return corr


def _groups(corr, n_models, **kwargs) -> list[list[int]]:
    _, unmerge = zip_match(corr, n_models, **kwargs)
    return sorted(unmerge[:, g].nonzero().flatten().tolist() for g in range(unmerge.shape[1]))


# Each expected grouping below is derived by hand from the official ZipIt rules (the
# derivation is in the comments); the project's matcher before it followed them got each wrong.

def test_a_budget_of_zero_still_allows_one_within_model_merge_per_model():
    # A0 A1 | B0 B1 (C = 2): budget int((2 // 2) * 0) = 0. The official budget is checked
    # after a within-model merge spends it: A0-A1 (0.9) merges, A is then spent; the group
    # sees B0 at min(0.5, 0.2) * 0.3 = 0.06 and B1 at 0.03, below B0-B1 (0.3), B's one
    # within merge. (Forbidding within merges from the start gives A1-B1, A0-B0.)
    corr = _symmetric(4, {(0, 1): 0.9, (0, 2): 0.5, (1, 2): 0.2, (0, 3): 0.1, (1, 3): 0.6, (2, 3): 0.3})
    assert _groups(corr, 2, alpha=0.3, beta=0.0) == [[0, 1], [2, 3]]


def test_the_budget_for_an_odd_width_counts_whole_features_per_model():
    # C = 5: official budget int((5 // 2) * 0.8) = 1 (not int(0.8 * 5 / 2) = 2). A0-A1 (0.95)
    # spends it, so A2-A3 (0.9) is blocked; the cross pairs A2-B2, A3-B3, A4-B4 follow; the
    # fifth merge is among zeros, the first in row-major order: {A0, A1} with B0.
    corr = _symmetric(10, {(0, 1): 0.95, (2, 3): 0.9, (2, 7): 0.8, (3, 8): 0.79, (4, 9): 0.7,
                           (0, 5): 0.6, (1, 6): 0.55})
    assert _groups(corr, 2, alpha=0.3, beta=0.8) == [[0, 1, 5], [2, 7], [3, 8], [4, 9], [6]]


def test_a_mixed_group_counts_as_its_lowest_members_model():
    # C = 4, alpha 1 (a group's similarity is the minimum of its members'), budget
    # int((4 // 2) * 0.5) = 1. A0-B0 (0.95) makes a group labelled A. A1 joins it (0.9): a
    # within-A merge, which spends A's budget. A2 would join next (0.85) but is now blocked;
    # B1 joins instead (0.8, free: B into an A group); then A2-B2 (0.7).
    pairs = {(0, 4): 0.95, (0, 1): 0.9, (1, 4): 0.9, (0, 2): 0.85, (1, 2): 0.85, (2, 4): 0.85,
             (0, 5): 0.8, (1, 5): 0.8, (4, 5): 0.8, (2, 6): 0.7}
    assert _groups(_symmetric(8, pairs), 2, alpha=1.0, beta=0.5) == [[0, 1, 4, 5], [2, 6], [3], [7]]


def test_alpha_zero_stops_a_group_from_meeting_its_members_models_again():
    # A0-B0 (0.9) merge; with alpha 0 the group may not merge with A or B features any more,
    # so A0-A1 (0.8) and B0-B1 (0.7) through it are gone and A1-B1 (0.5) follows.
    corr = _symmetric(4, {(0, 2): 0.9, (0, 1): 0.8, (2, 3): 0.7, (1, 3): 0.5})
    assert _groups(corr, 2, alpha=0.0, beta=0.0) == [[0, 2], [1, 3]]


def test_three_models_can_block_every_merge_before_the_width_and_say_so():
    # A0 A1 | B0 B1 | C0 C1. With alpha 0, A0-B0 (0.9), A1-C0 (0.8) and B1-C1 (0.7) merge; each
    # group may then meet no feature of its members' models, and every pair of the three groups
    # shares a model: three groups are left, one more than the width 2.
    corr = _symmetric(6, {(0, 2): 0.9, (1, 4): 0.8, (3, 5): 0.7})
    with pytest.raises(MatchBlocked, match="cannot reach 2 features"):
        zip_match(corr, 3, alpha=0.0, beta=0.0)


def test_same_index_tiebreak_is_an_option_for_exact_ties():
    dead = torch.ones(4, 4, dtype=torch.float64)  # dead units: every correlation 1
    assert _groups(dead, 2) == [[0, 1], [2, 3]]  # the official first-index order: A0-A1, then B0-B1
    assert _groups(dead, 2, same_index_tiebreak=True) == [[0, 2], [1, 3]]  # like weight averaging


@pytest.mark.parametrize("alpha,beta", [(-0.1, 0.1), (1.5, 0.1), (0.3, -1.0), (0.3, 2.0)])
def test_alpha_and_beta_outside_the_unit_interval_are_refused(alpha, beta):
    with pytest.raises(ConfigError, match="alpha and beta"):
        zip_match(torch.eye(4), 2, alpha=alpha, beta=beta)


def test_zip_match_works_on_float64_inputs_on_any_device():
    corr = _symmetric(4, {(0, 2): 0.9, (1, 3): 0.5}).to(torch.float32)
    merge, unmerge = zip_match(corr, 2)
    assert merge.device.type == "cpu" and unmerge.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]


def test_partial_zip_at_depth_zero_is_the_calibrated_ensemble():
    a, b = _model("lenet5_bn", 0), _model("lenet5_bn", 1)
    x = _images("lenet5_bn")
    zipped = build_zipped([a, b], [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "lenet5_bn", 0).eval()
    zipped.calibrate_heads([x])
    scale, shift = zipped.head_scale, zipped.head_shift
    expected = torch.cat([a(x) * scale[0] + shift[0], b(x) * scale[1] + shift[1]], dim=1)
    torch.testing.assert_close(zipped(x), expected, atol=1e-4, rtol=1e-4)


def test_head_calibration_balances_heads_of_unrelated_scales():
    a, b = _model("lenet5", 0), _model("lenet5", 1)
    with torch.no_grad():
        b.classifier[2].weight.mul_(30.0)  # head B shouts: raw logits would always pick its classes
        b.classifier[2].bias.mul_(30.0)
    x = _images("lenet5")
    zipped = build_zipped([a, b], [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "lenet5", 0).eval()
    raw_share_a = (zipped(x).argmax(1) < 5).float().mean()
    info = zipped.calibrate_heads(x.split(128))
    predicted = zipped(x).argmax(1)
    share_a = (predicted < 5).float().mean()
    assert raw_share_a < 0.1 and 0.2 < share_a < 0.8
    assert info["information_after"] > info["information_before"]
    # Within each task the decision is the original teacher's: calibration only places heads.
    torch.testing.assert_close(zipped(x)[:, :5].argmax(1), a(x).argmax(1))
    torch.testing.assert_close(zipped(x)[:, 5:].argmax(1), b(x).argmax(1))
    # The overall temperature stays the teachers' (geometric mean of the heads' logit spreads),
    # so KD targets keep their soft information: only the relative scale is fitted.
    with torch.no_grad():
        spreads = torch.stack([h.std(unbiased=False) for h in zipped.head_logits(x)[0]])
    torch.testing.assert_close((zipped.head_scale * spreads).log().mean(), spreads.log().mean(), rtol=1e-4, atol=1e-4)


def test_batchnorm_reset_uses_the_merge_images():
    a, b = _model("lenet5_bn", 0), _model("lenet5_bn", 1)
    x = _images("lenet5_bn")
    zipped = build_zipped([a, b], [list(range(5)), list(range(5, 10))], "lenet5_bn", 2, "zipit",
                          feature_correlations([a, b], [x])).eval()
    assert reset_batchnorm(zipped, x.split(128)) > 0
    first_bn = zipped.trunk[0][1]
    pre_bn = zipped.trunk[0][0](x)
    torch.testing.assert_close(first_bn.running_mean, pre_bn.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first_bn.running_var, pre_bn.var(dim=(0, 2, 3)), atol=1e-3, rtol=1e-3)
    assert not zipped.training and not first_bn.training


def test_three_models_zip_back_to_one():
    # alpha < 1 makes a merged pair reluctant to take a third member (ZipIt's rule), so a
    # third copy could end up elsewhere; with alpha = 1 and no within-model merges every
    # feature's three copies, correlated exactly 1, must form one group.
    a = _model("lenet5", 0)
    x = _images("lenet5")
    zipped = build_zipped([a, a, a], [list(range(5))] * 3, "lenet5", max_depth(a), "zipit",
                          feature_correlations([a, a, a], [x]), alpha=1.0, beta=0.0).eval()
    for logits in zipped.head_logits(x)[0]:
        torch.testing.assert_close(logits, a(x), atol=1e-4, rtol=1e-4)


def test_zipped_model_round_trips_through_safetensors(tmp_path):
    from dafl.weights import load_classifier, save_classifier

    a, b = _model("lenet5_bn", 0), _model("lenet5_bn", 1)
    x = _images("lenet5_bn")
    zipped = build_zipped([a, b], [list(range(5)), list(range(5, 10))], "lenet5_bn", 3, "zipit",
                          feature_correlations([a, b], [x])).eval()
    zipped.calibrate_heads([x])
    meta = {"arch": "zipit", "base_arch": "lenet5_bn", "class_lists": zipped.class_lists, "depth": 3,
            "num_classes": 10, "in_channels": 1, "image_size": 32}
    save_classifier(tmp_path / "merged.safetensors", zipped, meta)
    loaded, loaded_meta = load_classifier(tmp_path / "merged.safetensors")
    assert isinstance(loaded, ZippedClassifier) and loaded_meta["num_classes"] == 10
    torch.testing.assert_close(loaded.eval()(x), zipped(x))
    logits, features = loaded(x, return_features=True)
    assert logits.shape == (len(x), 10) and features.shape[0] == len(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_full_merge_is_one_network_with_the_same_function(arch):
    a, b, c = _model(arch, 0, 4), _model(arch, 1, 3), _model(arch, 2, 3)
    x = _images(arch)
    zipped = build_zipped([a, b, c], [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]], arch, max_depth(a), "zipit",
                          feature_correlations([a, b, c], [x]), alpha=0.3, beta=1.0, in_channels=x.shape[1]).eval()
    zipped.calibrate_heads([x], steps=5)  # heads of unequal scale and shift, as a real merge has
    single = zipped.single_network()
    assert type(single) is type(a) and not isinstance(single, ZippedClassifier)
    torch.testing.assert_close(single(x), zipped(x), atol=1e-4, rtol=1e-4)


def test_only_a_full_merge_is_one_network():
    a, b = _model("lenet5_bn", 0), _model("lenet5_bn", 1)
    zipped = build_zipped([a, b], [list(range(5)), list(range(5, 10))], "lenet5_bn", 0, "zipit",
                          feature_correlations([a, b], [_images("lenet5_bn")]))
    with pytest.raises(ConfigError, match="only a full ZipIt merge"):
        zipped.single_network()
