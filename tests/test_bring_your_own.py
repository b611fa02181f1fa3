"""Bring your own teacher: any nn.Module (a class path, timm, torchvision), weights as
safetensors, a plain state dict or a Lightning checkpoint, and the input contract as
settings. Every bad input is one line."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dafl.errors import ConfigError
from dafl.models import PenultimateFeatures, build_network, output_classes
from dafl.weights import load_classifier
from test_cli import one_line_error
from user_nets import SmallNet, trained_small_net

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def user_path(monkeypatch):
    """The user's own module importable in `python -m dafl` subprocesses."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


def tiny_fit(teacher, run_dir, *extra):
    return ["fit", "--model.teacher", teacher, "--data.eval_dataset", "digits", "--model.batch_size", "32",
            "--model.val_size", "32", "--model.source.pool_size", "64", "--model.source.inversion_batch", "64",
            "--model.source.inversion_steps", "2", "--model.student_steps", "2",
            "--data.iterations_per_epoch", "10", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--run_dir", run_dir, *extra]


def test_a_plain_state_dict_of_the_users_own_class_distils_end_to_end(run_cli, tmp_path, user_path):
    teacher = trained_small_net()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    result = run_cli(*tiny_fit(tmp_path / "teacher.pt", tmp_path / "run", "--model.teacher_arch", "user_nets.SmallNet"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test accuracy" in result.stdout
    from dafl import load_student

    student = load_student(tmp_path / "run" / "export" / "student.safetensors")
    assert student(torch.rand(4, 1, 8, 8)).shape == (4, 10)  # digits' native 8x8 pixels in, 10 logits out


def test_a_lightning_checkpoint_needs_its_key_prefix(run_cli, tmp_path, user_path):
    state = SmallNet().state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "t.ckpt")
    line = one_line_error(run_cli(*tiny_fit(tmp_path / "t.ckpt", tmp_path / "run",
                                            "--model.teacher_arch", "user_nets.SmallNet")))
    assert "missing" in line and "--model.teacher_key_prefix model." in line
    network, meta = load_classifier(tmp_path / "t.ckpt", arch="user_nets.SmallNet", key_prefix="model.")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items()) and meta["num_classes"] == 10


@pytest.mark.parametrize("arch", ["timm/resnet10t", {"class_path": "torchvision.models.resnet18",
                                                     "init_args": {"num_classes": 10}}])
def test_timm_and_torchvision_teachers_load_and_give_features(tmp_path, arch):
    channels = 1 if isinstance(arch, str) else 3
    network = build_network(arch, in_channels=channels, num_classes=10, image_size=32)
    torch.save(network.state_dict(), tmp_path / "t.pth")
    loaded, meta = load_classifier(tmp_path / "t.pth", arch=arch, in_channels=channels)
    x = torch.randn(3, channels, 32, 32, dtype=torch.float64)
    loaded.double().eval()
    logits, features = PenultimateFeatures(loaded)(x)
    assert logits.shape == (3, 10) and features.shape[0] == 3 and features.dtype == torch.float64
    assert torch.isfinite(features).all() and meta["num_classes"] == 10
    (features.abs().mean()).backward()  # the activation loss can push gradients to the images


def test_registered_models_keep_their_own_features():
    lenet = build_network("lenet5_bn").eval()
    x = torch.randn(2, 1, 32, 32)
    logits, features = PenultimateFeatures(lenet)(x)
    assert features.shape == (2, 120)  # DAFL's LeNet-5 features: the conv3 output, not the fc input
    hooked = PenultimateFeatures(lenet, layer="classifier.2")(x)[1]
    assert hooked.shape == (2, 84)


def test_timm_student_from_the_shipped_teacher(run_cli, tmp_path):
    result = run_cli(*tiny_fit("checkpoints/fashion_mnist_lenet5_bn.safetensors", tmp_path / "run",
                               "--model.student_arch", "timm/resnet10t", "--data.eval_dataset", "fashion-mnist"),
                     cwd=TESTS.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_contract_comes_from_settings_when_the_file_has_none(run_cli, tmp_path, user_path):
    torch.save(SmallNet().state_dict(), tmp_path / "teacher.pt")
    args = tiny_fit(tmp_path / "teacher.pt", tmp_path / "run", "--model.teacher_arch", "user_nets.SmallNet",
                    "--data.eval_dataset", "null")
    line = one_line_error(run_cli(*args))
    assert "teacher_input.native_size" in line
    result = run_cli(*args, "--model.teacher_input", "{native_size: 28, mean: [0.5], std: [0.5]}")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = load_file(tmp_path / "run" / "export" / "student.safetensors")  # weights written
    assert meta


@pytest.mark.parametrize("extra,message", [
    (["--model.teacher_arch", "user_nets.NoSuchNet"], "cannot import user_nets.NoSuchNet"),
    (["--model.teacher_arch", "user_nets.NotAClassifier"], "does not fit"),
    (["--model.teacher_arch", "timm/no_such_model_xyz"], "timm/no_such_model_xyz"),
    (["--model.teacher_arch", "user_nets.SmallNet", "--model.teacher_input", "{mean: [0.1, 0.2, 0.3]}"],
     "mean has 3 values"),
    (["--model.teacher_arch", "user_nets.SmallNet", "--model.student_arch",
      "{class_path: user_nets.SmallNet, init_args: {classes: 12}}"], "returns 12 logits but the teacher 10"),
])
def test_bad_own_teacher_input_is_one_line(run_cli, tmp_path, user_path, extra, message):
    torch.save(SmallNet().state_dict(), tmp_path / "teacher.pt")
    assert message in one_line_error(run_cli(*tiny_fit(tmp_path / "teacher.pt", tmp_path / "run", *extra)))
    assert not (tmp_path / "run").exists()


def test_not_a_classifier_output_is_refused(tmp_path):
    from user_nets import NotAClassifier

    with pytest.raises(ConfigError, match=r"\(N, classes\) logits"):
        output_classes(NotAClassifier(), 1, 32, "teacher")


def test_a_dict_without_tensors_is_not_a_checkpoint(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "x.ckpt")
    with pytest.raises(ConfigError, match="state dict of tensors"):
        load_classifier(tmp_path / "x.ckpt", arch="lenet5")


def test_the_teacher_recipe_trains_a_timm_model_whose_file_loads_alone():
    from lightning_modules.classifier import ClassifierModule

    module = ClassifierModule(arch="timm/test_efficientnet", num_classes=10, in_channels=1)
    assert type(module.net).__module__.startswith("timm.")
    meta = module.export_metadata()
    assert meta["arch"] == "timm/test_efficientnet"
    rebuilt = build_network(meta["arch"], in_channels=1, num_classes=10)
    rebuilt.load_state_dict(module.net.state_dict())  # the exported name rebuilds the same network
