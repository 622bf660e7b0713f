"""Plain progress lines for logs that are not a terminal.

Lightning's progress bar only draws on a TTY, so a SLURM log file (or ``make demo > log``)
shows nothing between the model summary and the end of a run. ``PlainProgress`` prints one
line every ``trainer.log_every_n_steps`` optimizer steps and one after every validation,
on global rank 0, flushed at once so that ``tail -f`` follows the run.
"""

from __future__ import annotations

import time
from datetime import timedelta

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

TRAIN_KEYS = ("loss", "caption_ce", "retrieval_ce", "contrastive")  # logged as train/KEY


class PlainProgress(L.Callback):
    """``step 150/20000 | loss 3.412 ... | 312.5 samples/s | elapsed 0:08:12 | remaining ...``

    samples/s counts every rank's samples (local batch x world size) over the wall clock
    since the previous line, validation time left out; the remaining time extrapolates the
    average time per step of this run (validations included) to ``max_steps``.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._interval_start = time.perf_counter()
        self._start_step = self._printed_step = trainer.global_step
        self._samples = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._samples += len(batch) * trainer.world_size
        step = trainer.global_step
        due = step % trainer.log_every_n_steps == 0 or step == trainer.max_steps
        if step == self._printed_step or not due:
            return  # accumulating gradients, or between lines
        now = time.perf_counter()
        if trainer.is_global_zero:
            print(self._train_line(trainer, now), flush=True)
        self._printed_step, self._interval_start, self._samples = step, now, 0

    def _train_line(self, trainer: L.Trainer, now: float) -> str:
        step, total = trainer.global_step, trainer.max_steps
        metrics = trainer.callback_metrics
        losses = " ".join(
            f"{key} {float(metrics[f'train/{key}']):.4g}"
            for key in TRAIN_KEYS
            if f"train/{key}" in metrics
        )
        elapsed = now - self._start
        parts = [
            f"step {step}/{total}" if total > 0 else f"step {step}",
            losses,
            f"{self._samples / (now - self._interval_start):.1f} samples/s",
            f"elapsed {_clock(elapsed)}",
        ]
        if total > 0:
            per_step = elapsed / (step - self._start_step)
            parts.append(f"remaining {_clock(per_step * (total - step))}")
        return " | ".join(p for p in parts if p)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:  # keep validation time out of samples/s
            self._interval_start += time.perf_counter() - self._validation_start
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if trainer.is_global_zero and values:
            line = " ".join(f"{k} {v:.4g}" for k, v in sorted(values.items()))
            print(f"validation at step {trainer.global_step} | {line}", flush=True)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
