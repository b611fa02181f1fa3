"""The inverted pool: dead-leaves shapes moved by the teacher (model inversion) into a
fixed set of images the student learns from; the default image source."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from dafl.contract import InputContract
from dafl.errors import ConfigError
from dafl.losses import BatchNormStatistics
from dafl.procedural import ProceduralShapes, class_cycle, invert_toward_classes
from dafl.weights import known_classes, load_classifier, resolve
from lightning_modules.sources import HELD_OUT_SEED, ImageSource, require_contract

class InvertedPool(ImageSource):
    """A fixed pool of dead-leaves shapes (`dafl.procedural`), each moved by `inversion_steps`
    Adam steps on its pixels until the teacher sees its assigned class, with the teacher's
    BatchNorm statistics matched over `inversion_batch` shapes at a time. Built once, in the
    first epoch (again when a run resumes: the pool is not in checkpoints)."""

    description = "held-out inverted shapes"
    has_reference_images = True

    def __init__(self, pool_size: int = 32768, inversion_steps: int = 40, inversion_batch: int = 512,
                 shapes: int = 3, scale: float = 1.5, class_weights: Optional[list[int]] = None,
                 symmetric_classes: Optional[list[int]] = None, class_teachers: Optional[list[str]] = None,
                 calibrate_teacher_heads: bool = False):
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
            class_teachers: weights files of teachers that each know some of the classes (their
                `classes` metadata: the teachers a merged teacher was made from). Each class is
                then inverted through the teacher that knows it, with that teacher's BatchNorm
                statistics, instead of through the (merged) teacher, whose statistics mix every
                task's; the teacher still labels every image for the student.
            calibrate_teacher_heads: a merged teacher (`python -m dafl zip`) refits its heads' logit
                scales and shifts on the pool once it is built (`ZippedClassifier.calibrate_heads`:
                no labels), instead of keeping those fitted on the merge images.
        """
        super().__init__()
        for name, value in (("pool_size", pool_size), ("inversion_steps", inversion_steps),
                            ("inversion_batch", inversion_batch), ("shapes", shapes), ("scale", scale)):
            if value <= 0:
                raise ConfigError(f"InvertedPool {name} must be positive, got {value}")
        self.pool_size, self.inversion_steps, self.inversion_batch = pool_size, inversion_steps, inversion_batch
        self.shapes, self.scale = shapes, scale
        self.class_weights, self.symmetric_classes = class_weights, symmetric_classes
        self.class_teacher_paths = class_teachers
        self.calibrate_teacher_heads = calibrate_teacher_heads
        self.class_teachers: list[tuple[nn.Module, list[int]]] = []  # a plain list: not saved in checkpoints
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
        if self.class_teacher_paths:
            self.class_teachers = load_class_teachers(self.class_teacher_paths, contract, num_classes)
        if self.calibrate_teacher_heads and not hasattr(teacher, "calibrate_heads"):
            raise ConfigError(f"InvertedPool calibrate_teacher_heads needs a merged teacher (python -m dafl zip), "
                              f"not {type(teacher).__name__}")

    def prepare(self, show_progress: bool = False) -> None:
        if self.pool is None:
            self.pool = self._invert(self.pool_size, show_progress=show_progress, class_weights=self.class_weights,
                                     symmetric_classes=self.symmetric_classes)
            rank_zero_info(f"Inverted {self.pool_size} procedural images through the teacher "
                           f"({self.inversion_steps} steps each)")
            if self.calibrate_teacher_heads:
                # Calibration starts from the raw head logits, so a resumed run refits the same way.
                with torch.inference_mode(False):
                    fit = self.teacher[0].calibrate_heads(self.pool.split(self.inversion_batch))
                rank_zero_info("Refitted the merged teacher's heads on the pool: information "
                               f"{fit['information_before']:.3f} -> {fit['information_after']:.3f} nats")

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

    def _inverters(self, count: int, class_weights: Optional[list[int]], symmetric_classes: Optional[list[int]]
                   ) -> list[tuple[nn.Module, int, int, Optional[list[int]], Optional[list[int]]]]:
        """(network, images, classes, class weights, symmetric classes) per network that inverts:
        the teacher for every class, or each class teacher for its own classes (indices local to
        it) with the share of the images that `class_cycle` deals to its classes."""
        if not self.class_teachers:
            return [(self.teacher[0], count, self.num_classes, class_weights, symmetric_classes)]
        cycle = class_cycle(self.num_classes, class_weights)
        dealt = cycle[torch.arange(count) % len(cycle)]
        weights = class_weights or [1] * self.num_classes
        return [(network, int(torch.isin(dealt, torch.tensor(classes)).sum()), len(classes),
                 [weights[c] for c in classes], [i for i, c in enumerate(classes) if c in (symmetric_classes or [])])
                for network, classes in self.class_teachers]

    def _invert(self, count: int, seed: Optional[int] = None, show_progress: bool = False,
                class_weights: Optional[list[int]] = None, symmetric_classes: Optional[list[int]] = None
                ) -> torch.Tensor:
        device = self.device
        self.shapes_maker.to(device)
        chunks = []
        fixed = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        # inference_mode(False): `validate` may ask for held-out images inside Lightning's inference mode
        with fixed if seed is not None else contextlib.nullcontext(), torch.inference_mode(False):
            if seed is not None:
                torch.manual_seed(seed)
            with tqdm(total=count, desc="inverting shapes through the teacher", unit="img", leave=False,
                      disable=not show_progress) as bar:
                for network, images, classes, weights, symmetric in self._inverters(count, class_weights,
                                                                                  symmetric_classes):
                    network.to(device)
                    bn_stats = BatchNormStatistics(network)
                    for first in range(0, images, self.inversion_batch):
                        n = min(self.inversion_batch, images - first)
                        chunks.append(invert_toward_classes(
                            self.shapes_maker.pixels(n), network, self.shapes_maker.adapter, classes,
                            self.inversion_steps, bn_stats=bn_stats if bn_stats.layers else None,
                            class_weights=weights, symmetric_classes=symmetric))
                        bar.update(n)
                    bn_stats.remove()
        return torch.cat(chunks)


def load_class_teachers(paths: list[str], contract: InputContract, num_classes: int
                        ) -> list[tuple[nn.Module, list[int]]]:
    """The class teachers of `InvertedPool`, frozen, with their classes (indices of the
    teacher's); every class known by exactly one, every one taking the teacher's inputs."""
    networks, metas = zip(*(load_classifier(resolve(path)) for path in paths))
    class_lists = known_classes(paths, list(metas))
    for path, classes, meta in zip(paths, class_lists, metas):
        if any(not 0 <= c < num_classes for c in classes):
            raise ConfigError(f"class teacher {path} knows classes {classes}; the teacher has {num_classes}")
        theirs = InputContract.from_metadata(meta)
        if theirs.missing() or theirs != contract:
            raise ConfigError(f"class teacher {path} takes {theirs}, the teacher {contract}: they must take the "
                              "same inputs")
    unknown = sorted(set(range(num_classes)) - {c for classes in class_lists for c in classes})
    if unknown:
        raise ConfigError(f"classes {unknown} are known by no class teacher: every class needs one")
    return [(network.eval().requires_grad_(False), classes) for network, classes in zip(networks, class_lists)]
