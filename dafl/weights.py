"""Saving and loading classifier weights safely. User files are untrusted: safetensors, or
`torch.load(weights_only=True)` for plain state dicts and Lightning checkpoints; nothing
that can run code on load."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from dafl.errors import ConfigError
from dafl.models import build_model

REPO_ROOT = Path(__file__).resolve().parent.parent

# Metadata keys whose values are JSON (safetensors metadata is str -> str).
JSON_KEYS = {"num_classes", "in_channels", "image_size", "native_size", "mean", "std", "class_names", "test_acc",
             "seed", "parameters", "flops", "teacher_test_acc", "classes", "class_lists", "depth"}


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a kill during the
    write never leaves a half-written file under `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; weights are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_classifier(path: str | Path, network: nn.Module, metadata: dict[str, Any]) -> None:
    """safetensors weights + metadata (arch, shapes, normalisation, accuracy...)."""
    meta = {k: json.dumps(v) if k in JSON_KEYS else str(v) for k, v in metadata.items() if v is not None}
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: json.loads(v) if k in JSON_KEYS else v for k, v in raw.items()}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve(path: str | Path) -> Path:
    """A relative path that does not exist from the working directory is looked up from
    the repository root, so shipped files (checkpoints/, configs/) work from anywhere."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def _check_local_file(path: str | Path, what: str) -> Path:
    """`path` as a local file that exists, or a one-line ConfigError. URLs are refused:
    a remote file cannot be checked before it is loaded."""
    if "://" in str(path):
        raise ConfigError(f"{what} must be a local file, got the URL {path}: download it first "
                          "(files from elsewhere are loaded only as plain weights, never fetched)")
    path = resolve(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    return path


def _torch_load(path: Path, what: str) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, so a crafted
    pickle cannot run code."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = first_line(e)
        if reason.startswith("Weights only load failed"):  # torch's paragraph: keep its gist
            reason = "it holds objects other than tensors, or is not a PyTorch file at all"
        raise ConfigError(f"refusing to load {what} {path}: not a plain weights file ({reason})") from None
    except Exception as e:  # noqa: BLE001 - whatever a corrupt file raises, it is the user's bad input
        raise ConfigError(f"{what} {path} is not a readable PyTorch file: {first_line(e)}") from None


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A Lightning checkpoint (a dict with a `state_dict`), loaded safely: a local file
    only, `torch.load(weights_only=True)`. Every checkpoint dafl reads goes through here."""
    path = _check_local_file(path, what)
    ckpt = _torch_load(path, what)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"{what} {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = _check_local_file(path, "weights file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), read_metadata(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSON errors...
            raise ConfigError(f"{path} is not a readable safetensors file: {first_line(e)}") from None
    obj = _torch_load(path, "weights file")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        # A Lightning checkpoint of ClassifierModule: its network lives under "net.".
        obj = {k[len("net."):]: v for k, v in obj["state_dict"].items() if k.startswith("net.")}
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors")
    return obj, {}


def load_classifier(path: str | Path, arch: Optional[str] = None, num_classes: Optional[int] = None,
                    in_channels: Optional[int] = None, image_size: Optional[int] = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture named in the file's metadata (or `arch`) and load the weights
    strictly. Shapes not in the metadata come from the arguments (defaults 10 / 1 / 32)."""
    path = Path(path)
    state, meta = _read_state_dict(path)
    arch = arch or meta.get("arch")
    if arch is None:
        raise ConfigError(f"{path} does not name its architecture: pass teacher_arch (e.g. lenet5)")
    if meta.get("arch") and arch != meta["arch"]:
        raise ConfigError(f"{path} holds a {meta['arch']} but {arch} was asked for")
    shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for key, value in shape.items():
        if key in meta and value is not None and meta[key] != value:
            raise ConfigError(f"{path} was trained with {key}={meta[key]}, but {value} was asked for")
    shape = {k: meta.get(k, v) for k, v in shape.items()}
    shape = {"num_classes": shape["num_classes"] or 10, "in_channels": shape["in_channels"] or 1,
             "image_size": shape["image_size"] or 32}
    if arch == "zipit":  # a merged multi-task teacher (dafl.zipit): its structure is in the metadata
        from dafl.zipit import ZippedClassifier

        missing_keys = [k for k in ("base_arch", "class_lists", "depth") if k not in meta]
        if missing_keys:
            raise ConfigError(f"{path} is a zipit model without {', '.join(missing_keys)} in its metadata")
        network = ZippedClassifier(meta["base_arch"], meta["class_lists"], meta["depth"], shape["in_channels"],
                                   shape["num_classes"], shape["image_size"])
    else:
        network = build_model(arch, **shape)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ConfigError(f"{path} does not fit {arch} ({shape}): missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {mismatched[:3]}")
    network.load_state_dict(state)
    return network, {**meta, **shape, "arch": arch}
