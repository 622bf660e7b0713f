"""Train a tiny configured model in this process, and SIGKILL it at a chosen point.

    python tests/interrupted_training.py MODE STEP [overrides...]

MODE ``none`` trains to the end; ``after_step`` dies right after optimizer step STEP;
``during_save`` dies halfway through writing the first checkpoint after step STEP;
``signal`` sends itself SLURM's pre-emption signal (SIGUSR1) right after step STEP.
Used by test_reliability.py and test_training.py: a kill leaves no cleanup code a chance
to run.
"""

import os
import signal
import sys

import fsspec.implementations.local

from fromage.config import compose
from fromage.train.module import FromageLitModule
from fromage.train.run import train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mode, step, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    state = {"step": 0}
    optimizer_step = FromageLitModule.optimizer_step

    def counting_step(self, *args, **kwargs):
        optimizer_step(self, *args, **kwargs)
        state["step"] += 1
        if mode == "after_step" and state["step"] == step:
            die()
        if mode == "signal" and state["step"] == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    FromageLitModule.optimizer_step = counting_step
    write = fsspec.implementations.local.LocalFileOpener.write

    def half_write(self, data):
        if mode == "during_save" and state["step"] >= step:
            write(self, data[: len(data) // 2])
            self.flush()
            die()
        return write(self, data)

    fsspec.implementations.local.LocalFileOpener.write = half_write
    train(compose("demo", overrides))


if __name__ == "__main__":
    main()
