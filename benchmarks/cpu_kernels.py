"""Milliseconds per student step of the default preset's loop (a batch from the pool,
mixup, the teacher's labels, the student's forward/backward and SGD step), and per step of
the pool's inversion, with torch's stock LeNet layers against dafl.cpu_kernels' MaxPool2x2 /
SingleChannelConv2d, which `dafl.models` uses. Both variants are timed in the same process,
alternating, so a noisy machine slows both alike; the median over repetitions is reported.

    python benchmarks/cpu_kernels.py --threads 2 --out benchmarks/cpu_kernels.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dafl.cpu_kernels import MaxPool2x2, SingleChannelConv2d  # noqa: E402
from dafl.losses import kd_loss  # noqa: E402
from dafl.models import build_model  # noqa: E402


def with_stock_layers(model: nn.Module) -> nn.Module:
    """The same network with torch's nn.MaxPool2d / nn.Conv2d in place of dafl's layers."""
    for i, layer in enumerate(model.features):
        if isinstance(layer, MaxPool2x2):
            model.features[i] = nn.MaxPool2d(2)
        elif isinstance(layer, SingleChannelConv2d):
            stock = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size)
            stock.load_state_dict(layer.state_dict())
            model.features[i] = stock
    return model


def kd_step_timer(teacher: nn.Module, student: nn.Module, batch: int):
    pool = torch.rand(8192, 1, 32, 32)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def kd_step():
        x = pool[torch.randint(0, len(pool), (batch,))]
        lam = torch.distributions.Beta(1.0, 1.0).sample((batch, 1, 1, 1))
        x = lam * x + (1 - lam) * x.flip(0)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = kd_loss(student(x), teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def teacher_labels():
        with torch.no_grad():
            teacher(pool[:batch])

    def student_forward_backward():
        student(pool[:batch]).logsumexp(1).mean().backward()

    targets = torch.arange(512) % 10

    def inversion_step():  # building the pool: gradients into 512 images through the teacher
        images = pool[:512].clone().requires_grad_()
        F.cross_entropy(teacher(images), targets).backward()

    return {"KD step (all of it)": kd_step, "teacher labels (no grad)": teacher_labels,
            "student forward + backward": student_forward_backward,
            "inversion step (teacher forward + backward into 512 images)": inversion_step}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default="", help="also write the markdown table here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    variants = {}
    for name, convert in (("torch layers", with_stock_layers), ("dafl layers", lambda m: m)):
        teacher = convert(build_model("lenet5_bn")).eval().requires_grad_(False)
        variants[name] = kd_step_timer(teacher, convert(build_model("lenet5_half")), a.batch)
    parts = list(variants["dafl layers"])
    times = {(v, part): [] for v in variants for part in parts}
    for _ in range(a.reps):
        for part in parts:
            for v in variants:  # alternate, so drift in the machine's speed hits both
                fn = variants[v][part]
                for _ in range(3):
                    fn()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    fn()
                times[(v, part)].append((time.perf_counter() - t0) / a.steps * 1000)
    lines = [f"Machine: {platform.machine()}, {a.threads} torch threads ({torch.get_num_threads()} used), "
             f"torch {torch.__version__}; batch {a.batch}; median (min-max) of {a.reps} repetitions of {a.steps} steps.",
             f"Command: `python benchmarks/cpu_kernels.py --threads {a.threads} --batch {a.batch} --steps {a.steps} --reps {a.reps}`",
             "", "| part of the step | torch layers (ms) | dafl layers (ms) | speed-up |", "|---|---|---|---|"]
    for part in parts:
        cells = []
        for v in variants:
            t = times[(v, part)]
            cells.append(f"{statistics.median(t):.1f} ({min(t):.1f}-{max(t):.1f})")
        ratio = statistics.median(times[("torch layers", part)]) / statistics.median(times[("dafl layers", part)])
        lines.append(f"| {part} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
