"""A callback that SIGKILLs its own process after a given optimizer step: a preemption at a known step.

Used by tests/test_resume_exact.py through the config (`+callbacks.kill._target_=tests.resume_kill.KillAtStep`),
also in `python train.py` subprocesses, where every DDP rank kills itself at the same step.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL (no cleanup, no checkpoint, nothing flushed) once `step` optimizer steps have run."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
