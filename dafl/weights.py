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
from dafl.models import ArchSpec, build_network, output_classes, parse_spec, spec_name

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
        raise ConfigError(f"{what} must be a local file, got the URL {path}: URLs are refused (a remote file "
                          "could run code when loaded); download it and pass its path")
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


def _strip(state: dict[str, Any], prefix: str, keep_others: bool) -> dict[str, Any]:
    if not prefix:
        return dict(state)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()
            if keep_others or k.startswith(prefix)}


def _read_state_dict(path: Path, key_prefix: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from safetensors, a plain state dict, or a Lightning checkpoint
    (its `state_dict`, keys under `key_prefix`; default: the prefix a dafl checkpoint
    records, else `net.`, dafl's classifier module, when such keys exist)."""
    path = _check_local_file(path, "weights file")
    if path.suffix == ".safetensors":
        try:
            state, meta = load_file(str(path)), read_metadata(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSON errors...
            raise ConfigError(f"{path} is not a readable safetensors file: {first_line(e)}") from None
        return _strip(state, key_prefix or "", keep_others=True), meta
    obj = _torch_load(path, "weights file")
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and "state_dict" in obj:  # a Lightning checkpoint
        if not isinstance(obj["state_dict"], dict):
            raise ConfigError(f"{path} has a state_dict that is not a mapping of tensors")
        dafl_meta = obj.get("dafl") if isinstance(obj.get("dafl"), dict) else {}
        prefix = key_prefix if key_prefix is not None else dafl_meta.get("state_prefix")
        if prefix is None:
            prefix = "net." if any(k.startswith("net.") for k in obj["state_dict"]) else ""
        meta = {k: v for k, v in dafl_meta.items() if k != "state_prefix"}
        obj = _strip(obj["state_dict"], prefix, keep_others=False)
    elif isinstance(obj, dict):
        obj = _strip(obj, key_prefix or "", keep_others=True)
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors (nor a Lightning checkpoint with a "
                          "state_dict)")
    return obj, meta


def _prefix_hint(state: dict[str, Any], expected: dict[str, Any]) -> str:
    """A hint when the file's keys all carry a prefix the network's keys lack."""
    heads = {k.split(".", 1)[0] for k in state if "." in k}
    if len(heads) == 1 and not any(k.startswith(f"{next(iter(heads))}.") for k in expected):
        return f"; the file's keys all start with '{next(iter(heads))}.': set --model.teacher_key_prefix {next(iter(heads))}."
    return ""


def load_classifier(path: str | Path, arch: Optional[ArchSpec] = None, num_classes: Optional[int] = None,
                    in_channels: Optional[int] = None, image_size: Optional[int] = None,
                    key_prefix: Optional[str] = None, defaults: Optional[dict] = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture named in the file's metadata (or `arch`: a registered name,
    `timm/NAME`, or a class path, see `dafl.models.build_network`) and load the weights
    strictly. Shapes not in the metadata come from the arguments, then `defaults`, then
    10 classes / 1 channel / 32 px;
    the number of classes of a class-path network is what its forward returns."""
    path = Path(path)
    state, meta = _read_state_dict(path, key_prefix)
    arch = parse_spec(arch) if arch is not None else meta.get("arch")
    if arch is None:
        raise ConfigError(f"{path} does not name its architecture: set teacher_arch (a registered name such as "
                          "lenet5, timm/NAME, or a class path)")
    if meta.get("arch") and spec_name(arch) != meta["arch"]:
        raise ConfigError(f"{path} holds a {meta['arch']} but {spec_name(arch)} was asked for")
    shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for key, value in shape.items():
        if key in meta and value is not None and meta[key] != value:
            raise ConfigError(f"{path} was trained with {key}={meta[key]}, but {value} was asked for")
    shape = {k: meta.get(k, v) for k, v in shape.items()}
    defaults = {"num_classes": 10, "in_channels": 1, "image_size": 32, **(defaults or {})}
    shape = {k: v if v is not None else defaults[k] for k, v in shape.items()}
    if arch == "zipit":  # a merged multi-task teacher (dafl.zipped): its structure is in the metadata
        from dafl.zipped import ZippedClassifier

        missing_keys = [k for k in ("base_arch", "class_lists", "depth") if k not in meta]
        if missing_keys:
            raise ConfigError(f"{path} is a zipit model without {', '.join(missing_keys)} in its metadata")
        network = ZippedClassifier(meta["base_arch"], meta["class_lists"], meta["depth"], shape["in_channels"],
                                   shape["num_classes"], shape["image_size"])
    else:
        network = build_network(arch, **shape)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ConfigError(f"{path} does not fit {spec_name(arch)}: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {mismatched[:3]}{_prefix_hint(state, expected)}")
    network.load_state_dict(state)
    classes = output_classes(network, shape["in_channels"], shape["image_size"], f"{path} ({spec_name(arch)})")
    if num_classes is not None and classes != num_classes:
        raise ConfigError(f"{path} returns {classes} logits, but {num_classes} classes were asked for")
    return network, {**meta, **shape, "num_classes": classes, "arch": spec_name(arch)}


def known_classes(paths: list[str], metas: list[dict[str, Any]]) -> list[list[int]]:
    """The classes each teacher knows (its `classes` metadata, written when it was trained on
    a subset; else all of its outputs), every class known by one teacher only."""
    class_lists, owner = [], {}
    for path, meta in zip(paths, metas):
        classes = [int(c) for c in (meta.get("classes") or range(meta["num_classes"]))]
        if len(classes) != meta["num_classes"]:
            raise ConfigError(f"{path} lists {len(classes)} classes but has {meta['num_classes']} outputs")
        for c in classes:
            if c in owner:
                raise ConfigError(f"class {c} is known by both {owner[c]} and {path}: the teachers must know "
                                  "different classes")
            owner[c] = path
        class_lists.append(classes)
    return class_lists
