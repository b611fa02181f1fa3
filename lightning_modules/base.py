"""What every dafl LightningModule shares: a frozen teacher that is never trained and never
checkpointed (it is reloaded from its file), the metadata `dafl export` reads, and
optimizer settings checked before anything runs."""
from __future__ import annotations

import math
import os
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dafl.errors import ConfigError


def check_optimizer(factory: Optional[OptimizerCallable], name: str) -> Optional[OptimizerCallable]:
    """Build the optimizer once on a dummy parameter so bad settings (lr <= 0, ...) fail
    before anything is trained or written."""
    if factory is not None:
        try:
            optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
        except ValueError as e:  # torch's own checks: "Invalid learning rate: -0.1", ...
            raise ConfigError(f"{name}: {e}") from None
        for key, value in optimizer.defaults.items():  # torch lets NaN and inf through
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}: {key} must be a finite number, got {value}")
    return factory


def physical_memory_bytes() -> int:
    """This machine's memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(needs: dict[str, tuple[int, int]], image_bytes: int) -> None:
    """Settings {name: (value, images held per unit)} that cannot fit in this machine's
    memory fail now, in one line, not after minutes of work (or an allocator traceback)."""
    memory = physical_memory_bytes()
    for name, (value, images_per_unit) in needs.items():
        nbytes = value * images_per_unit * image_bytes
        if memory and nbytes > memory // 2:
            raise ConfigError(f"{name} {value:,} needs about {nbytes / 2**30:,.0f} GiB, more than half of this "
                              f"machine's {memory / 2**30:,.0f} GiB of memory")


def student_schedulers(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, milestones: list[int],
                       warmup: int) -> list:
    """'constant', 'cosine' (to zero over `total_steps`) or 'multistep' (lr / 10 at each
    milestone epoch), times a linear warm-up over `warmup` iterations."""
    schedulers = []
    if schedule == "cosine":
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps)))
    elif schedule == "multistep":
        schedulers.append(torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1))
    if warmup:
        # Chained after the main schedule: both step every iteration, their factors multiply.
        schedulers.append(torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup))
    return schedulers


class FrozenTeacherModule(L.LightningModule):
    """A LightningModule with an optional frozen `teacher` attribute: always in eval mode
    (running BatchNorm statistics, never batch statistics), left out of checkpoints.
    Subclasses define `export_metadata()`, saved in every checkpoint under "dafl"."""

    #: the metric that picks best.ckpt: a label-free one where training has no labels
    monitor: str = "val/acc"

    def freeze_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    @property
    def frozen_teacher(self) -> Optional[nn.Module]:
        return self._modules.get("teacher")

    def export_metadata(self) -> dict:
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_teacher is not None:
            self.frozen_teacher.eval()
        return self

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(state)((k, v) for k, v in state.items() if not k.startswith(prefix + "teacher."))

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("teacher.")}
        if self.frozen_teacher is not None:
            state_dict.update({f"teacher.{k}": v for k, v in self.frozen_teacher.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["dafl"] = self.export_metadata()
