"""Every image source through the interface `StudentDistillation` uses (bind, prepare,
sample, held_out, reference_images), timm-style: parametrized over all of them; then what
each one promises of its own."""
import pytest
import torch

from conftest import quiet_trainer
from dafl.data import DataFreeDataModule
from dafl.errors import ConfigError
from dafl.contract import InputContract
from dafl.procedural import class_cycle
from lightning_modules.generator import GeneratorSource
from lightning_modules.inverted_pool import InvertedPool
from lightning_modules.sources import GaussianNoise, Mixture, RealImages
from lightning_modules.student import StudentDistillation

SOURCES = {
    "gaussian": lambda: GaussianNoise(),
    "inverted_pool": lambda: InvertedPool(pool_size=40, inversion_steps=2, inversion_batch=16),
    "generator": lambda: GeneratorSource(latent_dim=16, width=16, joint_step=False),
    "generator_joint": lambda: GeneratorSource(latent_dim=16, width=16, joint_step=True, replay_size=64),
    "real_images": lambda: RealImages("digits"),
    "mixture": lambda: Mixture(GeneratorSource(latent_dim=16, width=16, joint_step=False, replay_size=64),
                               InvertedPool(pool_size=40, inversion_steps=2), extra_fraction=0.25),
}


def distill(teacher, source, **settings):
    defaults = dict(batch_size=32, val_size=48, student_steps=2, student_lr_warmup=0)
    return StudentDistillation(teacher=str(teacher), source=source, **{**defaults, **settings})


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_gives_finite_batches_of_the_teachers_input_and_trains_the_student(digits_teacher, name):
    torch.manual_seed(0)
    model = distill(digits_teacher[0], SOURCES[name]())
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = [p.clone() for p in model.student.parameters()]
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=2))
    batch = model.source.sample(10)
    assert batch.shape == (10, 1, 32, 32) and torch.isfinite(batch).all()
    held_out = model.held_out_images()
    assert [len(b) for b in held_out] == [32, 16]  # val_size 48 in batches of 32
    again = model.held_out_images()  # fixed: the label-free signal is comparable across epochs
    assert all(torch.equal(a, b) for a, b in zip(held_out, again))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, model.student.parameters()))
    assert 0 <= float(trainer.callback_metrics["val/agreement"]) <= 1
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), f"teacher {k} changed"
    assert not model.teacher.training
    # Only a source that learns gets an optimizer.
    learns = name.startswith("generator") or name == "mixture"
    assert isinstance(model.optimizers(), list) == learns


@pytest.mark.parametrize("name", ["gaussian", "inverted_pool", "real_images"])
def test_sources_that_do_not_learn_hold_no_parameters(digits_teacher, name):
    model = distill(digits_teacher[0], SOURCES[name]())
    assert not list(model.source.parameters())
    assert model.source.configure_optimizer() is None


def test_inverted_pool_is_built_once_at_epoch_start_and_holds_out_its_validation_shapes(digits_teacher):
    torch.manual_seed(0)
    model = distill(digits_teacher[0], InvertedPool(pool_size=40, inversion_steps=3, inversion_batch=16))
    source = model.source
    hooks_before = sum(len(m._forward_hooks) for m in model.teacher.modules())
    assert source.pool is None
    source.prepare()
    pool = source.pool
    assert pool.shape == (40, 1, 32, 32)
    assert sum(len(m._forward_hooks) for m in model.teacher.modules()) == hooks_before  # inversion hooks removed
    batch = source.sample(32)
    assert all((pool == image).flatten(1).all(1).any() for image in batch)  # nothing but pool images
    held_out = torch.cat(model.held_out_images())
    assert not any((pool == image).flatten(1).all(1).any() for image in held_out)
    source.prepare()
    assert source.pool is pool and torch.equal(source.reference_images(), pool)
    # the held-out shapes are the same whatever the global random state
    torch.manual_seed(123)
    fresh = distill(digits_teacher[0], InvertedPool(pool_size=40, inversion_steps=3, inversion_batch=16))
    torch.testing.assert_close(torch.cat(fresh.held_out_images()), held_out)


def test_inverted_pool_is_built_on_first_use_when_the_epoch_start_hook_was_skipped(digits_teacher):
    # A run resumed from a mid-epoch checkpoint gets no `on_train_epoch_start` from Lightning.
    model = distill(digits_teacher[0], InvertedPool(pool_size=40, inversion_steps=3))
    batch = model.source.sample(8)
    assert model.source.pool is not None and all((model.source.pool == x).flatten(1).all(1).any() for x in batch)


def test_inverted_pool_class_weights_and_symmetric_classes_shape_the_training_pool_only(digits_teacher):
    torch.manual_seed(0)
    weights = [4] + [1] * 9  # class 0 dealt 4 times in every 13 images
    model = distill(digits_teacher[0], InvertedPool(pool_size=52, inversion_steps=30, inversion_batch=52,
                                                    class_weights=weights, symmetric_classes=[0]), val_size=52)
    model.source.prepare()
    pool, held_out = model.source.pool, torch.cat(model.held_out_images())
    dealt = class_cycle(10, weights)[torch.arange(52) % 13]
    predicted = model.teacher(pool).argmax(1)
    assert (predicted == 0).sum() > 8 and (predicted == dealt).float().mean() > 0.7  # balanced: about 5
    symmetric = torch.tensor([torch.allclose(x, x.flip(-1), atol=1e-5) for x in pool])
    assert symmetric.tolist() == (dealt == 0).tolist()
    # the held-out validation shapes stay balanced and unconstrained
    assert torch.bincount(model.teacher(held_out).argmax(1), minlength=10).max() < 13
    assert sum(torch.allclose(x, x.flip(-1), atol=1e-5) for x in held_out) < 13


@pytest.mark.parametrize("settings, message", [
    (dict(pool_size=0), "pool_size must be positive"), (dict(inversion_steps=0), "inversion_steps must be positive"),
    (dict(inversion_batch=0), "inversion_batch"), (dict(shapes=0), "shapes"), (dict(scale=0.0), "scale"),
    (dict(class_weights=[1] * 9), "class_weights must be 10 whole numbers"),
    (dict(class_weights=[1] * 9 + [2.5]), "class_weights must be 10 whole numbers"),
    (dict(symmetric_classes=[10]), "symmetric_classes must be distinct class indices"),
    (dict(symmetric_classes=[0, 0]), "symmetric_classes must be distinct class indices"),
])
def test_inverted_pool_settings_are_checked(digits_teacher, settings, message):
    with pytest.raises(ConfigError, match=message):
        distill(digits_teacher[0], InvertedPool(**settings))


def test_inverted_pool_needs_the_input_contract(digits_teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(digits_teacher[0])), str(bare), metadata={"arch": "lenet5_bn"})
    with pytest.raises(ConfigError, match="InvertedPool needs the teacher's input contract"):
        distill(bare, InvertedPool())
    distill(bare, InvertedPool(), dataset="digits")  # a registered dataset completes it


def test_mixture_ends_each_batch_with_the_extra_share(digits_teacher):
    torch.manual_seed(0)
    model = distill(digits_teacher[0], Mixture(GaussianNoise(), InvertedPool(pool_size=40, inversion_steps=2),
                                               extra_fraction=0.25))
    batch = model.source.sample(32)
    pool = model.source.extra.pool
    assert all((pool == image).flatten(1).all(1).any() for image in batch[24:])
    assert not any((pool == image).flatten(1).all(1).any() for image in batch[:24])
    assert model.source.description == "Gaussian noise"  # validation is the main source's
    with pytest.raises(ConfigError, match="extra_fraction"):
        Mixture(GaussianNoise(), GaussianNoise(), extra_fraction=1.0)


def test_real_images_are_the_datasets_pixels_through_the_teachers_normalisation(digits_teacher):
    from dafl.datasets import load_split

    model = distill(digits_teacher[0], RealImages("digits", classes=[3]))
    train = load_split("digits", "train")
    threes = model.contract.adapter()(train.images[train.labels == 3])  # digits: the teacher's own native size
    batch = model.source.sample(16)
    assert all((threes == image).flatten(1).all(1).any() for image in batch)
    with pytest.raises(ConfigError, match="--model.source.root"):  # this source's setting, not the data module's
        RealImages("cifar10", root="/nonexistent")


def test_gaussian_noise_is_standard_normal():
    torch.manual_seed(0)
    source = GaussianNoise()
    source.bind(torch.nn.Linear(1, 1), InputContract(input_size=32, channels=1), 10, None)
    noise = source.sample(256)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


@pytest.mark.parametrize("settings, message", [
    (dict(width=0), "width"), (dict(steps=0), "steps"), (dict(entropy_weight=-1.0), "entropy_weight"),
    (dict(replay_size=-5), "replay_size"), (dict(entropy_log_base=1.0), "entropy_log_base"),
    (dict(balanced_one_hot=True, class_conditional=True), "choose one"),
    (dict(arch="native", native_padding=True), "native_padding"),
])
def test_generator_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        GeneratorSource(**settings)


def test_joint_step_is_one_backward_for_generator_and_student(digits_teacher):
    model = distill(digits_teacher[0], GeneratorSource(latent_dim=16, width=16, joint_step=True), student_steps=1)
    student_before = [p.clone() for p in model.student.parameters()]
    generator_before = [p.clone() for p in model.source.parameters()]
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=1))
    assert all(not torch.equal(a, b) for a, b in zip(student_before, model.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(generator_before, model.source.parameters()))
    assert trainer.global_step == 2  # one step per optimizer: Lightning's global_step counts both


def test_generator_steps_and_student_steps_per_iteration(digits_teacher):
    for joint, expected in ((False, 3 + 4), (True, 3 + 4)):
        model = distill(digits_teacher[0], GeneratorSource(latent_dim=16, width=16, steps=3, joint_step=joint),
                        student_steps=4)
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=2))
        assert trainer.global_step == 2 * expected  # joint: the third generator step shares the first student step


def test_bn_stat_loss_needs_a_batchnorm_teacher(tmp_path):
    from dafl.models import build_model
    from dafl.weights import save_classifier

    path = tmp_path / "plain.safetensors"
    save_classifier(path, build_model("lenet5"), {"arch": "lenet5", "num_classes": 10, "in_channels": 1,
                                                  "image_size": 32})
    with pytest.raises(ConfigError, match="BatchNorm"):
        distill(path, GeneratorSource(bn_stat_weight=1.0))


def test_class_conditional_latents_are_balanced_and_coded(digits_teacher):
    model = distill(digits_teacher[0], GeneratorSource(latent_dim=16, width=16, class_conditional=True))
    z, targets = model.source.objective.latents(30)
    assert torch.bincount(targets).tolist() == [3] * 10
    assert torch.equal(z[:, :10], torch.nn.functional.one_hot(targets, 10).float())
    with pytest.raises(ConfigError, match="latent_dim"):
        distill(digits_teacher[0], GeneratorSource(latent_dim=5, class_conditional=True))


def test_balanced_one_hot_aims_at_a_class_quota(digits_teacher):
    model = distill(digits_teacher[0], GeneratorSource(latent_dim=16, width=16, balanced_one_hot=True))
    images = torch.zeros(20, 1, 32, 32)  # one image 20 times: the teacher gives one class to all
    losses, logits, _ = model.source.objective.losses(images, model.teacher)
    argmax_loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
    assert losses["oh"].item() > argmax_loss.item()  # 18 of the 20 are asked for other classes


def test_native_generator_and_its_levers_train(digits_teacher):
    source = GeneratorSource(arch="native", latent_dim=16, width=16, joint_step=False, replay_size=64,
                             activation_weight=0.0, bn_stat_weight=1.0, adversarial_weight=0.1, diversity_weight=0.1)
    model = distill(digits_teacher[0], source)
    before = [p.clone() for p in model.source.parameters()]
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=2))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.source.parameters()))
    assert {"train/loss_div", "train/loss_adv", "train/loss_bn"} <= set(trainer.logged_metrics)
    assert len(model.source.replay) == 64  # two iterations of 32 generated images


def test_native_generator_needs_input_metadata(digits_teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(digits_teacher[0])), str(bare), metadata={"arch": "lenet5_bn"})
    with pytest.raises(ConfigError, match="native"):
        distill(bare, GeneratorSource(arch="native"))


HALVES = ["checkpoints/fashion_mnist_lenet5_bn_classes0-4.safetensors",
          "checkpoints/fashion_mnist_lenet5_bn_classes5-9.safetensors"]
ENSEMBLE = "checkpoints/fashion_mnist_ensemble_lenet5_bn.safetensors"


def bound_pool(class_teachers, **settings):
    from dafl.weights import load_classifier

    teacher, meta = load_classifier(ENSEMBLE)
    pool = InvertedPool(class_teachers=class_teachers, **{"inversion_steps": 2, "inversion_batch": 16, **settings})
    pool.bind(teacher.eval().requires_grad_(False), InputContract.from_metadata(meta), 10, None)
    return pool, teacher


def count_images(network):
    seen = []
    return seen, network.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))


def test_class_teachers_invert_their_own_classes_in_their_share_and_the_teacher_inverts_none():
    pool, teacher = bound_pool(HALVES, pool_size=28, class_weights=[2, 1, 2, 1, 2, 1, 2, 1, 1, 1])
    (first, _), (second, _) = pool.class_teachers
    counts = [count_images(network) for network in (teacher, first, second)]
    pool.prepare()
    for _, handle in counts:
        handle.remove()
    (by_teacher, _), (by_first, _), (by_second, _) = counts
    # a cycle deals 0..9 then 0, 2, 4, 6 again: 8 of every 14 images are classes 0-4
    assert by_teacher == [] and by_first == [16] * 2 and by_second == [12] * 2
    assert pool.pool.shape == (28, 1, 32, 32) and torch.isfinite(pool.pool).all()


def test_each_class_teacher_moves_its_images_toward_each_of_its_classes():
    torch.manual_seed(0)
    pool, _ = bound_pool(HALVES, pool_size=40, inversion_steps=30, inversion_batch=20)
    (first, classes), _ = pool.class_teachers
    assert classes == [0, 1, 2, 3, 4]
    pool.prepare()
    with torch.no_grad():
        predicted = first(pool.pool[:20]).argmax(1)  # the first teacher's images come first
    assert predicted.bincount(minlength=5).tolist() == [4] * 5


@pytest.mark.parametrize("class_teachers, message", [
    ([HALVES[0], HALVES[0]], "known by both"),
    ([HALVES[0]], r"classes \[5, 6, 7, 8, 9\] are known by no class teacher"),
    (["checkpoints/mnist5k_lenet5_bn.safetensors"], "same inputs"),
])
def test_bad_class_teachers_are_one_line_errors(class_teachers, message):
    with pytest.raises(ConfigError, match=message):
        bound_pool(class_teachers, pool_size=8)


def test_a_class_teacher_whose_class_list_does_not_match_its_outputs_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(HALVES[1], "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta["classes"] = "[5, 6, 7]"  # five outputs
    save_file(tensors, tmp_path / "three.safetensors", metadata=meta)
    with pytest.raises(ConfigError, match="lists 3 classes but has 5 outputs"):
        bound_pool([HALVES[0], str(tmp_path / "three.safetensors")], pool_size=8)


def test_calibrate_teacher_heads_refits_the_merged_teachers_heads_on_the_pool():
    pool, teacher = bound_pool(HALVES, pool_size=32, calibrate_teacher_heads=True)
    before = teacher.head_scale.clone(), teacher.head_shift.clone()
    pool.prepare()
    after = teacher.head_scale.clone(), teacher.head_shift.clone()
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    teacher.calibrate_heads(pool.pool.split(16))  # the same fit on the same images: the same heads
    torch.testing.assert_close((teacher.head_scale, teacher.head_shift), after)


def test_calibrate_teacher_heads_needs_a_merged_teacher(digits_teacher):
    from dafl.weights import load_classifier

    teacher, meta = load_classifier(digits_teacher[0])
    with pytest.raises(ConfigError, match="calibrate_teacher_heads needs a merged teacher"):
        InvertedPool(calibrate_teacher_heads=True).bind(teacher, InputContract.from_metadata(meta), 10, None)


def test_the_pools_former_class_path_still_names_it():
    # configs and checkpoints written before the pool had its own module name it there
    import lightning_modules.sources as sources

    assert sources.InvertedPool is InvertedPool
    with pytest.raises(AttributeError):
        sources.NoSuchSource
