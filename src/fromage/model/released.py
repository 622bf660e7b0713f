"""The checkpoint released with the paper: load it, or convert it to ``save_pretrained`` format.

The release is a directory with ``pretrained_ckpt.pth.tar`` (a torch pickle whose
``state_dict`` holds the trained layers, keys possibly prefixed ``module.``) and
``model_args.json`` (which OPT and CLIP, k, the shared width, the ``[RET]`` layers and
id). The pickle is read with ``weights_only=True``: tensors and plain containers only.
Its tokenizer is OPT's with ``<|image|>`` added before ``[RET]``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fromage.config import LanguageModelConfig, ModelConfig, VisionConfig, model_config
from fromage.model.fromage import FromageModel
from fromage.model.pretrained import read_checkpoint

CHECKPOINT_FILE = "pretrained_ckpt.pth.tar"
ARGS_FILE = "model_args.json"
IMAGE_TOKEN = "<|image|>"
RENAMES = {
    "model.logit_scale": "logit_scale",
    "model.visual_embeddings.weight": "image_to_lm.weight",
    "model.visual_embeddings.bias": "image_to_lm.bias",
    "model.visual_fc.weight": "image_to_shared.weight",
    "model.visual_fc.bias": "image_to_shared.bias",
    "ret_input_embeddings.weight": "ret_embedding",
}
TEXT_HIDDEN_FC = re.compile(r"model\.text_hidden_fcs\.(\d+)\.0\.(weight|bias)")


def released_model_config(args: dict, overrides: list[str] = ()) -> ModelConfig:
    """Our ``ModelConfig`` for a release's ``model_args.json`` (backbones in bf16)."""
    base = ModelConfig(
        lm=LanguageModelConfig(name=args["opt_version"], extra_tokens=[IMAGE_TOKEN]),
        vision=VisionConfig(name=args["visual_encoder"], backend="hf"),
        n_visual_tokens=args["n_visual_tokens"],
        shared_dim=args["shared_emb_dim"],
        ret_layers=list(args["text_emb_layers"]),
        input_prompt=args.get("input_prompt") or "",
        dtype="bfloat16",
    )
    return model_config(base, overrides, source=ARGS_FILE)


def released_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The release's trained weights under this project's parameter names."""
    checkpoint = read_checkpoint(path)
    state = {
        k.removeprefix("module."): v for k, v in checkpoint.get("state_dict", checkpoint).items()
    }
    renamed = {}
    for key, value in state.items():
        if key in RENAMES:
            renamed[RENAMES[key]] = value
        elif match := TEXT_HIDDEN_FC.fullmatch(key):
            renamed[f"ret_to_shared.{match[1]}.{match[2]}"] = value
    if "ret_embedding" in renamed:
        renamed["ret_embedding"] = renamed["ret_embedding"].reshape(-1)  # stored as (1, d_emb)
    return renamed


def load_released(directory: str | Path, overrides: list[str] = ()) -> FromageModel:
    """A FromageModel with the release's backbones and trained weights.

    ``overrides`` change the derived config, e.g. ``lm.name=/models/opt-6.7b`` for a local
    copy or ``dtype=float32`` on a CPU.
    """
    directory = Path(directory)
    args = json.loads((directory / ARGS_FILE).read_text())
    model = FromageModel.from_config(released_model_config(args, overrides))
    if model.ret_id != args["retrieval_token_idx"]:
        raise ValueError(
            f"[RET] is token {model.ret_id} with this tokenizer but "
            f"{args['retrieval_token_idx']} in {directory / ARGS_FILE}: another LM's tokenizer?"
        )
    state = released_state_dict(directory / CHECKPOINT_FILE)
    model.load_trainable_state_dict(state, source=str(directory / CHECKPOINT_FILE))
    return model
