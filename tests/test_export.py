"""Export: safetensors + metadata, ONNX, torch.export; usable without dafl's classes."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from dafl.data import DataFreeDataModule
from dafl.datasets import load_split
from dafl.errors import ConfigError
from dafl import load_student
from dafl.export import export_classifier, read_checkpoint
from lightning_modules.generator import GeneratorSource
from lightning_modules.student import StudentDistillation


@pytest.fixture(scope="module")
def student_run(digits_teacher, tmp_path_factory):
    """A briefly trained data-free student checkpoint and its export folder."""
    root = tmp_path_factory.mktemp("run")
    model = StudentDistillation(teacher=str(digits_teacher[0]), source=GeneratorSource(latent_dim=16, width=16,
                                joint_step=False), student_steps=2, batch_size=32, val_size=32)
    data = DataFreeDataModule("digits", iterations_per_epoch=20)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)])
    trainer.fit(model, datamodule=data)
    framework_acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    meta, state, _ = read_checkpoint(root)
    out = export_classifier(meta, state, root / "export")
    return root, out, model, framework_acc


def test_export_writes_all_files(student_run):
    _, out, _, _ = student_run
    assert sorted(p.name for p in out.iterdir()) == ["model_card.md", "student.onnx", "student.pt2",
                                                     "student.safetensors"]
    card = (out / "model_card.md").read_text()
    assert "onnxruntime" in card and "1 x 8 x 8" in card


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_pytorch(student_run, batch):
    _, out, model, _ = student_run
    session = ort.InferenceSession(str(out / "student.onnx"))
    pixels = np.random.rand(batch, 1, 8, 8).astype(np.float32)
    logits = session.run(None, {"pixels": pixels})[0]
    reference = load_student(out / "student.safetensors")(torch.from_numpy(pixels)).detach().numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)


def test_onnx_is_one_file(student_run):
    _, out, _, _ = student_run
    import onnx

    model = onnx.load(str(out / "student.onnx"))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert len(list(out.glob("*.data"))) == 0


@pytest.mark.parametrize("batch", [1, 7])
def test_pt2_loads_and_matches(student_run, batch):
    _, out, _, _ = student_run
    program = torch.export.load(str(out / "student.pt2"))
    pixels = torch.rand(batch, 1, 8, 8)
    expected = load_student(out / "student.safetensors")(pixels)
    torch.testing.assert_close(program.module()(pixels), expected, atol=1e-5, rtol=0)


def test_load_student_round_trip(student_run):
    _, out, model, _ = student_run
    loaded = load_student(out / "student.safetensors")
    for k, v in model.student.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v)
    assert not loaded.training


def test_exported_accuracy_equals_framework_accuracy(student_run):
    _, out, _, framework_acc = student_run
    test = load_split("digits", "test")
    pixels = test.images.float().numpy() / 255.0
    session = ort.InferenceSession(str(out / "student.onnx"))
    predictions = session.run(None, {"pixels": pixels.astype(np.float32)})[0].argmax(1)
    assert float((predictions == test.labels.numpy()).mean()) == pytest.approx(framework_acc, abs=1e-6)


def test_not_a_student_checkpoint(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="not a dafl"):
        read_checkpoint(path)
    with pytest.raises(ConfigError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_unwritable_output_leaves_nothing(student_run, tmp_path):
    root, _, _, _ = student_run
    meta, state, _ = read_checkpoint(root)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create output folder"):
        export_classifier(meta, state, blocker / "out")
    assert blocker.read_text() == "x"


def test_failed_export_leaves_no_partial_files(student_run, tmp_path, monkeypatch):
    root, _, _, _ = student_run
    meta, state, _ = read_checkpoint(root)
    import dafl.export

    def boom(*args, **kwargs):
        raise RuntimeError("simulated ONNX failure")

    monkeypatch.setattr(dafl.export, "_export_onnx", boom)
    with pytest.raises(RuntimeError):
        export_classifier(meta, state, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output folder nor a temporary one is left
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "student.onnx").write_text("an earlier export")
    with pytest.raises(RuntimeError):
        export_classifier(meta, state, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # a failed replacement keeps the old export
    assert (tmp_path / "out" / "student.onnx").read_text() == "an earlier export"
