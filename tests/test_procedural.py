"""Procedural (dead-leaves) images for the student: pixels, shapes, size control, and how
DataFreeDistillation mixes them into student batches."""
import pytest
import torch

from dafl.errors import ConfigError
from dafl.procedural import ProceduralShapes, dead_leaves
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
                {"procedural_scale": 0.0}):
        with pytest.raises(ConfigError, match="procedural"):
            DataFreeDistillation(teacher=teacher, schedule="alternating", **bad, **FAST)
    with pytest.raises(ConfigError, match="official"):
        DataFreeDistillation(teacher=teacher, schedule="official", procedural_fraction=0.25, **FAST)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(teacher), str(bare), metadata={"arch": "lenet5_bn"})
    with pytest.raises(ConfigError, match="procedural_fraction needs"):
        DataFreeDistillation(teacher=str(bare), schedule="alternating", procedural_fraction=0.25, **FAST)
