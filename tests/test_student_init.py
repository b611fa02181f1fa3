"""dafl.student_init: a student made from the teacher's weights (BatchNorm folded, each layer
zipped to the student's width), and StudentDistillation's `student_init: zip_teacher`."""
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import quiet_trainer
from dafl.data import DataFreeDataModule
from dafl.errors import ConfigError
from dafl.models import build_model
from dafl.student_init import check_zippable, fold_batchnorm, zip_teacher_into_student
from lightning_modules.inverted_pool import InvertedPool
from lightning_modules.sources import GaussianNoise
from lightning_modules.student import StudentDistillation


def randomise_batchnorm(net: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so folding has work to do."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def doubled(half: nn.Module) -> nn.Module:
    """A full-width LeNet-5 computing exactly what `half` computes: every feature twice (its
    weights repeated), and every layer reading each copy with half the weight."""
    full = build_model("lenet5").eval()
    h, f = half.state_dict(), {}
    for key in ("features.0", "features.4", "features.8", "classifier.0", "classifier.2"):
        w, b = h[f"{key}.weight"], h[f"{key}.bias"]
        if key != "features.0":
            w = w.repeat_interleave(2, dim=1) / 2  # the inputs: each feature of the layer below, twice
        if key != "classifier.2":
            w, b = w.repeat_interleave(2, dim=0), b.repeat_interleave(2)  # the outputs, twice
        f[f"{key}.weight"], f[f"{key}.bias"] = w, b
    full.load_state_dict(f)
    return full


def test_folding_batchnorm_keeps_the_function():
    torch.manual_seed(0)
    teacher = randomise_batchnorm(build_model("lenet5_bn"))
    x = torch.randn(16, 1, 32, 32)
    folded = fold_batchnorm(teacher)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # the teacher is not touched
    torch.testing.assert_close(folded(x), teacher(x), atol=1e-4, rtol=1e-4)


def test_a_student_as_wide_as_the_teacher_becomes_the_teacher():
    torch.manual_seed(0)
    teacher = randomise_batchnorm(build_model("lenet5_bn"))
    student = build_model("lenet5")
    x = torch.randn(64, 1, 32, 32)
    zip_teacher_into_student(teacher, student, x)
    torch.testing.assert_close(student.eval()(x), teacher(x), atol=1e-4, rtol=1e-4)


def test_zipping_merges_duplicated_features_back_into_the_half_network():
    torch.manual_seed(0)
    half = build_model("lenet5_half").eval()
    teacher = doubled(half)
    images = torch.rand(256, 1, 32, 32) * 4 - 1
    torch.testing.assert_close(teacher(images), half(images), atol=1e-4, rtol=1e-4)
    student = build_model("lenet5_half")
    parameters = [p for p in student.parameters()]
    zip_teacher_into_student(teacher, student, images)
    # each pair of twins (correlation 1) was merged: the student computes what `half` computes
    torch.testing.assert_close(student.eval()(images), half(images), atol=1e-4, rtol=1e-4)
    assert all(p is q for p, q in zip(parameters, student.parameters()))  # in place: an optimizer keeps them


@pytest.mark.parametrize("teacher, student, message", [
    ("resnet18", "lenet5_half", "LeNet-5"),
    ("lenet5_bn", "lenet5_half_bn", "without BatchNorm"),
    ("lenet5_half", "lenet5", "more than the teacher"),
])
def test_unzippable_pairs_are_one_line_config_errors(teacher, student, message):
    channels = 3 if teacher == "resnet18" else 1
    with pytest.raises(ConfigError, match=message):
        check_zippable(build_model(teacher, in_channels=channels), build_model(student))


def test_zip_teacher_needs_lenet5s(digits_teacher):
    with pytest.raises(ConfigError, match="zip_teacher"):
        StudentDistillation(teacher=str(digits_teacher[0]), student_arch="resnet18", student_init="zip_teacher")


@pytest.mark.parametrize("student_init", ["zip_teacher", "auto"])
def test_fit_starts_the_student_from_the_zipped_teacher(digits_teacher, student_init):
    import lightning as L

    settings = dict(teacher=str(digits_teacher[0]), source=InvertedPool(pool_size=128, inversion_steps=2),
                    batch_size=32, val_size=64, student_init=student_init)

    class FirstStep(L.Callback):
        weights = None

        def on_train_batch_start(self, trainer, module, *args):
            if FirstStep.weights is None:
                FirstStep.weights = {k: v.clone() for k, v in module.student.state_dict().items()}

    L.seed_everything(0, verbose=False)
    model = StudentDistillation(**settings)
    random_start = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[FirstStep()])
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=2))
    expected = build_model("lenet5_half", num_classes=model.teacher_meta["num_classes"])
    zip_teacher_into_student(model.teacher, expected, model.source.pool)
    for key, value in expected.state_dict().items():
        assert torch.equal(FirstStep.weights[key], value), key  # trained from the zip, not from the random init
        assert not torch.equal(random_start[key], value), key


@pytest.mark.parametrize("student_arch, source", [("lenet5_half_bn", None), ("resnet8", None),
                                                   ("lenet5_half", GaussianNoise())])
def test_auto_starts_at_random_exactly_where_zip_teacher_refuses(digits_teacher, student_arch, source):
    settings = dict(teacher=str(digits_teacher[0]), student_arch=student_arch, source=source)
    with pytest.raises(ConfigError, match="zip_teacher"):
        StudentDistillation(**settings, student_init="zip_teacher")
    assert not StudentDistillation(**settings, student_init="auto").zips_student
    assert StudentDistillation(teacher=str(digits_teacher[0]), student_init="auto").zips_student


def test_auto_starts_at_random_from_a_teacher_without_batchnorm():
    teacher = str(Path(__file__).resolve().parent.parent / "checkpoints" / "fashion_mnist_lenet5.safetensors")
    assert StudentDistillation(teacher=teacher, student_init="zip_teacher").zips_student  # the pair zips
    assert not StudentDistillation(teacher=teacher, student_init="auto").zips_student


def full_merge_of_the_halves(path) -> None:
    from dafl.weights import load_classifier, save_classifier
    from dafl.zipit import build_zipped, feature_correlations
    from dafl.zipped import max_depth

    halves = [load_classifier(f"checkpoints/fashion_mnist_lenet5_bn_classes{c}.safetensors") for c in ("0-4", "5-9")]
    (a, meta), (b, _) = halves
    images = torch.rand(64, 1, 32, 32)
    zipped = build_zipped([a, b], [list(range(5)), list(range(5, 10))], "lenet5_bn", max_depth(a), "zipit",
                          feature_correlations([a, b], [images]))
    save_classifier(path, zipped, {"arch": "zipit", "base_arch": "lenet5_bn", "depth": max_depth(a),
                                   "class_lists": [list(range(5)), list(range(5, 10))], "num_classes": 10,
                                   **{k: meta[k] for k in ("in_channels", "image_size", "native_size", "mean", "std")}})


def test_student_init_from_zips_a_full_merge_into_the_student_of_the_ensemble(tmp_path):
    import lightning as L

    from dafl.weights import load_classifier

    full_merge_of_the_halves(tmp_path / "full.safetensors")
    L.seed_everything(0, verbose=False)
    model = StudentDistillation(teacher="checkpoints/fashion_mnist_ensemble_lenet5_bn.safetensors",
                                source=InvertedPool(pool_size=64, inversion_steps=2), batch_size=32, val_size=32,
                                student_init="zip_teacher", student_init_from=str(tmp_path / "full.safetensors"))
    first = {}

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, module, *args):
            first.update({} if first else {k: v.clone() for k, v in module.student.state_dict().items()})

    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[FirstStep()])
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=1))
    expected = build_model("lenet5_half", num_classes=10)
    zip_teacher_into_student(load_classifier(tmp_path / "full.safetensors")[0].single_network(), expected,
                             model.source.pool)
    for key, value in expected.state_dict().items():
        assert torch.equal(first[key], value), key


def test_student_init_from_needs_zip_teacher_and_a_full_merge(tmp_path):
    with pytest.raises(ConfigError, match="set both"):
        StudentDistillation(student_init_from="checkpoints/fashion_mnist_lenet5_bn.safetensors")
    with pytest.raises(ConfigError, match="only a full ZipIt merge"):
        StudentDistillation(teacher="checkpoints/fashion_mnist_ensemble_lenet5_bn.safetensors",
                            student_init="zip_teacher",
                            student_init_from="checkpoints/fashion_mnist_ensemble_lenet5_bn.safetensors")


DDP_SCRIPT = '''
import sys, torch, lightning as L
from dafl.data import DataFreeDataModule
from lightning_modules.inverted_pool import InvertedPool
from lightning_modules.student import StudentDistillation

teacher, out = sys.argv[1], sys.argv[2]


class SaveFirstStep(L.Callback):
    saved = False

    def on_train_batch_start(self, trainer, module, *args):
        if not SaveFirstStep.saved:
            SaveFirstStep.saved = True
            torch.save({"student": module.student.state_dict(), "pool": module.source.pool},
                       f"{out}/rank{trainer.global_rank}.pt")


L.seed_everything(0, verbose=False)
model = StudentDistillation(teacher=teacher, source=InvertedPool(pool_size=64, inversion_steps=2), batch_size=16,
                            val_size=32, student_init="zip_teacher")
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_val_batches=0,
                    num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[SaveFirstStep()])
trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=1))
'''


def test_under_ddp_every_rank_starts_from_rank_zeros_zip(digits_teacher, tmp_path):
    """Two CPU processes (gloo): each rank inverts its own pool (seeds are offset by rank), so
    without the broadcast their zipped students would differ; every rank must train from rank
    0's. A real two-process run, not a mock of Lightning's strategy."""
    import subprocess
    import sys

    from dafl.weights import load_classifier

    script = tmp_path / "ddp_zip.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(digits_teacher[0]), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["pool"], rank1["pool"])  # else the broadcast would have nothing to do
    teacher, meta = load_classifier(digits_teacher[0])
    expected = build_model("lenet5_half", num_classes=meta["num_classes"])
    zip_teacher_into_student(teacher, expected, rank0["pool"])
    for key, value in expected.state_dict().items():
        assert torch.allclose(rank0["student"][key], value, atol=1e-6), key
        assert torch.equal(rank1["student"][key], rank0["student"][key]), key
