import pickle

import numpy as np
import pytest
import torch

from dafl.data import DataFreeDataModule, ImageDataModule, stratified_holdout
from dafl.contract import InputAdapter
from dafl.datasets import dataset_info, is_available, load_split
from dafl.errors import ConfigError

needs_fashion = pytest.mark.skipif(not is_available("fashion-mnist"),
                                   reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@needs_fashion
def test_fashion_mnist_shapes_and_ranges():
    train, test = load_split("fashion-mnist", "train"), load_split("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_mnist_5k_fixed_stratified_split():
    train, test = load_split("mnist-5k", "train"), load_split("mnist-5k", "test")
    assert len(train.labels) == 4000 and len(test.labels) == 1000
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.bincount(train.labels).tolist() == [400] * 10
    again = load_split("mnist-5k", "test")
    assert torch.equal(again.images, test.images)
    assert train.images.shape[1:] == (1, 28, 28)


def test_digits_split():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert len(train.labels) + len(test.labels) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255


def test_image_datamodule_split_sizes_and_normalisation():
    dm = ImageDataModule("digits", val_size=100, batch_size=32)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.val_set) == 100 and len(dm.train_set) + 100 == len(load_split("digits", "train").labels)
    images, labels = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32
    # validation classes are balanced (stratified hold-out)
    counts = torch.bincount(dm.val_set.tensors[1], minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11


def test_class_subset_keeps_only_those_classes_relabelled_in_order():
    full = load_split("digits", "test")
    dm = ImageDataModule("digits", val_size=20, batch_size=32, classes=[7, 2, 5])
    dm.setup("fit")
    dm.setup("test")
    assert dm.info.num_classes == 3 and dm.info.classes == [7, 2, 5] and dm.info.class_names == ["7", "2", "5"]
    labels = dm.test_set.tensors[1]
    assert sorted(labels.unique().tolist()) == [0, 1, 2]
    # label 0 is digit 7: the same images, in the same order, as the full split's sevens
    assert torch.equal(dm.test_set.tensors[0][labels == 0], full.images[full.labels == 7])
    assert len(labels) == int(torch.isin(full.labels, torch.tensor([7, 2, 5])).sum())
    assert set(dm.train_set.tensors[1].unique().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("classes", [[], [3, 3], [10], [-1]])
def test_bad_class_subsets_are_one_line_errors(classes):
    with pytest.raises(ConfigError, match="classes must be distinct"):
        ImageDataModule("digits", classes=classes)


def test_stratified_holdout_size_and_determinism():
    labels = torch.arange(103) % 3
    a, b = stratified_holdout(labels, 30, seed=1), stratified_holdout(labels, 30, seed=1)
    assert a.sum() == 30 and torch.equal(a, b)
    assert torch.bincount(labels[a]).tolist() == [10, 10, 10]


def test_input_adapter_pads_28_to_32_and_normalises():
    adapter = InputAdapter(28, 32, [0.5], [0.25])
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    y = adapter(x)
    assert y.shape == (2, 1, 32, 32)
    assert torch.allclose(y[:, :, 2:30, 2:30], torch.tensor(2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(y[:, :, 0, :], torch.tensor(-2.0))  # padding is black: (0 - 0.5) / 0.25
    assert torch.allclose(adapter(x.float() / 255), y)  # uint8 and [0, 1] floats agree


def test_input_adapter_resizes_when_padding_cannot():
    y = InputAdapter(8, 32, [0.0], [1.0])(torch.rand(3, 1, 8, 8))
    assert y.shape == (3, 1, 32, 32)


def test_missing_fashion_mnist_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_split("fashion-mnist", "train", root=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message and "--data.root" in message


def test_fashion_mnist_from_user_folder(tmp_path):
    import gzip

    images = np.random.randint(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], dtype=np.uint8)
    for stem, array, code in (("t10k-images-idx3-ubyte", images, 3), ("t10k-labels-idx1-ubyte", labels, 1)):
        header = bytes([0, 0, 8, code]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(header + array.tobytes())
    split = load_split("fashion-mnist", "test", root=str(tmp_path))
    assert torch.equal(split.images[:, 0], torch.from_numpy(images))
    assert split.labels.tolist() == [0, 1, 2, 3, 9]


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'"):
        load_split("svhn", "train")


def _write_fake_cifar(root, n_per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n_per_batch).tolist())}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar10_from_fake_torchvision_folder(tmp_path):
    _write_fake_cifar(tmp_path)
    train, test = load_split("cifar10", "train", str(tmp_path)), load_split("cifar10", "test", str(tmp_path))
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    dm = ImageDataModule("cifar10", root=str(tmp_path), val_size=5, batch_size=4, augment_shift=4, augment_flip=True)
    dm.setup("fit")
    x, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (4, 3, 32, 32)


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    folder = _write_fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(ConfigError, match="refusing to load builtins.print"):
        load_split("cifar10", "test", str(tmp_path))


def test_cifar_without_root_says_how():
    with pytest.raises(ConfigError, match="--data.root"):
        load_split("cifar100", "train")


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    split = load_split("image-folder", "train", str(tmp_path))
    assert split.images.shape == (6, 3, 12, 12) and split.info.class_names == ["cat", "dog"]
    assert dataset_info("image-folder", str(tmp_path)).num_classes == 2


def test_data_free_module_never_loads_training_images():
    dm = DataFreeDataModule("digits", iterations_per_epoch=7)
    assert list(dm.train_dataloader()) == list(range(7))
    assert dm.has_test_data
    images, labels = next(iter(dm.test_dataloader()))
    x, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape[1:] == (1, 32, 32)


def test_data_free_module_checks_named_data_at_once_and_reports_missing_data(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):  # a folder the user named: checked up front
        DataFreeDataModule("fashion-mnist", root=str(tmp_path))
    monkeypatch.delenv("DAFL_CIFAR10", raising=False)
    dm = DataFreeDataModule("cifar10")  # not installed, no folder named: trained anyway, not scored
    assert not dm.has_test_data and "--data.root" in dm.missing_reason


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"val_size": -1}, {"input_size": 0}])
def test_image_datamodule_rejects_bad_numbers(kwargs):
    with pytest.raises(ConfigError):
        ImageDataModule("digits", **kwargs)


def test_input_contract_round_trips_through_metadata_and_builds_the_adapter():
    from dafl.contract import InputContract
    from dafl.errors import ConfigError

    meta = {"image_size": 32, "in_channels": 1, "native_size": 28, "mean": [0.5], "std": [0.25], "arch": "x"}
    contract = InputContract.from_metadata(meta)
    assert contract.metadata() == {k: meta[k] for k in ("image_size", "in_channels", "native_size", "mean", "std")}
    pixels = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(contract.adapter()(pixels), InputAdapter(28, 32, [0.5], [0.25])(pixels))
    bare = InputContract(input_size=32, channels=1)
    assert bare.missing() == ["native_size", "mean", "std"]
    with pytest.raises(ConfigError, match="teacher_input.native_size"):
        bare.adapter()
