"""The student side: a small classifier trained by KD to imitate the frozen teacher on
images from an image source (`lightning_modules.sources`: a DAFL generator, an inverted
pool of shapes, noise, or real images), validated without labels (student-teacher
agreement on the source's held-out images) and tested on real data when there is some."""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from dafl.augment import augment_batch
from dafl.contract import complete_contract, contract_settings
from dafl.datasets import dataset_contract
from dafl.errors import ConfigError
from dafl.losses import kd_loss
from dafl.models import build_network, output_classes, spec_name
from dafl.student_init import zip_refusal, zip_teacher_into_student
from dafl.weights import load_classifier
from lightning_modules.base import FrozenTeacherModule, check_memory, check_optimizer, student_schedulers
from lightning_modules.inverted_pool import InvertedPool
from lightning_modules.sources import ImageSource

CHECKPOINT_FORMAT = 2  # 1: before image sources (one module with a generator always built)


class StudentDistillation(FrozenTeacherModule):
    monitor = "val/agreement"

    def __init__(
        self,
        teacher: str = "checkpoints/fashion_mnist_lenet5_bn.safetensors",
        source: Optional[ImageSource] = None,
        teacher_arch: Optional[Union[str, dict]] = None,
        teacher_key_prefix: Optional[str] = None,
        teacher_input: Optional[dict] = None,
        dataset: Optional[str] = None,
        student_arch: Union[str, dict] = "lenet5_half",
        student_init: Literal["random", "zip_teacher", "auto"] = "auto",
        student_init_from: Optional[str] = None,
        batch_size: int = 256,
        student_steps: int = 10,
        kd_temperature: float = 1.0,
        augment_shift: int = 0,
        augment_flip: bool = False,
        mixup_alpha: float = 1.0,
        cutmix_prob: float = 0.5,
        student_optimizer: Optional[OptimizerCallable] = None,
        student_lr_schedule: Literal["constant", "cosine", "multistep"] = "cosine",
        student_lr_milestones: list[int] = [],  # epochs at which the student's lr is divided by 10
        student_lr_warmup: int = 50,
        val_size: int = 1024,
        channels_last: bool = False,
        compile: bool = False,
        finite_check_every: int = 1,
    ):
        """
        Args:
            teacher: weights file of the trained classifier: safetensors, a plain state dict (.pt/.pth)
                or a Lightning .ckpt (its state_dict); files that would run code are refused.
            source: where the student's images come from, by class_path: InvertedPool (default),
                GeneratorSource, GaussianNoise, RealImages or Mixture (lightning_modules.sources).
            teacher_arch: the teacher's network, if its file does not name it: a registered name
                (`python -m dafl models`), `timm/NAME`, or a class path (`torchvision.models.resnet18`,
                your own `package.module.Class`), as a string or {class_path, init_args}.
            teacher_key_prefix: prefix stripped from the file's keys before they must match the network's
                exactly (e.g. `model.` for a Lightning module that holds the network as `self.model`).
            teacher_input: the teacher's input contract, for a file that does not record it: any of
                input_size (what the network takes), native_size (real images), channels, mean, std.
                Missing values come from the teacher file, then from `dataset`.
            dataset: registered dataset whose conventions complete the input contract (`fit` uses
                data.eval_dataset).
            student_arch: the student's network: a registered name, `timm/NAME` or a class path, like
                teacher_arch; it must return as many logits as the teacher.
            student_init: 'random' (the architecture's own initialisation), 'zip_teacher' (the
                teacher's weights, BatchNorm folded, zipped to the student's width on the source's
                reference images; LeNet-5 teacher and student), or 'auto' (default): 'zip_teacher' where the
                pair and the source allow it and the teacher has BatchNorm, else 'random' (the log
                says which and why). Not redone when a run resumes.
            student_init_from: weights file of the network 'zip_teacher' zips instead of the teacher,
                e.g. a full ZipIt merge (`python -m dafl zip`, depth full) for a student that learns
                from the ensemble of the same teachers.
            batch_size: images per student step (and per generator step).
            student_steps: student updates per iteration.
            kd_temperature: temperature of the KD loss.
            augment_shift: random shift, in pixels, of every student batch (0: off).
            augment_flip: random horizontal flip of half of each student batch.
            mixup_alpha: blend each student image with another of its batch, weight ~ Beta(alpha, alpha);
                the teacher labels the blend (0: off).
            cutmix_prob: probability that a student batch gets CutMix instead of mixup (0: off).
            student_optimizer: the student's optimizer (default: SGD, lr 0.1, momentum 0.9, wd 5e-4).
            student_lr_schedule: 'constant', 'cosine' (to zero over the run) or 'multistep'.
            student_lr_milestones: epochs at which a 'multistep' schedule divides the student's lr by 10.
            student_lr_warmup: iterations over which the student's lr rises linearly to its value.
            val_size: held-out source images for the label-free validation signal `val/agreement`
                (student-teacher top-1 agreement).
            channels_last: NHWC memory format for every network (speed only).
            compile: `torch.compile` the networks in place (speed only; bf16 is the Trainer's `precision`).
            finite_check_every: check the losses for NaN/inf every this many steps (a check waits for
                the device; a NaN persists, so a later check still catches it).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["source", "student_optimizer"])
        self.automatic_optimization = False
        for name in ("batch_size", "student_steps", "val_size", "finite_check_every"):
            if self.hparams[name] <= 0:
                raise ConfigError(f"{name} must be positive, got {self.hparams[name]}")
        for name in ("augment_shift", "mixup_alpha", "student_lr_warmup"):
            if self.hparams[name] < 0:
                raise ConfigError(f"{name} must be >= 0, got {self.hparams[name]}")
        if not 0 <= cutmix_prob <= 1 or kd_temperature <= 0:
            raise ConfigError("cutmix_prob must be in [0, 1] and kd_temperature > 0")
        self.student_optimizer_factory = check_optimizer(student_optimizer, "student_optimizer")

        explicit = contract_settings(teacher_input)
        defaults = dataset_contract(dataset) if dataset else {}
        teacher_net, meta = load_classifier(teacher, arch=teacher_arch, in_channels=explicit.get("in_channels"),
                                            image_size=explicit.get("image_size"), key_prefix=teacher_key_prefix,
                                            defaults=defaults)
        self.freeze_teacher(teacher_net)
        self.contract = complete_contract(meta, explicit, defaults)
        self.teacher_meta = {**meta, **self.contract.metadata()}
        shape = {k: self.teacher_meta[k] for k in ("in_channels", "num_classes", "image_size")}
        self.student = build_network(student_arch, **shape)
        classes = output_classes(self.student, shape["in_channels"], shape["image_size"], f"student {student_arch}")
        if classes != shape["num_classes"]:
            raise ConfigError(f"the student {student_arch} returns {classes} logits but the teacher {shape['num_classes']}")
        self.source = source if source is not None else InvertedPool()
        self.init_network = [self.teacher]  # a list: not a child module, not in checkpoints
        if student_init_from is not None:
            if student_init != "zip_teacher":
                raise ConfigError("student_init_from is the network student_init 'zip_teacher' zips; set both")
            network, _ = load_classifier(student_init_from)
            network = network.single_network() if hasattr(network, "single_network") else network
            if output_classes(network, shape["in_channels"], shape["image_size"], student_init_from) != classes:
                raise ConfigError(f"student_init_from {student_init_from} does not give the teacher's "
                                  f"{classes} classes")
            self.init_network = [network.eval().requires_grad_(False)]
        refusal = zip_refusal(self.init_network[0], self.student)
        if refusal is None and not self.source.has_reference_images:
            refusal = (f"student_init 'zip_teacher' needs a source with reference images (InvertedPool, "
                       f"RealImages), not {type(self.source).__name__}")
        if student_init == "zip_teacher" and refusal:
            raise ConfigError(refusal)
        if refusal is None and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                       for m in self.init_network[0].modules()):
            # 'auto' goes as far as the measurements (benchmarks/teachers.md): BatchNorm teachers
            refusal = "the teacher has no BatchNorm layer"
        self.zips_student = student_init == "zip_teacher" or (student_init == "auto" and refusal is None)
        if student_init == "auto" and refusal:
            rank_zero_info(f"student_init auto starts the student at random: {refusal}")
        self.source.bind(self.teacher, self.contract, shape["num_classes"], self.student)
        # A training batch holds each image's activations too: about 64 images' worth for these networks.
        check_memory({"batch_size": (batch_size, 64), "val_size": (val_size, 1), **self.source.memory_needs()},
                     image_bytes=4 * shape["in_channels"] * shape["image_size"] ** 2)
        for network in (self.teacher, self.student, *self.source.networks()):
            if channels_last:
                network.to(memory_format=torch.channels_last)
            if compile:
                network.compile()

    # ------------------------------------------------------------------ plumbing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def setup(self, stage: str):
        if stage == "fit" and self.trainer.world_size > 1:
            # Same seed on every process would draw the same images everywhere: offset by rank.
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        info = getattr(self.trainer.datamodule, "info", None) if self.trainer else None
        if info is not None:
            for key, value in (("num_classes", info.num_classes), ("in_channels", info.channels)):
                if self.teacher_meta[key] != value:
                    raise ConfigError(f"the teacher has {key}={self.teacher_meta[key]} but dataset {info.name} has {value}")

    def export_metadata(self) -> dict:
        """What `dafl export` needs to rebuild the student without the teacher."""
        meta, hp = self.teacher_meta, self.hparams
        info = getattr(self.trainer.datamodule, "info", None) if self._trainer else None
        fallback = {"dataset": info.name, "native_size": info.size, "mean": info.mean, "std": info.std,
                    "class_names": info.class_names} if info else {
            "dataset": None, "native_size": meta["image_size"], "mean": [0.0] * meta["in_channels"],
            "std": [1.0] * meta["in_channels"], "class_names": None}
        return {**fallback, **{k: meta[k] for k in fallback if meta.get(k) is not None},
                "kind": "student", "method": f"distillation from {type(self.source).__name__}",
                "arch": spec_name(hp.student_arch), "num_classes": meta["num_classes"], "in_channels": meta["in_channels"],
                "image_size": meta["image_size"], "teacher": str(hp.teacher), "teacher_arch": meta["arch"],
                "state_prefix": "student.", "format": CHECKPOINT_FORMAT}

    def on_load_checkpoint(self, checkpoint):
        if checkpoint.get("dafl", {}).get("format") != CHECKPOINT_FORMAT:
            raise ConfigError("this checkpoint was written by an older dafl (before image sources) and cannot be "
                              "resumed; `python -m dafl export --ckpt` still exports its student")

    def on_train_epoch_start(self):
        # The source's one-off work (an inverted pool) runs in the first epoch rather than at fit
        # start, so that its time counts as training time (benchmarks time epochs).
        trainer = self.trainer
        self.source.prepare(show_progress=trainer.progress_bar_callback is not None and trainer.is_global_zero)
        if self.zips_student and self.global_step == 0 and self.current_epoch == 0:
            self._zip_teacher_into_student()

    def _zip_teacher_into_student(self):
        zip_teacher_into_student(self.init_network[0].to(self.device), self.student, self.source.reference_images())
        if self.trainer.world_size > 1:  # each rank zipped its own images: take rank 0's
            self.student.load_state_dict(self.trainer.strategy.broadcast(self.student.state_dict(), src=0))
        origin = self.hparams.student_init_from or "the teacher"
        rank_zero_info(f"Student initialised from {origin}, zipped to its width on the source's images")

    def check_finite(self, losses: dict[str, torch.Tensor]):
        if self._batch_idx % self.hparams.finite_check_every:
            return
        for name, value in losses.items():
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss {name} became {value.item()} at epoch {self.current_epoch}, "
                                         f"iteration {self._batch_idx}")

    def source_optimizer(self) -> Optional[torch.optim.Optimizer]:
        optimizers = self.optimizers()
        return optimizers[1] if isinstance(optimizers, list) else None

    def kd(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(self.student(images), teacher_logits.detach(), self.hparams.kd_temperature)

    # ------------------------------------------------------------------ training

    def training_step(self, batch, batch_idx):
        self._batch_idx, hp = batch_idx, self.hparams
        optimizers = self.optimizers()
        opt_student = optimizers[0] if isinstance(optimizers, list) else optimizers
        source_losses = self.source.update(self, hp.batch_size)
        steps = hp.student_steps
        joint = self.source.joint_batch(hp.batch_size)
        if joint is not None:  # one backward for the source's loss and the student's KD loss
            images, teacher_logits, source_losses = joint
            loss_kd = self.kd(images.detach(), teacher_logits)
            self.check_finite({**source_losses, "kd": loss_kd})
            opt_source = self.source_optimizer()
            opt_source.zero_grad()
            opt_student.zero_grad()
            self.manual_backward(source_losses["total"] + loss_kd)
            opt_source.step()
            opt_student.step()
            steps -= 1
        for _ in range(steps):
            images = augment_batch(self.source.sample(hp.batch_size), hp.augment_shift, hp.augment_flip,
                                   hp.mixup_alpha, hp.cutmix_prob)
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss_kd = self.kd(images, teacher_logits)
            self.check_finite({"kd": loss_kd})
            opt_student.zero_grad()  # also clears gradients an adversarial source term left on the student
            self.manual_backward(loss_kd)
            opt_student.step()
        self._step_schedulers(batch_idx)
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in source_losses.items()}, batch_size=hp.batch_size)
        self.log("train/loss_kd", loss_kd.detach(), prog_bar=True, batch_size=hp.batch_size)

    def _step_schedulers(self, batch_idx: int):
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        last_of_epoch = batch_idx == self.trainer.num_training_batches - 1
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if not isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) or last_of_epoch:
                scheduler.step()

    def configure_optimizers(self):
        make = self.student_optimizer_factory or (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4))
        opt_student = make(self.student.parameters())
        opt_source = self.source.configure_optimizer()
        hp = self.hparams
        schedulers = student_schedulers(opt_student, hp.student_lr_schedule, self.trainer.estimated_stepping_batches,
                                        hp.student_lr_milestones, hp.student_lr_warmup)
        optimizers = [opt_student] + ([opt_source] if opt_source is not None else [])
        return (optimizers, schedulers) if schedulers else optimizers

    # ------------------------------------------------------------------ label-free validation, real-data test

    def held_out_images(self) -> list[torch.Tensor]:
        return self.source.held_out(self.hparams.val_size, self.hparams.batch_size)

    def validation_step(self, batch, batch_idx):
        agree, kd, n = 0.0, 0.0, 0
        for images in self.held_out_images():
            teacher_logits, student_logits = self.teacher(images), self.student(images)
            agree += (teacher_logits.argmax(1) == student_logits.argmax(1)).sum()
            kd += kd_loss(student_logits, teacher_logits, self.hparams.kd_temperature) * len(images)
            n += len(images)
        self.log("val/agreement", agree / n, prog_bar=True, batch_size=n)
        self.log("val/loss_kd", kd / n, batch_size=n)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.log("test/acc", (self.student(images).argmax(1) == labels).float().mean(), batch_size=len(labels))
        self.log("test/teacher_acc", (self.teacher(images).argmax(1) == labels).float().mean(), batch_size=len(labels))
