"""Shared fixtures: a small BatchNorm LeNet-5 teacher trained on scikit-learn digits
(about ten seconds on two CPU cores), saved like a shipped teacher."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from dafl.data import ImageDataModule
from dafl.weights import save_classifier
from lightning_modules.classifier import ClassifierModule

REPO = Path(__file__).resolve().parent.parent


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> tuple[Path, float]:
    """(weights path, test accuracy) of a lenet5_bn teacher on digits."""
    L.seed_everything(0, verbose=False)
    data = ImageDataModule("digits", batch_size=64, val_size=150)
    model = ClassifierModule(arch="lenet5_bn", scheduler="onecycle",
                             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = quiet_trainer(max_epochs=8)
    trainer.fit(model, datamodule=data)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    path = tmp_path_factory.mktemp("teacher") / "digits_lenet5_bn.safetensors"
    meta = {**model.export_metadata(), "test_acc": acc}
    meta.pop("state_prefix")
    save_classifier(path, model.net, meta)
    return path, acc


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m dafl ...` in a subprocess; returns CompletedProcess."""
    import subprocess

    def run(*args, timeout=600, cwd=None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, "-m", "dafl", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd or tmp_path, env=env)

    return run
