"""The DAFL generator as an image source: a generator optimised against the frozen teacher
(one-hot, activation and information-entropy losses, plus optional BatchNorm-statistics,
adversarial and diversity terms), `steps` updates per iteration, alternating with the
student's steps; or, with `joint_step`, the official code's single backward."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dafl.contract import InputContract
from dafl.distributed import gather_with_grad
from dafl.errors import ConfigError
from dafl.generator import GeneratorObjective, ReplayMemory
from lightning_modules.base import check_optimizer
from lightning_modules.sources import HELD_OUT_SEED, ImageSource, require_contract


class GeneratorSource(ImageSource):
    """Student images from a DAFL generator trained alongside the student. The defaults are
    the official MNIST recipe."""

    description = "generator samples"

    def __init__(self, latent_dim: int = 100, arch: Literal["dafl", "native"] = "dafl", width: int = 128,
                 steps: int = 1, joint_step: bool = True, one_hot_weight: float = 1.0,
                 activation_weight: float = 0.1, entropy_weight: float = 5.0, entropy_log_base: float = 10.0,
                 bn_stat_weight: float = 0.0, adversarial_weight: float = 0.0, diversity_weight: float = 0.0,
                 class_conditional: bool = False, balanced_one_hot: bool = False, native_padding: bool = False,
                 replay_size: int = 0, feature_layer: Optional[str] = None,
                 optimizer: Optional[OptimizerCallable] = None):
        """
        Args:
            latent_dim: size of the generator's latent vector.
            arch: 'dafl' (the official generator, normalised output at the network's input size) or
                'native' (pixels in [0, 1] at the teacher's native size, padded and normalised like
                real inputs).
            width: channels of the generator's first conv block (official 128).
            steps: generator updates per iteration.
            joint_step: the last generator update and the student's first step share one backward
                (the official code: the student trains on the generator's pre-update batch, without
                augmentation); otherwise the student's steps follow on fresh samples.
            one_hot_weight: weight of DAFL's one-hot loss (cross-entropy against the teacher's arg-max).
            activation_weight: weight of DAFL's activation loss (-mean |penultimate features|).
            entropy_weight: weight of DAFL's information-entropy loss (class balance over a batch).
            entropy_log_base: logarithm base of the information-entropy loss (official: 10).
            bn_stat_weight: weight of DeepInversion's BatchNorm-statistics loss (needs a BatchNorm teacher).
            adversarial_weight: weight of the DFAD term: the generator maximises the student-teacher L1
                gap (not in the joint step, whose backward also reaches the student).
            diversity_weight: weight of a mode-seeking term: different latents must give different images.
            class_conditional: the generator gets a one-hot class code and the one-hot loss asks for it.
            balanced_one_hot: the one-hot loss aims each batch at equal class quotas instead of the
                arg-max (not with class_conditional, which balances by construction).
            native_padding: generated images keep the constant border real inputs get when padded from
                the teacher's native size (e.g. 28 -> 32); for arch 'dafl'.
            replay_size: generated images kept for student steps to sample from (0: fresh samples only).
            feature_layer: module of the teacher whose input is the penultimate feature vector of the
                activation loss (default: the network's own `return_features`, else its last nn.Linear).
            optimizer: the generator's optimizer (default: Adam, lr 0.2, the official MNIST recipe).
        """
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("width", width), ("steps", steps)):
            if value <= 0:
                raise ConfigError(f"GeneratorSource {name} must be positive, got {value}")
        weights = {"one_hot_weight": one_hot_weight, "activation_weight": activation_weight,
                   "entropy_weight": entropy_weight, "bn_stat_weight": bn_stat_weight,
                   "adversarial_weight": adversarial_weight, "diversity_weight": diversity_weight,
                   "replay_size": replay_size}
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"GeneratorSource {name} must be >= 0, got {value}")
        if entropy_log_base <= 1:
            raise ConfigError(f"GeneratorSource entropy_log_base must be > 1, got {entropy_log_base}")
        if balanced_one_hot and class_conditional:
            raise ConfigError("balanced_one_hot and class_conditional both balance the classes: choose one")
        if native_padding and arch == "native":
            raise ConfigError("native_padding is for arch 'dafl'; the native generator pads like real inputs")
        self.settings = dict(latent_dim=latent_dim, arch=arch, width=width, entropy_log_base=entropy_log_base,
                             class_conditional=class_conditional, balanced_one_hot=balanced_one_hot, **weights)
        self.steps, self.joint_step, self.native_padding = steps, joint_step, native_padding
        self.replay_size, self.feature_layer = replay_size, feature_layer
        self.optimizer_factory = check_optimizer(optimizer, "GeneratorSource optimizer")
        self.val_latents: Optional[torch.Tensor] = None

    def bind(self, teacher: nn.Module, contract: InputContract, num_classes: int, student: nn.Module) -> None:
        super().bind(teacher, contract, num_classes, student)
        s = self.settings
        self.objective = GeneratorObjective(
            s["latent_dim"], contract.input_size, contract.channels, s["width"], s["one_hot_weight"],
            s["activation_weight"], s["entropy_weight"], s["entropy_log_base"], s["bn_stat_weight"],
            s["adversarial_weight"], num_classes, s["class_conditional"], s["arch"], contract,
            s["diversity_weight"], s["balanced_one_hot"])
        if self.native_padding:
            self._set_native_frame(contract)
        self.objective.attach(teacher, features=True, feature_layer=self.feature_layer)
        self.student = [student]  # not a child: the student module owns it
        self.replay = ReplayMemory(self.replay_size, self.image_shape) if self.replay_size else None

    def _set_native_frame(self, contract: InputContract) -> None:
        require_contract(contract, "native_padding")
        border = (contract.input_size - contract.native_size) // 2
        if border <= 0 or contract.input_size - contract.native_size != 2 * border:
            raise ConfigError(f"native_padding: the teacher's {contract.native_size}px inputs are not padded "
                              f"to {contract.input_size}px")
        pad_value = -torch.tensor(contract.mean) / torch.tensor(contract.std)  # a black pixel, normalised
        self.objective.set_frame(border, pad_value)

    @property
    def device(self) -> torch.device:
        return next(self.objective.parameters()).device

    def configure_optimizer(self) -> torch.optim.Optimizer:
        make = self.optimizer_factory or (lambda p: torch.optim.Adam(p, lr=0.2))
        return make(self.objective.parameters())

    def _generate(self, batch_size: int, student: Optional[nn.Module] = None):
        z, targets = self.objective.latents(batch_size, device=self.device)
        images = self.objective(z)
        losses, teacher_logits, _ = self.objective.losses(images, self.teacher[0], gather_with_grad, student,
                                                          targets, z)
        return images, teacher_logits, losses

    def update(self, module, batch_size: int) -> dict[str, torch.Tensor]:
        optimizer = module.source_optimizer()
        losses = {}
        adversarial = self.student[0] if self.settings["adversarial_weight"] > 0 else None
        for _ in range(self.steps - 1 if self.joint_step else self.steps):
            images, _, losses = self._generate(batch_size, adversarial)
            module.check_finite(losses)
            optimizer.zero_grad()
            module.manual_backward(losses["total"])
            optimizer.step()
            if self.replay is not None:
                self.replay.push(images)
        return losses

    def joint_batch(self, batch_size: int):
        if not self.joint_step:
            return None
        images, teacher_logits, losses = self._generate(batch_size)
        if self.replay is not None:  # later student steps of the iteration may sample it
            self.replay.push(images)
        return images, teacher_logits, losses

    def sample(self, n: int) -> torch.Tensor:
        if self.replay is not None:
            return self.replay.sample(n)
        return self.objective.sample(self.objective.latents(n, device=self.device)[0])

    def held_out(self, count: int, batch_size: int) -> list[torch.Tensor]:
        if self.val_latents is None or len(self.val_latents) != count:
            bank, _ = self.objective.latents(count, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
            self.val_latents = bank
        return [self.objective.sample(z.to(self.device)) for z in self.val_latents.split(batch_size)]

    def networks(self) -> list[nn.Module]:
        return [self.objective.net]

    def memory_needs(self) -> dict[str, tuple[int, int]]:
        return {"replay_size": (self.replay_size, 1)}
