import pytest
import torch

from dafl.errors import ConfigError
from dafl.models import build_model, classifier_names, count_flops, count_parameters


def _shape(name):
    return (3, 32) if name.startswith("resnet") else (1, 32)


@pytest.mark.parametrize("name", classifier_names())
def test_classifier_forward_backward_features(name):
    channels, size = _shape(name)
    model = build_model(name, in_channels=channels, num_classes=7, image_size=size)
    x = torch.randn(4, channels, size, size, requires_grad=True)
    logits, features = model(x, return_features=True)
    assert logits.shape == (4, 7)
    assert features.shape == (4, model.feature_dim)
    assert torch.equal(logits, model(x))
    (logits.sum() + features.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", classifier_names())
def test_classifier_in_channels_and_classes_are_parameters(name):
    model = build_model(name, in_channels=3, num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_paper_parameter_counts():
    # DAFL paper: LeNet-5 about 62K parameters, LeNet-5-half about 16K.
    assert count_parameters(build_model("lenet5")) == 61706
    assert count_parameters(build_model("lenet5_half")) == 15738
    assert count_parameters(build_model("lenet5_bn")) > 61706
    assert 11_000_000 < count_parameters(build_model("resnet18")) < 11_300_000
    assert 21_000_000 < count_parameters(build_model("resnet34")) < 21_400_000
    # He et al. (2016), table 6: the CIFAR ResNet-20 has 0.27M parameters
    assert 265_000 < count_parameters(build_model("resnet20", in_channels=3)) < 275_000
    assert count_parameters(build_model("resnet8")) < count_parameters(build_model("resnet20")) / 3


def test_lenet5_flops_counted_by_library():
    # ~416K multiply-adds for LeNet-5 on 32x32 (the paper's ~436K includes pooling/activations).
    flops = count_flops(build_model("lenet5"), (1, 32, 32))
    assert 800_000 < flops < 900_000


@pytest.mark.parametrize("width,channels,size", [(128, 1, 32), (32, 3, 32), (16, 1, 28)])
def test_generator_shapes_and_range(width, channels, size):
    gen = build_model("generator", latent_dim=20, image_size=size, channels=channels, width=width)
    images = gen(torch.randn(16, 20))
    assert images.shape == (16, channels, size, size)
    assert torch.isfinite(images).all()
    # Final non-affine BatchNorm: each channel is standardised over the batch.
    assert images.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (images.var(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    images.sum().backward()


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown architecture 'lenet6'"):
        build_model("lenet6")


def test_generator_rejects_bad_image_size():
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_model("generator", image_size=30)


@pytest.mark.parametrize("native,size,channels", [(28, 32, 1), (32, 32, 3), (8, 32, 1)])
def test_native_generator_draws_pixels_like_real_inputs(native, size, channels):
    """Pixels in [0, 1] at the native size, then the real-input adapter: a 28 -> 32 border is
    exactly the normalised black of real padded images."""
    from dafl.contract import InputAdapter

    mean, std = [0.3] * channels, [0.4] * channels
    gen = build_model("generator_native", latent_dim=20, image_size=size, channels=channels, width=16,
                      native_size=native, mean=mean, std=std)
    z = torch.randn(8, 20)
    pixels = gen.pixels(z)
    assert pixels.shape == (8, channels, native, native)
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    images = gen(z)
    assert images.shape == (8, channels, size, size) and torch.isfinite(images).all()
    torch.testing.assert_close(images, InputAdapter(native, size, mean, std)(pixels))
    if native == 28:
        assert torch.allclose(images[..., :2, :], torch.tensor(-0.3 / 0.4))
    images.sum().backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_native_generator_rejects_native_sizes_it_cannot_draw():
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_model("generator_native", native_size=30, image_size=32)
