"""The student side of DAFL: a small classifier that imitates the teacher on synthetic
images (KD loss), with an optional replay memory of earlier synthetic batches (CMI-style)
and batch augmentation. Composed by `DataFreeDistillation`."""
from __future__ import annotations

import math

import torch
from torch import nn

from dafl.data import random_shift_flip
from dafl.losses import kd_loss
from dafl.errors import ConfigError
from dafl.models import build_network, output_classes


class ReplayMemory(nn.Module):
    """Ring buffer of the most recent `capacity` synthetic images. Students trained only on
    the newest batch forget what the generator made earlier; sampling from a memory of
    recent batches makes each (expensive) generated image serve several student steps."""

    def __init__(self, capacity: int, image_shape: tuple[int, ...]):
        super().__init__()
        self.capacity = capacity
        self.register_buffer("images", torch.zeros(capacity, *image_shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # images ever pushed

    def push(self, images: torch.Tensor) -> None:
        images = images.detach()[-self.capacity:]
        start = int(self.count) % self.capacity
        idx = (torch.arange(len(images), device=images.device) + start) % self.capacity
        self.images[idx] = images.to(self.images.dtype)
        self.count += len(images)

    def __len__(self) -> int:
        return min(int(self.count), self.capacity)

    def sample(self, n: int) -> torch.Tensor:
        if len(self) == 0:
            raise RuntimeError("replay memory is empty")
        idx = torch.randint(0, len(self), (n,), device=self.images.device)
        return self.images[idx]


def mixup(images: torch.Tensor, alpha: float) -> torch.Tensor:
    """Each image blended with a random other one of the batch, weight ~ Beta(alpha, alpha)
    per image (Zhang et al., 2018); no labels to mix: the teacher labels the blend."""
    if alpha <= 0:
        return images
    weight = torch.distributions.Beta(alpha, alpha).sample((images.shape[0],)).to(images)
    weight = weight.view(-1, *([1] * (images.dim() - 1)))
    partner = images[torch.randperm(images.shape[0], device=images.device)]
    return weight * images + (1 - weight) * partner


def cutmix(images: torch.Tensor) -> torch.Tensor:
    """Paste one box from a random partner of the batch into every image (Yun et al., 2019):
    box area ~ U(0, 1) of the image, same box for the whole batch, partners by a random
    permutation. Again the teacher labels the result, so the student learns from images
    with parts of two synthetic objects (local evidence), unlike mixup's global blends."""
    height, width = images.shape[-2:]
    side = math.sqrt(torch.rand(()).item())  # box side fraction: area fraction ~ U(0, 1)
    box_h, box_w = round(height * side), round(width * side)
    top = int(torch.randint(0, height - box_h + 1, ()))
    left = int(torch.randint(0, width - box_w + 1, ()))
    partner = images[torch.randperm(images.shape[0], device=images.device)]
    mixed = images.clone()
    mixed[..., top:top + box_h, left:left + box_w] = partner[..., top:top + box_h, left:left + box_w]
    return mixed


class StudentObjective(nn.Module):
    """Student network + KD settings (temperature, augmentation of synthetic batches)."""

    def __init__(self, arch: str, in_channels: int, num_classes: int, image_size: int,
                 temperature: float = 1.0, augment_shift: int = 0, augment_flip: bool = False,
                 mixup_alpha: float = 0.0, cutmix_prob: float = 0.0):
        super().__init__()
        self.net = build_network(arch, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        classes = output_classes(self.net, in_channels, image_size, f"student {arch}")
        if classes != num_classes:
            raise ConfigError(f"the student {arch} returns {classes} logits but the teacher {num_classes}")
        self.temperature, self.augment_shift, self.augment_flip = temperature, augment_shift, augment_flip
        self.mixup_alpha, self.cutmix_prob = mixup_alpha, cutmix_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Shift / flip, then CutMix (with probability `cutmix_prob`) or else mixup: the
        teacher labels whatever the student sees, so every augmented or blended image is a
        new, correctly labelled training point (benchmarks/explore/README.md)."""
        images = random_shift_flip(images, self.augment_shift, self.augment_flip)
        if self.cutmix_prob > 0 and torch.rand(()) < self.cutmix_prob:
            return cutmix(images)
        return mixup(images, self.mixup_alpha)

    def loss(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(self.net(images), teacher_logits.detach(), self.temperature)
