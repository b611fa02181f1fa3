"""Tables of the bring-your-own-teacher runs (benchmarks/teachers.md: the default on every
teacher, the fast presets' priors on the LeNet-5-BN teachers, one lever per teacher against
the default) and the merged-teacher runs (benchmarks/merged_teachers.md), from the records
`accuracy.py run` writes.

    python benchmarks/teachers.py    # prints the four tables (markdown)

A data-free row is `results/<row>/seed_*.json`; its KD-with-data row, where there is one, is
`results/<row>_kd/`. The teacher's accuracy is the one each run measured on the real test set.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# row -> what the teacher is and how it was trained (the project's own recipes)
TEACHERS = {
    "eighth_lenet5_bn_shipped": ("LeNet-5-BN, shipped (the presets' teacher)",
                                 "configs/fashion_mnist/teacher_lenet5_bn.yaml"),
    "eighth_lenet5_bn_seed1": ("LeNet-5-BN, seed 1", "configs/fashion_mnist/teacher_lenet5_bn.yaml --seed_everything 1"),
    "eighth_lenet5_bn_seed2": ("LeNet-5-BN, seed 2", "configs/fashion_mnist/teacher_lenet5_bn.yaml --seed_everything 2"),
    "eighth_lenet5_bn_sgd": ("LeNet-5-BN, other recipe (SGD, no shift augmentation)",
                             "configs/fashion_mnist/teacher_lenet5_bn.yaml --seed_everything 3 "
                             "--model.optimizer torch.optim.SGD --model.optimizer.lr 0.05 "
                             "--model.optimizer.momentum 0.9 --data.augment_shift 0"),
    "eighth_resnet8": ("ResNet-8 (CIFAR-style, registered `resnet8`)", "configs/fashion_mnist/teacher_resnet8.yaml"),
    "eighth_timm_test_efficientnet": ("timm `test_efficientnet`, `in_chans=1`",
                                      "configs/fashion_mnist/teacher_resnet8.yaml --model.arch timm/test_efficientnet"),
    "mnist5k_eighth_lenet5_bn": ("mnist-5k LeNet-5-BN, shipped", "configs/mnist5k/teacher_lenet5_bn.yaml"),
    "eighth_lenet5_nobn": ("LeNet-5 without BatchNorm, shipped", "configs/fashion_mnist/teacher_lenet5.yaml"),
}
# row with fast.yaml's priors -> the same teacher's default row
PRIORS = {f"eighth_fast_lenet5_bn_{t}": f"eighth_lenet5_bn_{t}" for t in ("shipped", "seed1", "seed2", "sgd")}
# row with a lever -> (the same teacher's default row, the lever's own KD-with-data row or None for
# the default's, what the lever is)
ZIPPED_START = "zipped start (`student_init: zip_teacher`)"
LEVERS = {
    **{f"eighth_zipinit_{t}": (f"eighth_lenet5_bn_{t}", None, ZIPPED_START) for t in ("shipped", "seed1", "seed2", "sgd")},
    "eighth_zipinit_mnist5k": ("mnist5k_eighth_lenet5_bn", None, ZIPPED_START),
    "eighth_zipinit_lenet5_nobn": ("eighth_lenet5_nobn", None, ZIPPED_START),
    "eighth_resnet8_student_resnet8": ("eighth_resnet8", "eighth_resnet8_student_resnet8_kd",
                                       "ResNet-8 student (KD with data: the same student)"),
}
MERGED = {
    "merged_eighth_ensemble": "calibrated ensemble of the two halves (shipped)",
    "merged_eighth_class_teachers": "the ensemble, each class inverted through its own half teacher (`class_teachers`)",
    "merged_eighth_zipit_d2": "ZipIt depth 2 (shipped)",
    "merged_eighth_zipit_d1": "ZipIt depth 1 (made by the same zip settings)",
    "merged_eighth_calibrated_class_teachers": "the ensemble, `class_teachers` + `calibrate_teacher_heads`",
    "merged_eighth_ensemble_zip_init": "the ensemble; the student starts as the full ZipIt merge (`student_init_from`)",
    "merged_eighth_split433_ensemble": "4+3+3 split: calibrated ensemble of the three",
    "merged_eighth_split433_zipit_d1": "4+3+3 split: ZipIt depth 1",
    "merged_eighth_split433_calibrated_class_teachers": "4+3+3 split: the ensemble, `class_teachers` + "
                                                        "`calibrate_teacher_heads`",
}
REFERENCE = "eighth_lenet5_bn_shipped"
TOLERANCE = 2.0  # points of the shipped teacher's ratio a teacher may lose (issue 36)


def records(row: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / row).glob("seed_*.json"))]


def accuracies(row: str) -> list[float]:
    return [100 * r["test_acc"] for r in records(row)]


def by_seed(row: str) -> dict[int, float]:
    return {r["seed"]: 100 * r["test_acc"] for r in records(row)}


def summary(accs: list[float]) -> str:
    if not accs:
        return "not run"
    if len(accs) == 1:
        return f"{accs[0]:.2f}"
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.2f} ± {spread:.2f} ({', '.join(f'{a:.2f}' for a in accs)})"


def teacher_accuracy(row: str) -> str:
    found = [r.get("teacher_acc") for r in records(row) + records(row + "_kd") if r.get("teacher_acc")]
    return f"{100 * found[0]:.2f}" if found else "–"


def ratio(row: str, kd_row: str | None = None) -> float | None:
    free, kd = accuracies(row), accuracies(kd_row or row + "_kd")
    return 100 * statistics.mean(free) / statistics.mean(kd) if free and kd else None


def teachers_table() -> str:
    reference = ratio(REFERENCE)
    lines = ["| teacher | trained by `python -m dafl fit --config` | teacher (%) | KD with data, seed 0 (%) | data-free, random start, seeds 0-2 (%) | "
             "data-free / KD | passes (>= shipped ratio - 2) |", "|---|---|---|---|---|---|---|"]
    for row, (what, recipe) in TEACHERS.items():
        kd, share = accuracies(row + "_kd"), ratio(row)
        verdict = "–" if share is None or reference is None else \
            ("yes" if share >= reference - TOLERANCE else f"no ({share - reference:+.1f})")
        lines.append(f"| {what} | `{recipe}` | {teacher_accuracy(row)} | {summary(kd)} | {summary(accuracies(row))} | "
                     f"{'–' if share is None else f'{share:.1f}%'} | {verdict} |")
    return "\n".join(lines) + "\n"


def priors_table() -> str:
    """fast.yaml's priors against the default on each LeNet-5-BN teacher, same budget: the gain
    of paired means, and whether it is within 2 points of the shipped teacher's gain."""
    def gain(row: str) -> float | None:
        with_priors, default = accuracies(row), accuracies(PRIORS[row])
        return statistics.mean(with_priors) - statistics.mean(default) if with_priors and default else None

    reference = gain(f"eighth_fast_{REFERENCE.removeprefix('eighth_')}")
    lines = ["| teacher | default, seeds 0-2 (%) | fast.yaml's priors, seeds 0-2 (%) | gain (points) | "
             "general (gain >= shipped gain - 2) |", "|---|---|---|---|---|"]
    for row, default_row in PRIORS.items():
        change = gain(row)
        verdict = "–" if change is None or reference is None else \
            ("yes" if change >= reference - TOLERANCE else f"no ({change - reference:+.1f})")
        lines.append(f"| {TEACHERS[default_row][0]} | {summary(accuracies(default_row))} | {summary(accuracies(row))} | "
                     f"{'–' if change is None else f'{change:+.2f}'} | {verdict} |")
    return "\n".join(lines) + "\n"


def levers_table() -> str:
    """Each lever against the default on the same teacher: the mean gain over the seeds both
    ran (paired), and whether the lever's data-free / KD passes the teachers table's rule."""
    reference = ratio(REFERENCE)
    lines = ["| teacher | lever | the default before round 4 (%) | with the lever (%) | gain, paired seeds (points) | KD with data (%) | "
             "with the lever / KD | passes (>= shipped default ratio - 2) |", "|---|---|---|---|---|---|---|---|"]
    for row, (default_row, kd_row, lever) in LEVERS.items():
        kd_row = kd_row or default_row + "_kd"
        mine, theirs = by_seed(row), by_seed(default_row)
        pairs = sorted(set(mine) & set(theirs))
        gain = (f"{statistics.mean(mine[s] - theirs[s] for s in pairs):+.2f} ({len(pairs)})" if pairs else "–")
        share = ratio(row, kd_row)
        verdict = "–" if share is None or reference is None else \
            ("yes" if share >= reference - TOLERANCE else f"no ({share - reference:+.1f})")
        lines.append(f"| {TEACHERS[default_row][0]} | {lever} | {summary(accuracies(default_row))} | "
                     f"{summary(accuracies(row))} | {gain} | {summary(accuracies(kd_row))} | "
                     f"{'–' if share is None else f'{share:.1f}%'} | {verdict} |")
    return "\n".join(lines) + "\n"


def merged_table() -> str:
    full = accuracies(REFERENCE)
    lines = ["| row | teacher | teacher 10-way (%) | student, seeds 0-2 (%) | vs the full teacher's student |",
             "|---|---|---|---|---|"]
    for row, what in MERGED.items():
        accs = accuracies(row)
        gap = f"{statistics.mean(accs) - statistics.mean(full):+.2f}" if accs and full else "–"
        lines.append(f"| `{row}` | {what} | {teacher_accuracy(row)} | {summary(accs)} | {gap} |")
    lines.append(f"| `{REFERENCE}` | the single full teacher (reference) | {teacher_accuracy(REFERENCE)} | "
                 f"{summary(full)} | 0 |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(teachers_table())
    print(priors_table())
    print(levers_table())
    print(merged_table())
