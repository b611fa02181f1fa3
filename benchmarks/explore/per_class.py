"""Per-class test accuracy (recall) of exported students and of the teacher, as a markdown table:
where a data-free student loses to its teacher, and where seeds differ.

    python benchmarks/explore/per_class.py checkpoints/fashion_mnist_lenet5_bn.safetensors \
        runs/bench/inverted_pool_long_cpu_kernels/seed_0/export/student.safetensors ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dafl.datasets import InputAdapter, load_split  # noqa: E402
from dafl.errors import ConfigError  # noqa: E402
from dafl.weights import load_classifier  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="safetensors classifiers (teacher or exported students)")
    p.add_argument("--dataset", default="fashion-mnist")
    a = p.parse_args()
    test = load_split(a.dataset, "test")
    x = InputAdapter.for_dataset(test.info, 32)(test.images)
    names = test.info.class_names or [str(c) for c in range(test.info.num_classes)]
    lines = ["| model | " + " | ".join(names) + " | all |", "|---" * (len(names) + 2) + "|"]
    for path in a.models:
        network, _ = load_classifier(path)
        with torch.no_grad():
            pred = network.eval()(x).argmax(1)
        recall = MulticlassAccuracy(num_classes=len(names), average=None)(pred, test.labels)
        lines.append(f"| `{path}` | " + " | ".join(f"{100 * r:.0f}" for r in recall)
                     + f" | {100 * (pred == test.labels).float().mean():.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:  # a missing file or dataset: one line, not a traceback
        raise SystemExit(f"error: {error}")
