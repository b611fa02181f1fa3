"""Procedural images for the student: random shapes, no data.

"Dead leaves" images (Baradad et al., NeurIPS 2021, "Learning to see by looking at noise"):
a few random ellipses and rectangles of random grey levels painted over each other on a
black background. The teacher labels them like any synthetic image. They give the student
large, sharp-edged silhouettes, which a generator's images (textured blobs) rarely contain;
`invert_toward_classes` moves them toward the teacher's classes (the `InvertedPool` source).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dafl.contract import InputAdapter
from dafl.losses import BatchNormStatistics, batchnorm_statistics_loss


def dead_leaves(n: int, size: int, channels: int = 1, shapes: int = 3, scale: float = 1.5,
                device: torch.device | str | None = None) -> torch.Tensor:
    """n images of `shapes` random ellipses / rectangles, [0, 1] pixels, n x channels x size x size.

    Centres ~ N(0, 0.35) of the half-frame (objects sit roughly in the middle, as in most
    classification datasets), half-axes uniform in [0.1, 0.7] x `scale` of the half-frame,
    random rotation, one grey level (per channel) per shape; later shapes cover earlier
    ones. A 3x3 box blur softens the edges like a downsampled photograph's."""
    coords = torch.linspace(-1, 1, size, device=device)
    rows, cols = coords.view(1, -1, 1), coords.view(1, 1, -1)
    images = torch.zeros(n, channels, size, size, device=device)
    for _ in range(shapes):
        centre_x, centre_y = torch.randn(2, n, 1, 1, device=device) * 0.35
        half_x, half_y = (0.1 + 0.6 * torch.rand(2, n, 1, 1, device=device)) * scale
        angle = torch.rand(n, 1, 1, device=device) * math.pi
        # coordinates in the shape's rotated frame
        u = (cols - centre_x) * angle.cos() + (rows - centre_y) * angle.sin()
        v = (rows - centre_y) * angle.cos() - (cols - centre_x) * angle.sin()
        ellipse = (u / half_x) ** 2 + (v / half_y) ** 2 < 1
        rectangle = (u.abs() < half_x) & (v.abs() < half_y)
        inside = torch.where(torch.rand(n, 1, 1, device=device) < 0.5, ellipse, rectangle)
        grey = torch.rand(n, channels, 1, 1, device=device)
        images = torch.where(inside.unsqueeze(1), grey, images)
    return F.avg_pool2d(images, 3, stride=1, padding=1)


class ProceduralShapes(nn.Module):
    """Dead-leaves images at the teacher's native size, through the same padding and
    normalisation as real inputs (`InputAdapter`), so a black background is the real one."""

    def __init__(self, adapter: InputAdapter, shapes: int = 3, scale: float = 1.5):
        """`adapter`: the teacher's (`InputContract.adapter`), which sets the native size and channels."""
        super().__init__()
        self.adapter, self.shapes, self.scale = adapter, shapes, scale
        self.native_size, self.channels = adapter.native_size, adapter.mean.shape[1]

    def pixels(self, n: int) -> torch.Tensor:
        """n images as [0, 1] pixels at the native size (before padding and normalisation)."""
        return dead_leaves(n, self.native_size, self.channels, self.shapes, self.scale, self.adapter.mean.device)

    def forward(self, n: int) -> torch.Tensor:
        return self.adapter(self.pixels(n))


def class_cycle(num_classes: int, class_weights: list[int] | None = None) -> torch.Tensor:
    """The order in which inversion targets are dealt: every class once, then, with
    `class_weights` (a whole number >= 1 per class), the classes of weight >= 2 once more,
    then those of weight >= 3, and so on. Image i of a batch goes to cycle[i mod len(cycle)],
    so over each whole cycle a class gets its weight's share of the images."""
    weights = [1] * num_classes if class_weights is None else class_weights
    if len(weights) != num_classes or any(int(w) != w or w < 1 for w in weights):
        raise ValueError(f"class_weights must be {num_classes} whole numbers >= 1, got {list(weights)}")
    return torch.tensor([c for round_ in range(max(weights)) for c in range(num_classes) if weights[c] > round_])


def invert_toward_classes(pixels: torch.Tensor, teacher: nn.Module, adapter: InputAdapter, num_classes: int,
                          steps: int, lr: float = 0.02, bn_stats: BatchNormStatistics | None = None,
                          class_weights: list[int] | None = None,
                          symmetric_classes: list[int] | None = None) -> torch.Tensor:
    """Shapes as a starting point for model inversion: `steps` Adam steps on the pixels
    (native size, kept in [0, 1]) until the frozen teacher sees image i as class i mod
    num_classes (or as `class_cycle(num_classes, class_weights)` deals them), with
    DeepInversion's BatchNorm-statistics loss when `bn_stats` hooks the teacher. The shapes'
    large, sharp silhouettes survive; the teacher adds the texture of the class. Images dealt
    to `symmetric_classes` start and stay left-right mirror symmetric (`mirror_symmetric`).
    Returns the images padded and normalised like real inputs.

    Why shapes: from noise, pixel inversion gives textures without object shape."""
    cycle = class_cycle(num_classes, class_weights).to(pixels.device)
    targets = cycle[torch.arange(len(pixels), device=pixels.device) % len(cycle)]
    symmetric = torch.isin(targets, torch.tensor(symmetric_classes or [], dtype=targets.dtype, device=targets.device))
    pixels = mirror_left_half(pixels, symmetric).requires_grad_()
    optimizer = torch.optim.Adam([pixels], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            if bn_stats is not None:
                bn_stats.recording = True
            logits = teacher(adapter(mirror_symmetric(pixels, symmetric)))
            loss = F.cross_entropy(logits, targets)
            if bn_stats is not None:
                bn_stats.recording = False
                loss = loss + batchnorm_statistics_loss(bn_stats.pop())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                pixels.clamp_(0, 1)
    return adapter(mirror_symmetric(pixels.detach(), symmetric))


def mirror_left_half(pixels: torch.Tensor, symmetric: torch.Tensor) -> torch.Tensor:
    """A copy of `pixels` in which the images marked in `symmetric` (one bool per image) have
    their left half mirrored onto their right: symmetric silhouettes that keep the shapes'
    sharp edges (averaging an image with its mirror would blur them into greys)."""
    pixels = pixels.clone()
    half = pixels.shape[-1] // 2  # an odd width keeps its middle column
    if not symmetric.any() or half == 0:
        return pixels
    mask = symmetric.view(-1, *[1] * (pixels.dim() - 1))
    pixels[..., -half:] = torch.where(mask, pixels[..., :half].flip(-1), pixels[..., -half:])
    return pixels


def mirror_symmetric(pixels: torch.Tensor, symmetric: torch.Tensor) -> torch.Tensor:
    """The images marked in `symmetric` averaged with their mirror image, the others as they
    are. Inversion steps through this map: a symmetric start then gets symmetric gradients,
    so Adam keeps it symmetric, without a penalty weight to tune."""
    if not symmetric.any():
        return pixels
    mask = symmetric.view(-1, *[1] * (pixels.dim() - 1))
    return torch.where(mask, (pixels + pixels.flip(-1)) / 2, pixels)
