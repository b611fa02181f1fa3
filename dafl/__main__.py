"""python -m dafl <command>.

  fit        train (teacher, student, or data-free distillation), by LightningCLI config;
             with no --config it runs configs/default.yaml (data-free, shipped teacher)
  validate   / test: LightningCLI's, same configs
  compare    the DAFL paper's comparison table for one teacher / student / dataset
  zip        merge teachers trained on different classes (ZipIt!), with real or generated images
  export     export a trained student (safetensors, ONNX, .pt2, model card)
  models     list registered architectures
  datasets   list registered datasets and whether they are installed
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

from dafl.errors import ConfigError

DEFAULT_CONFIG = "configs/default.yaml"
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _quiet():
    # Noise that says nothing to a user of a CPU run with in-memory data.
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", ".*LeafSpec.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*TensorBoard.*",
                    ".*Experiment logs directory .* exists.*", ".*is deprecated.*",
                    r".*module\(s\) in eval mode.*"):
        warnings.filterwarnings("ignore", pattern)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def export_main(args: list[str]) -> None:
    from dafl.export import export_classifier, read_checkpoint

    parser = argparse.ArgumentParser(prog="python -m dafl export",
                                     description="Export a student (or any classifier) trained by `dafl fit`.")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint, or a run folder (uses checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--formats", default="safetensors,onnx,pt2", help="comma-separated subset of the default")
    opts = parser.parse_args(args)
    formats = tuple(f.strip() for f in opts.formats.split(",") if f.strip())
    unknown = set(formats) - {"safetensors", "onnx", "pt2"}
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {sorted(unknown)}; use safetensors, onnx, pt2")
    meta, state, hparams = read_checkpoint(opts.ckpt)
    out = export_classifier(meta, state, opts.out, formats=formats,
                            name="student" if meta["kind"] == "student" else "model")
    print(f"Exported {meta['arch']} ({meta['kind']}) to {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))


def models_main(args: list[str]) -> None:
    from dafl.models import build_model, classifier_names, count_parameters

    for name in classifier_names():
        channels = 3 if name.startswith("resnet") else 1
        print(f"{name:16s} {count_parameters(build_model(name, in_channels=channels)):>12,} parameters"
              f" ({channels} channel(s), 10 classes)")
    print(f"{'generator':16s} {count_parameters(build_model('generator')):>12,} parameters (latent 100, width 128)")


def datasets_main(args: list[str]) -> None:
    from dafl.datasets import INFOS, load_split

    for name, info in sorted(INFOS.items()):
        try:
            split = load_split(name, "test")
            status = f"installed ({len(split.labels):,} test images)"
        except ConfigError as e:
            status = f"not available: {e}"
        print(f"{name:14s} {info.channels}x{info.size}x{info.size}  {status}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    _quiet()
    try:
        if command in LIGHTNING_COMMANDS:
            from dafl.cli import run_lightning_cli
            from dafl.weights import resolve

            if command == "fit" and not any(a == "-c" or a.startswith("--config") for a in rest):
                rest = ["--config", str(resolve(DEFAULT_CONFIG)), *rest]
            run_lightning_cli([command, *rest], argv)
        elif command == "export":
            export_main(rest)
        elif command == "compare":
            from dafl.compare import compare_main

            compare_main(rest)
        elif command == "zip":
            from dafl.merging import zip_main

            zip_main(rest)
        elif command == "models":
            models_main(rest)
        elif command == "datasets":
            datasets_main(rest)
        else:
            print(f"dafl: error: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
            return 2
    except argparse.ArgumentError as e:  # an option LightningCLI's parser rejected
        print(f"dafl: error: {argument_error_line(str(e))} (`python -m dafl {command} --help` lists the options)",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        user_error = _user_error(e)
        if user_error is None:
            raise
        print(f"dafl: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def argument_error_line(message: str) -> str:
    """jsonargparse's multi-line report in one line: the option's full key and the reasons.

    Its reports nest one 'Parser key "K":' per level (model -> cutmix_prob) and, for
    options that may also be null, list a 'NoneType' alternative that only adds noise."""
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))
    reasons, given = [], None
    for line in (l.strip().lstrip("- ").strip() for l in message.splitlines()):
        line = re.sub(r'^Parser key "[^"]+":\s*', "", line)
        if line.startswith("Given value:") and "NestedArg" not in line:
            given = line.split(":", 1)[1].strip()
        elif line and "NoneType" not in line and not line.startswith(
                ("Does not validate", "Subtypes:", "Errors:", "Given value", "Problem with given class_path")):
            reasons.append(re.sub(r"<class '([\w.]+)'>", r"\1", line))
    text = "; ".join(dict.fromkeys(reasons)) or message.strip().splitlines()[0]
    if given is not None and "Got value" not in text:
        text += f", got {given!r}"
    return f"--{'.'.join(keys)}: {text}" if keys else text


def _user_error(error: BaseException) -> BaseException | None:
    """The ConfigError (bad input) or FloatingPointError (diverged loss) behind `error`:
    jsonargparse and Lightning wrap exceptions raised while building or running modules."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (ConfigError, FloatingPointError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
