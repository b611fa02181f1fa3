"""The command line as a user meets it: help, printed configs, one-line errors (exit 2)."""
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def one_line_error(result):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("dafl: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def in_process_error(capsys, *args) -> str:
    """The one `dafl: error:` line of `python -m dafl ARGS`, run through the CLI's entry
    point in this process (for errors raised before any training: no Lightning start-up)."""
    from dafl.__main__ import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("dafl: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "usage:" not in err
    return lines[0]


def test_help(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0 and "fit" in result.stdout and "export" in result.stdout
    result = run_cli("fit", "--help")
    assert result.returncode == 0 and "--overwrite" in result.stdout and "--config" in result.stdout


def test_print_config_of_the_default(run_cli):
    result = run_cli("fit", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "StudentDistillation" in result.stdout and "fashion_mnist_lenet5_bn.safetensors" in result.stdout


# compare.yaml and zipit.yaml belong to `compare` and `zip`, every other YAML to `fit`.
FIT_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                     if p.name not in ("compare.yaml", "zipit.yaml"))


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_every_shipped_config_parses(config, capsys):
    # In this process (the CLI's own entry point): a subprocess per config would spend its
    # time importing Lightning.
    from dafl.__main__ import main

    with pytest.raises(SystemExit) as done:  # --print_config prints, then exits 0
        main(["fit", "--config", str(REPO / config), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def _leaves(tree, prefix=""):
    """{"model.init_args.batch_size": 256, ...}: a YAML config as flat dotted keys."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {k: v for key, value in tree.items()
            for k, v in _leaves(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def _overlay(name: str) -> dict:
    import yaml

    return _leaves(yaml.safe_load((REPO / "configs/fashion_mnist" / f"{name}.yaml").read_text()))


def test_presets_are_overlays_of_the_default_holding_only_what_differs():
    import yaml

    default = _leaves(yaml.safe_load((REPO / "configs/default.yaml").read_text()))
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if path.name in ("default.yaml", "compare.yaml", "zipit.yaml") or path.name.startswith("teacher_") or \
                config["model"].get("class_path") == "lightning_modules.classifier.ClassifierModule":
            continue
        assert not path.is_symlink() and "class_path" not in config["model"], path
        same = {k for k, v in _leaves(config).items() if default.get(k) == v and not k.endswith("class_path")}
        assert not same - {"model.init_args.source.init_args.inversion_steps",
                           "model.init_args.source.init_args.main.init_args.steps"}, (path, same)


def test_the_long_presets_double_the_budget_of_what_they_overlay():
    pool = "model.init_args.source.init_args.pool_size"
    assert _overlay("inverted_pool_long") == {"trainer.max_epochs": 64, pool: 65536}
    fast, long = _overlay("fast"), _overlay("fast_long")
    doubled = ("trainer.max_epochs", pool)
    assert long == {**fast, **{key: 2 * fast[key] for key in doubled}}


def test_stacked_configs_override_the_earlier_ones(run_cli, tmp_path):
    # README: a file with only the changed values, after the preset it changes.
    changes = tmp_path / "bigger_pool.yaml"
    changes.write_text("trainer:\n  max_epochs: 3\nmodel:\n  init_args:\n    source:\n      init_args:\n"
                       "        pool_size: 4096\n")
    result = run_cli("fit", "--config", REPO / "configs/fashion_mnist/fast.yaml", "--config", changes, "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    import yaml

    printed = yaml.safe_load(result.stdout)
    assert printed["trainer"]["max_epochs"] == 3
    assert printed["model"]["init_args"]["source"]["init_args"]["pool_size"] == 4096
    assert printed["model"]["init_args"]["student_init"] == "zip_teacher"  # from the preset
    assert printed["model"]["init_args"]["mixup_alpha"] == 1.0  # the rest comes from the default
    assert printed["model"]["class_path"] == "lightning_modules.student.StudentDistillation"


@pytest.mark.parametrize("config", sorted((REPO / "configs").rglob("compare.yaml")), ids=lambda p: p.parent.name)
def test_compare_configs_name_existing_files(config):
    import yaml

    cfg = yaml.safe_load(config.read_text())
    for key in ("teacher", "supervised_config", "official_config", "best_config"):
        assert (REPO / cfg[key]).is_file(), (key, cfg[key])


def test_models_and_datasets_listings(run_cli):
    assert "lenet5_half" in run_cli("models").stdout
    assert "mnist-5k" in run_cli("datasets").stdout


def test_unknown_command(run_cli):
    assert run_cli("frobnicate").returncode == 2


def test_missing_teacher_file(run_cli, tmp_path):
    line = one_line_error(run_cli("fit", "--model.teacher", tmp_path / "nope.safetensors", "--run_dir", tmp_path / "r"))
    assert "not found" in line


def test_corrupt_teacher_file(run_cli, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    line = one_line_error(run_cli("fit", "--model.teacher", bad, "--run_dir", tmp_path / "r"))
    assert "not a readable safetensors" in line


@pytest.mark.parametrize("flag,value,message", [
    ("--model.batch_size", "0", "batch_size must be positive"),
    ("--model.source.pool_size", "0", "pool_size must be positive"),
    ("--model.cutmix_prob", "1.5", "cutmix_prob must be in [0, 1]"),
    ("--model.student_arch", "lenet9", "unknown architecture"),
    ("--data.eval_dataset", "svhn", "unknown dataset"),
    ("--model.source.symmetric_classes", "[0,10]", "symmetric_classes must be distinct class indices"),
])
def test_bad_hyperparameters(capsys, tmp_path, flag, value, message):
    assert message in in_process_error(capsys, "fit", flag, value, "--run_dir", tmp_path / "r")


@pytest.mark.parametrize("flag,value,key", [
    ("--model.cutmix_prob", "abc", "--model.cutmix_prob: Expected a float"),
    ("--model.augment_flip", "maybe", "--model.augment_flip: Expected a bool"),
    ("--trainer.max_epochs", "x", "--trainer.max_epochs: Expected a int, got 'x'"),
    ("--model.no_such_option", "1", "Option 'no_such_option' is not accepted"),
    ("--config", "missing.yaml", "File does not exist"),
])
def test_rejected_option_is_one_line_and_leaves_no_folder(capsys, tmp_path, flag, value, key):
    # jsonargparse's own report is a usage block plus a nested, multi-line explanation.
    assert key in in_process_error(capsys, "fit", flag, value, "--run_dir", tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_run_rejected_after_parsing_leaves_no_empty_folder(run_cli, tmp_path):
    line = one_line_error(run_cli("fit", "--model.source", "GeneratorSource", "--model.source.balanced_one_hot", "true",
                                  "--model.source.class_conditional", "true", "--run_dir", tmp_path / "new" / "run"))
    assert "choose one" in line
    assert not (tmp_path / "new").exists()


def test_non_positive_learning_rate(run_cli, tmp_path):
    line = one_line_error(run_cli("fit", "--model.student_optimizer.init_args.lr", "-0.1", "--run_dir", tmp_path / "r"))
    assert "Invalid learning rate" in line


def test_unwritable_run_folder(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write to run folder" in one_line_error(run_cli("fit", "--run_dir", blocker / "run"))
    assert blocker.read_text() == "x"


def test_class_count_mismatch_between_teacher_and_data(run_cli, tmp_path, digits_teacher):
    # A 10-class digits teacher with a 100-class evaluation dataset.
    line = one_line_error(run_cli("fit", "--model.teacher", digits_teacher[0], "--data.eval_dataset", "cifar100",
                                  "--run_dir", tmp_path / "r", "--trainer.max_epochs", "1"))
    assert "num_classes" in line


def test_bad_export_arguments(run_cli, tmp_path):
    assert "no checkpoint" in one_line_error(run_cli("export", "--ckpt", tmp_path / "x.ckpt", "--out", tmp_path / "o"))
    assert "unknown export format" in one_line_error(
        run_cli("export", "--ckpt", tmp_path, "--out", tmp_path / "o", "--formats", "tflite"))


def test_fit_refuses_to_overwrite_a_run_then_overwrites_on_request(run_cli, tmp_path, digits_teacher):
    args = ["fit", "--model.teacher", digits_teacher[0], "--data.eval_dataset", "digits", "--model.batch_size", "32",
            "--model.val_size", "32", "--model.source.pool_size", "64",
            "--data.iterations_per_epoch", "3",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--run_dir", tmp_path / "run"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Test accuracy (last epoch, digits test set" in first.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1
    for name in ("student.safetensors", "student.onnx", "student.pt2", "model_card.md"):
        assert (tmp_path / "run" / "export" / name).is_file()
    assert (tmp_path / "run" / "samples" / "epoch_0000.png").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "metrics.csv").is_file()
    before = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    line = one_line_error(run_cli(*args))
    assert "already holds a run" in line
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == before  # nothing overwritten
    assert run_cli(*args, "--overwrite").returncode == 0


def test_fit_without_real_test_data_still_trains(run_cli, tmp_path, digits_teacher):
    result = run_cli("fit", "--model.teacher", digits_teacher[0], "--data.eval_dataset", "null",
                     "--model.batch_size", "16",
                     "--model.val_size", "16", "--model.source.pool_size", "64", "--data.iterations_per_epoch", "2",
                     "--trainer.max_epochs", "1",
                     "--trainer.enable_progress_bar", "false", "--run_dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Real-data evaluation skipped" in result.stdout
    assert "will be trained and exported but not scored" in result.stderr  # said before training, too
    assert (tmp_path / "run" / "export" / "student.onnx").is_file()


def test_overwrite_with_a_bad_config_keeps_the_old_run(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"previous run")
    line = one_line_error(run_cli("fit", "--model.batch_size", "0", "--run_dir", run_dir, "--overwrite"))
    assert "batch_size" in line
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"previous run"
    line = one_line_error(run_cli("fit", "--checkpoint_minutes", "0", "--run_dir", run_dir, "--overwrite"))
    assert "checkpoint_minutes" in line


def test_bad_checkpoint_interval_keeps_the_old_run(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"previous run")
    line = one_line_error(run_cli("fit", "--checkpoint_minutes", "0", "--run_dir", run_dir, "--overwrite"))
    assert "checkpoint_minutes" in line
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"previous run"


def test_zip_writes_table_and_merged_teacher(run_cli, tmp_path):
    """Tiny budget: both image sources, every method row, one merged teacher that `fit` can load."""
    import yaml

    config = tmp_path / "zip.yaml"
    merged = tmp_path / "merged.safetensors"
    config.write_text(yaml.safe_dump({
        "teachers": [str(REPO / "checkpoints/fashion_mnist_lenet5_bn_classes0-4.safetensors"),
                     str(REPO / "checkpoints/fashion_mnist_lenet5_bn_classes5-9.safetensors")],
        "merge_images": 256, "generator": {"iterations": 3, "batch_size": 64},
        "outputs": [{"source": "real", "method": "zipit", "depth": 2, "path": str(merged)},
                    {"source": "generator", "depth": "auto", "path": str(tmp_path / "auto.safetensors")}]}))
    result = run_cli("zip", "--config", config, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "out" / "table.md").read_text()
    for source in ("real", "generator"):
        for method in ("weight averaging", "permutation", "ZipIt full", "ZipIt partial, depth 1", "ensemble"):
            assert f"| {source} | {method} |" in table
    rows = (tmp_path / "out" / "table.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 + 2 * 7  # header, two teachers alone, 7 merges per source (LeNet-5: depths 4..0)
    from dafl.weights import load_classifier

    model, meta = load_classifier(merged)
    assert meta["arch"] == "zipit" and meta["num_classes"] == 10 and merged.with_suffix(".md").is_file()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    # depth auto: the ZipIt depth (ensemble = 0) whose merge kept the most information, no labels
    import csv

    table_rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    zipit_depths = {"ZipIt full": 4, "ZipIt partial, depth 3": 3, "ZipIt partial, depth 2": 2,
                    "ZipIt partial, depth 1": 1, "ensemble": 0}
    information = {zipit_depths[r["method"]]: float(r["information"]) for r in table_rows
                   if r["source"] == "generator" and r["method"] in zipit_depths}
    assert len(information) == 5
    assert load_classifier(tmp_path / "auto.safetensors")[1]["depth"] == max(information, key=information.get)


def test_zip_merges_three_teachers_of_uneven_class_lists_and_reports_blocked_merges(run_cli, tmp_path):
    """Classes 0-3, 4-6, 7-9: at beta 0.125 ZipIt's rules block the full merge of three models
    (a group inherits its members' blocked pairs): a row says so, the table and every other
    merge are kept, and an output asking for the blocked merge is a one-line error."""
    import yaml

    teachers = [str(REPO / f"benchmarks/teachers/lenet5_bn_classes{c}.safetensors") for c in ("0-3", "4-6", "7-9")]
    config = tmp_path / "zip.yaml"
    config.write_text(yaml.safe_dump({
        "teachers": teachers, "merge_images": 512, "sources": ["real"],
        "outputs": [{"source": "real", "depth": 1, "path": str(tmp_path / "d1.safetensors")},
                    {"source": "real", "depth": "full", "path": str(tmp_path / "full.safetensors")}]}))
    line = one_line_error(run_cli("zip", "--config", config, "--out", tmp_path / "out"))
    assert "not written" in line and "cannot reach" in line and not (tmp_path / "full.safetensors").exists()
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| real | ZipIt full (blocked by alpha/beta) | - | - | - | - | - |" in table
    assert "| real | ZipIt partial, depth 1 |" in table and "task3 = classes [7, 8, 9]" in table
    from dafl.weights import load_classifier

    model, meta = load_classifier(tmp_path / "d1.safetensors")
    assert meta["class_lists"] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_zip_never_overwrites_without_being_asked(run_cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "table.md").write_text("earlier result")
    line = one_line_error(run_cli("zip", "--out", tmp_path / "out"))
    assert "--overwrite" in line and (tmp_path / "out" / "table.md").read_text() == "earlier result"


@pytest.mark.parametrize("args,message", [
    (["--sources", "webcam"], "unknown image source"),
    (["--config", "nope.yaml"], "zip config not found"),
])
def test_zip_bad_input_is_one_line_error(run_cli, args, message):
    assert message in one_line_error(run_cli("zip", *args))
