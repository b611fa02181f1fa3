"""`python -m dafl compare` with a tiny budget on digits: every row runs, the table has
the paper's columns, and a re-run reuses finished rows."""
import csv
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare_run(digits_teacher, tmp_path_factory):
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("compare")
    # The best preset with a small pool of inverted shapes, so that the tiny budget stays tiny.
    (root / "best.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"source": {"init_args": {
        "pool_size": 64}}}}}))  # an overlay of configs/default.yaml
    config = root / "compare.yaml"
    config.write_text(f"""
teacher: {digits_teacher[0]}
student_arch: lenet5_half
dataset: digits
alternative_dataset: mnist-5k
supervised_config: configs/fashion_mnist/teacher_lenet5.yaml
official_config: configs/fashion_mnist/dafl_official.yaml
best_config: {root / 'best.yaml'}
iterations_per_epoch: 2
""")
    out = root / "out"

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "dafl", "compare", "--config", str(config), "--budget", "tiny",
                               "--out", str(out), "--accelerator", "cpu", *extra],
                              capture_output=True, text=True, timeout=900)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    return out, run


@pytest.mark.slow  # the shared compare run takes about 2.5 minutes
def test_table_has_every_row_and_column(compare_run):
    out, _ = compare_run
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["Teacher", "Standard back-propagation", "Knowledge distillation",
                                        "Normal distribution", "Alternative data (mnist-5k)",
                                        "DAFL (official recipe)", "DAFL (dafl's best preset)"]
    for r in rows:
        assert set(r) >= {"required data", "test accuracy (%)", "FLOPs", "parameters", "wall-clock (s)", "device"}
        mean = float(r["test accuracy (%)"].split(" ± ")[0])
        assert 0.0 <= mean <= 100.0
    teacher, student = rows[0], rows[1]
    assert float(teacher["test accuracy (%)"].split(" ± ")[0]) > 90  # the fixture teacher's real accuracy
    assert int(teacher["parameters"]) > int(student["parameters"]) and int(teacher["FLOPs"]) > int(student["FLOPs"])
    assert rows[3]["required data"] == "none" and "labels" in rows[1]["required data"]
    for name in ("table.md", "curves.png", "compare_config.yaml"):
        assert (out / name).is_file()
    assert "| Teacher |" in (out / "table.md").read_text()


@pytest.mark.slow  # the shared compare run takes about 2.5 minutes
def test_rerun_reuses_finished_rows(compare_run):
    out, run = compare_run
    record = out / "standard" / "seed_0.json"
    before = json.loads(record.read_text())
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(record.read_text()) == before  # not re-trained


@pytest.mark.slow  # the shared compare run takes about 2.5 minutes
def test_unknown_row_is_a_one_line_error(compare_run):
    _, run = compare_run
    result = run("--rows", "teacher,lasso")
    assert result.returncode == 2 and "unknown rows" in result.stderr and "Traceback" not in result.stderr


def test_student_rows_are_the_best_preset_with_another_image_source():
    """Every distillation row runs the best preset's student loop; only the image source
    differs: noise, the dataset's own images (labels unused), another dataset's images."""
    from dafl.compare import BUDGETS, build_rows

    cfg = {"teacher": "t.safetensors", "student_arch": "lenet5_half", "dataset": "fashion-mnist",
           "alternative_dataset": "mnist-5k", "supervised_config": "s.yaml", "official_config": "o.yaml",
           "best_config": "b.yaml"}
    rows = {row.name: dict(zip(row.args[::2], row.args[1::2])) for row in build_rows(cfg, BUDGETS["tiny"])
            if row.args is not None}
    source = "--model.init_args.source"
    assert rows["gaussian"][source] == "lightning_modules.sources.GaussianNoise"
    for name, dataset in (("kd", "fashion-mnist"), ("alternative", "mnist-5k")):
        assert rows[name][source] == "lightning_modules.sources.RealImages"
        assert rows[name][f"{source}.init_args.dataset"] == dataset
        assert rows[name]["--config"] == "b.yaml" and rows[name]["--data.init_args.eval_dataset"] == "fashion-mnist"
    assert source not in rows["dafl_best"] and rows["dafl_best"]["--config"] == "b.yaml"
