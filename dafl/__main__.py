"""python -m dafl <command>.

  fit        train (teacher, student, or data-free distillation), by LightningCLI config;
             with no --config it runs configs/default.yaml (data-free, shipped teacher); a
             config without model.class_path (a preset) applies on top of that file
  validate   / test: LightningCLI's, same configs
  compare    the DAFL paper's comparison table for one teacher / student / dataset
  zip        merge teachers trained on different classes (ZipIt!), with real or generated images
  export     export a trained student (safetensors, ONNX, .pt2, model card)
  models     list registered architectures
  datasets   list registered datasets and whether they are installed
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import warnings

from dafl.errors import ConfigError, OneLineParser, RunStopped

DEFAULT_CONFIG = "configs/default.yaml"
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _quiet():
    # Noise that says nothing to a user of a CPU run with in-memory data.
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", ".*LeafSpec.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*TensorBoard.*",
                    ".*Experiment logs directory .* exists.*", ".*is deprecated.*",
                    r".*module\(s\) in eval mode.*"):
        warnings.filterwarnings("ignore", pattern)
    # torch's and Lightning's advice to developers (UserWarning) is not for a CLI user.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|lightning|torchmetrics|onnx)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # "Seed set to 0" on stderr would precede every one-line error.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)


def export_main(args: list[str]) -> None:
    from dafl.export import export_classifier, read_checkpoint

    parser = OneLineParser(prog="python -m dafl export",
                           description="Export a student (or any classifier) trained by `dafl fit`.")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint, or a run folder (uses checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--formats", default="safetensors,onnx,pt2", help="comma-separated subset of the default")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder whole")
    opts = parser.parse_args(args)
    formats = tuple(f.strip() for f in opts.formats.split(",") if f.strip())
    unknown = set(formats) - {"safetensors", "onnx", "pt2"}
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {sorted(unknown)}; use safetensors, onnx, pt2")
    meta, state, hparams = read_checkpoint(opts.ckpt)
    out = export_classifier(meta, state, opts.out, formats=formats, overwrite=opts.overwrite,
                            name="student" if meta["kind"] == "student" else "model")
    print(f"Exported {meta['arch']} ({meta['kind']}) to {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))


def models_main(args: list[str]) -> None:
    from dafl.models import build_model, classifier_names, count_parameters

    import torch

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        for name in classifier_names():
            channels = 3 if name.startswith("resnet") else 1
            print(f"{name:16s} {count_parameters(build_model(name, in_channels=channels)):>12,} parameters"
                  f" ({channels} channel(s), 10 classes)")
        print(f"{'generator':16s} {count_parameters(build_model('generator')):>12,} parameters (latent 100, width 128)")


def datasets_main(args: list[str]) -> None:
    from dafl.datasets import INFOS, locate

    for name, info in sorted(INFOS.items()):
        try:
            status = f"installed ({locate(name)})"
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

            has_config = any(a == "-c" or a.startswith("--config") for a in rest)
            files = _config_files(rest)
            if command == "fit" and (not has_config or (files and is_overlay(files[0]))):
                rest = ["--config", str(resolve(DEFAULT_CONFIG)), *rest]
            elif not has_config and not any(a in ("-h", "--help", "--help-all") or a.startswith("--model")
                                            for a in rest):
                raise ConfigError(f"{command} evaluates a trained run: pass --config RUN_DIR/config.yaml "
                                  "--ckpt_path RUN_DIR/checkpoints/last.ckpt")
            if command == "fit" and any(a in ("-h", "--help") for a in rest):
                from dafl.help import fit_help

                print(fit_help(_config_files(rest)))
                return 0
            rest = ["--help" if a == "--help-all" else a for a in rest]
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
    except RunStopped as e:
        print(f"dafl: {e}", file=sys.stderr)
        return 128 + e.signum
    except argparse.ArgumentError as e:  # an option LightningCLI's parser rejected
        print(f"dafl: error: {argument_error_line(str(e))} (`python -m dafl {command} --help` lists the options)",
              file=sys.stderr)
        return 2
    except SystemExit as e:  # Lightning's own SIGTERM handling ends with SystemExit(None): not a success
        if type(e).__name__ == "SIGTERMException":
            print("dafl: stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
            return 128 + 15
        raise
    except Exception as e:  # noqa: BLE001
        user_error = _user_error(e)
        if user_error is None:
            raise
        print(f"dafl: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def _config_files(args: list[str]) -> list[str]:
    """The files named by --config / -c in `args`."""
    from dafl.weights import resolve

    files = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return [str(resolve(f)) for f in files]


def is_overlay(config_file: str) -> bool:
    """A config that names no model class_path holds only what differs from configs/default.yaml."""
    from dafl.errors import read_yaml_mapping

    try:
        config = read_yaml_mapping(config_file, "config")
    except (ConfigError, OSError):
        return False  # LightningCLI reports the file itself
    model = config.get("model")
    return not (isinstance(model, dict) and "class_path" in model)


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


def _user_error(error: BaseException) -> BaseException | str | None:
    """The ConfigError (bad input) or FloatingPointError (diverged loss) behind `error`:
    jsonargparse and Lightning wrap exceptions raised while building or running modules."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (ConfigError, FloatingPointError)):
            return error
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on the disk while writing {error.filename or 'a file'}; free some space and " \
                   "resume with --ckpt_path last"
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
