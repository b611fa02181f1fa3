"""Shipped teachers load and reproduce the accuracy their metadata and cards state."""
from pathlib import Path

import pytest

from dafl.data import ImageDataModule, evaluate_accuracy
from dafl.datasets import is_available
from dafl.weights import load_classifier, read_metadata

CHECKPOINTS = sorted((Path(__file__).resolve().parent.parent / "checkpoints").glob("*.safetensors"))


def test_teachers_are_shipped():
    names = {p.stem for p in CHECKPOINTS}
    assert {"fashion_mnist_lenet5", "fashion_mnist_lenet5_bn", "mnist5k_lenet5", "mnist5k_lenet5_bn",
            "fashion_mnist_lenet5_bn_classes0-4",
            "fashion_mnist_lenet5_bn_classes5-9"} <= names


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.stem)
def test_shipped_teacher_reproduces_its_card(path):
    meta = read_metadata(path)
    card = path.with_suffix(".md").read_text()
    assert f"{100 * meta['test_acc']:.2f}%" in card and meta["command"] in card
    if not is_available(meta["dataset"]):
        pytest.skip(f"{meta['dataset']} not installed")
    network, meta = load_classifier(path)
    # A teacher of a class subset is tested on those classes; a merged one on all of them.
    data = ImageDataModule(meta["dataset"], input_size=meta["image_size"], batch_size=1000,
                           classes=meta.get("classes"))
    data.setup("test")
    assert evaluate_accuracy(network, data) == pytest.approx(meta["test_acc"], abs=1e-4)
    if meta["dataset"] == "fashion-mnist" and meta["arch"] != "zipit" and not meta.get("classes"):
        assert meta["test_acc"] >= 0.905
