"""Pre-emption: SLURM's warning signal ends the run at a step boundary, resumably.

Lightning's own SLURM handler writes its checkpoint inside the signal handler, at
whatever point of a step the signal lands, and each rank at its own point. Here the
signal only raises a flag; after the next optimizer step every rank learns whether any
of them was signalled (one all-reduce), all write ``last.ckpt`` at that same step,
rank 0 requeues the job, and training stops. The resumed run then continues exactly
where an uninterrupted one would be (the data stream included).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)


class RequeueOnSignal(L.Callback):
    """On ``signum`` (SLURM's ``--signal=USR1@SECONDS``), checkpoint to ``checkpoint``
    after the current optimizer step, requeue the SLURM job and stop; ``preempted`` says
    so afterwards (the run is not finished: nothing is exported)."""

    def __init__(self, checkpoint: Path, signum: int = signal.SIGUSR1):
        self.checkpoint = checkpoint
        self.signum = signum
        self.signalled = False
        self.preempted = False
        self._previous = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the Trainer registers its signal handlers: Lightning then leaves this one
        if threading.current_thread() is threading.main_thread():  # only there, says Python
            self._previous = signal.signal(self.signum, self._note)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)

    def _note(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing after this step", signum)
        self.signalled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # between the micro-batches of a step
        flag = torch.tensor(float(self.signalled), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")  # every rank decides alike
        if not flag.item():
            return
        trainer.save_checkpoint(self.checkpoint)
        self.preempted = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            requeue()


def requeue() -> None:
    """Put this SLURM job back in the queue (it resumes from ``last.ckpt``)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if job is None:
        log.warning("not a SLURM job: run the same command again to resume")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
    else:
        rank_zero_info(f"requeued SLURM job {job}")
