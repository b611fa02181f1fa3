"""The generator side of DAFL: a generator and the weighted losses that make the frozen
teacher find its images meaningful (`GeneratorObjective`), a memory of its recent images,
and `fit_generator`, which trains one alone. `lightning_modules.generator.GeneratorSource`
trains it alongside a student."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dafl.contract import InputContract
from dafl.errors import ConfigError
from dafl.losses import (BatchNormStatistics, activation_loss, batchnorm_statistics_loss, information_entropy_loss,
                         l1_disagreement, mode_seeking_loss, one_hot_loss)
from dafl.models import PenultimateFeatures, build_model

@torch.no_grad()
def balanced_targets(teacher_logits: torch.Tensor) -> torch.Tensor:
    """One-hot targets with a class quota: every class gets ceil(n / classes) slots and the
    images are assigned to slots so that the summed teacher log-probability of the assigned
    classes is maximal (a linear assignment problem, scipy's Hungarian solver). Most images
    keep their arg-max; the few that would overfill a class are pushed to the most likely
    under-filled one, so the generator is asked for every class, including the ones the
    teacher rarely predicts on synthetic images (Fashion-MNIST: trouser)."""
    from scipy.optimize import linear_sum_assignment

    n, num_classes = teacher_logits.shape
    slots = -(-n // num_classes)
    log_probs = F.log_softmax(teacher_logits.float(), dim=1).cpu().double()
    _, columns = linear_sum_assignment(log_probs.repeat_interleave(slots, dim=1).numpy(), maximize=True)
    return torch.as_tensor(columns // slots, device=teacher_logits.device)


class GeneratorObjective(nn.Module):
    """Generator + loss weights. Every lever is a weight; zero switches it off (and skips
    its computation where that saves work)."""

    def __init__(self, latent_dim: int, image_size: int, channels: int, width: int,
                 one_hot_weight: float, activation_weight: float, entropy_weight: float, entropy_log_base: float,
                 bn_stat_weight: float, adversarial_weight: float, num_classes: int = 10, conditional: bool = False,
                 arch: str = "dafl", contract: Optional[InputContract] = None, diversity_weight: float = 0.0,
                 balanced_one_hot: bool = False):
        """`arch`: 'dafl' (the official generator, output in the normalised space) or
        'native' (pixels at the dataset's native size through the real-input adapter; needs
        the teacher's complete `contract`). `balanced_one_hot`: the one-hot loss
        aims at `balanced_targets` (a class quota per batch) instead of the arg-max."""
        super().__init__()
        if conditional and num_classes > latent_dim:
            raise ConfigError(f"class-conditional generation needs latent_dim >= {num_classes} classes")
        self.num_classes, self.conditional, self.balanced_one_hot = num_classes, conditional, balanced_one_hot
        shape = {"latent_dim": latent_dim, "image_size": image_size, "channels": channels, "width": width}
        if arch == "native":
            missing = contract.missing() if contract is not None else ["native_size", "mean", "std"]
            if missing:
                raise ConfigError(f"the native generator needs the teacher's {', '.join(missing)} (set teacher_input, "
                                  "or a registered dataset); or use arch 'dafl'")
            self.net = build_model("generator_native", **shape, native_size=contract.native_size,
                                   mean=list(contract.mean), std=list(contract.std))
        elif arch == "dafl":
            self.net = build_model("generator", **shape)
        else:
            raise ConfigError(f"unknown generator_arch {arch!r}; use 'dafl' or 'native'")
        self.latent_dim = latent_dim
        self.weights = {"oh": one_hot_weight, "a": activation_weight, "ie": entropy_weight,
                        "bn": bn_stat_weight, "adv": adversarial_weight, "div": diversity_weight}
        self.entropy_log_base = entropy_log_base
        self._bn_hooks: Optional[BatchNormStatistics] = None
        self._features: Optional[PenultimateFeatures] = None
        self.register_buffer("frame_mask", None, persistent=False)
        self.register_buffer("frame_value", None, persistent=False)

    def set_frame(self, border: int, value: torch.Tensor) -> None:
        """Real inputs of a 28x28 dataset padded to 32 always carry a constant 2-pixel
        border; make every synthetic image carry the same border (value per channel, in
        the normalised space) so the generator spends nothing on pixels that never vary."""
        size = self.net.image_size
        mask = torch.zeros(1, 1, size, size)
        mask[..., border:size - border, border:size - border] = 1.0
        self.frame_mask, self.frame_value = mask, value.view(1, -1, 1, 1).float()

    def attach(self, teacher: nn.Module, features: bool = True, feature_layer: Optional[str] = None) -> None:
        """Find the teacher's penultimate features (`dafl.models.PenultimateFeatures`), if this
        generator will be trained, and hook its BatchNorm layers if the statistics loss is on."""
        if features and (self._features is None or self._features.network is not teacher):
            if self._features is not None:
                self._features.remove()
            self._features = PenultimateFeatures(teacher, feature_layer)
        if self.weights["bn"] > 0 and self._bn_hooks is None:
            self._bn_hooks = BatchNormStatistics(teacher)
            if not self._bn_hooks.layers:
                raise ConfigError("bn_stat_weight > 0 needs a teacher with BatchNorm layers (e.g. lenet5_bn)")

    def detach_hooks(self) -> None:
        """Remove the hooks from the teacher (once this generator is done with it)."""
        if self._features is not None:
            self._features.remove()
            self._features = None
        if self._bn_hooks is not None:
            self._bn_hooks.remove()
            self._bn_hooks = None

    def latents(self, n: int, device=None, generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """z ~ N(0, I); class-conditional: the first `num_classes` entries are replaced by the
        one-hot code of a balanced list of target classes, which the one-hot loss enforces."""
        z = torch.randn(n, self.latent_dim, generator=generator).to(device) if generator is not None \
            else torch.randn(n, self.latent_dim, device=device)
        if not self.conditional:
            return z, None
        targets = torch.arange(n, device=z.device) % self.num_classes
        z[:, :self.num_classes] = F.one_hot(targets, self.num_classes).to(z.dtype)
        return z, targets

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._frame(self.net(z))

    def _frame(self, images: torch.Tensor) -> torch.Tensor:
        if self.frame_mask is None:
            return images
        return images * self.frame_mask + self.frame_value * (1 - self.frame_mask)

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Images as training sees them (batch statistics), leaving running statistics alone."""
        saved = [b.clone() for b in self.net.buffers()]
        was_training = self.net.training
        self.net.train()
        images = self._frame(self.net(z))
        self.net.train(was_training)
        for b, s in zip(self.net.buffers(), saved):
            b.copy_(s)
        return images

    def losses(self, images: torch.Tensor, teacher: nn.Module,
               gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
               student: Optional[nn.Module] = None, targets: Optional[torch.Tensor] = None,
               latents: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Losses of generated `images` against the frozen teacher.

        `gather` all-gathers a tensor over processes (with gradients): the information
        entropy is a batch statistic and must see the global batch under DDP.
        Returns (named losses incl. 'total', teacher logits, teacher features).
        """
        w = self.weights
        if self._bn_hooks is not None:
            self._bn_hooks.recording = True
        if self._features is None or self._features.network is not teacher:
            self.attach(teacher, features=True)
        teacher_logits, features = self._features(images)
        if self._bn_hooks is not None:
            self._bn_hooks.recording = False
        if targets is None and self.balanced_one_hot:
            targets = balanced_targets(teacher_logits)
        losses = {"oh": one_hot_loss(teacher_logits, targets), "a": activation_loss(features),
                  "ie": information_entropy_loss(gather(teacher_logits), self.entropy_log_base)}
        if self._bn_hooks is not None:
            losses["bn"] = batchnorm_statistics_loss(self._bn_hooks.pop())
        if w["adv"] > 0 and student is not None:
            # DFAD: the generator seeks images where student and teacher disagree.
            losses["adv"] = -l1_disagreement(student(images), teacher_logits)
        if w["div"] > 0 and latents is not None:
            losses["div"] = mode_seeking_loss(latents, images)
        losses["total"] = sum(w[k] * v for k, v in losses.items())
        return losses, teacher_logits, features


class ReplayMemory(nn.Module):
    """Ring buffer of the most recent `capacity` generated images. Students trained only on
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


def fit_generator(teacher: nn.Module, meta: dict, iterations: int, batch_size: int = 256, width: int = 32,
                  lr: float = 1e-3, one_hot_weight: float = 1.0, entropy_weight: float = 5.0,
                  bn_stat_weight: float = 1.0, progress: Optional[str] = None) -> GeneratorObjective:
    """Train a generator alone against a frozen `teacher` (no student): the images a
    teacher finds meaningful, e.g. for data-free ZipIt merging. The native generator is
    used when the teacher's metadata allows it, BN-statistics matching when the teacher
    has BatchNorm layers."""
    from tqdm import tqdm

    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    contract = InputContract.from_metadata(meta)
    native = not contract.missing() and contract.native_size % 4 == 0
    objective = GeneratorObjective(100, meta["image_size"], meta["in_channels"], width, one_hot_weight, 0.0,
                                   entropy_weight, 10.0, bn_stat_weight if has_bn else 0.0, 0.0,
                                   meta["num_classes"], arch="native" if native else "dafl", contract=contract)
    teacher.eval().requires_grad_(False)
    objective.attach(teacher)
    optimizer = torch.optim.Adam(objective.parameters(), lr=lr, betas=(0.5, 0.999))
    for _ in tqdm(range(iterations), desc=progress or "generator", disable=progress is None, leave=False):
        z, _ = objective.latents(batch_size)
        losses, _, _ = objective.losses(objective(z), teacher)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    objective.detach_hooks()
    return objective
