"""The global batch rule: ``data.batch_size`` pairs per optimizer step, however many
processes share it.

Each optimizer step sees ``data.batch_size`` pairs in all: ``accumulate`` micro-batches
of ``batch_size / accumulate`` pairs each, split over the processes as evenly as it goes
(some may hold one pair more). The contrastive loss ranks each micro-batch across all
processes, and the caption losses average over all their tokens, so the step is the
one a single process with the whole micro-batch would take, whatever the split.
``data.per_device_batch_size`` caps what one device holds at once (more accumulation),
or, without ``data.batch_size``, fixes it (then the global batch is derived).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


class BatchSizeError(ValueError):
    """A batch request that the processes cannot meet exactly; says what would."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # pairs per optimizer step, all processes and micro-batches
    processes: int
    accumulate: int  # micro-batches per optimizer step

    @property
    def micro_batch(self) -> int:
        """Pairs per micro-batch over all processes: what the contrastive loss ranks."""
        return self.global_batch // self.accumulate

    def per_process(self, rank: int) -> int:
        """Pairs process ``rank`` takes per micro-batch: the first ``micro_batch % W``
        processes take one more."""
        share, extra = divmod(self.micro_batch, self.processes)
        return share + (rank < extra)

    @property
    def largest_per_process(self) -> int:
        return self.per_process(0)

    def describe(self) -> str:
        sizes = sorted({self.per_process(r) for r in range(self.processes)}, reverse=True)
        per = " or ".join(str(s) for s in sizes)
        return (
            f"global batch {self.global_batch} = {self.accumulate} accumulated micro-batch(es) "
            f"of {self.micro_batch} over {self.processes} process(es): {per} pairs per process"
        )


def plan_batches(
    batch_size: int | None,
    per_device_batch_size: int | None,
    processes: int,
    accumulate: int = 1,
) -> BatchPlan:
    """The plan for ``processes`` data-parallel processes, or ``BatchSizeError`` naming
    settings that would work.

    ``batch_size`` is the global batch; ``per_device_batch_size`` the most a device
    holds at once (with ``batch_size``) or exactly what it holds (without);
    ``accumulate`` (``trainer.accumulate_grad_batches``) the fewest micro-batches.
    """
    if batch_size is None:
        if per_device_batch_size is None:
            raise BatchSizeError("set data.batch_size (global) or data.per_device_batch_size")
        return BatchPlan(per_device_batch_size * processes * accumulate, processes, accumulate)
    plan = _fewest_micro_batches(batch_size, per_device_batch_size, processes, accumulate)
    if plan is None:
        raise BatchSizeError(
            _what_would_work(batch_size, per_device_batch_size, processes, accumulate)
        )
    return plan


def _fewest_micro_batches(
    batch: int, cap: int | None, processes: int, accumulate: int
) -> BatchPlan | None:
    """The plan with the fewest equal micro-batches (at least ``accumulate``) in which
    no process holds more than ``cap`` pairs and none holds none."""
    for steps in range(accumulate, batch // processes + 1):
        if batch % steps == 0 and math.ceil(batch / steps / processes) <= (cap or batch):
            return BatchPlan(batch, processes, steps)
    return None


def _what_would_work(batch: int, cap: int | None, processes: int, accumulate: int) -> str:
    held = f", at most {cap} per device" if cap else ""
    fits = _fewest_micro_batches
    smaller = [b for b in range(batch - 1, 0, -1) if fits(b, cap, processes, accumulate)][:1]
    larger = next(b for b in itertools.count(batch + 1) if fits(b, cap, processes, accumulate))
    fewer = [p for p in range(processes - 1, 0, -1) if fits(batch, cap, p, accumulate)][:1]
    options = [f"data.batch_size={b}" for b in [*smaller, larger]]
    options += [f"{p} processes" for p in fewer]
    return (
        f"data.batch_size={batch} cannot be split into equal micro-batches (at least "
        f"{accumulate}, from trainer.accumulate_grad_batches) over {processes} processes{held}, "
        f"each process holding at least one pair; would work: {' or '.join(options)}"
    )


def device_processes(accelerator: str, devices, num_nodes: int) -> int:
    """Processes a Trainer with these arguments starts (one per device): checked against
    the Trainer's own world size once it is built."""
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, str) and "," in devices:
        per_node = len([d for d in devices.split(",") if d.strip()])
    elif str(devices) not in ("-1", "auto"):
        per_node = int(devices)
    else:
        gpu = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        )
        per_node = torch.cuda.device_count() if gpu else 1
    return per_node * num_nodes
