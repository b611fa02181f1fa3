"""LightningDataModules: real data by name (`ImageDataModule`) and the data-free one
(`DataFreeDataModule`), which never touches training images: its training "batches" are
step counters, and real test images are used only to report accuracy at the end."""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from dafl.augment import random_shift_flip
from dafl.contract import InputAdapter
from dafl.datasets import (INFOS, DatasetInfo, Split, dataset_info, load_split, select_classes, subset_info)
from dafl.errors import ConfigError


def _check_positive(**values):
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def stratified_holdout(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Boolean mask of `size` examples, about equally many per class, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    classes = labels.unique()
    per_class = -(-size // len(classes))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in classes:
        mask[order[labels[order] == c][:per_class]] = True
    surplus = mask.nonzero().squeeze(1)[size:] if mask.sum() > size else torch.empty(0, dtype=torch.long)
    mask[surplus] = False
    return mask




class ImageDataModule(L.LightningDataModule):
    """A registered dataset, split into train / validation (a stratified hold-out of the
    training split: never the test set) / test."""

    def __init__(self, dataset: str = "fashion-mnist", root: Optional[str] = None, input_size: int = 32,
                 batch_size: int = 128, val_size: Optional[int] = None, num_workers: int = 0, split_seed: int = 0,
                 augment_shift: int = 0, augment_flip: bool = False, test_dataset: Optional[str] = None,
                 classes: Optional[list[int]] = None):
        """`test_dataset`: evaluate on another dataset's test split (KD with alternative data:
        train on `dataset`'s images, test on the teacher's task). `classes`: train and test
        on these classes only (original indices), relabelled 0, 1, ... in the order given
        (teachers of different tasks, for ZipIt merging)."""
        super().__init__()
        _check_positive(batch_size=batch_size, input_size=input_size)
        if val_size is not None and val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {val_size}")
        self.save_hyperparameters()
        self.info: DatasetInfo = dataset_info(dataset, root)
        self.adapter = self.test_adapter = InputAdapter(self.info.size, input_size, self.info.mean, self.info.std)
        if test_dataset is not None:
            test_info = dataset_info(test_dataset)
            if test_info.channels != self.info.channels:
                raise ConfigError(f"test_dataset {test_dataset} has {test_info.channels} channel(s), "
                                  f"{dataset} {self.info.channels}")
            # The networks serve the test dataset's task: every image gets its normalisation,
            # each dataset's images are padded/resized from their own native size.
            self.adapter = InputAdapter(self.info.size, input_size, test_info.mean, test_info.std)
            self.test_adapter = InputAdapter(test_info.size, input_size, test_info.mean, test_info.std)
            self.info = test_info
        if classes is not None:
            if test_dataset is not None:
                raise ConfigError("classes and test_dataset cannot be combined")
            self.info = subset_info(self.info, classes)
        self.train_set = self.val_set = self.test_set = None

    def _load(self, name: str, split: str, root: Optional[str]) -> Split:
        data = load_split(name, split, root)
        return select_classes(data, self.hparams.classes) if self.hparams.classes is not None else data

    def setup(self, stage: Optional[str] = None):
        hp = self.hparams
        if stage in (None, "fit", "validate") and self.train_set is None:
            train = self._load(hp.dataset, "train", hp.root)
            # Default validation hold-out: 10% of the training split, at most 5,000 images.
            val_size = min(5000, len(train.labels) // 10) if hp.val_size is None else hp.val_size
            if val_size >= len(train.labels):
                raise ConfigError(f"val_size {val_size} leaves no training data ({len(train.labels)} images)")
            held_out = stratified_holdout(train.labels, val_size, hp.split_seed)
            self.train_set = TensorDataset(train.images[~held_out], train.labels[~held_out])
            self.val_set = TensorDataset(train.images[held_out], train.labels[held_out])
        if stage in (None, "test") and self.test_set is None:
            test = self._load(hp.test_dataset or hp.dataset, "test", None if hp.test_dataset else hp.root)
            self.test_set = TensorDataset(test.images, test.labels)

    @property
    def has_test_data(self) -> bool:
        self.setup("test")
        return True

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        testing = self.trainer is not None and self.trainer.testing
        images = (self.test_adapter if testing else self.adapter).to(images.device)(images)
        if self.trainer is not None and self.trainer.training:
            images = random_shift_flip(images, self.hparams.augment_shift, self.hparams.augment_flip)
        return images, labels


class DataFreeDataModule(L.LightningDataModule):
    """Data-free training: `iterations_per_epoch` step counters per epoch, one validation
    tick per epoch (the module validates on its own synthetic images, label-free), and, only
    for the final report, the real test split of `eval_dataset` if it is installed."""

    def __init__(self, eval_dataset: Optional[str] = "fashion-mnist", root: Optional[str] = None,
                 input_size: int = 32, iterations_per_epoch: int = 120, eval_batch_size: int = 512):
        """
        Args:
            eval_dataset: registered dataset whose real test split scores the student at the end
                (never used for training; None: no score).
            root: folder holding that dataset (default: where its package installs it); checked before training.
            input_size: size of the network's input; real images are padded or resized to it.
            iterations_per_epoch: training iterations per epoch.
            eval_batch_size: batch size of the final real-data test.
        """
        super().__init__()
        _check_positive(iterations_per_epoch=iterations_per_epoch, eval_batch_size=eval_batch_size)
        if eval_dataset is not None and eval_dataset not in INFOS:
            raise ConfigError(f"unknown dataset {eval_dataset!r}; choose one of {', '.join(sorted(INFOS))}")
        self.save_hyperparameters()
        self.info: Optional[DatasetInfo] = dataset_info(eval_dataset, root) if eval_dataset else None
        self.adapter = self.test_adapter = InputAdapter(self.info.size, input_size, self.info.mean, self.info.std) if self.info else None
        self._test: Optional[Split] = None
        self.missing_reason: Optional[str] = None
        if eval_dataset is not None and root is not None:
            # Data the user named is checked now, before any training: a bad folder fails in one line.
            self._test = load_split(eval_dataset, "test", root)

    @property
    def has_test_data(self) -> bool:
        if self.hparams.eval_dataset is None:
            self.missing_reason = "no eval_dataset configured"
            return False
        if self._test is None and self.missing_reason is None:
            try:
                self._test = load_split(self.hparams.eval_dataset, "test", self.hparams.root)
            except ConfigError as e:
                self.missing_reason = str(e)
        return self._test is not None

    def train_dataloader(self):
        # Step counters, not data: the generator makes every training image.
        return range(self.hparams.iterations_per_epoch)

    def val_dataloader(self):
        return range(1)

    def test_dataloader(self):
        if not self.has_test_data:
            raise ConfigError(f"no real test data: {self.missing_reason}")
        return DataLoader(TensorDataset(self._test.images, self._test.labels), batch_size=self.hparams.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, (list, tuple)) and len(batch) == 2 and torch.is_tensor(batch[0]):
            return self.adapter.to(batch[0].device)(batch[0]), batch[1]
        return batch


@torch.no_grad()
def evaluate_accuracy(network: torch.nn.Module, datamodule, max_images: Optional[int] = None) -> float:
    """Top-1 accuracy of `network` on the datamodule's real test split (for reporting)."""
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    correct = total = 0
    for images, labels in datamodule.test_dataloader():
        images = datamodule.test_adapter.to(device)(images.to(device))
        correct += int((network(images).argmax(1) == labels.to(device)).sum())
        total += len(labels)
        if max_images is not None and total >= max_images:
            break
    network.train(was_training)
    return correct / total
