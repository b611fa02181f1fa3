"""The teacher's input contract: the size its network takes, the native size of real
images, channels, mean and std. Each value comes from the user's settings, then the
teacher file's metadata, then a registered dataset's conventions."""
from __future__ import annotations

from typing import Optional

from dafl.datasets import INFOS
from dafl.errors import ConfigError

CONTRACT_KEYS = {"input_size": "image_size", "native_size": "native_size", "channels": "in_channels",
                 "mean": "mean", "std": "std"}  # setting name -> metadata key


def dataset_contract(name: str) -> dict:
    """A registered dataset's input conventions as metadata: native size, channels, mean,
    std, and the network input size (32 for small images, padded or resized, as LeNet-5
    was meant; the native size above that)."""
    if name not in INFOS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(INFOS))}")
    info = INFOS[name]
    return {"image_size": max(32, info.size), "native_size": info.size, "in_channels": info.channels,
            "mean": list(info.mean), "std": list(info.std)}


def contract_settings(settings: Optional[dict]) -> dict:
    """User settings {input_size, native_size, channels, mean, std} (any subset) as
    metadata keys, checked."""
    settings = dict(settings or {})
    unknown = set(settings) - set(CONTRACT_KEYS)
    if unknown:
        raise ConfigError(f"teacher_input: unknown setting(s) {sorted(unknown)}; use {', '.join(CONTRACT_KEYS)}")
    for key in ("input_size", "native_size", "channels"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"teacher_input.{key} must be a whole number >= 1, got {value!r}")
    for key in ("mean", "std"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not value
                                  or not all(isinstance(v, (int, float)) for v in value)):
            raise ConfigError(f"teacher_input.{key} must be a list of numbers, one per channel, got {value!r}")
    if settings.get("std") is not None and any(v <= 0 for v in settings["std"]):
        raise ConfigError(f"teacher_input.std must be positive, got {settings['std']}")
    return {CONTRACT_KEYS[k]: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items() if v is not None}


def complete_contract(meta: dict, explicit: dict, defaults: dict) -> dict:
    """`meta` with native_size, mean and std filled in: the user's settings first, then the
    teacher file's metadata, then the dataset's defaults; checked against the channels."""
    meta = {**meta}
    for key in ("native_size", "mean", "std"):
        value = explicit.get(key, meta.get(key))
        meta[key] = value if value is not None else defaults.get(key)
    channels = meta["in_channels"]
    for key in ("mean", "std"):
        if meta[key] is not None and len(meta[key]) != channels:
            raise ConfigError(f"the teacher takes {channels} channel(s) but its {key} has {len(meta[key])} values "
                              f"({meta[key]}): set teacher_input.{key}")
    return meta
