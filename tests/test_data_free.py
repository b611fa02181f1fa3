"""Data-free distillation: mechanics of both schedules, the frozen teacher, checkpoints
without the teacher, resume, and a short real run on digits."""
import lightning as L
import pytest
import torch

from conftest import quiet_trainer
from dafl.data import DataFreeDataModule
from dafl.errors import ConfigError
from lightning_modules.data_free import DataFreeDistillation
from lightning_modules.student import ReplayMemory

FAST = dict(latent_dim=16, generator_width=16, batch_size=32, val_size=64)


def best_preset(teacher, **overrides):
    settings = dict(teacher=str(teacher), schedule="alternating", student_steps=5, replay_size=2048,
                    activation_weight=0.0, bn_stat_weight=1.0, latent_dim=32, generator_width=32, batch_size=128,
                    generator_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.999)),
                    student_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
                    student_lr_schedule="cosine", val_size=256)
    return DataFreeDistillation(**{**settings, **overrides})


def test_short_data_free_run_beats_chance_widely(digits_teacher, tmp_path):
    path, teacher_acc = digits_teacher
    assert teacher_acc > 0.9
    L.seed_everything(0, verbose=False)
    model = best_preset(path)
    data = DataFreeDataModule("digits", iterations_per_epoch=50)
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    agreement = float(trainer.callback_metrics["val/agreement"])
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    # Chance is 10%; the student never saw a real digit.
    assert result["test/acc"] > 0.5, result
    assert agreement > 0.5


def test_teacher_is_frozen_and_in_eval_mode(digits_teacher):
    model = best_preset(digits_teacher[0], **FAST)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = quiet_trainer(max_steps=3 * 2, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=3))
    assert not model.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"  # running stats too


def test_official_schedule_is_one_combined_step(digits_teacher):
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="official", **FAST)
    student_before = [p.clone() for p in model.student.parameters()]
    generator_before = [p.clone() for p in model.generator.parameters()]
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=1))
    assert all(not torch.equal(a, b) for a, b in zip(student_before, model.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(generator_before, model.generator.parameters()))
    # One step per optimizer: Lightning's global_step counts both.
    assert trainer.global_step == 2


def test_official_schedule_rejects_alternating_settings(digits_teacher):
    with pytest.raises(ConfigError, match="official"):
        DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="official", student_steps=5)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"entropy_weight": -1.0}, {"kd_temperature": 0.0},
                                 {"generator_width": 0}, {"replay_size": -5}])
def test_invalid_hyperparameters(digits_teacher, bad):
    with pytest.raises(ConfigError):
        DataFreeDistillation(teacher=str(digits_teacher[0]), **bad)


def test_bn_stat_loss_needs_batchnorm_teacher(tmp_path):
    from dafl.models import build_model
    from dafl.weights import save_classifier

    path = tmp_path / "plain.safetensors"
    save_classifier(path, build_model("lenet5"), {"arch": "lenet5", "num_classes": 10, "in_channels": 1,
                                                  "image_size": 32})
    with pytest.raises(ConfigError, match="BatchNorm"):
        DataFreeDistillation(teacher=str(path), bn_stat_weight=1.0)


def test_checkpoint_excludes_teacher_and_resume_continues(digits_teacher, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make():
        return best_preset(digits_teacher[0], **FAST)

    ckpt_dir = tmp_path / "ckpt"
    first = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, enable_checkpointing=True,
                          callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    first.fit(make(), datamodule=DataFreeDataModule(None, iterations_per_epoch=4))
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("student.net.") for k in ckpt["state_dict"])
    assert any(k.startswith("generator.net.") for k in ckpt["state_dict"])
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


def test_augmentation_of_synthetic_batches():
    from dafl.data import random_shift_flip

    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    flipped = random_shift_flip(x, shift=0, flip=True)
    n_flipped = sum(torch.equal(f, x[0].flip(2)) for f in flipped)
    assert 10 < n_flipped < 54  # about half
    shifted = random_shift_flip(x, shift=1, flip=False)
    assert shifted.shape == x.shape
    assert torch.equal(random_shift_flip(x, 0, False), x)


@pytest.mark.parametrize("synthetic, extra", [("gaussian", {}),
                                              ("inverted", dict(procedural_inversion_steps=2, procedural_pool_size=64))])
def test_sources_without_generator_train_no_generator(digits_teacher, synthetic, extra):
    model = best_preset(digits_teacher[0], synthetic=synthetic, **extra, **FAST)
    generator_before = [p.clone() for p in model.generator.parameters()]
    student_before = [p.clone() for p in model.student.parameters()]
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=2))
    assert all(torch.equal(a, b) for a, b in zip(generator_before, model.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, model.student.parameters()))
    assert 0 <= float(trainer.callback_metrics["val/agreement"]) <= 1
    with pytest.raises(ConfigError, match=synthetic):
        DataFreeDistillation(teacher=str(digits_teacher[0]), synthetic=synthetic, schedule="official", **extra)


def test_class_conditional_latents_are_balanced_and_coded(digits_teacher):
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), class_conditional=True, **FAST)
    z, targets = model.generator.latents(30)
    assert torch.bincount(targets).tolist() == [3] * 10
    assert torch.equal(z[:, :10], torch.nn.functional.one_hot(targets, 10).float())
    assert torch.equal(model.val_latents[:, :10].argmax(1)[:10], torch.arange(10))
    with pytest.raises(ConfigError, match="latent_dim"):
        DataFreeDistillation(teacher=str(digits_teacher[0]), class_conditional=True, latent_dim=5)


def test_balanced_one_hot_aims_at_a_class_quota(digits_teacher):
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), balanced_one_hot=True, **FAST)
    images = torch.zeros(20, 1, 32, 32)  # one image 20 times: the teacher gives one class to all
    losses, logits, _ = model.generator.losses(images, model.teacher)
    argmax_loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
    assert losses["oh"].item() > argmax_loss.item()  # 18 of the 20 are asked for other classes
    with pytest.raises(ConfigError, match="choose one"):
        DataFreeDistillation(teacher=str(digits_teacher[0]), balanced_one_hot=True, class_conditional=True)


def test_mixup_blends_pairs_of_the_batch():
    from lightning_modules.student import mixup

    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()  # image i is constant i
    assert torch.equal(mixup(x, 0.0), x)
    mixed = mixup(x, 1.0)
    assert mixed.shape == x.shape and not torch.equal(mixed, x)
    # Every output is w * x_i + (1 - w) * x_j: constant per image, within the batch's range.
    assert torch.equal(mixed, mixed[:, :, :1, :1].expand_as(mixed))
    assert mixed.min() >= 0 and mixed.max() <= 7


def test_cutmix_pastes_one_box_of_a_partner_image():
    from lightning_modules.student import cutmix

    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 16, 16).contiguous()  # image i is constant i
    boxes = 0
    for _ in range(20):
        mixed = cutmix(x)
        changed = mixed != x
        assert mixed.shape == x.shape
        if not changed.any():
            continue  # an empty box, or every image its own partner
        boxes += 1
        # Outside the box each image is itself; inside it is one constant partner image.
        rows, cols = changed.any(0)[0].any(1).nonzero(), changed.any(0)[0].any(0).nonzero()
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[box] = False
        assert torch.equal(mixed[:, 0][:, outside], x[:, 0][:, outside])
        inside = mixed[:, 0][(slice(None), *box)]
        assert torch.equal(inside, inside[:, :1, :1].expand_as(inside))
        assert sorted(inside[:, 0, 0].tolist()) == list(range(8))  # partners are a permutation
    assert boxes > 10


def test_student_augment_chooses_cutmix_by_probability():
    from lightning_modules.student import StudentObjective

    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 16, 16).contiguous()
    plain = StudentObjective("lenet5_half", 1, 10, 32, mixup_alpha=0.0, cutmix_prob=0.0)
    assert torch.equal(plain.augment(x), x)  # neither lever on: the batch is untouched
    boxed = StudentObjective("lenet5_half", 1, 10, 32, mixup_alpha=0.0, cutmix_prob=1.0)
    # CutMix keeps every pixel an original value (a box, never a blend).
    assert all(torch.isin(boxed.augment(x), x).all() for _ in range(5))
    blended = StudentObjective("lenet5_half", 1, 10, 32, mixup_alpha=1.0, cutmix_prob=0.0)
    assert not torch.isin(blended.augment(x), x).all()  # mixup: blends between integers


def test_native_generator_and_new_levers_train(digits_teacher):
    model = best_preset(digits_teacher[0], generator_arch="native", mixup_alpha=1.0, diversity_weight=0.1,
                        adversarial_weight=0.1, cutmix_prob=0.5, procedural_fraction=0.25, **FAST)
    images = model.generator(model.generator.latents(4)[0])
    assert images.shape == (4, 1, 32, 32)  # digits: 8x8 pixels resized to the network's 32x32
    before = [p.clone() for p in model.generator.parameters()]
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=2))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.generator.parameters()))
    assert {"train/loss_div", "train/loss_adv", "train/loss_bn"} <= set(trainer.logged_metrics)


def test_native_generator_needs_input_metadata(digits_teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(digits_teacher[0])), str(bare), metadata={"arch": "lenet5_bn"})
    with pytest.raises(ConfigError, match="native"):
        DataFreeDistillation(teacher=str(bare), generator_arch="native", **FAST)
    with pytest.raises(ConfigError, match="native_padding"):
        DataFreeDistillation(teacher=str(digits_teacher[0]), generator_arch="native", native_padding=True, **FAST)


def test_speed_settings_keep_the_method_and_clean_state_dict_keys(digits_teacher):
    """channels_last and in-place compile change memory layout and kernels only: the same
    seed gives the same first student step, and checkpoint keys carry no `_orig_mod`."""
    def first_step(**speed):
        L.seed_everything(0, verbose=False)
        model = DataFreeDistillation(teacher=str(digits_teacher[0]), schedule="official", **FAST, **speed)
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=1))
        return model

    plain, nhwc = first_step(), first_step(channels_last=True)
    for (name, a), b in zip(plain.student.state_dict().items(), nhwc.student.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    compiled = DataFreeDistillation(teacher=str(digits_teacher[0]), compile=True, **FAST)
    assert set(compiled.state_dict()) == set(plain.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())


def test_finite_check_every_n_steps_still_catches_a_nan(digits_teacher):
    model = DataFreeDistillation(teacher=str(digits_teacher[0]), finite_check_every=3, **FAST)
    nan = {"loss": torch.tensor(float("nan"))}
    model._batch_idx = 1
    model._check_finite(nan)  # skipped: not a check step
    model._batch_idx = 3
    with pytest.raises(FloatingPointError, match="nan"):
        model._check_finite(nan)


def test_student_lr_warmup_multiplies_the_cosine_schedule(digits_teacher):
    """Warm-up is linear from lr/w to lr over w iterations, on top of the cosine decay."""
    import math

    base, warmup, iterations = 0.1, 4, 8
    model = best_preset(digits_teacher[0], student_lr_warmup=warmup, student_steps=1, replay_size=0, **FAST)
    seen = []

    class RecordLr(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.optimizers()[1].param_groups[0]["lr"])

    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[RecordLr()])
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=iterations))
    expected = [base * min(1.0, 1 / warmup + (1 - 1 / warmup) * k / warmup) * 0.5 * (1 + math.cos(math.pi * k / iterations))
                for k in range(iterations)]
    assert seen == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="student_lr_warmup"):
        DataFreeDistillation(teacher=str(digits_teacher[0]), student_lr_warmup=-1)
