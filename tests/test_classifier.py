import lightning as L
import pytest
import torch

from conftest import quiet_trainer
from dafl.data import ImageDataModule
from dafl.errors import ConfigError
from lightning_modules.classifier import ClassifierModule


def test_teacher_fixture_learns_digits(digits_teacher):
    # Trained by the same module `fit` uses; 10 classes, chance 10%.
    assert digits_teacher[1] > 0.9


def test_student_by_kd_with_real_data(digits_teacher):
    L.seed_everything(0, verbose=False)
    data = ImageDataModule("digits", batch_size=64, val_size=150)
    model = ClassifierModule(arch="lenet5_half", teacher=str(digits_teacher[0]), kd_temperature=4.0,
                             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = quiet_trainer(max_epochs=4)
    trainer.fit(model, datamodule=data)
    assert trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"] > 0.7
    assert not model.teacher.training
    assert not any(k.startswith("teacher.") for k in model.state_dict())


def test_model_and_data_shapes_must_agree():
    data = ImageDataModule("digits")
    model = ClassifierModule(arch="lenet5", num_classes=5)
    trainer = quiet_trainer(max_epochs=1)
    with pytest.raises(ConfigError, match="10 classes"):
        trainer.fit(model, datamodule=data)


def test_kd_settings_validated():
    with pytest.raises(ConfigError):
        ClassifierModule(kd_weight=1.5)
