"""Data-free distillation losses as plain functions of tensors (torch only): DAFL's one-hot,
activation and information-entropy losses, KD, and the optional terms the generator can
weigh in. Each takes tensors and returns a scalar."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def one_hot_loss(teacher_logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the teacher's logits against its own arg-max: pushes generated
    images towards confident teacher predictions. With `targets` (class-conditional
    generation), against the classes the images were asked to show."""
    teacher_logits = teacher_logits.float()  # losses in float32 even under bf16 autocast
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1) if targets is None else targets)




def activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    """-mean |f| of the teacher's penultimate features: rewards strongly activating images."""
    return -teacher_features.float().abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor, log_base: float = 10.0) -> torch.Tensor:
    """sum(p_mean * log p_mean) over classes, p_mean = batch mean of softmax: minimising it
    maximises the entropy of the batch's class distribution, i.e. balanced classes.

    A batch statistic: under DDP pass the all-gathered logits (see GeneratorSource).
    The official code uses log10; `log_base=math.e` gives nats.
    """
    mean_probs = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    # A class no image predicts at all (softmax underflow to exactly 0, e.g. a very confident
    # teacher) contributes 0 * log 0 = 0; the clamp keeps value and gradient finite there.
    return (mean_probs * torch.log(mean_probs.clamp_min(1e-30))).sum() / math.log(log_base)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch-mean, times T^2 (Hinton et al.) so the
    gradient scale does not depend on the temperature. At T=1 this is the official loss."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


def l1_disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute logit gap (DFAD): the generator maximises it, the student minimises it."""
    return (student_logits.float() - teacher_logits.float()).abs().mean()


def mode_seeking_loss(latents: torch.Tensor, images: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mode seeking (Mao et al., CVPR 2019): two latents should give images about as far
    apart as the latents are. Pairs the batch's first half with its second half and
    averages mean|z1 - z2| / (mean|x1 - x2| + eps); minimising it spreads the generator's
    outputs instead of collapsing each class onto a few images."""
    half = latents.shape[0] // 2
    latent_gap = (latents[:half] - latents[half:2 * half]).abs().flatten(1).mean(1)
    image_gap = (images[:half] - images[half:2 * half]).abs().flatten(1).mean(1)
    return (latent_gap / (image_gap + eps)).mean()


def batchnorm_statistics_loss(batch_stats: list[tuple[torch.Tensor, torch.Tensor, nn.modules.batchnorm._BatchNorm]]) -> torch.Tensor:
    """DeepInversion: distance between the batch's per-channel mean / variance at each
    BatchNorm input and that layer's running statistics (the training data's), summed over
    layers of ||mu - running_mean||_2 + ||var - running_var||_2."""
    total = 0.0
    for mean, var, bn in batch_stats:
        total = total + torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(var - bn.running_var)
    return total


class BatchNormStatistics:
    """Forward hooks on every BatchNorm (1d, 2d or 3d) of a (frozen) network that record the
    batch mean and variance of the layer's input per channel (dimension 1), for
    `batchnorm_statistics_loss`. Records only while `recording` is set, so other forward
    passes of the network cost nothing."""

    def __init__(self, network: nn.Module):
        self.recording = False
        self.records: list[tuple[torch.Tensor, torch.Tensor, nn.modules.batchnorm._BatchNorm]] = []
        self.layers = [m for m in network.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, inputs, output):
        if not self.recording:
            return
        x = inputs[0].float()
        dims = [d for d in range(x.dim()) if d != 1]  # (N, C) for BatchNorm1d, (N, C, H, W) for 2d
        self.records.append((x.mean(dim=dims), x.var(dim=dims, unbiased=False), module))

    def pop(self) -> list[tuple[torch.Tensor, torch.Tensor, nn.modules.batchnorm._BatchNorm]]:
        records, self.records = self.records, []
        return records

    def remove(self):
        for h in self.handles:
            h.remove()
