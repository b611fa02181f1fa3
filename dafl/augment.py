"""Batch augmentations on normalised image tensors. For distillation the teacher labels
whatever the student sees, so every shifted, flipped or blended image is a new, correctly
labelled training point."""
from __future__ import annotations

import math

import torch


def random_shift_flip(x: torch.Tensor, shift: int, flip: bool) -> torch.Tensor:
    """Batch augmentation on normalised tensors: one random translation of up to `shift`
    pixels for the whole batch (cheap; padding is 0 in the normalised space, i.e. the mean
    pixel) and, optionally, a horizontal flip of a random half of the images."""
    if shift:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, [shift] * 4)
        dx, dy = torch.randint(0, 2 * shift + 1, (2,)).tolist()
        x = padded[:, :, dy:dy + h, dx:dx + w]
    if flip:
        mask = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
    return x


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


def augment_batch(images: torch.Tensor, shift: int = 0, flip: bool = False, mixup_alpha: float = 0.0,
                  cutmix_prob: float = 0.0) -> torch.Tensor:
    """Shift / flip, then CutMix (with probability `cutmix_prob`) or else mixup."""
    images = random_shift_flip(images, shift, flip)
    if cutmix_prob > 0 and torch.rand(()) < cutmix_prob:
        return cutmix(images)
    return mixup(images, mixup_alpha)
