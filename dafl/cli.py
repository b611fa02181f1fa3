"""`python -m dafl fit|validate|test`: LightningCLI over the registered modules, with a
run folder per experiment (checkpoints, logs, samples, export), overwrite protection,
a real-data test of the last-epoch model and an automatic export at the end."""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dafl.callbacks import AtomicCheckpointIO, GracefulStop, IntervalCheckpoint, SampleGrid
from dafl.errors import ConfigError
from dafl.export import export_classifier
import lightning_modules.generator  # noqa: F401  (every image source known: short class names work in --model.source)
from lightning_modules.student import CHECKPOINT_FORMAT, StudentDistillation

RUN_PARTS = ("checkpoints", "tensorboard", "samples", "export", "metrics.csv", "hparams.yaml", "config.yaml",
             "summary.json", "curve.json")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path words Lightning resolves itself


def holds_run(run_dir: Path) -> bool:
    """A folder holds a run once it has a checkpoint, an export or a summary: the leftovers
    of a run refused before its first checkpoint (a config.yaml, logs) do not count."""
    checkpoints = run_dir / "checkpoints"
    return (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))) or (run_dir / "export").exists() \
        or (run_dir / "summary.json").exists()


class DaflCLI(LightningCLI):
    user_command = "python -m dafl fit"
    created_dirs: list[Path] = []  # folders this run made for --run_dir, deepest first
    run_dir: Path | None = None
    fresh_parts: list[str] = []  # run parts absent before this run: removed again if it fails before a checkpoint

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a finished or started run in the run folder.")
        parser.add_argument("--run_dir", type=str, default=None,
                            help="Run folder (checkpoints, logs, samples, export); default runs/<config name>.")
        parser.add_argument("--checkpoint_minutes", type=float, default=2.0,
                            help="Also save checkpoints/last.ckpt every this many minutes of training (crash safety).")

    def _run_dir(self, config) -> Path:
        if config.get("run_dir"):
            return Path(config.run_dir)
        if config.trainer.get("default_root_dir"):
            return Path(config.trainer.default_root_dir)
        sources = config.get("config") or []
        stem = Path(str(sources[-1])).stem if sources else "fit"
        parent = Path(str(sources[-1])).parent.name if sources else ""
        return Path("runs") / (f"{parent}_{stem}" if parent and parent != "configs" else stem)

    def _parse_ckpt_path(self) -> None:
        # Every checkpoint goes through dafl's own loader (a local file, weights_only=True)
        # before Lightning sees it; Lightning then loads it with weights_only=True too.
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            if "weights_only" in config:
                config.weights_only = True
            if config.get("ckpt_path") is not None:
                config.ckpt_path = str(self._checked_ckpt_path(subcommand, config))
        super()._parse_ckpt_path()

    def _checked_ckpt_path(self, subcommand: str, config) -> Path:
        from dafl.weights import load_checkpoint

        given = str(config.ckpt_path)  # a string, not a Path: load_checkpoint refuses URLs, which Path would mangle
        if given in LIGHTNING_CKPT_NAMES:
            if given not in ("last", "best"):
                raise ConfigError(f"--ckpt_path {given} is not supported; use last, best or a checkpoint file")
            run_dir = self._run_dir(config)
            path = run_dir / "checkpoints" / f"{given}.ckpt"
            if not path.is_file():
                raise ConfigError(f"--ckpt_path {given}: {run_dir} has no checkpoints/{given}.ckpt "
                                  f"({'nothing to resume' if subcommand == 'fit' else 'nothing to evaluate'}); "
                                  "name the run with --run_dir or pass a checkpoint file")
        else:
            path = given
        checkpoint = load_checkpoint(path, "--ckpt_path")
        meta = checkpoint.get("dafl")
        if not isinstance(meta, dict):
            raise ConfigError(f"--ckpt_path {path} was not written by `dafl fit` (no dafl metadata)")
        if meta.get("kind") == "student" and meta.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"--ckpt_path {path} was written by an older dafl (before image sources) and cannot be "
                              f"resumed or evaluated; `python -m dafl export --ckpt {path}` still exports its student")
        return Path(path).resolve()

    def before_instantiate_classes(self):
        config = self.config[self.subcommand]
        if self.subcommand != "fit":
            if config.get("model") is None:
                raise ConfigError(f"{self.subcommand} needs the run's config: --config RUN_DIR/config.yaml "
                                  "--ckpt_path RUN_DIR/checkpoints/last.ckpt")
            # Evaluation writes nothing beside the user's files (no ./lightning_logs).
            config.trainer.logger = False
            return
        model_args, data_args = config.model.get("init_args"), config.data.get("init_args")
        if model_args is not None and data_args is not None and "dataset" in model_args \
                and model_args.get("dataset") is None and data_args.get("eval_dataset"):
            # The dataset the student is scored on also completes the teacher's input contract.
            model_args.dataset = data_args.eval_dataset
        run_dir = self._run_dir(config)
        if config.checkpoint_minutes <= 0:
            raise ConfigError(f"--checkpoint_minutes must be positive, got {config.checkpoint_minutes}")
        trainer = config.trainer
        if trainer.get("max_epochs") is None or trainer.max_epochs < 1:
            raise ConfigError(f"--trainer.max_epochs must be at least 1, got {trainer.get('max_epochs')}")
        if trainer.get("max_steps") not in (None, -1) and trainer.max_steps < 1:
            raise ConfigError(f"--trainer.max_steps must be at least 1 (or -1: no limit), got {trainer.max_steps}")
        resume = Path(config.ckpt_path) if config.get("ckpt_path") else None
        resumes_here = resume is not None and run_dir.resolve() in resume.parents
        if holds_run(run_dir) and not config.overwrite and not resumes_here:
            how = "a checkpoint of another run starts a new run here" if resume is not None else "it would be replaced"
            raise ConfigError(f"{run_dir} already holds a run ({how}); resume it with --ckpt_path last, replace it with "
                              "--overwrite, or choose another --run_dir")
        if config.overwrite and resumes_here:
            raise ConfigError(f"--overwrite would delete {resume}, the checkpoint --ckpt_path resumes from")
        started = [p for p in RUN_PARTS if (run_dir / p).exists()]
        # Removed only once model and data were built: a bad config loses nothing. The
        # leftovers of a run that never reached a checkpoint are replaced without --overwrite.
        self._replaced = started if (config.overwrite or not holds_run(run_dir)) and not resumes_here else []
        DaflCLI.fresh_parts = [p for p in RUN_PARTS if p not in started or p in self._replaced]
        try:
            DaflCLI.created_dirs = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ".write-test").touch()
            (run_dir / ".write-test").unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to run folder {run_dir}: {e.strerror}") from None
        config.trainer.default_root_dir = str(run_dir)
        DaflCLI.run_dir = run_dir

    def instantiate_trainer(self, **kwargs):
        if self.subcommand != "fit":
            return super().instantiate_trainer(**kwargs)
        for part in self._replaced:
            target = self.run_dir / part
            if not target.exists():
                continue
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        run_dir = str(self.run_dir)
        callbacks = list(self.config_init.fit.trainer.get("callbacks") or [])
        callbacks.append(ModelCheckpoint(dirpath=f"{run_dir}/checkpoints", filename="best",
                                         monitor=getattr(self.model, "monitor", "val/acc"), mode="max",
                                         save_top_k=1, enable_version_counter=False))
        # last.ckpt is IntervalCheckpoint's alone: Lightning's save_last would write
        # last-v1.ckpt beside a last.ckpt it did not write itself, or skip epochs.
        callbacks.append(IntervalCheckpoint(f"{run_dir}/checkpoints/last.ckpt", self.config.fit.checkpoint_minutes))
        callbacks.append(GracefulStop(f"{run_dir}/checkpoints/last.ckpt"))
        if isinstance(self.model, StudentDistillation):
            callbacks.append(SampleGrid())
        loggers = [CSVLogger(run_dir, name="", version=""), TensorBoardLogger(run_dir, name="tensorboard", version="")]
        plugins = self.config_init.fit.trainer.get("plugins") or []
        plugins = (list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]) + [AtomicCheckpointIO()]
        return super().instantiate_trainer(logger=loggers, callbacks=callbacks, plugins=plugins, **kwargs)

    def before_fit(self):
        datamodule = self.datamodule
        if not getattr(datamodule, "has_test_data", True):
            print(f"note: no real test data ({datamodule.missing_reason}); the student will be trained and exported "
                  "but not scored", file=sys.stderr)

    def after_fit(self):
        if self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        run_dir, datamodule = Path(self.trainer.default_root_dir), self.datamodule
        test_acc, line = None, None
        if getattr(datamodule, "has_test_data", True):
            start = time.time()
            results = self.trainer.test(self.model, datamodule=datamodule, verbose=False)
            test_acc = float(results[0]["test/acc"])
            name = getattr(datamodule, "info", None)
            count = len(self.trainer.test_dataloaders.dataset)
            line = (f"Test accuracy (last epoch, {name.name if name else 'test'} test set, {count:,} images): "
                    f"{100 * test_acc:.2f}%")
            if "test/teacher_acc" in results[0]:
                line += f"  (teacher: {100 * results[0]['test/teacher_acc']:.2f}%)"
            line += f"  [evaluated in {time.time() - start:.1f}s]"
        else:
            line = f"Real-data evaluation skipped: {datamodule.missing_reason}"
        meta = {**self.model.export_metadata(), "test_acc": test_acc,
                "seed": self.config.fit.get("seed_everything"), "command": self.user_command}
        prefix = meta["state_prefix"]
        state = {k[len(prefix):]: v for k, v in self.model.state_dict().items() if k.startswith(prefix)}
        config_file = run_dir / "config.yaml"
        export_dir = export_classifier(meta, state, run_dir / "export",
                                       config_file.read_text() if config_file.exists() else "", overwrite=True,
                                       name="student" if meta["kind"] == "student" else "model")
        summary = {"test_acc": test_acc, "epochs": self.trainer.current_epoch, "export": str(export_dir),
                   "best_checkpoint": self.trainer.checkpoint_callback.best_model_path}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(line)
        print(f"Run folder: {run_dir}  (exported model: {export_dir}/, samples and logs beside it)")


def run_lightning_cli(args: list[str], user_args: list[str]) -> None:
    """`args`: what LightningCLI parses (the default config may be added); `user_args`: what
    the user typed, recorded in model cards."""
    DaflCLI.user_command = shlex.join(["python", "-m", "dafl", *user_args])
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both argv and args
    try:
        # exit_on_error=False: jsonargparse raises instead of printing its usage block, and
        # `python -m dafl` turns the error into one line (dafl.__main__.argument_error_line).
        quiet = {"exit_on_error": False}
        named = {**quiet, "prog": "python -m dafl"}  # not "__main__.py" in usage lines
        DaflCLI(args=args, save_config_kwargs={"overwrite": True}, subclass_mode_model=True, subclass_mode_data=True,
                auto_configure_optimizers=False,
                parser_kwargs={**named, **{name: quiet for name in DaflCLI.subcommands()}})
    except FloatingPointError as error:
        _forget_failed_run()
        run_dir = DaflCLI.run_dir
        kept = (f"the last checkpoint is kept ({run_dir / 'checkpoints' / 'last.ckpt'})"
                if run_dir is not None and holds_run(run_dir) else "no checkpoint had been saved")
        raise FloatingPointError(f"{error}; {kept}") from None
    except BaseException:
        _forget_failed_run()
        raise
    finally:
        DaflCLI.created_dirs, DaflCLI.run_dir, DaflCLI.fresh_parts = [], None, []
        sys.argv = argv


def _forget_failed_run() -> None:
    """A run that failed before its first checkpoint leaves nothing behind: not the parts it
    wrote (config.yaml, logs), nor the folders it made. A rerun then starts cleanly."""
    run_dir = DaflCLI.run_dir
    if run_dir is not None and not holds_run(run_dir):
        for part in DaflCLI.fresh_parts:
            target = run_dir / part
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()
    for folder in DaflCLI.created_dirs:
        if not folder.is_dir() or any(folder.iterdir()):
            break
        folder.rmdir()
