"""Read the scalars a training run logged (TensorBoard event files), for plots in notebooks."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` over every logger version of the run, sorted by
    step; a resumed run's later version wins where steps repeat."""
    versions = sorted(Path(run).glob("tensorboard/version_*"), key=_version_number)
    if not versions:
        raise FileNotFoundError(f"no TensorBoard logs under {run}/tensorboard: train first")
    scalars: dict[str, dict[int, float]] = {}
    for version in versions:
        events = EventAccumulator(str(version), size_guidance={"scalars": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def _version_number(path: Path) -> int:
    return int(path.name.removeprefix("version_"))
