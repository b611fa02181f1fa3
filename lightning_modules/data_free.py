"""Data-free knowledge distillation (DAFL, Chen et al. ICCV 2019) and its levers.

A generator learns images that the frozen teacher finds meaningful (`GeneratorObjective`);
a student imitates the teacher on them (`StudentObjective`). Two schedules:

- `official`: one combined backward of generator loss + student KD loss, both optimizers
  step; the student trains on the generator's pre-update batch (the published code).
- `alternating`: `generator_steps` generator updates, then `student_steps` student
  updates on fresh generator samples (or on batches drawn from the replay memory).

With `synthetic="inverted"` no generator is trained: every student image comes from a
fixed pool of dead-leaves shapes inverted through the teacher (`dafl.procedural`).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from dafl.distributed import gather_with_grad
from dafl.contract import complete_contract, contract_settings, dataset_contract
from dafl.datasets import missing_input_metadata
from dafl.errors import ConfigError
from dafl.models import spec_name
from dafl.losses import BatchNormStatistics
from dafl.procedural import ProceduralShapes, class_cycle, invert_toward_classes
from dafl.student_init import check_zippable, zip_teacher_into_student
from dafl.weights import load_classifier
from lightning_modules.classifier import check_optimizer
from lightning_modules.generator import GeneratorObjective
from lightning_modules.student import ReplayMemory, StudentObjective


def physical_memory_bytes() -> int:
    """This machine's memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class DataFreeDistillation(L.LightningModule):
    def __init__(
        self,
        teacher: str = "checkpoints/fashion_mnist_lenet5_bn.safetensors",
        teacher_arch: Optional[Union[str, dict]] = None,
        teacher_key_prefix: Optional[str] = None,
        teacher_input: Optional[dict] = None,
        dataset: Optional[str] = None,
        teacher_feature_layer: Optional[str] = None,
        student_arch: Union[str, dict] = "lenet5_half",
        student_init: Literal["random", "zip_teacher"] = "random",
        latent_dim: int = 100,
        generator_arch: Literal["dafl", "native"] = "dafl",
        generator_width: int = 128,
        batch_size: int = 512,
        schedule: Literal["official", "alternating"] = "official",
        synthetic: Literal["generator", "gaussian", "inverted"] = "generator",
        generator_steps: int = 1,
        student_steps: int = 1,
        one_hot_weight: float = 1.0,
        activation_weight: float = 0.1,
        entropy_weight: float = 5.0,
        entropy_log_base: float = 10.0,
        bn_stat_weight: float = 0.0,
        adversarial_weight: float = 0.0,
        diversity_weight: float = 0.0,
        kd_temperature: float = 1.0,
        native_padding: bool = False,
        class_conditional: bool = False,
        balanced_one_hot: bool = False,
        replay_size: int = 0,
        augment_shift: int = 0,
        augment_flip: bool = False,
        mixup_alpha: float = 0.0,
        cutmix_prob: float = 0.0,
        procedural_fraction: float = 0.0,
        procedural_shapes: int = 3,
        procedural_scale: float = 1.5,
        procedural_inversion_steps: int = 0,
        procedural_pool_size: int = 4096,
        procedural_inversion_batch: int = 1024,
        procedural_class_weights: Optional[list[int]] = None,
        procedural_symmetric_classes: Optional[list[int]] = None,
        generator_optimizer: Optional[OptimizerCallable] = None,
        student_optimizer: Optional[OptimizerCallable] = None,
        student_lr_schedule: Literal["constant", "cosine", "multistep"] = "constant",
        student_lr_milestones: list[int] = [],  # epochs at which the student's lr is divided by 10
        student_lr_warmup: int = 0,
        val_size: int = 1024,
        channels_last: bool = False,
        compile: bool = False,
        finite_check_every: int = 1,
    ):
        """
        Args:
            teacher: weights file of the trained classifier: safetensors, a plain state dict (.pt/.pth)
                or a Lightning .ckpt (its state_dict); files that would run code are refused.
            teacher_arch: the teacher's network, if its file does not name it: a registered name
                (`python -m dafl models`), `timm/NAME`, or a class path (`torchvision.models.resnet18`,
                your own `package.module.Class`), as a string or {class_path, init_args}.
            teacher_key_prefix: prefix stripped from the file's keys before they must match the network's
                exactly (e.g. `model.` for a Lightning module that holds the network as `self.model`).
            teacher_input: the teacher's input contract, for a file that does not record it: any of
                input_size (what the network takes), native_size (real images), channels, mean, std.
                Missing values come from the teacher file, then from `dataset`.
            dataset: registered dataset whose conventions complete the input contract (`fit` uses
                data.eval_dataset; Fashion-MNIST: 28 px padded to 32, mean 0.286, std 0.353).
            teacher_feature_layer: module of the teacher whose input is the penultimate feature vector of
                DAFL's activation loss (default: the network's own `return_features`, else its last nn.Linear).
            student_arch: the student's network: a registered name, `timm/NAME` or a class path, like
                teacher_arch; it must return as many logits as the teacher.
            student_init: 'random' (the architecture's own initialisation) or 'zip_teacher' (the
                teacher's weights, BatchNorm folded, zipped to the student's width on the inverted pool).
                'zip_teacher' needs LeNet-5 teacher and student and the inverted pool; it is not redone
                when a run resumes.
            latent_dim: size of the generator's latent vector.
            generator_arch: 'dafl' (the official generator, normalised output at the network's input
                size) or 'native' (pixels in [0, 1] at the teacher's native size, padded and normalised
                like real inputs).
            generator_width: channels of the generator's first conv block (official 128).
            batch_size: synthetic images per generator or student step.
            schedule: 'official' (one combined backward of generator and student losses per iteration)
                or 'alternating' (generator_steps generator updates, then student_steps student updates).
            synthetic: where student images come from: 'generator' (DAFL), 'gaussian' (noise) or
                'inverted' (only the inverted pool; no generator is trained).
            generator_steps: generator updates per iteration with the 'alternating' schedule.
            student_steps: student updates per iteration with the 'alternating' schedule.
            one_hot_weight: weight of DAFL's one-hot loss (cross-entropy against the teacher's arg-max).
            activation_weight: weight of DAFL's activation loss (-mean |penultimate features|).
            entropy_weight: weight of DAFL's information-entropy loss (class balance over a batch).
            entropy_log_base: logarithm base of the information-entropy loss (official: 10).
            bn_stat_weight: weight of DeepInversion's BatchNorm-statistics loss (needs a BatchNorm teacher).
            adversarial_weight: weight of the DFAD term: the generator maximises the student-teacher L1 gap.
            diversity_weight: weight of a mode-seeking term: different latents must give different images.
            kd_temperature: temperature of the student's KD loss.
            native_padding: generated images keep the constant border real inputs get when padded
                from the teacher's native size (e.g. 28 -> 32).
            class_conditional: the generator gets a one-hot class code and the one-hot loss asks for it.
            balanced_one_hot: the one-hot loss aims each batch at equal class quotas instead of the arg-max.
            replay_size: generator images kept for student steps to sample from (0: fresh samples only).
            augment_shift: random shift, in pixels, of the student's synthetic batches (0: off).
            augment_flip: random horizontal flip of half of each student batch.
            mixup_alpha: blend each student image with another of its batch, weight ~ Beta(alpha, alpha);
                the teacher labels the blend (0: off).
            cutmix_prob: probability that a student batch gets CutMix instead of mixup (0: off).
            procedural_fraction: share of each student batch replaced by procedural "dead leaves"
                shapes, which the teacher labels (0: off).
            procedural_shapes: shapes per procedural image.
            procedural_scale: size of the procedural shapes (half-axes 0.1-0.7 of the half-frame, times this).
            procedural_inversion_steps: Adam steps that move each pool image's pixels until the teacher
                sees its assigned class with real-data BatchNorm statistics (0: no pool, fresh shapes).
                The pool is built once, in the first epoch (again on resume).
            procedural_pool_size: images in the inverted pool the student trains on.
            procedural_inversion_batch: shapes inverted together: the batch whose statistics must match
                the teacher's BatchNorm statistics (it changes the images, not only the speed).
            procedural_class_weights: one whole number >= 1 per class: how often each class is an
                inversion target in the training pool (None: balanced).
            procedural_symmetric_classes: classes whose inverted training images start and stay
                left-right mirror symmetric (None: no constraint).
            generator_optimizer: the generator's optimizer (default: Adam, lr 0.2, the official MNIST recipe).
            student_optimizer: the student's optimizer (default: Adam, lr 2e-3, the official MNIST recipe).
            student_lr_schedule: 'constant', 'cosine' (to zero over the run) or 'multistep'.
            student_lr_milestones: epochs at which a 'multistep' schedule divides the student's lr by 10.
            student_lr_warmup: iterations over which the student's lr rises linearly to its value
                (early generator images are noise; a full lr on them can kill the student's ReLUs).
            val_size: held-out synthetic images for the label-free validation signal `val/agreement`
                (student-teacher top-1 agreement).
            channels_last: NHWC memory format for every network (speed only).
            compile: `torch.compile` generator, teacher and student in place (speed only; bf16 is the
                Trainer's `precision`).
            finite_check_every: check the losses for NaN/inf every this many steps (a check waits for
                the device; a NaN persists, so a later check still catches it).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["generator_optimizer", "student_optimizer"])
        self.automatic_optimization = False
        self._validate_hparams()
        self.generator_optimizer_factory = check_optimizer(generator_optimizer, "generator_optimizer")
        self.student_optimizer_factory = check_optimizer(student_optimizer, "student_optimizer")

        explicit = contract_settings(teacher_input)
        defaults = dataset_contract(dataset) if dataset else {}
        self.teacher, meta = load_classifier(teacher, arch=teacher_arch, in_channels=explicit.get("in_channels"),
                                             image_size=explicit.get("image_size"), key_prefix=teacher_key_prefix,
                                             defaults=defaults)
        self.teacher_meta = complete_contract(meta, explicit, defaults)
        self.teacher.eval().requires_grad_(False)
        shape = {k: self.teacher_meta[k] for k in ("in_channels", "num_classes", "image_size")}
        self._check_memory()
        if procedural_class_weights is not None:
            try:  # checked here, where the teacher's number of classes is known
                class_cycle(shape["num_classes"], procedural_class_weights)
            except ValueError as error:
                raise ConfigError(f"procedural_class_weights: {error}") from None
        if procedural_symmetric_classes is not None:
            classes = procedural_symmetric_classes
            if any(int(c) != c or not 0 <= c < shape["num_classes"] for c in classes) or len(set(classes)) != len(classes):
                raise ConfigError(f"procedural_symmetric_classes must be distinct class indices in "
                                  f"[0, {shape['num_classes']}), got {list(classes)}")
        self.student = StudentObjective(student_arch, **shape, temperature=kd_temperature,
                                        augment_shift=augment_shift, augment_flip=augment_flip,
                                        mixup_alpha=mixup_alpha, cutmix_prob=cutmix_prob)
        if student_init == "zip_teacher":
            check_zippable(self.teacher, self.student.net)
        self.generator = GeneratorObjective(latent_dim, shape["image_size"], shape["in_channels"], generator_width,
                                            one_hot_weight, activation_weight, entropy_weight, entropy_log_base,
                                            bn_stat_weight, adversarial_weight, shape["num_classes"],
                                            class_conditional, generator_arch, self.teacher_meta, diversity_weight,
                                            balanced_one_hot)
        if native_padding:
            self._set_native_frame()
        self.generator.attach(self.teacher, features=synthetic == "generator", feature_layer=teacher_feature_layer)
        if channels_last:
            for network in (self.generator.net, self.teacher, self.student.net):
                network.to(memory_format=torch.channels_last)
        if compile:
            for network in (self.generator.net, self.teacher, self.student.net):
                network.compile()
        self.replay = ReplayMemory(replay_size, self._image_shape()) if replay_size else None
        self.procedural = self._procedural_shapes() if procedural_fraction > 0 or synthetic == "inverted" else None
        self.procedural_pool: Optional[torch.Tensor] = None  # inverted shapes, built in the first epoch
        self.validation_pool: Optional[torch.Tensor] = None  # held-out inverted shapes ('inverted' only)
        # Fixed latent bank for the label-free validation signal and the sample grids.
        bank, _ = self.generator.latents(val_size, generator=torch.Generator().manual_seed(1234))
        self.register_buffer("val_latents", bank)

    def _set_native_frame(self):
        meta = self.teacher_meta
        if meta.get("native_size") is None or meta.get("mean") is None:
            raise ConfigError("native_padding needs the teacher's native_size, mean and std: set teacher_input "
                              "or a registered dataset")
        border = (meta["image_size"] - meta["native_size"]) // 2
        if border <= 0 or meta["image_size"] - meta["native_size"] != 2 * border:
            raise ConfigError(f"native_padding: the teacher's {meta['native_size']}px inputs are not padded "
                              f"to {meta['image_size']}px")
        pad_value = -torch.tensor(meta["mean"]) / torch.tensor(meta["std"])  # a black pixel, normalised
        self.generator.set_frame(border, pad_value)

    def _procedural_shapes(self) -> ProceduralShapes:
        meta, hp = self.teacher_meta, self.hparams
        missing = missing_input_metadata(meta)
        if missing:
            what = "synthetic 'inverted'" if hp.synthetic == "inverted" else "procedural_fraction"
            settings = ", ".join(f"teacher_input.{k}" for k in missing)
            raise ConfigError(f"{what} needs the teacher's input contract: set {settings}, or a registered "
                              "dataset (--data.eval_dataset / --model.dataset) whose conventions it follows")
        return ProceduralShapes(meta["native_size"], meta["image_size"], meta["mean"], meta["std"],
                                hp.procedural_shapes, hp.procedural_scale)

    def _check_memory(self):
        """Sizes that cannot fit in this machine's memory fail now, in one line, not after
        minutes of work (or an allocator traceback)."""
        hp, meta = self.hparams, self.teacher_meta
        image_bytes = 4 * meta["in_channels"] * meta["image_size"] ** 2
        memory = physical_memory_bytes()
        # A training batch holds each image's activations too: about 64 images' worth for these networks.
        needs = {"batch_size": 64 * image_bytes * hp.batch_size, "val_size": image_bytes * hp.val_size,
                 "replay_size": image_bytes * hp.replay_size,
                 "procedural_inversion_batch": 64 * image_bytes * hp.procedural_inversion_batch}
        if hp.synthetic == "inverted" or hp.procedural_inversion_steps:
            needs["procedural_pool_size"] = image_bytes * hp.procedural_pool_size
        for name, nbytes in needs.items():
            if memory and nbytes > memory // 2:
                raise ConfigError(f"{name} {hp[name]:,} needs about {nbytes / 2**30:,.0f} GiB, more than half of this "
                                  f"machine's {memory / 2**30:,.0f} GiB of memory")

    def _validate_hparams(self):
        hp = self.hparams
        for name in ("latent_dim", "generator_width", "batch_size", "generator_steps", "student_steps", "val_size",
                     "finite_check_every"):
            if hp[name] <= 0:
                raise ConfigError(f"{name} must be positive, got {hp[name]}")
        for name in ("one_hot_weight", "activation_weight", "entropy_weight", "bn_stat_weight", "adversarial_weight",
                     "diversity_weight", "replay_size", "augment_shift", "mixup_alpha", "student_lr_warmup"):
            if hp[name] < 0:
                raise ConfigError(f"{name} must be >= 0, got {hp[name]}")
        if not 0 <= hp.cutmix_prob <= 1:
            raise ConfigError(f"cutmix_prob must be in [0, 1], got {hp.cutmix_prob}")
        if not 0 <= hp.procedural_fraction < 1:
            raise ConfigError(f"procedural_fraction must be in [0, 1), got {hp.procedural_fraction}")
        if min(hp.procedural_shapes, hp.procedural_scale, hp.procedural_pool_size, hp.procedural_inversion_batch) <= 0:
            raise ConfigError("procedural_shapes, procedural_scale, procedural_pool_size and procedural_inversion_batch "
                              "must be positive")
        if hp.procedural_class_weights is not None and not hp.procedural_inversion_steps:
            raise ConfigError("procedural_class_weights weights the inverted pool's classes: set "
                              "procedural_inversion_steps > 0")
        if hp.procedural_symmetric_classes is not None and not hp.procedural_inversion_steps:
            raise ConfigError("procedural_symmetric_classes shapes the inverted pool's images: set "
                              "procedural_inversion_steps > 0")
        if hp.procedural_inversion_steps < 0:
            raise ConfigError(f"procedural_inversion_steps must be >= 0, got {hp.procedural_inversion_steps}")
        if hp.synthetic == "inverted" and (not hp.procedural_inversion_steps or hp.procedural_fraction):
            raise ConfigError("synthetic 'inverted' draws every student image from the inverted pool: set "
                              "procedural_inversion_steps > 0 and procedural_fraction 0")
        if hp.procedural_inversion_steps and not hp.procedural_fraction and hp.synthetic != "inverted":
            raise ConfigError("procedural_inversion_steps inverts the procedural images: set procedural_fraction > 0, "
                              "or procedural_inversion_steps 0 to turn the shapes off")
        if hp.student_init not in ("random", "zip_teacher"):
            raise ConfigError(f"student_init must be 'random' or 'zip_teacher', got {hp.student_init!r}")
        if hp.student_init == "zip_teacher" and not hp.procedural_inversion_steps:
            raise ConfigError("student_init 'zip_teacher' measures the teacher's feature correlations on the "
                              "inverted pool: set procedural_inversion_steps > 0")
        if hp.kd_temperature <= 0 or hp.entropy_log_base <= 1:
            raise ConfigError("kd_temperature must be > 0 and entropy_log_base > 1")
        if hp.synthetic != "generator" and hp.schedule == "official":
            raise ConfigError(f"synthetic '{hp.synthetic}' trains no generator: use schedule 'alternating'")
        if hp.balanced_one_hot and hp.class_conditional:
            raise ConfigError("balanced_one_hot and class_conditional both balance the classes: choose one")
        if hp.native_padding and hp.generator_arch == "native":
            raise ConfigError("native_padding is for generator_arch 'dafl'; the native generator pads like real inputs")
        if hp.schedule == "official" and (hp.generator_steps != 1 or hp.student_steps != 1 or hp.replay_size
                                          or hp.procedural_fraction):
            raise ConfigError("schedule 'official' is one combined step: use generator_steps=1, student_steps=1, "
                              "replay_size=0, procedural_fraction=0, or schedule 'alternating'")

    # ------------------------------------------------------------------ plumbing

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: running statistics, never batch statistics
        return self

    def state_dict(self, *args, **kwargs):
        # The teacher is reloaded from its file; checkpoints hold generator + student only.
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if not k.startswith("teacher."))

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("teacher.")}
        state_dict.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def setup(self, stage: str):
        if stage == "fit" and self.trainer.world_size > 1:
            # Same seed on every process would draw the same latents everywhere: offset by rank.
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        info = getattr(self.trainer.datamodule, "info", None) if self.trainer else None
        meta = self.teacher_meta
        if info is not None:
            for key, value in (("num_classes", info.num_classes), ("in_channels", info.channels)):
                if meta[key] != value:
                    raise ConfigError(f"the teacher has {key}={meta[key]} but dataset {info.name} has {value}")

    def export_metadata(self) -> dict:
        """What `dafl export` needs to rebuild the student without the teacher."""
        meta, hp = self.teacher_meta, self.hparams
        info = getattr(self.trainer.datamodule, "info", None) if self._trainer else None
        fallback = {"dataset": info.name, "native_size": info.size, "mean": info.mean, "std": info.std,
                    "class_names": info.class_names} if info else {
            "dataset": None, "native_size": meta["image_size"], "mean": [0.0] * meta["in_channels"],
            "std": [1.0] * meta["in_channels"], "class_names": None}
        return {**fallback, **{k: meta[k] for k in fallback if meta.get(k) is not None},
                "kind": "student", "method": f"data-free distillation ({hp.schedule} schedule)",
                "arch": spec_name(hp.student_arch), "num_classes": meta["num_classes"], "in_channels": meta["in_channels"],
                "image_size": meta["image_size"], "teacher": str(hp.teacher), "teacher_arch": meta["arch"],
                "state_prefix": "student.net."}

    def on_train_epoch_start(self):
        # Built in the first epoch rather than at fit start, so that its time counts as
        # training time (benchmarks time epochs).
        self._build_pools()

    def _build_pools(self):
        """The inverted pool (and, for 'inverted', the held-out validation pool), once. Also
        called on first use: Lightning skips `on_train_epoch_start` when a run resumes from a
        mid-epoch checkpoint, and the pool is not in checkpoints (it is rebuilt, from the
        resumed random state, so a resumed run sees a different pool of the same kind)."""
        hp = self.hparams
        if hp.procedural_inversion_steps and self.procedural_pool is None:
            start = time.perf_counter()
            self.procedural_pool = self._invert_shapes(hp.procedural_pool_size, class_weights=hp.procedural_class_weights,
                                                       symmetric_classes=hp.procedural_symmetric_classes)
            if hp.synthetic == "inverted" and self.validation_pool is None:
                self.validation_pool = self._invert_shapes(len(self.val_latents), seed=1234)
            rank_zero_info(f"Inverted {hp.procedural_pool_size} procedural images through the teacher "
                           f"({hp.procedural_inversion_steps} steps each) in {time.perf_counter() - start:.0f} s")
            if hp.student_init == "zip_teacher" and self.global_step == 0:  # a fresh run, not a resumed one
                self._zip_teacher_into_student()

    def _zip_teacher_into_student(self):
        zip_teacher_into_student(self.teacher, self.student.net, self.procedural_pool)
        if self._trainer is not None and self.trainer.world_size > 1:  # each rank zipped its own pool: take rank 0's
            state = self.trainer.strategy.broadcast(self.student.net.state_dict(), src=0)
            self.student.net.load_state_dict(state)
        rank_zero_info("Student initialised from the teacher, zipped to its width on the inverted pool")

    def _invert_shapes(self, count: int, seed: Optional[int] = None,
                       class_weights: Optional[list[int]] = None,
                       symmetric_classes: Optional[list[int]] = None) -> torch.Tensor:
        """`count` dead-leaves shapes inverted through the teacher, in chunks of
        `procedural_inversion_batch` (each chunk one BatchNorm-statistics batch, classes
        balanced within it, or dealt by `class_weights`; those dealt to `symmetric_classes`
        mirror symmetric). With `seed`, the same images every
        time (the validation pool), whatever the global random state."""
        hp = self.hparams
        bn_stats = BatchNormStatistics(self.teacher)
        chunks = []
        fixed = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        # inference_mode(False): `validate` may ask for the validation pool inside Lightning's inference mode
        with fixed if seed is not None else contextlib.nullcontext(), torch.inference_mode(False):
            if seed is not None:
                torch.manual_seed(seed)
            # a bar for the main pool when Lightning shows one (minutes for the default's 32,768)
            trainer = self._trainer
            show = seed is None and trainer is not None and trainer.progress_bar_callback is not None \
                and trainer.is_global_zero
            with tqdm(total=count, desc="inverting shapes through the teacher", unit="img", leave=False,
                      disable=not show) as bar:
                chunk = hp.procedural_inversion_batch
                for first in range(0, count, chunk):
                    n = min(chunk, count - first)
                    chunks.append(invert_toward_classes(self.procedural.pixels(n), self.teacher, self.procedural.adapter,
                                                        self.teacher_meta["num_classes"], hp.procedural_inversion_steps,
                                                        bn_stats=bn_stats if bn_stats.layers else None,
                                                        class_weights=class_weights,
                                                        symmetric_classes=symmetric_classes))
                    bar.update(n)
        bn_stats.remove()
        return torch.cat(chunks)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["dafl"] = self.export_metadata()

    def _latents(self, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.generator.latents(n, device=self.device)

    def _image_shape(self) -> tuple[int, int, int]:
        meta = self.teacher_meta
        return meta["in_channels"], meta["image_size"], meta["image_size"]

    def _student_batch(self, n: int) -> torch.Tensor:
        self._build_pools()
        procedural = round(n * self.hparams.procedural_fraction)
        images = self._synthetic_batch(n - procedural)
        if procedural and self.procedural_pool is not None:
            pick = torch.randint(len(self.procedural_pool), (procedural,), device=self.procedural_pool.device)
            images = torch.cat([images, self.procedural_pool[pick].to(images)])
        elif procedural:
            images = torch.cat([images, self.procedural(procedural).to(images)])
        return images

    def _synthetic_batch(self, n: int) -> torch.Tensor:
        if self.hparams.synthetic == "inverted":  # the pool exists: `_student_batch` built it
            return self.procedural_pool[torch.randint(len(self.procedural_pool), (n,), device=self.procedural_pool.device)]
        if self.hparams.synthetic == "gaussian":
            return torch.randn(n, *self._image_shape(), device=self.device)
        if self.replay is not None:
            return self.replay.sample(n)
        return self.generator.sample(self._latents(n)[0])

    def _held_out_images(self, z: torch.Tensor, chunk: int) -> torch.Tensor:
        """Validation images from the fixed latent bank (or fixed noise for 'gaussian', or a
        fixed held-out pool of inverted shapes for 'inverted')."""
        if self.hparams.synthetic == "inverted":
            if self.validation_pool is None:
                self.validation_pool = self._invert_shapes(len(self.val_latents), seed=1234)
            first = chunk * self.hparams.batch_size
            return self.validation_pool[first:first + len(z)]
        if self.hparams.synthetic == "gaussian":
            noise = torch.Generator().manual_seed(chunk)
            return torch.randn(z.shape[0], *self._image_shape(), generator=noise).to(self.device)
        return self.generator.sample(z)

    def preview_images(self, n: int) -> torch.Tensor:
        """The first `n` validation images (generator samples of the fixed latent bank, or
        the held-out inverted shapes): what `SampleGrid` shows."""
        return self._held_out_images(self.val_latents[:n], 0)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(t)

    def _check_finite(self, losses: dict[str, torch.Tensor]):
        if self._batch_idx % self.hparams.finite_check_every:
            return
        for name, value in losses.items():
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss {name} became {value.item()} at epoch {self.current_epoch}, "
                                         f"iteration {self._batch_idx}")

    # ------------------------------------------------------------------ training

    def training_step(self, batch, batch_idx):
        self._batch_idx = batch_idx
        opt_g, opt_s = self.optimizers()
        hp = self.hparams
        if hp.schedule == "official":
            z, targets = self._latents(hp.batch_size)
            images = self.generator(z)
            g_losses, teacher_logits, _ = self.generator.losses(images, self.teacher, self._gather, targets=targets,
                                                                latents=z)
            loss_kd = self.student.loss(images.detach(), teacher_logits)
            self._check_finite({**g_losses, "kd": loss_kd})
            opt_g.zero_grad()
            opt_s.zero_grad()
            self.manual_backward(g_losses["total"] + loss_kd)
            opt_g.step()
            opt_s.step()
        else:
            g_losses = {}
            for _ in range(hp.generator_steps if hp.synthetic == "generator" else 0):
                z, targets = self._latents(hp.batch_size)
                images = self.generator(z)
                student = self.student if hp.adversarial_weight > 0 else None
                g_losses, _, _ = self.generator.losses(images, self.teacher, self._gather, student, targets, z)
                self._check_finite(g_losses)
                opt_g.zero_grad()
                self.manual_backward(g_losses["total"])
                opt_g.step()
                if self.replay is not None:
                    self.replay.push(images)
            for _ in range(hp.student_steps):
                images = self.student.augment(self._student_batch(hp.batch_size))
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
                loss_kd = self.student.loss(images, teacher_logits)
                self._check_finite({"kd": loss_kd})
                opt_s.zero_grad()  # also clears gradients the adversarial term left on the student
                self.manual_backward(loss_kd)
                opt_s.step()
        self._step_schedulers(batch_idx)
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in g_losses.items()}, batch_size=hp.batch_size)
        self.log("train/loss_kd", loss_kd.detach(), prog_bar=True, batch_size=hp.batch_size)

    def _step_schedulers(self, batch_idx: int):
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        last_of_epoch = batch_idx == self.trainer.num_training_batches - 1
        for scheduler in schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):
                if last_of_epoch:
                    scheduler.step()
            else:
                scheduler.step()

    def configure_optimizers(self):
        # Defaults: the official MNIST recipe (generator Adam 0.2, student Adam 2e-3).
        make_g = self.generator_optimizer_factory or (lambda p: torch.optim.Adam(p, lr=0.2))
        make_s = self.student_optimizer_factory or (lambda p: torch.optim.Adam(p, lr=2e-3))
        opt_g, opt_s = make_g(self.generator.parameters()), make_s(self.student.parameters())
        schedule, warmup = self.hparams.student_lr_schedule, self.hparams.student_lr_warmup
        schedulers = []
        if schedule == "cosine":
            total = max(1, self.trainer.estimated_stepping_batches)
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=total))
        elif schedule == "multistep":
            schedulers.append(torch.optim.lr_scheduler.MultiStepLR(opt_s, milestones=self.hparams.student_lr_milestones,
                                                                   gamma=0.1))
        if warmup:
            # Chained after the main schedule: both step every iteration, their factors multiply.
            schedulers.append(torch.optim.lr_scheduler.LinearLR(opt_s, start_factor=1.0 / warmup, total_iters=warmup))
        return ([opt_g, opt_s], schedulers) if schedulers else [opt_g, opt_s]

    # ------------------------------------------------------------------ label-free validation, real-data test

    def validation_step(self, batch, batch_idx):
        agree, kd, n = 0.0, 0.0, 0
        for chunk, z in enumerate(self.val_latents.split(self.hparams.batch_size)):
            images = self._held_out_images(z, chunk)
            teacher_logits, student_logits = self.teacher(images), self.student(images)
            agree += (teacher_logits.argmax(1) == student_logits.argmax(1)).sum()
            kd += self.student.loss(images, teacher_logits) * len(z)
            n += len(z)
        self.log("val/agreement", agree / n, prog_bar=True, batch_size=n)
        self.log("val/loss_kd", kd / n, batch_size=n)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        student_acc = (self.student(images).argmax(1) == labels).float().mean()
        teacher_acc = (self.teacher(images).argmax(1) == labels).float().mean()
        self.log("test/acc", student_acc, batch_size=len(labels))
        self.log("test/teacher_acc", teacher_acc, batch_size=len(labels))
