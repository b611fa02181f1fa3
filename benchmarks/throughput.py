"""Images per second of one full data-free training step (generator forward/backward,
teacher forward/backward into the generator, student forward/backward, both optimizer
steps): the project's Lightning loop, with each speed setting, against a plain PyTorch loop
written like the published DAFL code (fp32, the teacher left with requires_grad, as there),
in one run, as a ratio. Every variant runs in its own process (clean peak memory, no shared
compile caches); the median of several repetitions is reported.

    python benchmarks/throughput.py --recipe mnist --device cpu          # table to stdout
    python benchmarks/throughput.py --recipe both --device cuda --out benchmarks/throughput_gpu.md
    python benchmarks/throughput.py --scaling --device cpu               # batch size / width sweep

The method never changes: settings only change precision, memory layout, kernels and
synchronisation. `--check_accuracy STEPS` trains the MNIST recipe on the shipped
Fashion-MNIST teacher for STEPS steps in fp32 and with the fastest settings, and reports
the students' test accuracy side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPES = {
    # the paper's settings
    "mnist": dict(teacher="lenet5", student="lenet5_half", channels=1, batch=512, latent=100, width=128,
                  g_lr=0.2, s_opt=("Adam", dict(lr=2e-3)), oh=1.0, ie=5.0, a=0.1),
    "cifar": dict(teacher="resnet34", student="resnet18", channels=3, batch=256, latent=1000, width=128,
                  g_lr=0.02, s_opt=("SGD", dict(lr=0.1, momentum=0.9, weight_decay=5e-4)), oh=0.05, ie=5.0, a=0.01),
}
VARIANTS = {
    "plain PyTorch (published code)": {},
    "dafl (fp32)": {},
    "dafl + channels_last": {"channels_last": True},
    "dafl + bf16": {"precision": "bf16-mixed"},
    "dafl + fused optimizers": {"fused": True},
    "dafl + compile": {"compile": True},
    "dafl + all of the above": {"channels_last": True, "precision": "bf16-mixed", "fused": True, "compile": True},
}


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _teacher_file(recipe: dict, folder: Path) -> Path:
    from dafl.models import build_model
    from dafl.weights import save_classifier

    torch.manual_seed(0)
    net = build_model(recipe["teacher"], in_channels=recipe["channels"], num_classes=10, image_size=32)
    path = folder / f"{recipe['teacher']}.safetensors"
    save_classifier(path, net, {"arch": recipe["teacher"], "num_classes": 10, "in_channels": recipe["channels"],
                                "image_size": 32})
    return path


def plain_loop(recipe: dict, device: str, warmup: int, steps: int, reps: int) -> list[float]:
    """The published step: teacher in eval mode but not frozen (its gradients are computed
    and thrown away), one combined backward, both optimizers step."""
    from dafl.models import build_model

    torch.manual_seed(0)
    generator = build_model("generator", latent_dim=recipe["latent"], image_size=32, channels=recipe["channels"],
                            width=recipe["width"]).to(device)
    teacher = build_model(recipe["teacher"], in_channels=recipe["channels"], num_classes=10).to(device).eval()
    student = build_model(recipe["student"], in_channels=recipe["channels"], num_classes=10).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=recipe["g_lr"])
    name, kwargs = recipe["s_opt"]
    opt_s = getattr(torch.optim, name)(student.parameters(), **kwargs)
    batch = recipe["batch"]

    def step():
        opt_s.zero_grad()
        opt_g.zero_grad()
        z = torch.randn(batch, recipe["latent"], device=device)
        images = generator(z)
        logits, features = teacher(images, return_features=True)
        loss_one_hot = F.cross_entropy(logits, logits.data.max(1)[1])
        loss_activation = -features.abs().mean()
        mean_softmax = F.softmax(logits, dim=1).mean(dim=0)
        loss_entropy = (mean_softmax * torch.log10(mean_softmax)).sum()
        loss = recipe["oh"] * loss_one_hot + recipe["ie"] * loss_entropy + recipe["a"] * loss_activation
        loss_kd = F.kl_div(F.log_softmax(student(images.detach()), dim=1), F.softmax(logits.detach(), dim=1),
                           reduction="batchmean")
        (loss + loss_kd).backward()
        opt_g.step()
        opt_s.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(batch * steps / (time.perf_counter() - start))
    return rates


def lightning_loop(recipe: dict, settings: dict, device: str, warmup: int, steps: int, reps: int) -> list[float]:
    """`python -m dafl fit`'s module and Trainer on the same recipe, timed in blocks of
    `steps` iterations after `warmup` (compilation and first-step costs excluded)."""
    from dafl.data import DataFreeDataModule
    from lightning_modules.generator import GeneratorSource
    from lightning_modules.student import StudentDistillation

    fused = {"fused": True} if settings.get("fused") else {}
    name, kwargs = recipe["s_opt"]
    with tempfile.TemporaryDirectory() as folder:
        teacher = _teacher_file(recipe, Path(folder))
        L.seed_everything(0, verbose=False)
        source = GeneratorSource(latent_dim=recipe["latent"], width=recipe["width"], joint_step=True,
                                 one_hot_weight=recipe["oh"], activation_weight=recipe["a"],
                                 entropy_weight=recipe["ie"],
                                 optimizer=lambda p: torch.optim.Adam(p, lr=recipe["g_lr"], **fused))
        model = StudentDistillation(
            teacher=str(teacher), source=source, student_arch=recipe["student"], batch_size=recipe["batch"],
            student_steps=1, mixup_alpha=0.0, cutmix_prob=0.0, student_lr_schedule="constant", student_lr_warmup=0,
            student_optimizer=lambda p: getattr(torch.optim, name)(p, **kwargs, **fused),
            val_size=8, channels_last=settings.get("channels_last", False), compile=settings.get("compile", False),
            finite_check_every=steps)
        timer = BlockTimer(device, warmup, steps, recipe["batch"])
        trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=1,
                            precision=settings.get("precision", "32-true"), logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[timer])
        trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=warmup + steps * reps + 1))
    return timer.rates


class BlockTimer(L.Callback):
    """images/s over each block of `steps` training steps after `warmup` steps."""

    def __init__(self, device: str, warmup: int, steps: int, batch: int):
        self.device, self.warmup, self.steps, self.batch = device, warmup, steps, batch
        self.rates, self._start = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx >= self.warmup and (batch_idx - self.warmup) % self.steps == 0:
            _sync(self.device)
            now = time.perf_counter()
            if self._start is not None:
                self.rates.append(self.batch * self.steps / (now - self._start))
            self._start = now


def run_one(args) -> dict:
    """One variant in this process; prints a JSON line."""
    recipe = {**RECIPES[args.recipe], **({"batch": args.batch} if args.batch else {}),
              **({"width": args.width} if args.width else {})}
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.variant.startswith("plain"):
        rates = plain_loop(recipe, args.device, args.warmup, args.steps, args.reps)
    else:
        rates = lightning_loop(recipe, VARIANTS[args.variant], args.device, args.warmup, args.steps, args.reps)
    return {"variant": args.variant, "recipe": args.recipe, "batch": recipe["batch"], "width": recipe["width"],
            "median": statistics.median(rates), "rates": rates, "peak_mb": _peak_memory_mb(args.device)}


def _spawn(args, variant: str, **overrides) -> dict:
    command = [sys.executable, __file__, "--_one", "--variant", variant, "--recipe", overrides.get("recipe", args.recipe),
               "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps), "--reps", str(args.reps)]
    for key in ("batch", "width", "threads"):
        value = overrides.get(key, getattr(args, key))
        if value:
            command += [f"--{key}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        return {"variant": variant, "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores, {platform.machine()})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["mnist", "cifar", "both"], default="mnist")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    parser.add_argument("--batch", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--width", type=int, default=None, help="override the generator width")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions; the median is reported")
    parser.add_argument("--scaling", action="store_true", help="images/s against batch size and generator width")
    parser.add_argument("--check_accuracy", type=int, default=0, metavar="STEPS")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(run_one(args)))
        return
    lines = [f"Device: {_device_name(args.device)}; torch {torch.__version__}. Median of {args.reps} repetitions of "
             f"{args.steps} steps after {args.warmup} warm-up steps; each variant in its own process.",
             f"Command: `python {' '.join(sys.argv)}`", ""]
    if args.check_accuracy:
        lines += check_accuracy(args)
    elif args.scaling:
        lines += scaling(args)
    else:
        recipes = ["mnist", "cifar"] if args.recipe == "both" else [args.recipe]
        names = args.variants.split(",") if args.variants else list(VARIANTS)
        for recipe in recipes:
            batch = args.batch or RECIPES[recipe]["batch"]
            lines += [f"### {recipe} recipe: {RECIPES[recipe]['teacher']} -> {RECIPES[recipe]['student']}, batch {batch}, "
                      f"generator width {args.width or RECIPES[recipe]['width']}", "",
                      "| variant | images/s (median) | min-max | x plain loop | peak memory (MB) |", "|---|---|---|---|---|"]
            results = [_spawn(args, name, recipe=recipe) for name in names]
            plain = next((r["median"] for r in results if r["variant"].startswith("plain") and "median" in r), None)
            for r in results:
                if "error" in r:
                    lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | |")
                    continue
                ratio = f"{r['median'] / plain:.2f}" if plain else "-"
                lines.append(f"| {r['variant']} | {r['median']:.0f} | {min(r['rates']):.0f}-{max(r['rates']):.0f} | "
                             f"{ratio} | {r['peak_mb']:.0f} |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def scaling(args) -> list[str]:
    """images/s of the fastest dafl setting that works here against batch size and width."""
    variant = args.variants or "dafl (fp32)"
    lines = [f"### Scaling ({args.recipe} recipe, variant `{variant}`)", "",
             "| batch | generator width | images/s | peak memory (MB) |", "|---|---|---|---|"]
    for width in (32, 64, 128):
        for batch in (64, 128, 256, 512):
            r = _spawn(args, variant, batch=batch, width=width)
            lines.append(f"| {batch} | {width} | " + (f"{r['median']:.0f} | {r['peak_mb']:.0f} |" if "median" in r
                                                      else f"failed: {r['error'][:60]} | |"))
    return lines + [""]


def check_accuracy(args) -> list[str]:
    """Same seed, same STEPS of the MNIST recipe on the shipped Fashion-MNIST LeNet-5: student
    test accuracy in fp32 and with the fast settings (bf16 changes rounding, not the method)."""
    lines = [f"### Accuracy after {args.check_accuracy} steps (MNIST recipe, shipped fashion_mnist_lenet5 teacher)", "",
             "| settings | student test accuracy |", "|---|---|"]
    for label, extra in (("fp32", []), ("channels_last + bf16 + fused", [
            "--model.channels_last", "true", "--trainer.precision", "bf16-mixed",
            "--model.source.optimizer.init_args.fused", "true", "--model.student_optimizer.init_args.fused", "true"])):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "dafl", "fit", "--config", "configs/fashion_mnist/dafl_official.yaml",
                       "--trainer.max_epochs", "1", "--data.iterations_per_epoch", str(args.check_accuracy),
                       "--run_dir", folder, "--trainer.enable_progress_bar", "false", "--trainer.accelerator",
                       "gpu" if args.device == "cuda" else "cpu", *extra]
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            summary = Path(folder) / "summary.json"
            accuracy = (f"{100 * json.loads(summary.read_text())['test_acc']:.2f}%" if summary.exists()
                        else "failed: " + (result.stderr.strip().splitlines() or ["?"])[-1][:80])
        lines.append(f"| {label} | {accuracy} |")
    return lines + [""]


if __name__ == "__main__":
    main()
