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

from dafl.callbacks import AtomicCheckpointIO, IntervalCheckpoint, SampleGrid
from dafl.errors import ConfigError
from dafl.export import export_classifier

RUN_PARTS = ("checkpoints", "tensorboard", "samples", "export", "metrics.csv", "hparams.yaml", "config.yaml",
             "summary.json", "curve.json")


class DaflCLI(LightningCLI):
    user_command = "python -m dafl fit"
    created_dirs: list[Path] = []  # folders this run made for --run_dir, deepest first

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a finished or started run in trainer.default_root_dir.")
        parser.add_argument("--run_dir", type=str, default=None,
                            help="Run folder (checkpoints, logs, samples, export); default runs/<config name>.")
        parser.add_argument("--checkpoint_minutes", type=float, default=2.0,
                            help="Also save checkpoints/last.ckpt every this many minutes of training (crash safety).")

    def _run_dir(self) -> Path:
        config = self.config[self.subcommand]
        if config.get("run_dir"):
            return Path(config.run_dir)
        if config.trainer.get("default_root_dir"):
            return Path(config.trainer.default_root_dir)
        sources = config.get("config") or []
        stem = Path(str(sources[-1])).stem if sources else "fit"
        parent = Path(str(sources[-1])).parent.name if sources else ""
        return Path("runs") / (f"{parent}_{stem}" if parent and parent != "configs" else stem)

    def before_instantiate_classes(self):
        if self.subcommand != "fit":
            return
        run_dir = self._run_dir()
        config = self.config.fit
        if config.checkpoint_minutes <= 0:
            raise ConfigError(f"--checkpoint_minutes must be positive, got {config.checkpoint_minutes}")
        started = [p for p in RUN_PARTS if (run_dir / p).exists()]
        if started and not config.overwrite and not config.get("ckpt_path"):
            raise ConfigError(f"{run_dir} already holds a run; resume it with --ckpt_path last, replace it with "
                              "--overwrite, or choose another --run_dir")
        # Removed only once model and data were built: a bad config loses nothing.
        self._replaced = started if config.overwrite else []
        try:
            DaflCLI.created_dirs = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ".write-test").touch()
            (run_dir / ".write-test").unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to run folder {run_dir}: {e.strerror}") from None
        config.trainer.default_root_dir = str(run_dir)
        self.run_dir = run_dir

    def instantiate_trainer(self, **kwargs):
        if self.subcommand != "fit":
            return super().instantiate_trainer(**kwargs)
        for part in self._replaced:
            target = self.run_dir / part
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        run_dir = str(self.run_dir)
        data_free = hasattr(self.model, "generator")
        callbacks = list(self.config_init.fit.trainer.get("callbacks") or [])
        callbacks.append(ModelCheckpoint(dirpath=f"{run_dir}/checkpoints", filename="best",
                                         monitor="val/agreement" if data_free else "val/acc", mode="max",
                                         save_last=True, save_top_k=1))
        callbacks.append(IntervalCheckpoint(f"{run_dir}/checkpoints/last.ckpt", self.config.fit.checkpoint_minutes))
        if data_free:
            callbacks.append(SampleGrid())
        loggers = [CSVLogger(run_dir, name="", version=""), TensorBoardLogger(run_dir, name="tensorboard", version="")]
        plugins = self.config_init.fit.trainer.get("plugins") or []
        plugins = (list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]) + [AtomicCheckpointIO()]
        return super().instantiate_trainer(logger=loggers, callbacks=callbacks, plugins=plugins, **kwargs)

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
                                       config_file.read_text() if config_file.exists() else "",
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
        DaflCLI(args=args, save_config_kwargs={"overwrite": True}, subclass_mode_model=True, subclass_mode_data=True,
                auto_configure_optimizers=False,
                parser_kwargs={**quiet, **{name: quiet for name in DaflCLI.subcommands()}})
    except BaseException:
        # A run rejected before it wrote anything leaves no empty folders behind.
        for folder in DaflCLI.created_dirs:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise
    finally:
        DaflCLI.created_dirs = []
        sys.argv = argv
