"""Supervised classifier training on real data: the teacher, the student with labels
("standard back-propagation") and the student by knowledge distillation with the real
training data (set `teacher`)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from dafl.errors import ConfigError
from dafl.losses import kd_loss
from dafl.models import build_network, spec_name
from dafl.weights import load_classifier
from lightning_modules.base import FrozenTeacherModule, check_optimizer



def build_scheduler(kind: str, optimizer: torch.optim.Optimizer, total_steps: int):
    """'none', 'cosine' (to zero over the run) or 'onecycle' (peak at the optimizer's lr)."""
    if kind == "none":
        return None
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if kind == "onecycle":
        peak = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=max(2, total_steps))
    raise ConfigError(f"unknown scheduler {kind!r}; use none, cosine or onecycle")


class ClassifierModule(FrozenTeacherModule):
    def __init__(self, arch: str = "lenet5", num_classes: int = 10, in_channels: int = 1, image_size: int = 32,
                 optimizer: Optional[OptimizerCallable] = None, scheduler: Literal["none", "cosine", "onecycle"] = "onecycle",
                 teacher: Optional[str] = None, kd_temperature: float = 4.0, kd_weight: float = 1.0):
        """
        Args:
            arch: a registered name (`python -m dafl models`), `timm/NAME`, or a class path
                (`package.module.Class`, called with no arguments).
            teacher: weights file of a teacher; if set, the loss is
                kd_weight * KD(teacher, T=kd_temperature) + (1 - kd_weight) * cross-entropy.
        """
        super().__init__()
        if kd_temperature <= 0 or not 0 <= kd_weight <= 1:
            raise ConfigError("kd_temperature must be > 0 and kd_weight in [0, 1]")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = check_optimizer(optimizer, "optimizer")
        self.net = build_network(arch, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        if teacher is not None:
            self.freeze_teacher(load_classifier(teacher, num_classes=num_classes, in_channels=in_channels,
                                                image_size=image_size)[0])
        metric = lambda: MulticlassAccuracy(num_classes=num_classes, average="micro")  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = metric(), metric(), metric()

    def forward(self, x):
        return self.net(x)

    def setup(self, stage: str):
        info = getattr(self.trainer.datamodule, "info", None)
        hp = self.hparams
        if info is not None:
            if (info.num_classes, info.channels) != (hp.num_classes, hp.in_channels):
                raise ConfigError(f"dataset {info.name} has {info.num_classes} classes and {info.channels} channels, "
                                  f"the model {hp.num_classes} and {hp.in_channels}")
            self.data_meta = {"dataset": info.name, "native_size": info.size, "mean": info.mean, "std": info.std,
                              "class_names": info.class_names, "classes": info.classes}

    def export_metadata(self) -> dict:
        hp = self.hparams
        method = "knowledge distillation with data" if hp.teacher else "supervised training"
        data = getattr(self, "data_meta", None) or {"dataset": None, "native_size": hp.image_size,
                                                    "mean": [0.0] * hp.in_channels, "std": [1.0] * hp.in_channels}
        return {**data, "kind": "classifier", "method": method, "arch": spec_name(hp.arch), "num_classes": hp.num_classes,
                "in_channels": hp.in_channels, "image_size": hp.image_size, "state_prefix": "net."}

    def on_load_checkpoint(self, checkpoint):
        meta = checkpoint.get("dafl", {})
        if "native_size" in meta:
            self.data_meta = {k: meta.get(k) for k in ("dataset", "native_size", "mean", "std", "class_names", "classes")}

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss_ce", loss)
        if self.frozen_teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss_kd = kd_loss(logits, teacher_logits, self.hparams.kd_temperature)
            self.log("train/loss_kd", loss_kd)
            loss = self.hparams.kd_weight * loss_kd + (1 - self.hparams.kd_weight) * loss
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.net(images)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.test_acc(self.net(images), labels)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        make = self.optimizer_factory or (lambda p: torch.optim.Adam(p, lr=1e-3))
        optimizer = make(self.net.parameters())
        scheduler = build_scheduler(self.hparams.scheduler, optimizer, self.trainer.estimated_stepping_batches)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
