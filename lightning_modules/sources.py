"""Image sources: where the student's training images come from. `StudentDistillation`
asks its source for a batch before every student step; the teacher labels whatever it
gets. Chosen in the YAML by `class_path`; `GeneratorSource` (lightning_modules/generator.py)
is the one that learns."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from dafl.contract import InputContract
from dafl.datasets import load_split, select_classes
from dafl.errors import ConfigError
from dafl.losses import BatchNormStatistics
from dafl.procedural import ProceduralShapes, class_cycle, invert_toward_classes

HELD_OUT_SEED = 1234  # validation images are the same every time, whatever the global random state


class ImageSource(nn.Module):
    """The interface. `bind` is called once the teacher is loaded, `prepare` at the start of
    every epoch; `sample(n)` gives a batch for a student step, `held_out(count, batch)` a
    fixed list of batches for the label-free validation signal."""

    #: what `SampleGrid` calls the validation images
    description = "synthetic images"
    #: whether `reference_images` gives images (what student_init 'zip_teacher' measures on)
    has_reference_images = False

    def bind(self, teacher: nn.Module, contract: InputContract, num_classes: int, student: nn.Module) -> None:
        self.teacher = [teacher]  # a list: the teacher is not this module's child
        self.contract, self.num_classes = contract, num_classes
        self.image_shape = (contract.channels, contract.input_size, contract.input_size)

    def prepare(self, show_progress: bool = False) -> None:
        """Work done once, before the first student step (a pool to build)."""

    def sample(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def held_out(self, count: int, batch_size: int) -> list[torch.Tensor]:
        raise NotImplementedError

    # A source that learns (a generator) overrides these three.
    def configure_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return None

    def update(self, module, batch_size: int) -> dict[str, torch.Tensor]:
        """Train the source once per iteration, before the student's steps; returns the
        named losses to log."""
        return {}

    def joint_batch(self, batch_size: int) -> Optional[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(images with gradients, teacher logits, named losses incl. 'total') for a step in
        which the source's loss and the student's share one backward, or None."""
        return None

    def reference_images(self) -> Optional[torch.Tensor]:
        """A fixed set of images representative of training (to zip the teacher into the
        student), or None where the source has none."""
        return None

    def networks(self) -> list[nn.Module]:
        """The source's own networks (for channels_last and torch.compile)."""
        return []

    def memory_needs(self) -> dict[str, tuple[int, int]]:
        """Settings that hold images in memory: name -> (value, images held per unit)."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.teacher[0].parameters()).device


def require_contract(contract: InputContract, what: str) -> None:
    missing = contract.missing()
    if missing:
        settings = ", ".join(f"teacher_input.{k}" for k in missing)
        raise ConfigError(f"{what} needs the teacher's input contract: set {settings}, or a registered "
                          "dataset (--data.eval_dataset / --model.dataset) whose conventions it follows")


class GaussianNoise(ImageSource):
    """Images of independent standard normal pixels in the network's input space: the
    baseline that shows what the teacher's knowledge is worth without meaningful images."""

    description = "Gaussian noise"

    def sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, *self.image_shape, device=self.device)

    def held_out(self, count: int, batch_size: int) -> list[torch.Tensor]:
        return [torch.randn(min(batch_size, count - first), *self.image_shape,
                            generator=torch.Generator().manual_seed(chunk)).to(self.device)
                for chunk, first in enumerate(range(0, count, batch_size))]


class InvertedPool(ImageSource):
    """A fixed pool of dead-leaves shapes (`dafl.procedural`), each moved by `inversion_steps`
    Adam steps on its pixels until the teacher sees its assigned class, with the teacher's
    BatchNorm statistics matched over `inversion_batch` shapes at a time. Built once, in the
    first epoch (again when a run resumes: the pool is not in checkpoints)."""

    description = "held-out inverted shapes"
    has_reference_images = True

    def __init__(self, pool_size: int = 32768, inversion_steps: int = 40, inversion_batch: int = 512,
                 shapes: int = 3, scale: float = 1.5, class_weights: Optional[list[int]] = None,
                 symmetric_classes: Optional[list[int]] = None):
        """
        Args:
            pool_size: images in the pool the student trains on.
            inversion_steps: Adam steps that move each image's pixels toward its class.
            inversion_batch: shapes inverted together: the batch whose statistics must match the
                teacher's BatchNorm statistics (it changes the images, not only the speed).
            shapes: shapes per image.
            scale: size of the shapes (half-axes 0.1-0.7 of the half-frame, times this).
            class_weights: one whole number >= 1 per class: how often each class is an inversion
                target (None: balanced).
            symmetric_classes: classes whose images start and stay left-right mirror symmetric.
        """
        super().__init__()
        for name, value in (("pool_size", pool_size), ("inversion_steps", inversion_steps),
                            ("inversion_batch", inversion_batch), ("shapes", shapes), ("scale", scale)):
            if value <= 0:
                raise ConfigError(f"InvertedPool {name} must be positive, got {value}")
        self.pool_size, self.inversion_steps, self.inversion_batch = pool_size, inversion_steps, inversion_batch
        self.shapes, self.scale = shapes, scale
        self.class_weights, self.symmetric_classes = class_weights, symmetric_classes
        self.pool: Optional[torch.Tensor] = None
        self.validation_pool: Optional[torch.Tensor] = None

    def bind(self, teacher: nn.Module, contract: InputContract, num_classes: int, student: nn.Module) -> None:
        super().bind(teacher, contract, num_classes, student)
        require_contract(contract, "InvertedPool")
        classes = num_classes
        if self.class_weights is not None:
            try:
                class_cycle(classes, self.class_weights)
            except ValueError as error:
                raise ConfigError(f"InvertedPool class_weights: {error}") from None
        symmetric = self.symmetric_classes
        if symmetric is not None and (any(int(c) != c or not 0 <= c < classes for c in symmetric)
                                      or len(set(symmetric)) != len(symmetric)):
            raise ConfigError(f"InvertedPool symmetric_classes must be distinct class indices in [0, {classes}), "
                              f"got {list(symmetric)}")
        self.shapes_maker = ProceduralShapes(contract.adapter(), self.shapes, self.scale)

    def prepare(self, show_progress: bool = False) -> None:
        if self.pool is None:
            self.pool = self._invert(self.pool_size, show_progress=show_progress, class_weights=self.class_weights,
                                     symmetric_classes=self.symmetric_classes)
            rank_zero_info(f"Inverted {self.pool_size} procedural images through the teacher "
                           f"({self.inversion_steps} steps each)")

    def sample(self, n: int) -> torch.Tensor:
        self.prepare()  # Lightning skips epoch-start hooks when a run resumes mid-epoch
        return self.pool[torch.randint(len(self.pool), (n,), device=self.pool.device)]

    def held_out(self, count: int, batch_size: int) -> list[torch.Tensor]:
        if self.validation_pool is None or len(self.validation_pool) != count:
            self.validation_pool = self._invert(count, seed=HELD_OUT_SEED)
        return list(self.validation_pool.split(batch_size))

    def reference_images(self) -> torch.Tensor:
        self.prepare()
        return self.pool

    def memory_needs(self) -> dict[str, tuple[int, int]]:
        return {"pool_size": (self.pool_size, 1), "inversion_batch": (self.inversion_batch, 64)}

    def _invert(self, count: int, seed: Optional[int] = None, show_progress: bool = False,
                class_weights: Optional[list[int]] = None, symmetric_classes: Optional[list[int]] = None
                ) -> torch.Tensor:
        teacher, device = self.teacher[0], self.device
        self.shapes_maker.to(device)
        bn_stats = BatchNormStatistics(teacher)
        chunks = []
        fixed = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        # inference_mode(False): `validate` may ask for held-out images inside Lightning's inference mode
        with fixed if seed is not None else contextlib.nullcontext(), torch.inference_mode(False):
            if seed is not None:
                torch.manual_seed(seed)
            with tqdm(total=count, desc="inverting shapes through the teacher", unit="img", leave=False,
                      disable=not show_progress) as bar:
                for first in range(0, count, self.inversion_batch):
                    n = min(self.inversion_batch, count - first)
                    chunks.append(invert_toward_classes(
                        self.shapes_maker.pixels(n), teacher, self.shapes_maker.adapter, self.num_classes,
                        self.inversion_steps, bn_stats=bn_stats if bn_stats.layers else None,
                        class_weights=class_weights, symmetric_classes=symmetric_classes))
                    bar.update(n)
        bn_stats.remove()
        return torch.cat(chunks)


class RealImages(ImageSource):
    """Images of a registered dataset or an image folder, labels unused: KD with the
    teacher's own data, or KD with alternative data (another dataset's images). Pixels are
    padded or resized to the teacher's input and normalised with the teacher's mean and std."""

    description = "real images"
    has_reference_images = True

    def __init__(self, dataset: str = "fashion-mnist", root: Optional[str] = None, split: str = "train",
                 classes: Optional[list[int]] = None):
        """
        Args:
            dataset: registered dataset name (`python -m dafl datasets`) or `image-folder` with root.
            root: folder holding it (default: where its package installs it).
            split: 'train' or 'test'.
            classes: keep only these classes' images.
        """
        super().__init__()
        try:  # loaded now: a missing dataset fails before any work
            data = load_split(dataset, split, root)
        except ConfigError as e:  # the loaders name the data module's setting; here it is this source's
            raise ConfigError(str(e).replace("--data.root", "--model.source.root")) from None
        self.images = select_classes(data, classes).images if classes is not None else data.images
        self.native_size, self.dataset = data.info.size, dataset

    def bind(self, teacher: nn.Module, contract: InputContract, num_classes: int, student: nn.Module) -> None:
        super().bind(teacher, contract, num_classes, student)
        if self.images.shape[1] != contract.channels:
            raise ConfigError(f"{self.dataset} has {self.images.shape[1]} channel(s), the teacher takes "
                              f"{contract.channels}")
        # this dataset's pixels, padded or resized and normalised the way the teacher's inputs are
        self.adapter = dataclasses.replace(contract, native_size=self.native_size).adapter()

    def _adapt(self, index: torch.Tensor) -> torch.Tensor:
        return self.adapter.to(self.device)(self.images[index].to(self.device))

    def sample(self, n: int) -> torch.Tensor:
        return self._adapt(torch.randint(len(self.images), (n,)))

    def held_out(self, count: int, batch_size: int) -> list[torch.Tensor]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(HELD_OUT_SEED))[:count]
        return [self._adapt(index) for index in order.split(batch_size)]

    def reference_images(self) -> torch.Tensor:
        return torch.cat(self.held_out(min(len(self.images), 4096), 1024))


class Mixture(ImageSource):
    """Each student batch drawn from `main`, with a share `extra_fraction` replaced by images
    of `extra` (e.g. inverted shapes mixed into generator batches). Validation uses `main`."""

    def __init__(self, main: ImageSource, extra: ImageSource, extra_fraction: float = 0.25):
        """
        Args:
            main: the source of most of each batch, and of the validation images.
            extra: the source of the last `extra_fraction` of each batch.
            extra_fraction: share of each student batch taken from `extra`, in (0, 1).
        """
        super().__init__()
        if not 0 < extra_fraction < 1:
            raise ConfigError(f"Mixture extra_fraction must be in (0, 1), got {extra_fraction}")
        self.main, self.extra, self.extra_fraction = main, extra, extra_fraction
        self.description = main.description
        self.has_reference_images = main.has_reference_images or extra.has_reference_images

    def bind(self, teacher: nn.Module, contract: InputContract, num_classes: int, student: nn.Module) -> None:
        super().bind(teacher, contract, num_classes, student)
        self.main.bind(teacher, contract, num_classes, student)
        self.extra.bind(teacher, contract, num_classes, student)

    def prepare(self, show_progress: bool = False) -> None:
        self.main.prepare(show_progress)
        self.extra.prepare(show_progress)

    def configure_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self.main.configure_optimizer()

    def update(self, module, batch_size: int) -> dict[str, torch.Tensor]:
        return self.main.update(module, batch_size)

    def joint_batch(self, batch_size: int):
        return self.main.joint_batch(batch_size)

    def sample(self, n: int) -> torch.Tensor:
        extra = round(n * self.extra_fraction)
        images = self.main.sample(n - extra)
        return torch.cat([images, self.extra.sample(extra).to(images)])

    def held_out(self, count: int, batch_size: int) -> list[torch.Tensor]:
        return self.main.held_out(count, batch_size)

    def reference_images(self) -> Optional[torch.Tensor]:
        return (self.main if self.main.has_reference_images else self.extra).reference_images()

    def networks(self) -> list[nn.Module]:
        return self.main.networks() + self.extra.networks()

    def memory_needs(self) -> dict[str, tuple[int, int]]:
        return {**self.main.memory_needs(), **self.extra.memory_needs()}
