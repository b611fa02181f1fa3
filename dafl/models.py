"""Model registry: classifiers (teachers and students) and the DAFL generator, by name.

Every classifier takes `(in_channels, num_classes, image_size)` and its forward accepts
`return_features=True` to also return the penultimate features the DAFL activation loss
needs (LeNet-5: the flattened conv3 output; the ResNets: the pooled vector).
"""
from __future__ import annotations

import importlib
import inspect
import json
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from dafl.cpu_kernels import MaxPool2x2, SingleChannelConv2d
from dafl.errors import ConfigError
from dafl.resnets import CifarResNet, ThinResNet

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn

    return wrap


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def classifier_names() -> list[str]:
    return sorted(n for n in MODELS if not n.startswith("generator"))


class LeNet5(nn.Module):
    """LeNet-5 as in the DAFL paper: 5x5 convs 6/16/120, fc 84, ReLU, max-pooling.

    `width` scales every hidden layer (0.5 gives the paper's LeNet-5-half: 3/8/60/42).
    `batch_norm` adds BatchNorm after each conv (lenet5_bn), which gives the generator
    running statistics to match (DeepInversion-style loss).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32,
                 width: float = 1.0, batch_norm: bool = False):
        super().__init__()
        c1, c2, c3, f1 = (max(1, round(c * width)) for c in (6, 16, 120, 84))
        if image_size < 20:
            raise ConfigError(f"LeNet-5 needs images of at least 20x20 pixels, got {image_size}")
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            SingleChannelConv2d(in_channels, c1, 5), norm(c1), nn.ReLU(), MaxPool2x2(),
            nn.Conv2d(c1, c2, 5), norm(c2), nn.ReLU(), MaxPool2x2(),
            nn.Conv2d(c2, c3, 5), norm(c3), nn.ReLU(),
        )
        spatial = ((image_size - 4) // 2 - 4) // 2 - 4  # 1 for the paper's 32x32 input
        self.feature_dim = c3 * spatial * spatial
        self.classifier = nn.Sequential(nn.Linear(self.feature_dim, f1), nn.ReLU(), nn.Linear(f1, num_classes))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.features(x).flatten(1)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits


@register("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return LeNet5(in_channels, num_classes, image_size)


@register("lenet5_half")
def lenet5_half(in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return LeNet5(in_channels, num_classes, image_size, width=0.5)


@register("lenet5_bn")
def lenet5_bn(in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return LeNet5(in_channels, num_classes, image_size, batch_norm=True)


@register("lenet5_half_bn")
def lenet5_half_bn(in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return LeNet5(in_channels, num_classes, image_size, width=0.5, batch_norm=True)


@register("resnet18")
def resnet18(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], in_channels, num_classes)


@register("resnet34")
def resnet34(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return CifarResNet([3, 4, 6, 3], in_channels, num_classes)


@register("resnet8")
def resnet8(in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return ThinResNet(1, in_channels, num_classes)


@register("resnet20")
def resnet20(in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return ThinResNet(3, in_channels, num_classes)


class Generator(nn.Module):
    """The DAFL generator (official architecture), width and sizes configurable.

    Output passes through a non-affine BatchNorm, so images come out roughly
    standardised, i.e. in the classifier's normalised input space.
    """

    def __init__(self, latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128):
        super().__init__()
        if image_size % 4:
            raise ConfigError(f"generator image_size must be a multiple of 4, got {image_size}")
        self.latent_dim, self.image_size, self.channels = latent_dim, image_size, channels
        self.init_size = image_size // 4
        self.width = width
        self.project = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(width)
        # BatchNorm2d(c, 0.8): the official code passes 0.8 positionally, i.e. eps=0.8; kept for fidelity.
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, 0.8), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2, 0.8), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.project(z).view(z.shape[0], self.width, self.init_size, self.init_size))
        x = self.block1(F.interpolate(x, scale_factor=2))
        return self.block2(F.interpolate(x, scale_factor=2))


@register("generator")
def generator(latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128) -> nn.Module:
    return Generator(latent_dim, image_size, channels, width)


class NativeGenerator(nn.Module):
    """A generator that draws images the way real inputs arrive: [0, 1] pixels (sigmoid) at
    the dataset's native resolution, then the very padding / resizing and normalisation
    real images get (`InputAdapter`). A black background is sigmoid's floor and the 28 -> 32
    padding border is exact, so no capacity is spent on what real inputs never vary.

    Linear -> width x (n/4)^2 -> BN -> up x2 -> conv3x3, BN, LeakyReLU -> up x2 ->
    conv3x3 (width/2), BN, LeakyReLU -> conv3x3 -> sigmoid, n = native size.
    """

    def __init__(self, latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 64,
                 native_size: Optional[int] = None, mean: Optional[list[float]] = None,
                 std: Optional[list[float]] = None):
        super().__init__()
        from dafl.contract import InputAdapter

        native_size = native_size or image_size
        if native_size % 4:
            raise ConfigError(f"the native generator needs a native size that is a multiple of 4, got {native_size}")
        self.latent_dim, self.image_size, self.channels, self.width = latent_dim, image_size, channels, width
        self.native_size, self.init_size = native_size, native_size // 4
        self.project = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(width)
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2),
                                    nn.LeakyReLU(0.2), nn.Conv2d(width // 2, channels, 3, padding=1), nn.Sigmoid())
        self.adapter = InputAdapter(native_size, image_size, mean or [0.0] * channels, std or [1.0] * channels)

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels at native size (what a real image file holds)."""
        x = self.bn0(self.project(z).view(z.shape[0], self.width, self.init_size, self.init_size))
        x = self.block1(F.interpolate(x, scale_factor=2))
        return self.block2(F.interpolate(x, scale_factor=2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.pixels(z))


@register("generator_native")
def generator_native(latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 64,
                     native_size: Optional[int] = None, mean: Optional[list[float]] = None,
                     std: Optional[list[float]] = None) -> nn.Module:
    return NativeGenerator(latent_dim, image_size, channels, width, native_size, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one sample, counted by torch.utils.flop_counter (multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- any nn.Module

ArchSpec = Union[str, dict]


def spec_name(spec: ArchSpec) -> str:
    """A spec as one string for metadata and messages: the name, or the class path with its
    init_args as JSON."""
    if isinstance(spec, str):
        return spec
    return json.dumps({"class_path": spec.get("class_path"), "init_args": spec.get("init_args") or {}},
                      sort_keys=True)


def parse_spec(spec: ArchSpec) -> ArchSpec:
    """The inverse of `spec_name` (a JSON class-path spec back to a dict)."""
    if isinstance(spec, str) and spec.startswith("{"):
        return json.loads(spec)
    return spec


def build_network(spec: ArchSpec, in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """A classifier from any of three kinds of spec:

    - a registered name (`python -m dafl models`), built for the given shape;
    - `timm/NAME`: `timm.create_model(NAME, in_chans=in_channels, num_classes=num_classes)`,
      never pretrained (nothing is downloaded);
    - a class path (`package.module.Class`, e.g. `torchvision.models.resnet18`, or your own),
      as a string or as `{class_path: ..., init_args: {...}}` (LightningCLI's convention):
      the class (or function) called with `init_args` only, so they must give it its shape.
    """
    spec = parse_spec(spec)
    if isinstance(spec, dict):
        if not isinstance(spec.get("class_path"), str) or not isinstance(spec.get("init_args") or {}, dict):
            raise ConfigError(f"an architecture spec needs class_path (a string) and init_args (a mapping), got {spec}")
        return _from_class_path(spec["class_path"], spec.get("init_args") or {})
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"an architecture is a registered name, timm/NAME or a class path, got {spec!r}")
    if spec in MODELS:
        return build_model(spec, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if spec.startswith("timm/"):
        try:
            import timm
        except ImportError:
            raise ConfigError(f"{spec} needs timm: `pip install timm`") from None
        try:
            return timm.create_model(spec[len("timm/"):], pretrained=False, in_chans=in_channels,
                                     num_classes=num_classes)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ConfigError(f"{spec}: {str(e).splitlines()[0]}") from None
    if "." in spec:
        return _from_class_path(spec, {})
    raise ConfigError(f"unknown architecture {spec!r}; choose one of {', '.join(sorted(MODELS))}, timm/NAME, "
                      "or a class path such as torchvision.models.resnet18")


def _from_class_path(class_path: str, init_args: dict) -> nn.Module:
    module_name, _, name = class_path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"cannot import {class_path}: {e}") from None
    try:
        network = factory(**init_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{class_path}({', '.join(f'{k}={v!r}' for k, v in init_args.items())}) failed: {e}") from None
    if not isinstance(network, nn.Module):
        raise ConfigError(f"{class_path} did not build an nn.Module (got {type(network).__name__})")
    return network


@torch.no_grad()
def output_classes(network: nn.Module, in_channels: int, image_size: int, what: str) -> int:
    """The number of logits `network` returns for a batch of the declared input; a one-line
    ConfigError if it fails on that input or does not return (N, classes) logits."""
    was_training = network.training
    network.eval()
    try:
        device = next(network.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        out = network(torch.zeros(2, in_channels, image_size, image_size, device=device))
    except Exception as e:  # noqa: BLE001 - whatever a user's forward raises on the declared input
        raise ConfigError(f"{what} fails on {in_channels}x{image_size}x{image_size} inputs: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    finally:
        network.train(was_training)
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"{what} must return (N, classes) logits for {in_channels}x{image_size}x{image_size} "
                          f"inputs, got {shape}")
    return int(out.shape[1])


class PenultimateFeatures:
    """(logits, penultimate features) of any classifier, for DAFL's activation loss: the
    network's own `return_features=True` where it has one (the registered models: LeNet-5's
    120-d conv3 output as in DAFL, ResNet's pooled vector), else the input of its last
    nn.Linear, or of the module named `layer`, caught by a forward pre-hook."""

    def __init__(self, network: nn.Module, layer: Optional[str] = None):
        self.network, self.captured, self.handle = network, None, None
        forward = getattr(network, "forward")
        self.native = layer is None and "return_features" in inspect.signature(forward).parameters
        if self.native:
            return
        modules = dict(network.named_modules())
        if layer is not None:
            if layer not in modules:
                raise ConfigError(f"the teacher has no module named {layer!r} (its last ones: "
                                  f"{', '.join(list(modules)[-3:])})")
            target = modules[layer]
        else:
            linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ConfigError("the teacher has no nn.Linear layer whose input is its penultimate features: "
                                  "name the module with teacher_feature_layer")
            target = linears[-1]
        self.handle = target.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.captured = inputs[0]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.native:
            return self.network(images, return_features=True)
        logits = self.network(images)
        features, self.captured = self.captured, None
        return logits, features.flatten(1)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
