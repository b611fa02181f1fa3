"""Procedural (dead-leaves) images and their inversion through a teacher (`dafl.procedural`);
the pool built from them is tested with the image sources (test_sources.py)."""
import pytest
import torch

from dafl.contract import InputAdapter, InputContract
from dafl.losses import BatchNormStatistics
from dafl.procedural import (ProceduralShapes, class_cycle, dead_leaves, invert_toward_classes, mirror_left_half,
                             mirror_symmetric)
from dafl.weights import load_classifier

def test_dead_leaves_pixels_in_range_with_black_background_and_distinct_images():
    torch.manual_seed(0)
    images = dead_leaves(64, 28, shapes=3, scale=1.0)
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    background = (images == 0).float().mean()
    assert 0.05 < background < 0.95  # shapes on a black background, neither empty nor full
    assert len({tuple(x.flatten().tolist()) for x in images}) == 64


def test_dead_leaves_are_reproducible_under_a_seed():
    torch.manual_seed(3)
    first = dead_leaves(8, 16, channels=3)
    torch.manual_seed(3)
    assert torch.equal(first, dead_leaves(8, 16, channels=3))


def test_dead_leaves_scale_sets_the_shapes_size():
    torch.manual_seed(0)
    small = (dead_leaves(256, 28, shapes=1, scale=0.5) > 0).float().mean()
    large = (dead_leaves(256, 28, shapes=1, scale=2.0) > 0).float().mean()
    assert large > 2 * small


def test_one_shape_has_one_colour():
    """The blur mixes a shape only with the black background, so every lit pixel of a
    one-shape colour image is a multiple of that shape's colour."""
    torch.manual_seed(0)
    images = dead_leaves(16, 20, channels=3, shapes=1)
    for image in images:
        lit = image.flatten(1)[:, image.flatten(1).sum(0) > 0]  # 3 x lit pixels
        direction = torch.nn.functional.normalize(lit, dim=0)
        torch.testing.assert_close(direction, direction[:, :1].expand_as(direction))


def test_procedural_shapes_are_padded_and_normalised_like_real_inputs():
    mean, std = [0.286], [0.353]
    images = ProceduralShapes(InputAdapter(28, 32, mean, std))(16)
    black = (0 - mean[0]) / std[0]
    assert images.shape == (16, 1, 32, 32)
    border = torch.cat([images[..., :2, :].flatten(), images[..., -2:, :].flatten(),
                        images[..., :, :2].flatten(), images[..., :, -2:].flatten()])
    torch.testing.assert_close(border, torch.full_like(border, black))
    assert images.min() >= black - 1e-6 and images.max() <= (1 - mean[0]) / std[0] + 1e-6


@pytest.mark.parametrize("use_bn_stats", [False, True])


def test_inversion_moves_shapes_toward_their_assigned_classes(digits_teacher, use_bn_stats):
    teacher, meta = load_classifier(str(digits_teacher[0]))
    teacher.eval().requires_grad_(False)
    shapes = ProceduralShapes(InputContract.from_metadata(meta).adapter())
    torch.manual_seed(0)
    pixels = shapes.pixels(40)
    targets = torch.arange(40) % 10
    bn_stats = BatchNormStatistics(teacher) if use_bn_stats else None
    inverted = invert_toward_classes(pixels, teacher, shapes.adapter, 10, steps=30, lr=0.05, bn_stats=bn_stats)
    before = torch.nn.functional.cross_entropy(teacher(shapes.adapter(pixels)), targets)
    after = torch.nn.functional.cross_entropy(teacher(inverted), targets)
    assert after < 0.5 * before
    assert (teacher(inverted).argmax(1) == targets).float().mean() > 0.8
    assert inverted.shape == shapes.adapter(pixels).shape  # padded and normalised like real inputs
    black, white = shapes.adapter(torch.zeros(1, 1, 8, 8)).min(), shapes.adapter(torch.ones(1, 1, 8, 8)).max()
    assert inverted.min() >= black - 1e-5 and inverted.max() <= white + 1e-5  # pixels stay in [0, 1]
    assert not pixels.requires_grad and not any(p.requires_grad for p in teacher.parameters())
    if bn_stats is not None:
        assert bn_stats.pop() == []  # nothing left recorded once inversion is done


def test_class_cycle_deals_each_class_as_often_as_its_weight():
    assert class_cycle(4).tolist() == [0, 1, 2, 3]
    assert class_cycle(4, [1, 1, 1, 1]).tolist() == [0, 1, 2, 3]
    # every class once, then the classes of weight >= 2, then those of weight >= 3
    assert class_cycle(4, [2, 1, 3, 1]).tolist() == [0, 1, 2, 3, 0, 2, 2]
    counts = torch.bincount(class_cycle(10, [2, 1, 2, 1, 2, 1, 2, 1, 1, 1]), minlength=10)
    assert counts.tolist() == [2, 1, 2, 1, 2, 1, 2, 1, 1, 1]
    for bad in ([], [1, 1, 1], [1, 0, 1, 1], [1, 1.5, 1, 1], [1, -2, 1, 1]):
        with pytest.raises(ValueError, match="class_weights must be 4 whole numbers"):
            class_cycle(4, bad)


def test_inversion_with_class_weights_makes_the_weighted_class_that_much_more_common(digits_teacher):
    teacher, meta = load_classifier(str(digits_teacher[0]))
    teacher.eval().requires_grad_(False)
    shapes = ProceduralShapes(InputContract.from_metadata(meta).adapter())
    torch.manual_seed(0)
    weights = [4] + [1] * 9  # class 0 four times as often: 4 of every 13 images
    inverted = invert_toward_classes(shapes.pixels(52), teacher, shapes.adapter, 10, steps=30, lr=0.05,
                                     class_weights=weights)
    predicted = teacher(inverted).argmax(1)
    dealt = class_cycle(10, weights)[torch.arange(52) % 13]
    assert (predicted == dealt).float().mean() > 0.8  # each image moved toward the class it was dealt
    assert (predicted == 0).sum() >= 13  # 16 dealt to class 0; a balanced deal would give it 6


@pytest.mark.parametrize("width", [6, 7])


def test_mirror_helpers_make_only_the_marked_images_symmetric(width):
    torch.manual_seed(0)
    pixels = torch.rand(4, 1, 5, width)
    marked = torch.tensor([True, False, True, False])
    mirrored = mirror_left_half(pixels, marked)
    assert torch.equal(mirrored[marked], mirrored[marked].flip(-1))
    assert torch.equal(mirrored[~marked], pixels[~marked])
    assert torch.equal(mirrored[..., :width // 2 + width % 2], pixels[..., :width // 2 + width % 2])  # left half (and middle) kept
    averaged = mirror_symmetric(pixels, marked)
    assert torch.equal(averaged[marked], averaged[marked].flip(-1))
    assert torch.equal(averaged[~marked], pixels[~marked])
    assert torch.allclose(averaged[marked].sum((-1, -2)), pixels[marked].sum((-1, -2)))  # an average, not a crop
    nothing = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(mirror_left_half(pixels, nothing), pixels) and mirror_symmetric(pixels, nothing) is pixels


def test_inversion_keeps_the_symmetric_classes_images_symmetric(digits_teacher):
    teacher, meta = load_classifier(str(digits_teacher[0]))
    teacher.eval().requires_grad_(False)
    shapes = ProceduralShapes(InputContract.from_metadata(meta).adapter())
    torch.manual_seed(0)
    inverted = invert_toward_classes(shapes.pixels(40), teacher, shapes.adapter, 10, steps=30, lr=0.05,
                                     symmetric_classes=[0, 8])
    dealt = torch.arange(40) % 10
    # the digits' 8 px are resized to the teacher's 32 (bilinear), symmetric up to rounding
    symmetric = torch.tensor([torch.allclose(x, x.flip(-1), atol=1e-5) for x in inverted])
    assert symmetric.tolist() == [int(c) in (0, 8) for c in dealt]  # those dealt to 0 and 8; no other
    assert (teacher(inverted).argmax(1) == dealt).float().mean() > 0.8  # and still moved toward their classes
