"""Image sources: where the student's training images come from. `StudentDistillation`
asks its source for a batch before every student step; the teacher labels whatever it
gets. Chosen in the YAML by `class_path`; `InvertedPool` (lightning_modules/inverted_pool.py)
is the default, `GeneratorSource` (lightning_modules/generator.py) the one that learns."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from dafl.contract import InputContract
from dafl.datasets import load_split, select_classes
from dafl.errors import ConfigError

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


def __getattr__(name: str):
    # InvertedPool's former home: configs and checkpoints that name lightning_modules.sources.InvertedPool
    # still load (imported lazily: inverted_pool imports this module)
    if name == "InvertedPool":
        from lightning_modules.inverted_pool import InvertedPool
        return InvertedPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
