"""Export a trained classifier (the student, or any classifier `fit` trained) for
deployment without this package: safetensors + metadata, one-file ONNX, torch.export
`.pt2`, and a model card. The exported graphs take float32 pixels in [0, 1] at the
dataset's native resolution (N x C x H x W) and return logits: padding / resizing and
normalisation are inside."""
from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dafl.contract import InputAdapter, InputContract
from dafl.errors import ConfigError
from dafl.models import build_network, count_flops, count_parameters
from dafl.weights import load_checkpoint, read_metadata, save_classifier

# What a checkpoint must carry (under checkpoint["dafl"]) to be exported.
REQUIRED = ("kind", "arch", "num_classes", "in_channels", "image_size", "native_size", "mean", "std")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as pkg_version

    try:
        return pkg_version("dafl")
    except PackageNotFoundError:
        return "unknown"


class ExportedClassifier(nn.Module):
    """InputAdapter (native [0, 1] pixels -> normalised network input) + classifier."""

    def __init__(self, net: nn.Module, adapter: InputAdapter):
        super().__init__()
        self.adapter, self.net = adapter, net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(pixels))


def build_exported(meta: dict[str, Any], state: Optional[dict[str, torch.Tensor]] = None) -> ExportedClassifier:
    net = build_network(meta["arch"], in_channels=meta["in_channels"], num_classes=meta["num_classes"],
                        image_size=meta["image_size"])
    if state is not None:
        net.load_state_dict(state)
    adapter = InputContract.from_metadata(meta).adapter()
    return ExportedClassifier(net, adapter).eval()


def load_student(path: str | os.PathLike) -> ExportedClassifier:
    """A ready nn.Module (eval mode) from an exported `student.safetensors`: it takes
    [0, 1] pixels at native size and returns logits, like the ONNX and .pt2 files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    meta = read_metadata(path)
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ConfigError(f"{path} lacks export metadata {missing}: was it written by `dafl export`?")
    return build_exported(meta, load_file(str(path)))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(export metadata, network state dict, hyper-parameters) from a Lightning checkpoint
    of `dafl fit`, or from a run folder (its checkpoints/last.ckpt)."""
    if Path(path).is_dir():
        path = Path(path) / "checkpoints" / "last.ckpt"
    if "://" not in str(path) and not Path(path).is_file():  # a URL is load_checkpoint's to refuse
        raise ConfigError(f"no checkpoint at {path}")
    ckpt = load_checkpoint(path)
    meta = ckpt.get("dafl")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED):
        raise ConfigError(f"{path} is not a dafl classifier or student checkpoint (no export metadata)")
    prefix = meta["state_prefix"]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return meta, state, dict(ckpt.get("hyper_parameters", {}))


def model_card(meta: dict[str, Any], config_text: str = "", name: str = "student") -> str:
    acc = f"{100 * meta['test_acc']:.2f}%" if meta.get("test_acc") is not None else "not measured"
    c, s, n = meta["in_channels"], meta["native_size"], meta["num_classes"]
    return textwrap.dedent(f"""\
    # {meta['arch']} ({meta['kind']}) for {meta.get('dataset', 'unknown data')}

    - Trained by: dafl {meta.get('dafl_version', version())}, {meta.get('method', meta['kind'])}
    - Input: float32 pixels in [0, 1], shape N x {c} x {s} x {s}; padding/resizing to {meta['image_size']} and
      normalisation (mean {meta['mean']}, std {meta['std']}) happen inside the model.
    - Output: {n} logits; classes: {', '.join(meta.get('class_names') or [str(i) for i in range(n)])}
    - Test accuracy (last epoch, real test set): {acc}
    - Parameters: {meta.get('parameters', '?'):,}; forward FLOPs per image: {meta.get('flops', '?'):,}
    - Seed: {meta.get('seed', 'not recorded')}; command: `{meta.get('command', 'not recorded')}`
    - Files: `{name}.safetensors` (weights + metadata), `{name}.onnx`, `{name}.pt2`

    ## Run it with onnxruntime

    ```python
    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("{name}.onnx")
    pixels = np.random.rand(4, {c}, {s}, {s}).astype(np.float32)  # your images, scaled to [0, 1]
    logits = session.run(None, {{"pixels": pixels}})[0]
    print(logits.argmax(1))
    ```

    ## Training configuration

    ```yaml
    {textwrap.indent(config_text.strip(), '    ').strip() if config_text else '(not recorded)'}
    ```
    """)


def export_classifier(meta: dict[str, Any], state: dict[str, torch.Tensor], out: str | os.PathLike,
                      config_text: str = "", formats: tuple[str, ...] = ("safetensors", "onnx", "pt2"),
                      name: str = "student", overwrite: bool = False) -> Path:
    """Write {name}.safetensors / .onnx / .pt2 and model_card.md into the folder `out`.
    An existing non-empty `out` is refused unless `overwrite`, and then replaced whole (no
    file of an earlier export stays beside the new ones). Everything is written to a
    temporary folder beside `out` first and moved in only when all of it succeeded."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} is not empty; pass --overwrite to replace it, or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-export-"))
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror}") from None
    try:
        model = build_exported(meta, state)
        shape = (meta["in_channels"], meta["native_size"], meta["native_size"])
        meta = {**meta, "parameters": count_parameters(model.net), "dafl_version": version(),
                "flops": count_flops(model.net, (meta["in_channels"], meta["image_size"], meta["image_size"]))}
        meta.pop("state_prefix", None)
        if "safetensors" in formats:
            save_classifier(tmp / f"{name}.safetensors", model.net, meta)
        example = torch.rand(3, *shape)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        if "pt2" in formats:
            program = torch.export.export(model, (example,), dynamic_shapes={"pixels": {0: batch}})
            torch.export.save(program, str(tmp / f"{name}.pt2"))
        if "onnx" in formats:
            _export_onnx(model, example, batch, tmp / f"{name}.onnx")
        (tmp / "model_card.md").write_text(model_card(meta, config_text, name))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_onnx(model: nn.Module, example: torch.Tensor, batch, path: Path) -> None:
    import logging
    import warnings

    # The dynamo exporter is chatty (progress lines, warnings): keep the console clean.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes={"pixels": {0: batch}}, dynamo=True, verbose=False)
    program.save(str(path), external_data=False)
