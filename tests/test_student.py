"""The student loop (`StudentDistillation`): KD on a source's images, the frozen teacher,
checkpoints without the teacher, resume, settings, and short real runs on digits."""
import lightning as L
import pytest
import torch

from conftest import quiet_trainer
from dafl.data import DataFreeDataModule
from dafl.errors import ConfigError
from dafl.generator import ReplayMemory
from lightning_modules.generator import GeneratorSource
from lightning_modules.inverted_pool import InvertedPool
from lightning_modules.student import StudentDistillation

SMALL = dict(batch_size=32, val_size=64, student_lr_warmup=0)


def generator_preset(teacher, **overrides):
    """A generator alternating with 5 student steps on a replay memory (like the generator presets)."""
    source = GeneratorSource(latent_dim=32, width=32, joint_step=False, replay_size=2048, activation_weight=0.0,
                             bn_stat_weight=1.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.999)))
    settings = dict(teacher=str(teacher), source=source, student_steps=5, batch_size=128, val_size=256,
                    mixup_alpha=0.0, cutmix_prob=0.0)
    return StudentDistillation(**{**settings, **overrides})


@pytest.mark.parametrize("make_source", [
    lambda: GeneratorSource(latent_dim=32, width=32, joint_step=False, replay_size=2048, activation_weight=0.0,
                            bn_stat_weight=1.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.999))),
    lambda: InvertedPool(pool_size=1024, inversion_steps=20, inversion_batch=256),
], ids=["generator", "inverted_pool"])
def test_short_data_free_run_beats_chance_widely(digits_teacher, make_source):
    path, teacher_acc = digits_teacher
    assert teacher_acc > 0.9
    L.seed_everything(0, verbose=False)
    model = StudentDistillation(teacher=str(path), source=make_source(), student_steps=5, batch_size=128, val_size=256)
    data = DataFreeDataModule("digits", iterations_per_epoch=50)
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    agreement = float(trainer.callback_metrics["val/agreement"])
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    # Chance is 10%; the student never saw a real digit.
    assert result["test/acc"] > 0.5, result
    assert agreement > 0.5


def test_default_source_is_the_inverted_pool_and_defaults_match_the_default_preset(digits_teacher):
    import yaml
    from conftest import REPO

    model = StudentDistillation(teacher=str(digits_teacher[0]))
    assert type(model.source) is InvertedPool
    preset = yaml.safe_load((REPO / "configs/default.yaml").read_text())["model"]["init_args"]
    for key, value in preset.items():
        if key not in ("teacher", "source", "student_optimizer"):
            assert model.hparams[key] == value, key
    for key, value in preset["source"]["init_args"].items():
        assert getattr(model.source, key) == value, key


def test_checkpoint_excludes_teacher_and_resume_continues(digits_teacher, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make():
        return generator_preset(digits_teacher[0], **SMALL)

    ckpt_dir = tmp_path / "ckpt"
    first = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, enable_checkpointing=True,
                          callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    first.fit(make(), datamodule=DataFreeDataModule(None, iterations_per_epoch=4))
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    assert any(k.startswith("source.objective.net.") for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["dafl"]["kind"] == "student"

    class Recorder(L.Callback):
        batches, start_weights = 0, None

        def on_train_start(self, trainer, module):
            Recorder.start_weights = {k: v.clone() for k, v in module.student.state_dict().items()}

        def on_train_batch_end(self, *args):
            Recorder.batches += 1

    second = quiet_trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[Recorder()])
    second.fit(make(), datamodule=DataFreeDataModule(None, iterations_per_epoch=4), ckpt_path=ckpt_dir / "last.ckpt")
    # Resumed: starts from the saved student and runs only the third epoch's 4 iterations.
    saved = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    assert all(torch.equal(Recorder.start_weights[k], v) for k, v in saved.items())
    assert Recorder.batches == 4 and second.current_epoch == 3
    # Each iteration: 1 generator + 5 student optimizer steps, all counted by global_step.
    assert second.global_step == 3 * 4 * 6


def test_a_checkpoint_of_the_old_single_module_is_refused_in_one_line(digits_teacher, tmp_path):
    model = StudentDistillation(teacher=str(digits_teacher[0]), **SMALL)
    old = {"dafl": {"kind": "student", "state_prefix": "student.net."}, "state_dict": {}}
    with pytest.raises(ConfigError, match="older dafl"):
        model.on_load_checkpoint(old)


def test_replay_memory_ring_buffer():
    memory = ReplayMemory(capacity=5, image_shape=(1, 2, 2))
    memory.push(torch.zeros(3, 1, 2, 2))
    assert len(memory) == 3
    memory.push(torch.ones(4, 1, 2, 2))
    assert len(memory) == 5 and int(memory.count) == 7
    # The oldest two zeros were overwritten: one zero-image remains among five.
    assert int((memory.images.flatten(1).sum(1) == 0).sum()) == 1
    assert memory.sample(10).shape == (10, 1, 2, 2)
    with pytest.raises(RuntimeError):
        ReplayMemory(2, (1, 2, 2)).sample(1)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"student_steps": 0}, {"kd_temperature": 0.0},
                                 {"val_size": 0}, {"mixup_alpha": -1.0}, {"cutmix_prob": 1.5},
                                 {"student_lr_warmup": -1}])
def test_invalid_settings(digits_teacher, bad):
    with pytest.raises(ConfigError):
        StudentDistillation(teacher=str(digits_teacher[0]), **bad)


def test_speed_settings_keep_the_method_and_clean_state_dict_keys(digits_teacher):
    """channels_last and in-place compile change memory layout and kernels only: the same
    seed gives the same first student step, and checkpoint keys carry no `_orig_mod`."""
    def first_step(**speed):
        L.seed_everything(0, verbose=False)
        model = StudentDistillation(teacher=str(digits_teacher[0]), source=GeneratorSource(latent_dim=16, width=16),
                                    student_steps=1, **SMALL, **speed)
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=1))
        return model

    plain, nhwc = first_step(), first_step(channels_last=True)
    for (name, a), b in zip(plain.student.state_dict().items(), nhwc.student.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    compiled = StudentDistillation(teacher=str(digits_teacher[0]), source=GeneratorSource(latent_dim=16, width=16),
                                   compile=True, **SMALL)
    assert set(compiled.state_dict()) == set(plain.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())


def test_a_nan_loss_stops_training_with_its_name(digits_teacher):
    model = StudentDistillation(teacher=str(digits_teacher[0]), source=GeneratorSource(latent_dim=16, width=16),
                                student_steps=1, finite_check_every=3, **SMALL)
    with torch.no_grad():
        next(model.source.objective.parameters()).fill_(float("nan"))
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(FloatingPointError, match="at epoch 0, iteration 0"):
        trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=5))


def test_student_lr_warmup_multiplies_the_cosine_schedule(digits_teacher):
    """Warm-up is linear from lr/w to lr over w iterations, on top of the cosine decay."""
    import math

    base, warmup, iterations = 0.1, 4, 8
    model = StudentDistillation(teacher=str(digits_teacher[0]), source=InvertedPool(pool_size=32, inversion_steps=1),
                                batch_size=32, val_size=32, student_steps=1, student_lr_warmup=warmup)
    seen = []

    class RecordLr(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.optimizers().param_groups[0]["lr"])

    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[RecordLr()])
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=iterations))
    expected = [base * min(1.0, 1 / warmup + (1 - 1 / warmup) * k / warmup) * 0.5 * (1 + math.cos(math.pi * k / iterations))
                for k in range(iterations)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_zip_teacher_needs_a_source_with_reference_images(digits_teacher):
    with pytest.raises(ConfigError, match="reference images"):
        StudentDistillation(teacher=str(digits_teacher[0]), source=GeneratorSource(latent_dim=16, width=16),
                            student_init="zip_teacher", **SMALL)
    from lightning_modules.sources import GaussianNoise, Mixture

    mixed = Mixture(GaussianNoise(), InvertedPool(pool_size=16, inversion_steps=1))
    StudentDistillation(teacher=str(digits_teacher[0]), source=mixed, student_init="zip_teacher", **SMALL)
