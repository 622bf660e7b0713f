"""The image tower matrix: every tower of ``tiny.TOWERS`` (transformers' CLIP, SigLIP and
DINOv2, timm's ViT and ConvNeXt), tiny and random, grounds a tiny Llama the same way."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fromage.config import compose
from fromage.data.datamodule import CaptionBatch
from fromage.data.image_sources import folder_images
from fromage.infer.bank import ImageBank
from fromage.infer.bank_build import build_bank, check_bank_fits
from fromage.infer.scoring import retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.pretrained import save_pretrained
from fromage.model.tokens import tokenize_captions
from fromage.train.module import FromageLitModule
from tiny import CAPTIONS, IMAGE_SIZE, TOWERS, tiny_model_config, tiny_tower_config

every_tower = pytest.mark.parametrize("tower", TOWERS)


def grounded_on(tower: str, tmp_path) -> FromageModel:
    config = tiny_model_config(tmp_path / "lm", "llama")
    config.vision = tiny_tower_config(tower, tmp_path / "tower")
    return FromageModel.from_config(config)


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    """Noise pictures of varied sizes and modes (grey, RGBA, RGB), none of the tower's size."""
    rng = np.random.default_rng(seed)
    sizes = [(45, 60), (80, 40), (33, 33), (64, 50)]
    images = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        images.append(image.convert(["RGB", "L", "RGBA"][i % 3]))
    return images


@every_tower
def test_the_tower_pools_one_feature_per_picture_whatever_its_size(tower, tmp_path):
    model = grounded_on(tower, tmp_path)
    pixels = torch.stack([model.vision.preprocess(image) for image in pictures(4)])
    assert pixels.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    features = model.image_features(pixels)
    assert features.shape == (4, model.vision.dim) and torch.isfinite(features).all()
    assert torch.cdist(features, features)[~torch.eye(4, dtype=torch.bool)].min() > 1e-4


@every_tower
def test_training_steps_move_the_projections_and_never_the_tower(tower, tmp_path):
    model = grounded_on(tower, tmp_path)
    module = FromageLitModule(compose("demo"), model)
    optimizer = module.configure_optimizers()["optimizer"]
    tower_weights = {name: p.detach().clone() for name, p in model.vision.named_parameters()}
    projections = model.image_to_lm.weight.detach().clone(), model.image_to_shared.weight.clone()
    for step in range(3):
        images = pictures(4, seed=step)
        pixels = torch.stack([model.vision.preprocess(image) for image in images])
        captions = CAPTIONS[step * 4 : step * 4 + 4]
        ids, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, 16)
        batch = CaptionBatch(pixels, ids, mask, captions, mask.sum(1).tolist(), 0)
        losses = module.model_step(batch)
        assert torch.isfinite(module.total(losses)), step
        optimizer.zero_grad()
        module.total(losses).backward()
        optimizer.step()
    assert not torch.equal(model.image_to_lm.weight, projections[0])
    assert not torch.equal(model.image_to_shared.weight, projections[1])
    for name, weight in model.vision.named_parameters():
        assert weight.grad is None and torch.equal(weight, tower_weights[name]), name


@every_tower
def test_a_bank_embedded_by_the_tower_serves_the_saved_and_reloaded_model(tower, tmp_path):
    model = grounded_on(tower, tmp_path).eval()
    with torch.no_grad():
        model.image_to_shared.weight.normal_(generator=torch.Generator().manual_seed(3))
    (tmp_path / "images").mkdir()
    for i, image in enumerate(pictures(5)):
        image.save(tmp_path / "images" / f"picture{i}.png")
    summary = build_bank(model, folder_images(tmp_path / "images"), tmp_path / "bank")
    assert summary.added == 5 and not summary.failed
    save_pretrained(model, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    bank = ImageBank.open(tmp_path / "bank")
    check_bank_fits(bank, loaded)  # same embedder
    pixels = torch.stack([loaded.vision.preprocess(image) for image in pictures(5)])
    with torch.no_grad():
        embedded = loaded.image_embeddings(loaded.image_features(pixels))  # (5, shared)
    rows = {Path(image_id).stem: row for row, image_id in enumerate(bank.ids)}
    order = [rows[f"picture{i}"] for i in range(5)]
    assert torch.allclose(bank.embeddings[order], embedded, atol=1e-6)
    query = retrieval_queries(loaded, [["a red circle[RET]"]])  # (1, shared)
    ranked = (query @ embedded.T)[0].argsort(descending=True).tolist()
    assert [hit.id for hit in bank.search(query, k=5)[0]] == [bank.ids[order[i]] for i in ranked]


@pytest.mark.parametrize("tower", ["siglip", "dinov2"])  # CLIP's: test_backbones.py
def test_the_hf_tower_feature_is_the_one_its_pretraining_shaped(tower, tmp_path):
    """SigLIP: its attention-pooling head over every patch state (its image embedding);
    DINOv2: the class token of the final layer norm."""
    model = grounded_on(tower, tmp_path).vision.model
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        states = model(pixel_values=pixels).last_hidden_state  # (2, tokens, dim)
        expected = model.head(states) if tower == "siglip" else states[:, 0]
        assert (
            type(model).__name__ == {"siglip": "SiglipVisionModel", "dinov2": "Dinov2Model"}[tower]
        )
        assert torch.equal(grounded_on(tower, tmp_path / "again").vision(pixels), expected)
