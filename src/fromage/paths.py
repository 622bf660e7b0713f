"""Where a training run keeps its files: one place that names them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """``runs/NAME/``: checkpoints, TensorBoard logs, the exported model and the report."""

    root: Path

    @classmethod
    def of(cls, config) -> RunPaths:
        """The run directory of an experiment config (``output_dir/name``)."""
        return cls(Path(config.output_dir) / config.name)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def pretrained(self) -> Path:
        """The final model in the ``from_pretrained`` format."""
        return self.root / "pretrained"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def report(self, runtime: Sequence[str] = ()) -> Path:
        """``report.md`` (``report.json`` beside it); the report of the model run another
        way (``runtime`` overrides such as ``lm.quantize=int8``) goes beside it, as
        ``report[lm.quantize=int8].md``, so it never replaces the plain one."""
        return self.root / (f"report[{','.join(runtime)}].md" if runtime else "report.md")

    def is_run(self) -> bool:
        return self.last_checkpoint.exists() or self.pretrained.is_dir()
