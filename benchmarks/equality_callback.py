"""A callback for comparing two versions of the code (benchmarks/README.md, "The refactor
changed no result"): optionally re-seed the global random stream at the first epoch's
start, and after epoch 1 save the student's weights and the inverted pool to $EQ_OUT.
Written to work with the module before image sources (b6dfca0) and after.

    EQ_OUT=new.pt PYTHONPATH=benchmarks python -m dafl fit --config CONFIG --trainer.max_epochs 1 \\
        --run_dir DIR --trainer.callbacks+=equality_callback.Reseed [--trainer.callbacks.reseed false]
"""
import os

import lightning as L
import torch


def student_and_pool(module) -> dict:
    student = getattr(module.student, "net", module.student)  # before image sources: module.student.net
    pool = getattr(module, "procedural_pool", None)
    source = getattr(module, "source", None)
    if pool is None and source is not None:
        pool = getattr(source, "pool", None)
        if pool is None and hasattr(source, "extra"):
            pool = getattr(source.extra, "pool", None)
    return {"pool": pool, "student": {k: v.clone() for k, v in student.state_dict().items()}}


class Reseed(L.Callback):
    def __init__(self, reseed: bool = True):
        self.reseed = reseed

    def on_train_epoch_start(self, trainer, module):
        if self.reseed and trainer.current_epoch == 0:
            torch.manual_seed(1)

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 0:
            torch.save(student_and_pool(module), os.environ["EQ_OUT"])
