import json

import pytest
import torch

from fromage.cli import main
from fromage.infer.scoring import retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.released import CHECKPOINT_FILE, load_released
from tiny import random_pixels, save_tiny_clip, tiny_model_config

PROMPTS = [["a red circle[RET]"], [random_pixels(1)[0], "a blue star at the[RET]"]]


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A checkpoint in the paper's release format, written from a tiny model."""
    root = tmp_path_factory.mktemp("release")
    config = tiny_model_config(root / "lm")
    config.lm.extra_tokens = ["<|image|>"]
    config.vision = save_tiny_clip(root / "clip")
    model = FromageModel.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    state = {
        "model.logit_scale": model.logit_scale.reshape(()),  # 0-dim, as the release stores it
        "model.visual_embeddings.weight": model.image_to_lm.weight,
        "model.visual_embeddings.bias": model.image_to_lm.bias,
        "model.visual_fc.weight": model.image_to_shared.weight,
        "model.visual_fc.bias": model.image_to_shared.bias,
        "model.text_hidden_fcs.0.0.weight": model.ret_to_shared[0].weight,
        "model.text_hidden_fcs.0.0.bias": model.ret_to_shared[0].bias,
        "ret_input_embeddings.weight": model.ret_embedding[None],
        "model.lm.lm_head.weight": torch.zeros(3, 3),  # frozen weights some copies carry
    }
    state = {f"module.{k}": v.detach().clone() for k, v in state.items()}
    directory = root / "fromage_model"
    directory.mkdir()
    torch.save({"epoch": 3, "state_dict": state, "best_acc1": 0.25}, directory / CHECKPOINT_FILE)
    args = {
        "opt_version": config.lm.name,
        "visual_encoder": config.vision.name,
        "n_visual_tokens": 1,
        "shared_emb_dim": 256,
        "text_emb_layers": [-1],
        "retrieval_token_idx": model.ret_id,
        "input_prompt": "A picture of",
    }
    (directory / "model_args.json").write_text(json.dumps(args))
    return directory, model


def test_release_loads_with_the_same_weights_and_outputs(release):
    directory, original = release
    model = load_released(directory, ["dtype=float32"])
    assert model.tokenizer.convert_ids_to_tokens([model.ret_id - 1, model.ret_id]) == [
        "<|image|>",
        "[RET]",
    ]
    for name, value in original.trainable_state_dict().items():
        assert torch.equal(model.trainable_state_dict()[name], value), name
    assert torch.equal(retrieval_queries(model, PROMPTS), retrieval_queries(original, PROMPTS))


def test_converted_release_reloads_identically(release, tmp_path):
    directory, original = release
    assert (
        main(["convert", str(directory), str(tmp_path / "converted"), "-o", "dtype=float32"]) == 0
    )
    model = load_model(tmp_path / "converted")
    assert torch.equal(retrieval_queries(model, PROMPTS), retrieval_queries(original, PROMPTS))


def test_release_for_another_lm_width_is_refused(release, tmp_path):
    directory, _ = release
    checkpoint = torch.load(directory / CHECKPOINT_FILE, weights_only=True)
    state = checkpoint["state_dict"]
    state["module.model.visual_embeddings.weight"] = torch.zeros(48, 24)
    state["module.model.visual_embeddings.bias"] = torch.zeros(48)
    state["module.ret_input_embeddings.weight"] = torch.zeros(1, 48)
    (tmp_path / "model_args.json").write_text((directory / "model_args.json").read_text())
    torch.save(checkpoint, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(
        ValueError, match=r"wrong shape .*image_to_lm.weight', \(48, 24\), \(32, 24\)"
    ):
        load_released(tmp_path, ["dtype=float32"])


def test_release_with_another_ret_id_is_refused(release, tmp_path):
    directory, model = release
    args = json.loads((directory / "model_args.json").read_text())
    args["retrieval_token_idx"] = 50266
    (tmp_path / "model_args.json").write_text(json.dumps(args))
    (tmp_path / CHECKPOINT_FILE).write_bytes((directory / CHECKPOINT_FILE).read_bytes())
    with pytest.raises(ValueError, match=f"is token {model.ret_id} with this tokenizer but 50266"):
        load_released(tmp_path, ["dtype=float32"])


def test_malicious_pickle_is_refused_without_running_it(release, tmp_path):
    directory, _ = release
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, tmp_path / CHECKPOINT_FILE)
    (tmp_path / "model_args.json").write_text((directory / "model_args.json").read_text())
    with pytest.raises(ValueError, match="is not a checkpoint of this project"):
        load_released(tmp_path, ["dtype=float32"])
    assert not marker.exists()
