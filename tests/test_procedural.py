"""Procedural (dead-leaves) images for the student: pixels, shapes, size control, and how
DataFreeDistillation mixes them into student batches."""
import pytest
import torch

from dafl.errors import ConfigError
from dafl.losses import BatchNormStatistics
from dafl.procedural import (ProceduralShapes, class_cycle, dead_leaves, invert_toward_classes, mirror_left_half,
                             mirror_symmetric)
from dafl.weights import load_classifier
from lightning_modules.data_free import DataFreeDistillation

FAST = dict(latent_dim=16, generator_width=16, batch_size=32, val_size=64)


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
    images = ProceduralShapes(28, 32, mean, std)(16)
    black = (0 - mean[0]) / std[0]
    assert images.shape == (16, 1, 32, 32)
    border = torch.cat([images[..., :2, :].flatten(), images[..., -2:, :].flatten(),
                        images[..., :, :2].flatten(), images[..., :, -2:].flatten()])
    torch.testing.assert_close(border, torch.full_like(border, black))
    assert images.min() >= black - 1e-6 and images.max() <= (1 - mean[0]) / std[0] + 1e-6


def test_student_batch_ends_with_the_procedural_share(digits_teacher):
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="alternating", synthetic="gaussian",
                                 procedural_fraction=0.25, **FAST)
    batch = model._student_batch(32)
    black = model.procedural.adapter(torch.zeros(1, 1, 8, 8))[0, 0, 0, 0]  # digits: 8x8 pixels
    has_black = (batch == black).flatten(1).any(1)
    assert has_black.tolist() == [False] * 24 + [True] * 8  # Gaussian noise first, then 8 shape images


def test_procedural_settings_are_checked(digits_teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    teacher = str(digits_teacher[0])
    for bad in ({"procedural_fraction": 1.0}, {"procedural_fraction": -0.1}, {"procedural_shapes": 0},
                {"procedural_scale": 0.0}, {"procedural_pool_size": 0}, {"procedural_inversion_batch": 0},
                {"procedural_inversion_steps": -1}, {"procedural_inversion_steps": 5}):
        with pytest.raises(ConfigError, match="procedural"):
            DataFreeDistillation(teacher=teacher, schedule="alternating", **bad, **FAST)
    with pytest.raises(ConfigError, match="official"):
        DataFreeDistillation(teacher=teacher, schedule="official", procedural_fraction=0.25, **FAST)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(teacher), str(bare), metadata={"arch": "lenet5_bn"})
    with pytest.raises(ConfigError, match="procedural_fraction needs"):
        DataFreeDistillation(teacher=str(bare), schedule="alternating", procedural_fraction=0.25, **FAST)


@pytest.mark.parametrize("use_bn_stats", [False, True])
def test_inversion_moves_shapes_toward_their_assigned_classes(digits_teacher, use_bn_stats):
    teacher, meta = load_classifier(str(digits_teacher[0]))
    teacher.eval().requires_grad_(False)
    shapes = ProceduralShapes(meta["native_size"], meta["image_size"], meta["mean"], meta["std"])
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


def test_inverted_pool_is_built_at_fit_start_and_feeds_the_procedural_share(digits_teacher):
    torch.manual_seed(0)
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="alternating", synthetic="gaussian",
                                 procedural_fraction=0.25, procedural_inversion_steps=3, procedural_pool_size=50,
                                 **FAST)
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) for m in model.teacher.modules())
    model.on_train_epoch_start()
    pool = model.procedural_pool
    assert pool.shape == (50, *model._image_shape())
    assert sum(len(m._forward_hooks) for m in model.teacher.modules()) == hooks_before  # inversion hooks removed
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k  # the teacher (and its BatchNorm statistics) untouched
    batch = model._student_batch(32)
    for image in batch[24:]:
        assert (pool == image).flatten(1).all(1).any()  # each procedural image is one of the pool's
    assert not any((pool == image).flatten(1).all(1).any() for image in batch[:24])
    model.on_train_epoch_start()
    assert model.procedural_pool is pool  # built once


def test_synthetic_inverted_draws_every_student_image_from_the_pool_and_validates_on_held_out_shapes(digits_teacher):
    torch.manual_seed(0)
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="alternating", synthetic="inverted",
                                 procedural_inversion_steps=3, procedural_pool_size=40, **FAST)
    model.on_train_epoch_start()
    pool, held_out = model.procedural_pool, model.validation_pool
    assert pool.shape == (40, *model._image_shape()) and held_out.shape == (64, *model._image_shape())
    batch = model._student_batch(32)
    assert all((pool == image).flatten(1).all(1).any() for image in batch)  # nothing but pool images
    assert not any((pool == image).flatten(1).all(1).any() for image in held_out)  # validation images held out
    # the held-out pool is the same whatever the global random state (label-free signal comparable across runs)
    torch.manual_seed(123)
    again = model._invert_shapes(64, seed=1234)
    torch.testing.assert_close(again, held_out)
    assert torch.equal(model.preview_images(8), held_out[:8])


def test_pool_is_inverted_in_batches_of_procedural_inversion_batch(digits_teacher, monkeypatch):
    # each call is one BatchNorm-statistics batch: the setting decides which images share statistics
    import lightning_modules.data_free as data_free
    sizes = []

    def recording(pixels, *args, **kwargs):
        sizes.append(len(pixels))
        return invert_toward_classes(pixels, *args, **kwargs)

    monkeypatch.setattr(data_free, "invert_toward_classes", recording)
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="alternating", synthetic="inverted",
                                 procedural_inversion_steps=1, procedural_pool_size=50,
                                 procedural_inversion_batch=16, **FAST)
    pool = model._invert_shapes(50)
    assert sizes == [16, 16, 16, 2] and len(pool) == 50


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
    shapes = ProceduralShapes(meta["native_size"], meta["image_size"], meta["mean"], meta["std"])
    torch.manual_seed(0)
    weights = [4] + [1] * 9  # class 0 four times as often: 4 of every 13 images
    inverted = invert_toward_classes(shapes.pixels(52), teacher, shapes.adapter, 10, steps=30, lr=0.05,
                                     class_weights=weights)
    predicted = teacher(inverted).argmax(1)
    dealt = class_cycle(10, weights)[torch.arange(52) % 13]
    assert (predicted == dealt).float().mean() > 0.8  # each image moved toward the class it was dealt
    assert (predicted == 0).sum() >= 13  # 16 dealt to class 0; a balanced deal would give it 6


def test_procedural_class_weights_shape_the_training_pool_only(digits_teacher, monkeypatch):
    import lightning_modules.data_free as data_free
    dealt = []

    def recording(pixels, *args, class_weights=None, **kwargs):
        dealt.append(class_weights)
        return invert_toward_classes(pixels, *args, class_weights=class_weights, **kwargs)

    monkeypatch.setattr(data_free, "invert_toward_classes", recording)
    weights = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1]
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="alternating", synthetic="inverted",
                                 procedural_inversion_steps=1, procedural_pool_size=40,
                                 procedural_class_weights=weights, **FAST)
    model.on_train_epoch_start()
    # the training pool is dealt by the weights; the held-out validation pool stays balanced
    assert dealt == [weights, None]


def test_procedural_class_weights_are_checked(digits_teacher):
    teacher = str(digits_teacher[0])
    for bad in ([1] * 9, [1] * 9 + [0], [1] * 9 + [2.5]):
        with pytest.raises(ConfigError, match="procedural_class_weights: class_weights must be 10 whole numbers"):
            DataFreeDistillation(teacher=teacher, schedule="alternating", synthetic="inverted",
                                 procedural_inversion_steps=3, procedural_class_weights=bad, **FAST)
    with pytest.raises(ConfigError, match="procedural_class_weights weights the inverted pool"):
        DataFreeDistillation(teacher=teacher, schedule="alternating", procedural_class_weights=[1] * 10, **FAST)


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
    shapes = ProceduralShapes(meta["native_size"], meta["image_size"], meta["mean"], meta["std"])
    torch.manual_seed(0)
    inverted = invert_toward_classes(shapes.pixels(40), teacher, shapes.adapter, 10, steps=30, lr=0.05,
                                     symmetric_classes=[0, 8])
    dealt = torch.arange(40) % 10
    # the digits' 8 px are resized to the teacher's 32 (bilinear), symmetric up to rounding
    symmetric = torch.tensor([torch.allclose(x, x.flip(-1), atol=1e-5) for x in inverted])
    assert symmetric.tolist() == [int(c) in (0, 8) for c in dealt]  # those dealt to 0 and 8; no other
    assert (teacher(inverted).argmax(1) == dealt).float().mean() > 0.8  # and still moved toward their classes


def test_procedural_symmetric_classes_shape_the_training_pool_only(digits_teacher, monkeypatch):
    import lightning_modules.data_free as data_free
    asked = []

    def recording(pixels, *args, symmetric_classes=None, **kwargs):
        asked.append(symmetric_classes)
        return invert_toward_classes(pixels, *args, symmetric_classes=symmetric_classes, **kwargs)

    monkeypatch.setattr(data_free, "invert_toward_classes", recording)
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="alternating", synthetic="inverted",
                                 procedural_inversion_steps=1, procedural_pool_size=40,
                                 procedural_symmetric_classes=[0, 8], **FAST)
    model.on_train_epoch_start()
    assert asked == [[0, 8], None]  # the held-out validation pool stays as it is
    pool = model.procedural_pool
    assert all(torch.allclose(pool[i], pool[i].flip(-1), atol=1e-5) for i in range(0, 40, 10))  # dealt to class 0


def test_procedural_symmetric_classes_are_checked(digits_teacher):
    teacher = str(digits_teacher[0])
    for bad in ([10], [-1], [0, 0], [1.5]):
        with pytest.raises(ConfigError, match="procedural_symmetric_classes must be distinct class indices in"):
            DataFreeDistillation(teacher=teacher, schedule="alternating", synthetic="inverted",
                                 procedural_inversion_steps=3, procedural_symmetric_classes=bad, **FAST)
    with pytest.raises(ConfigError, match="procedural_symmetric_classes shapes the inverted pool"):
        DataFreeDistillation(teacher=teacher, schedule="alternating", procedural_symmetric_classes=[0], **FAST)


@pytest.mark.parametrize("synthetic,fraction", [("inverted", 0.0), ("gaussian", 0.25)])
def test_pool_is_built_on_first_use_when_the_epoch_start_hook_was_skipped(digits_teacher, synthetic, fraction):
    # A run resumed from a mid-epoch checkpoint gets no `on_train_epoch_start` from Lightning:
    # the student's first batch must still come from an inverted pool (not plain shapes, no error).
    torch.manual_seed(0)
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="alternating", synthetic=synthetic,
                                 procedural_fraction=fraction, procedural_inversion_steps=3, procedural_pool_size=40,
                                 **FAST)
    assert model.procedural_pool is None
    batch = model._student_batch(32)
    pool = model.procedural_pool
    assert pool is not None and pool.shape == (40, *model._image_shape())
    from_pool = batch[32 - round(32 * fraction):] if fraction else batch
    assert all((pool == image).flatten(1).all(1).any() for image in from_pool)
    model._student_batch(8)
    assert model.procedural_pool is pool  # built once


def test_synthetic_inverted_settings_are_checked(digits_teacher):
    teacher = str(digits_teacher[0])
    for bad in ({"procedural_inversion_steps": 0}, {"procedural_inversion_steps": 3, "procedural_fraction": 0.25}):
        with pytest.raises(ConfigError, match="synthetic 'inverted'"):
            DataFreeDistillation(teacher=teacher, schedule="alternating", synthetic="inverted", **bad, **FAST)
    with pytest.raises(ConfigError, match="trains no generator"):
        DataFreeDistillation(teacher=teacher, schedule="official", synthetic="inverted", procedural_inversion_steps=3,
                             **FAST)
