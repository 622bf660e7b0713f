"""The LM family matrix: every family of ``tiny.FAMILIES`` grounded as FROMAGe, tiny and
random (transformers' own config classes, nothing downloaded), through the same checks.

Sliding-window families get a window shorter than the captions, so a packed pass that
ignored it would not equal the padded passes. The supported-families table of
docs/lm-families.md is written from these results (``make docs-families``; conftest.py).
"""

from dataclasses import replace

import pytest
import torch

from fromage.config import compose
from fromage.data.datamodule import CaptionBatch
from fromage.infer.bank import ImageBank
from fromage.infer.generation import GenerationConfig, generate
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.pretrained import save_pretrained
from fromage.model.tokens import tokenize_captions
from fromage.train.module import FromageLitModule
from tiny import (
    CAPTIONS,
    FAMILIES,
    family_tokenizer,
    random_pixels,
    tiny_clip_tower,
    tiny_lm,
    tiny_model_config,
)

pytestmark = pytest.mark.parametrize("family", list(FAMILIES))


def grounded(family: str, seed: int = 0, window: int | None = None, **kwargs) -> FromageModel:
    torch.manual_seed(seed)
    tokenizer = family_tokenizer(family)
    lm = tiny_lm(family, vocab_size=len(tokenizer), window=window)
    return FromageModel(lm, tokenizer, tiny_clip_tower(), n_visual_tokens=2, **kwargs)


def caption_batch(model: FromageModel, n: int = 6, seed: int = 0) -> CaptionBatch:
    """Distinct pooled features and captions longer than the sliding window; the last
    caption is short, so rows differ in length."""
    captions = [*CAPTIONS[seed * 7 : seed * 7 + n - 1], "a red"]
    ids, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, 16)
    features = torch.randn(n, model.vision.dim, generator=torch.Generator().manual_seed(seed))
    return CaptionBatch(features, ids, mask, captions, mask.sum(1).tolist(), 0)


def losses_of(model: FromageModel, batch: CaptionBatch, concat: bool = True):
    return model(batch.images, batch.ids, batch.mask, concat_captions=concat, lengths=batch.lengths)


def test_captions_start_with_bos_as_the_family_does_and_are_padded_right(family):
    model = grounded(family)
    batch = caption_batch(model)
    assert (batch.ids[:, 0] == model.tokenizer.bos_token_id).all() == FAMILIES[family].bos
    assert (batch.mask[:, :-1] >= batch.mask[:, 1:]).all()  # right padding, whatever the side
    last = batch.mask.sum(1) - 1
    assert (batch.ids[torch.arange(len(batch)), last] == model.ret_id).all()
    assert model.tokenizer.pad_token_id is not None


def test_losses_are_finite_in_float32_and_bfloat16(family):
    for dtype in (torch.float32, torch.bfloat16):
        model = grounded(family)
        model.lm.to(dtype)
        model.vision.to(dtype)
        losses = losses_of(model, caption_batch(model))
        losses.total().backward()
        for name in ("caption", "retrieval_lm", "contrastive"):
            assert torch.isfinite(getattr(losses, name)), (dtype, name)
        assert torch.isfinite(model.image_to_lm.weight.grad).all(), dtype


@pytest.mark.parametrize("concat", [False, True])
def test_a_packed_pass_gives_the_losses_of_padded_passes(family, concat):
    model = grounded(family, ret_layers=[-1, 1])
    assert model.pack_sequences
    batch = caption_batch(model)
    packed = losses_of(model, batch, concat)
    model.pack_sequences = False
    padded = losses_of(model, batch, concat)
    for name in ("caption", "retrieval_lm", "contrastive"):
        assert getattr(packed, name).item() == pytest.approx(getattr(padded, name).item(), rel=1e-5)
    assert torch.allclose(packed.text_embeddings, padded.text_embeddings, atol=1e-5)
    if FAMILIES[family].slides:  # the window is shorter than the captions: it must matter
        unwindowed = losses_of(grounded(family, ret_layers=[-1, 1], window=1000), batch, concat)
        assert unwindowed.caption.item() != pytest.approx(packed.caption.item(), rel=1e-4)


def test_training_steps_move_only_the_trainable_parts(family):
    model = grounded(family)
    module = FromageLitModule(compose("demo", ["optim.weight_decay=0.1"]), model)
    optimizer = module.configure_optimizers()["optimizer"]
    frozen = {
        name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad
    }
    trainable = {
        name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
    }
    assert model.tied_output == (
        model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight
    )
    for step in range(3):
        losses = module.model_step(caption_batch(model, seed=step), concat_captions=step == 1)
        optimizer.zero_grad()
        module.total(losses).backward()
        optimizer.step()
        module.normalize_ret_embedding()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, trainable[name]), name
        else:
            assert param.grad is None and torch.equal(param, frozen[name]), name
    norms = model.lm.get_input_embeddings().weight[: model.ret_id].float().norm(dim=-1).mean()
    assert model.ret_embedding.norm().item() == pytest.approx(norms.item(), rel=1e-5)


def test_kv_cache_generation_equals_rerunning_the_prefix(family):
    model = grounded(family, ret_layers=[-1, 1])
    features = torch.randn(12, model.vision.dim, generator=torch.Generator().manual_seed(1))
    bank = ImageBank(model.image_embeddings(features).detach(), [f"img{i}" for i in range(12)])
    prompt = ["a red", random_pixels(1)[0], "circle at the top left of the"]  # past the window
    config = GenerationConfig(max_new_tokens=12, ret_scale=3.0)
    cached = generate(model, prompt, bank, config)
    reference = generate(model, prompt, bank, replace(config, use_cache=False))
    assert len(cached.token_ids) >= 8  # a real comparison, not two early stops
    assert cached.token_ids == reference.token_ids


def test_a_saved_model_loads_with_the_same_outputs(family, tmp_path):
    config = tiny_model_config(tmp_path / "lm", family)
    model = FromageModel.from_config(config).eval()
    with torch.no_grad():
        model.image_to_lm.weight.normal_(generator=torch.Generator().manual_seed(3))
    save_pretrained(model, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    pixels = random_pixels(3)
    batch = caption_batch(model, n=3)
    with torch.no_grad():
        for a, b in ((model, loaded), (loaded, model)):
            assert torch.equal(
                a.image_embeddings(a.image_features(pixels)),
                b.image_embeddings(b.image_features(pixels)),
            )
        expected = losses_of(model, replace(batch, images=model.image_features(pixels)))
        got = losses_of(loaded, replace(batch, images=loaded.image_features(pixels)))
    assert got.caption.item() == expected.caption.item()
    assert torch.equal(got.text_embeddings, expected.text_embeddings)
