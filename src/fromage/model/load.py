"""One loader for every form a trained FROMAGe model takes on disk.

``load_model(path)`` recognises:

- the paper's release directory (``model_args.json`` + ``pretrained_ckpt.pth.tar``);
- a ``save_pretrained`` directory (``fromage.json`` + ``model.safetensors``);
- a run directory (``runs/NAME``): its last checkpoint, else its ``pretrained/``;
- a Lightning checkpoint file (``*.ckpt``), which names its model config itself.

Every pickle is read with ``weights_only=True``; nothing but tensors and plain
containers is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fromage.config import model_config
from fromage.model.fromage import FromageModel
from fromage.model.pretrained import CONFIG_FILE, load_pretrained, read_checkpoint
from fromage.model.released import ARGS_FILE, load_released
from fromage.paths import RunPaths


def load_model(path: str | Path, overrides: Sequence[str] = ()) -> FromageModel:
    """The trained model at ``path`` in eval mode; ``overrides`` are dotted ``key=value``
    changes to its model config (e.g. ``lm.name=/models/opt-6.7b``, ``dtype=float32``)."""
    path = Path(path)
    overrides = list(overrides)
    if (path / ARGS_FILE).is_file():
        model = load_released(path, overrides)
    elif (path / CONFIG_FILE).is_file():
        model = load_pretrained(path, overrides)
    elif path.is_file():
        model = load_lightning_checkpoint(path, overrides)
    elif RunPaths(path).is_run():
        run = RunPaths(path)
        if run.last_checkpoint.exists():
            model = load_lightning_checkpoint(run.last_checkpoint, overrides)
        else:
            model = load_pretrained(run.pretrained, overrides)
    else:
        raise FileNotFoundError(
            f"{path} is not a fromage model: expected a release directory ({ARGS_FILE}), "
            f"a saved model ({CONFIG_FILE}), a run directory (checkpoints/last.ckpt or "
            "pretrained/) or a Lightning .ckpt file"
        )
    return model.eval()


def load_lightning_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> FromageModel:
    """Rebuild the model named in a training checkpoint and load its trained weights."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("hyper_parameters", {}).get("config", {}).get("model")
    if saved is None:
        raise ValueError(f"{path} is not a fromage training checkpoint (no model config in it)")
    model = FromageModel.from_config(model_config(saved, list(overrides), source=str(path)))
    model.load_trainable_state_dict(trainable_weights(checkpoint), source=str(path))
    return model


def trainable_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """A training checkpoint's weights under FromageModel's names (without ``model.``)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
