"""`python -m dafl compare`: the DAFL paper's Table 1 for any teacher / student / dataset.

Rows (same teacher, same student architecture): the teacher itself; standard
back-propagation (student with labels); KD with the original data; KD on Gaussian noise;
KD on alternative data; DAFL with the official preset; DAFL with the project's best
preset. Each row is a `python -m dafl fit` run in its own folder, so finished rows are
reused when the command is re-run (unless --force).
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from dafl.errors import ConfigError, OneLineParser, read_yaml_mapping
from dafl.weights import load_classifier, resolve

# Budgets: quick fits a 2-core CPU in about half an hour; paper uses the paper's steps.
BUDGETS = {
    "quick": {"supervised_epochs": 3, "gaussian_iterations": 300,
              "official_iterations": 120, "best_iterations": 1200},
    "paper": {"supervised_epochs": 20, "gaussian_iterations": 24000,
              "official_iterations": 24000, "best_iterations": 3600},
    "tiny": {"supervised_epochs": 1, "gaussian_iterations": 4,
             "official_iterations": 2, "best_iterations": 4},  # for tests
}


@dataclass
class Row:
    name: str
    label: str
    data: str
    args: list[str] = field(default_factory=list)  # extra `dafl fit` arguments; None for the teacher


def build_rows(cfg: dict, budget: dict) -> list[Row]:
    """The standard row trains with labels (the supervised recipe); every other student row
    is the best preset's distillation loop with another image source."""
    teacher, student = cfg["teacher"], cfg["student_arch"]
    supervised = ["--config", cfg["supervised_config"], "--model.init_args.arch", student, "--data.init_args.val_size", "null",
                  "--data.init_args.dataset", cfg["dataset"]]
    distill = lambda config, iters: ["--config", config, "--model.init_args.teacher", teacher,  # noqa: E731
                                     "--model.init_args.student_arch", student,
                                     "--data.init_args.eval_dataset", cfg["dataset"],
                                     *_iterations(iters, cfg.get("iterations_per_epoch", 100))]
    source = lambda name, *args: ["--model.init_args.source", f"lightning_modules.sources.{name}", *args]  # noqa: E731
    real_images = lambda dataset: source("RealImages", "--model.init_args.source.init_args.dataset", dataset)  # noqa: E731
    best = lambda iters: distill(cfg["best_config"], iters)  # noqa: E731
    rows = [
        Row("teacher", "Teacher", "original data (labels)", None),
        Row("standard", "Standard back-propagation", "original data (labels)",
            [*supervised, "--trainer.max_epochs", str(budget["supervised_epochs"])]),
        Row("kd", "Knowledge distillation", "original data (no labels)",
            [*best(budget["best_iterations"]), *real_images(cfg["dataset"])]),
        Row("gaussian", "Normal distribution", "none", [*best(budget["gaussian_iterations"]), *source("GaussianNoise")]),
    ]
    if cfg.get("alternative_dataset"):
        rows.append(Row("alternative", f"Alternative data ({cfg['alternative_dataset']})", "other dataset",
                        [*best(budget["best_iterations"]), *real_images(cfg["alternative_dataset"])]))
    rows += [Row("dafl_official", "DAFL (official recipe)", "none",
                 distill(cfg["official_config"], budget["official_iterations"])),
             Row("dafl_best", "DAFL (dafl's best preset)", "none", best(budget["best_iterations"]))]
    return rows


def _iterations(total: int, per_epoch: int) -> list[str]:
    per_epoch = min(per_epoch, total)
    return ["--trainer.max_epochs", str(max(1, total // per_epoch)), "--data.init_args.iterations_per_epoch",
            str(per_epoch)]


def _teacher_row(cfg: dict, out: Path) -> dict:
    from dafl.data import ImageDataModule, evaluate_accuracy

    network, meta = load_classifier(cfg["teacher"])
    data = ImageDataModule(cfg["dataset"], input_size=meta["image_size"], batch_size=1000)
    data.setup("test")
    start = time.time()
    accuracy = evaluate_accuracy(network, data)
    return {"test_acc": accuracy, "arch": meta["arch"], "wall_seconds": time.time() - start, "curve": []}


def _fit_row(row: Row, seed: int, run_dir: Path, device_args: list[str]) -> dict:
    command = [sys.executable, "-m", "dafl", "fit", *row.args, "--seed_everything", str(seed), "--run_dir",
               str(run_dir), "--overwrite", "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks+=dafl.callbacks.TestAccuracyCurve", *device_args]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"row {row.name} (seed {seed}) failed: {tail}; full command: {shlex.join(command[1:])}")
    summary = json.loads((run_dir / "summary.json").read_text())
    curve_file = run_dir / "curve.json"
    return {"test_acc": summary["test_acc"], "wall_seconds": time.time() - start,
            "curve": json.loads(curve_file.read_text()) if curve_file.exists() else [],
            "command": shlex.join(["python", "-m", "dafl", *command[3:]])}


def _model_cost(arch: str, meta: dict) -> tuple[int, int]:
    from dafl.models import build_model, count_flops, count_parameters

    net = build_model(arch, in_channels=meta["in_channels"], num_classes=meta["num_classes"],
                      image_size=meta["image_size"])
    return count_parameters(net), count_flops(net, (meta["in_channels"], meta["image_size"], meta["image_size"]))


def compare_main(argv: list[str]) -> None:
    parser = OneLineParser(prog="python -m dafl compare", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist/compare.yaml", help="compare YAML")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row (mean ± std)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    parser.add_argument("--out", default=None, help="output folder (default runs/compare_<dataset>_<budget>)")
    parser.add_argument("--rows", default=None, help="comma-separated subset of rows")
    parser.add_argument("--force", action="store_true", help="re-run rows that already finished")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator for every row (cpu, gpu, auto)")
    opts = parser.parse_args(argv)
    if opts.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    config_path = resolve(opts.config)
    if not config_path.is_file():
        raise ConfigError(f"compare config not found: {opts.config}")
    cfg = read_yaml_mapping(config_path, "compare config")
    missing = [k for k in ("teacher", "student_arch", "dataset", "supervised_config", "official_config",
                           "best_config") if k not in cfg]
    if missing:
        raise ConfigError(f"{opts.config} lacks {', '.join(missing)}")
    for key in ("supervised_config", "official_config", "best_config"):
        cfg[key] = str(resolve(cfg[key]))
    cfg["teacher"] = str(resolve(cfg["teacher"]))
    _, teacher_meta = load_classifier(cfg["teacher"])  # fail early on a bad teacher
    rows = build_rows(cfg, BUDGETS[opts.budget])
    if opts.rows:
        wanted = set(opts.rows.split(","))
        unknown = wanted - {r.name for r in rows}
        if unknown:
            raise ConfigError(f"unknown rows {sorted(unknown)}; choose from {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in wanted]
    out = Path(opts.out or f"runs/compare_{cfg['dataset']}_{opts.budget}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_path, out / "compare_config.yaml")
    device_args = ["--trainer.accelerator", opts.accelerator]

    from tqdm import tqdm

    jobs = [(row, seed) for row in rows for seed in range(opts.seeds if row.args is not None else 1)]
    results: dict[str, list[dict]] = {}
    with tqdm(jobs, desc="compare", unit="run") as bar:
        for row, seed in bar:
            bar.set_postfix_str(f"{row.name} seed {seed}")
            record_file = out / row.name / f"seed_{seed}.json"
            if record_file.exists() and not opts.force:
                record = json.loads(record_file.read_text())  # finished earlier: reuse
            else:
                record_file.parent.mkdir(parents=True, exist_ok=True)
                record = (_teacher_row(cfg, out) if row.args is None
                          else _fit_row(row, seed, out / row.name / f"run_seed_{seed}", device_args))
                record_file.write_text(json.dumps(record, indent=1))
            results.setdefault(row.name, []).append(record)
    write_outputs(rows, results, cfg, teacher_meta, out, opts)


def _device(accelerator: str) -> str:
    import platform
    import os

    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def write_outputs(rows, results, cfg, teacher_meta, out: Path, opts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = _device(opts.accelerator)
    table = []
    for row in rows:
        records = results[row.name]
        accs = [100 * r["test_acc"] for r in records]
        arch = teacher_meta["arch"] if row.args is None else cfg["student_arch"]
        params, flops = _model_cost(arch, teacher_meta)
        table.append({"row": row.label, "required data": row.data, "seeds": len(accs),
                      "test accuracy (%)": f"{statistics.mean(accs):.2f} ± "
                                           f"{statistics.stdev(accs) if len(accs) > 1 else 0.0:.2f}",
                      "architecture": arch, "FLOPs": flops, "parameters": params,
                      "wall-clock (s)": f"{statistics.mean(r['wall_seconds'] for r in records):.0f}", "device": device})
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    header = list(table[0])
    lines = [f"# dafl compare: {cfg['dataset']}, teacher {teacher_meta['arch']}, student {cfg['student_arch']}", "",
             f"Budget `{opts.budget}`, {opts.seeds} seed(s) per row; last-epoch test accuracy on the real test set "
             "(no selection on test data). FLOPs: forward, per image, torch.utils.flop_counter (multiply-add = 2).",
             f"Command: `python -m dafl compare --config {opts.config} --budget {opts.budget} --seeds {opts.seeds}"
             + (f" --rows {opts.rows}`" if opts.rows else "`"), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        lines.append("| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in entry.values()) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(rows):
        for j, record in enumerate(results[row.name]):
            curve = record.get("curve") or []
            if curve:
                ax.plot([p["train_seconds"] for p in curve], [100 * p["test_acc"] for p in curve], color=f"C{i}",
                        marker=".", label=row.label if j == 0 else None)
            elif row.args is None:
                ax.axhline(100 * record["test_acc"], color=f"C{i}", linestyle="--", label=row.label)
    ax.set_xlabel("training wall-clock seconds")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    print("\n".join(lines))
    print(f"\nWrote {out}/table.md, table.csv, curves.png")
