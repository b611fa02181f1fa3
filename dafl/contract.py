"""The teacher's input contract: the size its network takes, the native size of real
images, channels, mean and std. Each value comes from the user's settings, then the
teacher file's metadata, then a registered dataset's conventions (`dafl.datasets.dataset_contract`).
`InputAdapter` turns native pixels into what the network takes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dafl.errors import ConfigError

CONTRACT_KEYS = {"input_size": "image_size", "native_size": "native_size", "channels": "in_channels",
                 "mean": "mean", "std": "std"}  # setting name -> metadata key




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


@dataclass(frozen=True)
class InputContract:
    """What a teacher takes: `input_size` x `input_size` images of `channels` channels,
    normalised by `mean` / `std`, made from real images of `native_size` pixels (padded or
    resized). Without native_size, mean and std, images cannot be made the way real inputs
    are (`missing`)."""

    input_size: int
    channels: int
    native_size: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    @classmethod
    def from_metadata(cls, meta: dict) -> "InputContract":
        """From a weights file's or checkpoint's metadata (keys image_size, in_channels, native_size, mean, std)."""
        as_tuple = lambda v: tuple(v) if v is not None else None  # noqa: E731
        return cls(meta["image_size"], meta["in_channels"], meta.get("native_size"), as_tuple(meta.get("mean")),
                   as_tuple(meta.get("std")))

    def metadata(self) -> dict:
        """The contract as metadata keys, as every export and checkpoint records it."""
        as_list = lambda v: list(v) if v is not None else None  # noqa: E731
        return {"image_size": self.input_size, "in_channels": self.channels, "native_size": self.native_size,
                "mean": as_list(self.mean), "std": as_list(self.std)}

    def missing(self) -> list[str]:
        return [key for key in ("native_size", "mean", "std") if getattr(self, key) is None]

    def adapter(self) -> "InputAdapter":
        """Native pixels -> the network's input; the one place an adapter is built from a contract."""
        if self.missing():
            raise ConfigError(f"the teacher's input contract lacks {', '.join(self.missing())}: set "
                              + ", ".join(f"teacher_input.{k}" for k in self.missing()))
        return InputAdapter(self.native_size, self.input_size, list(self.mean), list(self.std))


def complete_contract(meta: dict, explicit: dict, defaults: dict) -> InputContract:
    """The teacher's contract: the user's settings first, then the teacher file's metadata,
    then the dataset's defaults; mean and std checked against the channels."""
    meta = {**meta}
    for key in ("native_size", "mean", "std"):
        value = explicit.get(key, meta.get(key))
        meta[key] = value if value is not None else defaults.get(key)
    channels = meta["in_channels"]
    for key in ("mean", "std"):
        if meta[key] is not None and len(meta[key]) != channels:
            raise ConfigError(f"the teacher takes {channels} channel(s) but its {key} has {len(meta[key])} values "
                              f"({meta[key]}): set teacher_input.{key}")
    return InputContract.from_metadata(meta)


# ---------------------------------------------------------------- native pixels -> network input

class InputAdapter(nn.Module):
    """Pixels in [0, 1] (float) or uint8, N x C x H x W at native size -> the network's
    normalised input: zero-pad (MNIST 28 -> 32, as LeNet-5 was meant) or, when padding
    cannot reach the size, bilinear resize; then per-channel normalisation. Exported
    models contain this module, so consumers need none of our constants."""

    def __init__(self, native_size: int, input_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.native_size, self.input_size = native_size, input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        gap = input_size - native_size
        self.pad = gap // 2 if gap >= 0 and gap % 2 == 0 and gap <= native_size // 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        if self.pad is not None and self.pad > 0:
            x = F.pad(x, [self.pad] * 4)
        elif self.pad is None:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std
