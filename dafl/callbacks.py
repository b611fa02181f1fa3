"""Callbacks for data-free runs: a PNG grid of synthetic samples every epoch."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SampleGrid(L.Callback):
    """After each training epoch, write `samples/epoch_XXXX.png`: the first `count` images
    of the fixed latent bank, each titled with the teacher's predicted class and confidence."""

    def __init__(self, count: int = 32, columns: int = 8):
        self.count, self.columns = count, columns

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(module, "generator"):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        images = module.generator.sample(module.val_latents[: self.count])
        with torch.no_grad():
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
        fig.suptitle(f"epoch {trainer.current_epoch}: generator samples, teacher's class and confidence", fontsize=9)
        fig.tight_layout()
        folder = Path(trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / f"epoch_{trainer.current_epoch:04d}.png", dpi=80)
        plt.close(fig)
