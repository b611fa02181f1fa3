"""Crash and resume, determinism, divergence, multi-process entropy."""
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from conftest import quiet_trainer
from dafl.callbacks import IntervalCheckpoint
from dafl.data import DataFreeDataModule
from dafl.losses import information_entropy_loss
from lightning_modules.generator import GeneratorSource
from lightning_modules.student import StudentDistillation


def _small_fit_args(teacher, run_dir, epochs):
    return ["fit", "--model.teacher", str(teacher), "--data.eval_dataset", "digits", "--model.batch_size", "32",
            "--model.val_size", "32", "--model.source.pool_size", "64",
            "--data.iterations_per_epoch", "40",
            "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
            "--checkpoint_minutes", "0.02", "--run_dir", str(run_dir)]


@pytest.mark.slow  # about 3 minutes; test_run_safety.py stops and resumes a run with SIGTERM in the fast suite
def test_sigkill_mid_epoch_then_resume_finishes(digits_teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = _small_fit_args(digits_teacher[0], run_dir, epochs=6)
    proc = subprocess.Popen([sys.executable, "-m", "dafl", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and (run_dir / "metrics.csv").exists()):
        time.sleep(0.5)
    time.sleep(2.0)  # let a few interval checkpoints happen, then kill mid-training
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    ckpt = torch.load(last, weights_only=True)  # never corrupt: written atomically
    killed_at = ckpt["epoch"], ckpt["global_step"]
    resumed = subprocess.run([sys.executable, "-m", "dafl", *args, "--ckpt_path", "last"], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "summary.json").exists() and "Test accuracy" in resumed.stdout
    final = torch.load(last, weights_only=True)
    # All 6 epochs done (the last save is taken in the final epoch), beyond the killed point.
    assert final["epoch"] == 5 and final["global_step"] > killed_at[1], (killed_at, final["epoch"])


def test_interval_checkpoint_is_a_full_checkpoint_saved_without_lightnings_default_notice(digits_teacher, tmp_path,
                                                                                          caplog):
    model = StudentDistillation(teacher=str(digits_teacher[0]), student_steps=2, batch_size=32, val_size=32,
                                source=GeneratorSource(latent_dim=16, width=16, joint_step=False, replay_size=256))
    path = tmp_path / "last.ckpt"
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[IntervalCheckpoint(str(path), minutes=0)])
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=3))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] > 0 and ckpt["optimizer_states"]  # a resume needs the optimizers too
    assert not [r for r in caplog.records if "weights_only" in r.getMessage()]


def _train_briefly(teacher, seed):
    L.seed_everything(seed, verbose=False)
    source = GeneratorSource(latent_dim=16, width=16, joint_step=False, replay_size=256, bn_stat_weight=1.0)
    model = StudentDistillation(teacher=str(teacher), source=source, student_steps=2, batch_size=32, val_size=32)
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataFreeDataModule(None, iterations_per_epoch=5))
    return model.student.state_dict()


def test_same_seed_gives_bitwise_identical_student(digits_teacher):
    a, b = _train_briefly(digits_teacher[0], 3), _train_briefly(digits_teacher[0], 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _train_briefly(digits_teacher[0], 4)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _entropy_worker(rank, world, logits, port, results):
    import torch.distributed as dist

    from dafl.distributed import gather_with_grad

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    local = logits.chunk(world)[rank].clone().requires_grad_(True)
    loss = information_entropy_loss(gather_with_grad(local))
    loss.backward()
    results[rank] = (loss.item(), local.grad.clone())
    dist.destroy_process_group()


def test_entropy_loss_on_two_processes_equals_single_process():
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    full = logits.clone().requires_grad_(True)
    expected = information_entropy_loss(full)
    expected.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_entropy_worker, args=(2, logits, port, results), nprocs=2, join=True)
    for rank in range(2):
        value, grad = results[rank]
        assert value == pytest.approx(expected.item(), rel=1e-6)
        # all_gather's backward sums the gradients of the same loss computed on both processes
        # (x world size); DDP's averaging of parameter gradients divides that back out.
        torch.testing.assert_close(grad, 2 * full.grad.chunk(2)[rank], rtol=1e-5, atol=1e-7)
