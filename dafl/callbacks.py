"""Callbacks and plugins: sample grids, test-accuracy curves, atomic checkpoints."""
from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
import torch

from dafl.errors import ConfigError, RunStopped


class SampleGrid(L.Callback):
    """After each training epoch, write `samples/epoch_XXXX.png`: the first `count` of a
    `StudentDistillation`'s validation images (its image source's held-out images), each
    titled with the teacher's predicted class and confidence."""

    def __init__(self, count: int = 32, columns: int = 8):
        self.count, self.columns = count, columns

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with torch.no_grad():
            images = module.held_out_images()[0][:self.count]
            probs = module.teacher(images).softmax(1)
        confidence, predicted = probs.max(1)
        names = module.export_metadata().get("class_names") or [str(i) for i in range(probs.shape[1])]
        rows = -(-len(images) // self.columns)
        fig, axes = plt.subplots(rows, self.columns, figsize=(1.6 * self.columns, 1.8 * rows))
        for ax, image, c, p in zip(axes.flat, images.cpu(), predicted.tolist(), confidence.tolist()):
            image = image.permute(1, 2, 0).float()
            image = (image - image.min()) / (image.max() - image.min() + 1e-8)  # per-image contrast stretch
            ax.imshow(image.squeeze(-1).numpy(), cmap="gray" if image.shape[-1] == 1 else None)
            ax.set_title(f"{names[c]} {p:.0%}", fontsize=7)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(f"epoch {trainer.current_epoch}: {module.source.description}, teacher's class and confidence",
                     fontsize=9)
        fig.tight_layout()
        folder = Path(trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / f"epoch_{trainer.current_epoch:04d}.png", dpi=80)
        plt.close(fig)


class TestAccuracyCurve(L.Callback):
    """For benchmarks only: real test accuracy of the model after every `every` epochs
    against training wall-clock time (evaluation time excluded), written to
    `curve.json` in the run folder. Reported, never used to select a model."""

    def __init__(self, every: int = 1, max_images: int = 10000):
        self.every, self.max_images = every, max_images
        self.points: list[dict] = []
        self.train_seconds = 0.0
        self._start = None

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.train_seconds += time.perf_counter() - self._start
        epoch = trainer.current_epoch + 1
        datamodule = trainer.datamodule
        if epoch % self.every and epoch != trainer.max_epochs:
            return
        if not getattr(datamodule, "has_test_data", False):
            return
        from dafl.data import evaluate_accuracy

        accuracy = evaluate_accuracy(module, datamodule, self.max_images)
        self.points.append({"epoch": epoch, "iterations": epoch * trainer.num_training_batches,
                            "train_seconds": round(self.train_seconds, 2), "test_acc": accuracy})
        if trainer.is_global_zero:
            (Path(trainer.default_root_dir) / "curve.json").write_text(json.dumps(self.points, indent=1))


def _free_bytes(folder: Path) -> float:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return float("inf")  # not a folder we can ask: not a full disk either


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file in the same folder, fsynced, then
    renamed over the target: a kill during a write never leaves a corrupt `last.ckpt`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        from dafl.weights import atomic_write

        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            full = getattr(e, "errno", None) == errno.ENOSPC or _free_bytes(Path(path).parent) < (1 << 20)
            reason = "no space left on the disk" if full else (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"could not save checkpoint {path}: {reason}") from None


class IntervalCheckpoint(L.Callback):
    """The run's one `last.ckpt`, always its newest state: written at the end of every
    epoch and, mid-epoch, every `minutes` of training, so a crash loses at most that much
    work. The mid-epoch save skips an epoch's final batch: the epoch-end save covers it, and
    Lightning miscounts epochs when resuming from a save taken on that batch."""

    def __init__(self, path: str, minutes: float):
        self.path, self.seconds = path, 60.0 * minutes
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= trainer.num_training_batches - 1 or time.monotonic() - self._last < self.seconds:
            return
        # A full checkpoint (optimizer and loop state too): this file is what a resume starts from.
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last = time.monotonic()

    def on_train_epoch_end(self, trainer, module):
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last = time.monotonic()


class GracefulStop(L.Callback):
    """SIGTERM or SIGINT during `fit`: if a training batch is running, let it finish, save a
    full checkpoint to `path` (a resume starts there) and stop; anywhere else (building the
    pool, validating) stop at once, keeping the last checkpoint. Either way the run ends
    with `RunStopped`, which the CLI reports in one line with a non-zero status."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, path: str):
        self.path = path
        self.signum: int | None = None
        self.in_batch = False
        self._previous: dict[int, object] = {}
        self._active = False

    def setup(self, trainer, module, stage):
        if stage != "fit" or self._active:
            return
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            self._active = True
        except ValueError:  # not the main thread: signals stay as they are
            self._previous = {}

    def teardown(self, trainer, module, stage):
        if stage != "fit" or not self._active:
            return
        self._active = False
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if not self._active:  # left installed by someone restoring handlers after us: behave as the default
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first = self.signum is None
        self.signum = signum
        if not self.in_batch or not first:  # a second signal does not wait for the batch
            raise RunStopped(signum, f"stopped by {signal.Signals(signum).name} before the end of training; "
                                     f"{self._kept()}")

    def _kept(self) -> str:
        if Path(self.path).is_file():
            return f"the last checkpoint is kept ({self.path}); resume with --ckpt_path last"
        return "no checkpoint had been saved yet, so there is nothing to resume"

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.in_batch = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.in_batch = False
        if self.signum is None:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        raise RunStopped(self.signum, f"stopped by {signal.Signals(self.signum).name} at epoch "
                                      f"{trainer.current_epoch + 1}, step {trainer.global_step}: saved {self.path}; "
                                      "resume with --ckpt_path last")
