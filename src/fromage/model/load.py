"""One loader for every form a trained FROMAGe model takes on disk.

``load_model(path)`` recognises:

- the paper's release directory (``model_args.json`` + ``pretrained_ckpt.pth.tar``);
- a ``save_pretrained`` directory (``fromage.json`` + ``model.safetensors``);
- a run directory (``runs/NAME``): its last checkpoint, else its ``pretrained/``;
- a Lightning checkpoint (``*.ckpt``: a file, or DeepSpeed's directory), which names its
  model config itself.

Every pickle is read with ``weights_only=True``; nothing but tensors and plain
containers is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from fromage.config import ModelConfig, model_config
from fromage.model.fromage import FromageModel
from fromage.model.pretrained import (
    CONFIG_FILE,
    DEEPSPEED_MODEL_STATES,
    WEIGHTS_FILE,
    load_pretrained,
    read_checkpoint,
    read_model_config,
)
from fromage.model.released import (
    ARGS_FILE,
    CHECKPOINT_FILE,
    load_released,
    released_model_config,
    released_state_dict,
)
from fromage.paths import RunPaths


def locate(path: str | Path) -> tuple[str, Path]:
    """Which form of trained model ``path`` is: ``release``, ``saved`` or ``checkpoint``,
    and the directory or file to read it from."""
    path = Path(path)
    if (path / ARGS_FILE).is_file():
        return "release", path
    if (path / CONFIG_FILE).is_file():
        return "saved", path
    if path.is_file() or (path / DEEPSPEED_MODEL_STATES).is_file():
        return "checkpoint", path
    run = RunPaths(path)
    if run.last_checkpoint.exists():
        return "checkpoint", run.last_checkpoint
    if (run.pretrained / CONFIG_FILE).is_file():
        return "saved", run.pretrained
    raise FileNotFoundError(
        f"{path} is not a fromage model: expected a release directory ({ARGS_FILE}), "
        f"a saved model ({CONFIG_FILE}), a run directory (checkpoints/last.ckpt or "
        "pretrained/) or a Lightning .ckpt file"
    )


def load_model(path: str | Path, overrides: Sequence[str] = ()) -> FromageModel:
    """The trained model at ``path`` in eval mode; ``overrides`` are dotted ``key=value``
    changes to its model config (e.g. ``lm.name=/models/opt-6.7b``, ``dtype=float32``)."""
    kind, where = locate(path)
    overrides = list(overrides)
    if kind == "release":
        return load_released(where, overrides).eval()
    if kind == "saved":
        return load_pretrained(where, overrides).eval()
    return load_lightning_checkpoint(where, overrides).eval()


def trained_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and trainable weights at ``path`` (any form ``locate`` knows),
    without building the model: what a warm start loads into a model of its own."""
    kind, where = locate(path)
    if kind == "release":
        args = json.loads((where / ARGS_FILE).read_text())
        return released_model_config(args), released_state_dict(where / CHECKPOINT_FILE)
    if kind == "saved":
        return read_model_config(where), load_file(where / WEIGHTS_FILE)
    checkpoint = read_checkpoint(where)
    return _checkpoint_model_config(checkpoint, where), trainable_weights(checkpoint)


def load_lightning_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> FromageModel:
    """Rebuild the model named in a training checkpoint and load its trained weights."""
    checkpoint = read_checkpoint(path)
    config = _checkpoint_model_config(checkpoint, path, overrides)
    model = FromageModel.from_config(config)
    model.load_trainable_state_dict(trainable_weights(checkpoint), source=str(path))
    return model


def _checkpoint_model_config(checkpoint: dict, path, overrides: Sequence[str] = ()) -> ModelConfig:
    saved = checkpoint.get("hyper_parameters", {}).get("config", {}).get("model")
    if saved is None:
        raise ValueError(f"{path} is not a fromage training checkpoint (no model config in it)")
    return model_config(saved, list(overrides), source=str(path))


def trainable_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """A training checkpoint's weights under FromageModel's names (without ``model.``)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
