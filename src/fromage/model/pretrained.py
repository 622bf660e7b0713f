"""Save and load a trained FROMAGe model: the trainable weights plus the config of its backbones.

A model directory holds ``model.safetensors`` (only the trained layers and ``[RET]``:
about 11 MB in bf16 for OPT-6.7B + CLIP L/14) and ``fromage.json`` (the ``ModelConfig``
that names the LM and the vision tower, and a signature of both). Loading rebuilds the
frozen backbones from the config, checks them against the signature, and says what
differs, so weights are never silently attached to the wrong LM or tower.

A tower loaded from a local weights file (``vision.checkpoint``, e.g. the demo's
pre-trained stand-in for CLIP) has that file copied into the directory as
``tower.safetensors``, named relative to it, so the directory loads from any working
directory and after it is moved or copied. Directories saved before did name the file
relative to where training ran; loading finds it there (an ancestor of the directory).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from fromage.config import ModelConfig, model_config
from fromage.model.backbones import torch_dtype
from fromage.model.fromage import FromageModel
from fromage.model.quantize import loaded_weight_samples

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "fromage.json"
TOWER_FILE = "tower.safetensors"
FORMAT_VERSION = 1
# Weights change slightly when the same backbone is loaded in another dtype (bf16: 0.4%).
SAMPLE_RTOL = 1e-2


def backbone_signature(model: FromageModel) -> dict:
    """Facts about the frozen LM and tower that the trained layers depend on."""
    text = model.lm.config.get_text_config()
    embeddings = model.lm.get_input_embeddings().weight
    return {
        "lm_architecture": type(model.lm).__name__,
        "lm_layers": text.num_hidden_layers,
        "lm_hidden_size": text.hidden_size,
        "lm_embedding_dim": embeddings.shape[1],
        "lm_tokens_before_ret": model.ret_id,
        "lm_weight_samples": loaded_weight_samples(model.lm),  # before quantization
        "vision_architecture": type(getattr(model.vision, "model", model.vision)).__name__,
        "vision_dim": model.vision.dim,
        "vision_weight_samples": loaded_weight_samples(model.vision),
    }


def signature_differences(saved: dict, loaded: dict) -> list[str]:
    """Human-readable differences between two backbone signatures (empty when they match)."""
    differences = []
    for key in sorted(set(saved) | set(loaded)):
        was, now = saved.get(key), loaded.get(key)
        if key.endswith("samples") and isinstance(was, list) and isinstance(now, list):
            if len(was) != len(now):
                differences.append(f"{key}: {len(was)} weights saved, {len(now)} loaded")
                continue
            n_off = sum(
                not math.isclose(a, b, rel_tol=SAMPLE_RTOL, abs_tol=1e-6)
                for a, b in zip(was, now, strict=True)
            )
            if n_off:
                differences.append(f"{key}: {n_off} of {len(was)} weights have other values")
        elif was != now:
            differences.append(f"{key}: saved {was!r}, loaded {now!r}")
    return differences


def save_pretrained(
    model: FromageModel,
    path: str | Path,
    config: ModelConfig | None = None,
    dtype: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s trainable weights (in ``dtype``, default the backbones' dtype)
    and the config naming its backbones (``model.config`` unless given) to ``path``;
    ``weights`` replaces ``model.trainable_state_dict()`` (a sharded model's, gathered)."""
    config = config or model.config
    if config is None:
        raise ValueError("pass the ModelConfig that names this model's backbones")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), config))
    if config["vision"]["checkpoint"]:  # the tower's weights travel with the model
        tower = Path(config["vision"]["checkpoint"])
        if tower.resolve() != (path / TOWER_FILE).resolve():
            shutil.copyfile(tower, path / TOWER_FILE)
        config["vision"]["checkpoint"] = TOWER_FILE
    dtype = dtype or config["dtype"]
    weights = {
        k: v.detach().to(torch_dtype(dtype)).contiguous()
        for k, v in (weights or model.trainable_state_dict()).items()
    }
    save_file(weights, path / WEIGHTS_FILE, metadata={"format": "fromage"})
    description = {
        "format_version": FORMAT_VERSION,
        "model": config,
        "weights_dtype": dtype,
        "backbones": backbone_signature(model),
    }
    (path / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return path


def read_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """The saved ``ModelConfig``, with dotted ``key=value`` overrides (e.g. ``lm.name=/models/opt``);
    a tower checkpoint named by a relative path becomes the file it names (see
    ``tower_checkpoint``)."""
    path = Path(path)
    saved = _read_description(path)["model"]
    overridden = any(o.startswith("vision.checkpoint=") for o in overrides)
    if saved.get("vision", {}).get("checkpoint") and not overridden:
        saved = {**saved, "vision": {**saved["vision"]}}
        saved["vision"]["checkpoint"] = str(tower_checkpoint(path, saved["vision"]["checkpoint"]))
    return model_config(saved, overrides, source=str(path))


def tower_checkpoint(path: Path, name: str) -> Path:
    """The tower weights file a saved model at ``path`` names: absolute as is; relative,
    in the model directory (saved now), else in its nearest ancestor that has it (older
    saves named it relative to where training ran, e.g. ``runs/NAME/pretrained``'s
    checkout), else in the working directory."""
    if Path(name).is_absolute():
        return Path(name)
    directory = path.resolve()
    for where in [directory, *directory.parents, Path.cwd()]:
        if (where / name).is_file():
            return where / name
    raise FileNotFoundError(
        f"{path}: its tower weights {name} are neither in the model directory, nor in "
        "a directory above it, nor in the working directory; pass "
        "vision.checkpoint=/path/to/weights.safetensors"
    )


def load_pretrained(path: str | Path, overrides: list[str] = ()) -> FromageModel:
    """Rebuild the backbones named in ``path``'s config and load the trained weights.

    Raises ``ValueError`` naming every difference when the backbones loaded now are
    not the ones the weights were trained with.
    """
    path = Path(path)
    description = _read_description(path)
    model = FromageModel.from_config(read_model_config(path, overrides))
    differences = signature_differences(description["backbones"], backbone_signature(model))
    if differences:
        raise ValueError(
            f"the backbones loaded for {path} differ from the ones its weights were trained "
            "with: " + "; ".join(differences)
        )
    model.load_trainable_state_dict(load_file(path / WEIGHTS_FILE), source=str(path))
    return model


def _read_description(path: Path) -> dict:
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a fromage model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    description = json.loads(config_file.read_text())
    if description.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_file}: format_version {description.get('format_version')!r}, "
            f"this fromage reads {FORMAT_VERSION}"
        )
    return description


# where DeepSpeed keeps a Lightning checkpoint's module weights and client state
DEEPSPEED_MODEL_STATES = Path("checkpoint") / "mp_rank_00_model_states.pt"


def read_checkpoint(path: str | Path, fix: str = "give another checkpoint") -> dict:
    """A torch checkpoint's contents, unpickling tensors and plain containers only; a
    file cut short or holding other objects is refused naming it and ``fix``.

    A directory is a DeepSpeed checkpoint (``last.ckpt/``): its model-states file holds
    Lightning's client state and, under ``module``, the weights it saved."""
    path = Path(path)
    try:
        if path.is_dir():
            checkpoint = torch.load(path / DEEPSPEED_MODEL_STATES, "cpu", weights_only=True)
            return {**checkpoint, "state_dict": checkpoint["module"]}
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run the file's code
        raise ValueError(
            f"{path} is not a checkpoint of this project: it holds objects other than "
            f"tensors and plain containers, which are never unpickled; {fix}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} is cut short or damaged ({first_line}); {fix}") from None
