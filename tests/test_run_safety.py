"""Hostile and unlucky users: checkpoints that run code, runs stopped by signals, bad data
found before training, exports that must not mix, folders a failed run must not block.
Each test fails without the fix it names (benchmarks/reliability.md lists the probes)."""
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_cli import in_process_error, one_line_error


def small_fit(teacher, run_dir, *extra, epochs=2):
    return ["fit", "--model.teacher", teacher, "--data.eval_dataset", "digits", "--model.batch_size", "32",
            "--model.val_size", "32", "--model.source.pool_size", "64", "--model.source.inversion_batch", "64",
            "--model.source.inversion_steps", "2", "--model.student_steps", "2",
            "--data.iterations_per_epoch", "20", "--trainer.max_epochs", str(epochs),
            "--trainer.enable_progress_bar", "false", "--run_dir", run_dir, *extra]


class RunsCode:
    """A pickle that would create `marker` when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(digits_teacher, tmp_path_factory):
    """A finished 2-epoch run whose last.ckpt was first written mid-epoch by the interval
    checkpoint (the case where Lightning used to write its final state to last-v1.ckpt)."""
    from conftest import REPO

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run([sys.executable, "-m", "dafl", *map(str, small_fit(
        digits_teacher[0], run_dir, "--checkpoint_minutes", "0.0001"))], capture_output=True, text=True,
        timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_last_ckpt_is_the_final_student(finished_run, run_cli, tmp_path):
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    out = tmp_path / "again"
    assert run_cli("export", "--ckpt", finished_run, "--out", out, "--formats", "safetensors").returncode == 0
    ours, theirs = load_file(out / "student.safetensors"), load_file(finished_run / "export" / "student.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_checkpoint_urls_are_refused_without_fetching(run_cli, tmp_path, digits_teacher):
    line = one_line_error(run_cli(*small_fit(digits_teacher[0], tmp_path / "run", "--ckpt_path",
                                             "http://127.0.0.1:9/evil.ckpt")))
    assert "URL" in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_checkpoint_that_runs_code_is_refused(run_cli, tmp_path, digits_teacher, finished_run, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, evil)
    extra = ["--config", finished_run / "config.yaml"] if command == "test" else []
    args = small_fit(digits_teacher[0], tmp_path / "run") if command == "fit" else ["test"]
    line = one_line_error(run_cli(*args, *extra, "--ckpt_path", evil))
    assert "not a plain weights file" in line and not marker.exists()


def test_random_bytes_as_checkpoint(run_cli, tmp_path, digits_teacher):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(2000))
    one_line_error(run_cli(*small_fit(digits_teacher[0], tmp_path / "run", "--ckpt_path", junk)))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_run_does_not_replace_a_run(run_cli, finished_run, digits_teacher, tmp_path):
    other = tmp_path / "other"
    (other / "export").mkdir(parents=True)
    (other / "summary.json").write_text("{}")
    line = one_line_error(run_cli(*small_fit(digits_teacher[0], other, "--ckpt_path",
                                             finished_run / "checkpoints" / "last.ckpt")))
    assert "already holds a run" in line and (other / "summary.json").read_text() == "{}"
    line = one_line_error(run_cli(*small_fit(digits_teacher[0], other, "--ckpt_path", "last")))
    assert "nothing to resume" in line and (other / "summary.json").read_text() == "{}"


def test_sigterm_saves_a_checkpoint_exits_non_zero_and_resumes(digits_teacher, tmp_path):
    from conftest import REPO

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "dafl", *map(str, small_fit(digits_teacher[0], run_dir, epochs=200))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "last.ckpt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "--ckpt_path last" in err and "Traceback" not in err
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = subprocess.run([sys.executable, "-m", "dafl", *map(str, small_fit(
        digits_teacher[0], run_dir, "--ckpt_path", "last", epochs=saved["epoch"] + 2))],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] > saved["global_step"] and (run_dir / "summary.json").exists()


def test_sigterm_while_building_the_pool_stops_at_once(digits_teacher, tmp_path):
    from conftest import REPO

    run_dir = tmp_path / "run"
    args = small_fit(digits_teacher[0], run_dir, "--model.source.pool_size", "200000",
                     "--model.source.inversion_steps", "50")
    proc = subprocess.Popen([sys.executable, "-m", "dafl", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "config.yaml").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    start = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - start < 30 and proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "nothing to resume" in err
    assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing left to block a rerun


def _idx(path: Path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("case,message", [
    ("garbage", "cannot be read"), ("counts", "images but"), ("label", "labels must lie in")])
def test_bad_named_data_fails_before_training(run_cli, digits_teacher, tmp_path, case, message):
    root = tmp_path / "fm"
    root.mkdir()
    images = bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(3 * 784)
    labels = bytes([0, 0, 8, 1]) + (3 if case != "counts" else 2).to_bytes(4, "big") \
        + bytes([1, 2, 200 if case == "label" else 3][:3 if case != "counts" else 2])
    if case == "garbage":
        (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    else:
        _idx(root / "t10k-images-idx3-ubyte.gz", images)
    _idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    result = run_cli(*small_fit(digits_teacher[0], tmp_path / "run", "--data.eval_dataset", "fashion-mnist",
                                "--data.root", root))
    assert message in one_line_error(result) and not (tmp_path / "run").exists()


def test_export_refuses_a_non_empty_folder_and_replaces_it_whole(run_cli, finished_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "student.onnx").write_text("another model")
    assert "not empty" in one_line_error(run_cli("export", "--ckpt", finished_run, "--out", out))
    assert (out / "student.onnx").read_text() == "another model"
    result = run_cli("export", "--ckpt", finished_run, "--out", out, "--formats", "safetensors", "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["model_card.md", "student.safetensors"]


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_a_rerun(run_cli, digits_teacher, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(digits_teacher[0]), framework="pt") as f:
        meta = f.metadata()
    weights = load_file(str(digits_teacher[0]))
    weights["classifier.2.bias"] = torch.full_like(weights["classifier.2.bias"], float("nan"))
    broken = tmp_path / "nan_teacher.safetensors"
    save_file(weights, str(broken), metadata=meta)
    line = one_line_error(run_cli(*small_fit(broken, tmp_path / "run")))
    assert "nan" in line.lower() and "no checkpoint had been saved" in line
    assert not (tmp_path / "run").exists()
    assert run_cli(*small_fit(digits_teacher[0], tmp_path / "run", epochs=1)).returncode == 0


@pytest.mark.parametrize("flag,value,message", [
    ("--trainer.max_epochs", "0", "max_epochs must be at least 1"),
    ("--trainer.max_epochs", "-3", "max_epochs must be at least 1"),
    ("--model.student_optimizer.lr", ".nan", "finite"),
    ("--model.source.pool_size", "1000000000000", "memory"),
    ("--model.batch_size", "1000000000000", "memory"),
])
def test_values_that_cannot_work_are_refused_up_front(capsys, digits_teacher, tmp_path, flag, value, message):
    assert message in in_process_error(capsys, *small_fit(digits_teacher[0], tmp_path / "run", flag, value))
    assert not (tmp_path / "run").exists()


def test_an_error_line_is_alone_on_stderr(run_cli, digits_teacher, tmp_path):
    result = run_cli(*small_fit(digits_teacher[0], tmp_path / "run", "--trainer.max_epochs", "0"))
    one_line_error(result)
    assert "Seed set" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text,message", [("- a\n- b\n", "not a list"), ("teachers: [a\n", "not valid YAML"),
                                          ("merge_images: lots\nteachers: [a, b]\n", "merge_images"),
                                          ("alpha: 2\nteachers: [a, b]\n", "alpha")])
def test_zip_configs_are_checked(capsys, tmp_path, text, message):
    (tmp_path / "z.yaml").write_text(text)
    assert message in in_process_error(capsys, "zip", "--config", tmp_path / "z.yaml", "--out", tmp_path / "o")


def test_zip_refuses_overlapping_classes_before_merging(run_cli, tmp_path):
    from conftest import REPO

    half = str(REPO / "checkpoints" / "fashion_mnist_lenet5_bn_classes0-4.safetensors")
    (tmp_path / "z.yaml").write_text(f"teachers: [{half}, {half}]\n")
    assert "known by both" in one_line_error(run_cli("zip", "--config", tmp_path / "z.yaml", "--out", tmp_path / "o"))


def test_compare_config_must_be_a_mapping(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("[1, 2]\n")
    assert "not a list" in in_process_error(capsys, "compare", "--config", tmp_path / "c.yaml")


def test_usage_errors_are_one_line(capsys, run_cli, tmp_path):
    for args in (["export"], ["zip", "--bogus"], ["compare", "--seeds", "many"]):
        in_process_error(capsys, *args)
    line = one_line_error(run_cli("test", cwd=tmp_path))
    assert "--config" in line and not (tmp_path / "lightning_logs").exists()
    assert "folder" in in_process_error(capsys, "fit", "--model.teacher", tmp_path, "--run_dir", tmp_path / "r")


def test_fit_help_leads_with_the_model_options(run_cli):
    result = run_cli("fit", "--help")
    assert result.returncode == 0 and len(result.stdout.splitlines()) < 120
    source = [l for l in result.stdout.splitlines() if l.strip().startswith("--model.source ")]
    assert source and "InvertedPool" in source[0]
    assert "--help-all" in result.stdout


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path):
    from dafl.callbacks import AtomicCheckpointIO
    from dafl.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match="could not save checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, blocker / "checkpoints" / "last.ckpt")


def test_zip_output_depth_is_checked_before_merging(run_cli, tmp_path):
    from conftest import REPO

    halves = [str(REPO / "checkpoints" / f"fashion_mnist_lenet5_bn_classes{c}.safetensors") for c in ("0-4", "5-9")]
    (tmp_path / "z.yaml").write_text(f"teachers: [{halves[0]}, {halves[1]}]\noutputs: [{{depth: 99}}]\n")
    start = time.time()
    line = one_line_error(run_cli("zip", "--config", tmp_path / "z.yaml", "--out", tmp_path / "o"))
    assert "output depth 99" in line and time.time() - start < 60


def test_a_checkpoint_of_the_module_before_image_sources_is_refused_in_one_line(capsys, tmp_path):
    # What `dafl fit` wrote before the student loop took image sources: student kind, no format.
    old = tmp_path / "run" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save({"dafl": {"kind": "student", "state_prefix": "student.net."}, "state_dict": {}}, old)
    line = in_process_error(capsys, "fit", "--run_dir", tmp_path / "run", "--ckpt_path", "last")
    assert "older dafl" in line and "export" in line
    assert old.is_file()  # nothing removed
