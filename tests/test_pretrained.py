import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

from fromage.config import ConfigError
from fromage.infer.generation import GenerationConfig, generate
from fromage.infer.scoring import log_likelihood, retrieval_queries
from fromage.model.backbones import HFVisionTower
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.pretrained import CONFIG_FILE, TOWER_FILE, WEIGHTS_FILE, save_pretrained
from tiny import make_tokenizer, random_pixels, tiny_model_config

PROMPTS = [["a red circle at the top left[RET]"], [random_pixels(1)[0], "a blue[RET]"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model built from a saved tiny LM, with its trainable weights moved off their init."""
    root = tmp_path_factory.mktemp("pretrained")
    model = FromageModel.from_config(tiny_model_config(root / "lm"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return root, model


def test_round_trip_gives_identical_outputs(trained, tmp_path):
    _, model = trained
    save_pretrained(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(retrieval_queries(loaded, PROMPTS), retrieval_queries(model, PROMPTS))
    context = [random_pixels(1, seed=3)[0], "a"]
    assert torch.equal(
        log_likelihood(loaded, context, [" red", " blue star"]),
        log_likelihood(model, context, [" red", " blue star"]),
    )
    assert (
        generate(loaded, context, config=GenerationConfig(max_new_tokens=8)).token_ids
        == generate(model, context, config=GenerationConfig(max_new_tokens=8)).token_ids
    )


def test_bf16_weights_load_as_the_rounded_weights(trained, tmp_path):
    _, model = trained
    save_pretrained(model, tmp_path / "m", dtype="bfloat16")
    loaded = load_model(tmp_path / "m")
    for name, value in model.trainable_state_dict().items():
        expected = value.to(torch.bfloat16).float()
        assert torch.equal(loaded.trainable_state_dict()[name], expected), name


def test_other_backbones_are_refused_naming_the_difference(trained, tmp_path):
    root, model = trained
    save_pretrained(model, tmp_path / "m")
    tiny_model_config(tmp_path / "other-seed", seed=7)
    with pytest.raises(ValueError, match=r"lm_weight_samples: .* have other values"):
        load_model(tmp_path / "m", [f"lm.name={tmp_path / 'other-seed'}"])
    tiny_model_config(tmp_path / "llama", family="llama")
    with pytest.raises(ValueError, match="lm_architecture: saved 'OPTForCausalLM'"):
        load_model(tmp_path / "m", [f"lm.name={tmp_path / 'llama'}"])
    with pytest.raises(ValueError, match="vision_weight_samples"):
        load_model(tmp_path / "m", ["vision.init_seed=5"])
    with pytest.raises(ConfigError, match="nosuchkey"):
        load_model(tmp_path / "m", ["lm.nosuchkey=1"])
    with pytest.raises(FileNotFoundError, match="is not a fromage model"):
        load_model(root / "lm")


def test_weights_of_another_shape_are_refused(trained, tmp_path):
    _, model = trained
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text(
        (tmp_path / "m" / CONFIG_FILE).read_text().replace('"shared_dim": 256', '"shared_dim": 64')
    )
    with pytest.raises(ValueError, match="wrong shape"):
        load_model(tmp_path / "m")


def test_paper_sized_trainable_part_is_about_11_mb_in_bf16(tmp_path):
    """OPT-6.7B widths (4096) and CLIP ViT-L/14 widths (1024); the frozen layers are cut to
    zero or one because only the trainable part is saved."""
    tokenizer = make_tokenizer()
    lm = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=4096,
            word_embed_proj_dim=4096,
            num_hidden_layers=0,
            ffn_dim=8,
            num_attention_heads=32,
        )
    )
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=8,
            num_hidden_layers=0,
            num_attention_heads=16,
            image_size=28,
            patch_size=14,
        )
    )
    model = FromageModel(lm, tokenizer, HFVisionTower(vision, processor=None))
    save_pretrained(model, tmp_path / "paper", tiny_model_config(tmp_path), dtype="bfloat16")
    size_mb = (tmp_path / "paper" / WEIGHTS_FILE).stat().st_size / 1e6
    assert 10.5 < size_mb < 11.5


def _model_with_tower_file(root, checkout, monkeypatch):
    """A model whose tower loads its (perturbed) weights from a file in ``checkout``,
    named relative to it as the demo's training config names its tower; cwd: checkout."""
    config = tiny_model_config(root / "lm")
    tower = checkout / "data" / "tower" / "t.safetensors"
    tower.parent.mkdir(parents=True)
    weights = FromageModel.from_config(config).vision.model.state_dict()
    save_file({k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in weights.items()}, tower)
    config.vision.checkpoint = "data/tower/t.safetensors"
    monkeypatch.chdir(checkout)  # training runs in the checkout
    return FromageModel.from_config(config).eval(), config


def test_a_saved_model_carries_its_tower_and_loads_anywhere(trained, tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    model, config = _model_with_tower_file(trained[0], checkout, monkeypatch)
    save_pretrained(model, "runs/demo/pretrained", config)
    saved = json.loads((checkout / "runs/demo/pretrained" / CONFIG_FILE).read_text())
    assert saved["model"]["vision"]["checkpoint"] == TOWER_FILE
    moved = shutil.move(checkout / "runs/demo/pretrained", tmp_path / "elsewhere" / "model")
    shutil.rmtree(checkout)  # the original tower file is gone
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_model("model")
    assert torch.equal(retrieval_queries(loaded, PROMPTS), retrieval_queries(model, PROMPTS))
    # saving a loaded model again keeps the tower in the new directory
    save_pretrained(loaded, tmp_path / "again")
    assert (tmp_path / "again" / TOWER_FILE).read_bytes() == (Path(moved) / TOWER_FILE).read_bytes()


def test_an_older_save_finds_its_tower_where_training_ran(trained, tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    model, config = _model_with_tower_file(trained[0], checkout, monkeypatch)
    model_dir = save_pretrained(model, "runs/demo/pretrained", config)
    # as saves did before towers travelled: the path relative to the checkout, no copy
    (model_dir / TOWER_FILE).unlink()
    described = json.loads((model_dir / CONFIG_FILE).read_text())
    described["model"]["vision"]["checkpoint"] = "data/tower/t.safetensors"
    (model_dir / CONFIG_FILE).write_text(json.dumps(described))
    monkeypatch.chdir(checkout / "runs")  # e.g. a notebook's kernel in a subdirectory
    loaded = load_model(checkout / "runs/demo/pretrained")
    assert torch.equal(retrieval_queries(loaded, PROMPTS), retrieval_queries(model, PROMPTS))
    shutil.move(checkout / "runs/demo/pretrained", tmp_path / "lost")
    with pytest.raises(FileNotFoundError, match=r"tower weights data/tower/t.safetensors"):
        load_model(tmp_path / "lost")
    tower = f"vision.checkpoint={checkout / 'data/tower/t.safetensors'}"
    assert torch.equal(
        retrieval_queries(load_model(tmp_path / "lost", [tower]), PROMPTS),
        retrieval_queries(model, PROMPTS),
    )
