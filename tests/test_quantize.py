"""model.lm.quantize: int8 LMs answer like the float LM, keep the FROMAGe parts in float32,
pass gradients, load saved unquantized models, and refuse what cannot run here."""

import importlib.util

import pytest
import torch

from fromage.config import model_differences
from fromage.model import quantize
from fromage.model.backbones import load_language_model
from fromage.model.fromage import FromageModel
from fromage.model.pretrained import load_pretrained, save_pretrained
from fromage.model.quantize import QuantizationUnavailable, check_quantize, quantizable_linears
from fromage.model.tokens import tokenize_captions
from tiny import CAPTIONS, IMAGE_SIZE, make_tokenizer, tiny_lm, tiny_model_config

# Over 41 captions (410 tokens) on the tiny random LMs, one int8 scale per INT8_GROUP
# weights: max |int8 - float| logit over max |logit| (measured: llama 3.2%, opt 2.2%) and
# equal next-token argmaxes (llama 98.3%, opt 96.6%); the bounds leave about half again
LOGIT_TOLERANCE = 0.05
TOKEN_AGREEMENT = 0.95


def _config(tmp_path, family, setting):
    config = tiny_model_config(tmp_path, family)
    config.lm.quantize = setting
    return config


def _relative_logit_error(lm, reference, ids):
    with torch.no_grad():
        a, b = lm(ids).logits, reference(ids).logits
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_int8_lm_answers_close_to_the_float_lm(tmp_path, family):
    reference = FromageModel.from_config(_config(tmp_path, family, "none"))
    int8 = FromageModel.from_config(_config(tmp_path, family, "int8"))
    errors, same, total = [], 0, 0
    for caption in CAPTIONS[::5]:
        ids = torch.tensor([int8.tokenizer(caption).input_ids])
        errors.append(_relative_logit_error(int8.lm, reference.lm, ids))
        with torch.no_grad():
            same += int(
                (int8.lm(ids).logits.argmax(-1) == reference.lm(ids).logits.argmax(-1)).sum()
            )
        total += ids.shape[1]
    assert max(errors) < LOGIT_TOLERANCE
    assert same / total >= TOKEN_AGREEMENT


def test_only_the_transformer_linears_are_quantized(tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "INT8_GROUP", 64)  # the tiny LM's rows: 32 and 64 wide
    model = FromageModel.from_config(_config(tmp_path, "llama", "int8"))
    lm = model.lm
    quantized = [lm.get_submodule(name).weight for name in quantizable_linears(lm)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(type(w).__name__ == "Int8Tensor" for w in quantized)
    # a scale per INT8_GROUP weights of a row where the row divides, else per row
    blocks = {tuple(w.block_size) for w in quantized}
    assert blocks == {(1, 64) if w.shape[1] % 64 == 0 else (1, w.shape[1]) for w in quantized}
    assert len(blocks) == 2
    for kept in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
        assert type(kept) is torch.nn.Parameter and kept.dtype == torch.float32
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(type(p) is torch.nn.Parameter for p in trainable)
    assert all(p.dtype == torch.float32 for p in trainable)
    assert not any(p.requires_grad for p in lm.parameters())


def test_training_backpropagates_through_the_int8_lm(tmp_path):
    model = FromageModel.from_config(_config(tmp_path, "opt", "int8"))
    ids, mask = tokenize_captions(model.tokenizer, ["a red star", "a blue cross"], model.ret_id, 24)
    features = model.image_features(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    losses = model(features, ids, mask)
    losses.total().backward()
    assert torch.isfinite(losses.total())
    assert model.image_to_lm.weight.grad.abs().sum() > 0  # only reachable through the LM
    assert model.ret_embedding.grad.abs().sum() > 0


def test_a_model_saved_unquantized_loads_into_an_int8_lm(tmp_path):
    model = FromageModel.from_config(_config(tmp_path / "lm", "llama", "none"))
    save_pretrained(model, tmp_path / "saved")
    loaded = load_pretrained(tmp_path / "saved", overrides=["lm.quantize=int8"])
    assert type(loaded.lm.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert torch.equal(loaded.image_to_lm.weight, model.image_to_lm.weight)
    # and a model saved from an int8 LM loads into the float LM (samples precede quantizing)
    save_pretrained(loaded, tmp_path / "saved-int8")
    load_pretrained(tmp_path / "saved-int8")
    assert model_differences(model.config, loaded.config) == []  # a runtime key


@pytest.mark.parametrize("setting", ["int3", "8bit", "", "INT8"])
def test_unknown_settings_are_refused_naming_the_choices(tmp_path, setting):
    with pytest.raises(ValueError, match="none', 'int8', 'int4'"):
        load_language_model(_config(tmp_path, "llama", setting).lm)


def test_int4_and_other_devices_on_cpu_name_what_works():
    with pytest.raises(QuantizationUnavailable, match=r"CUDA GPU.*quantize=int8"):
        check_quantize("int4", "cpu")
    with pytest.raises(QuantizationUnavailable, match=r"not on mps.*quantize=none"):
        check_quantize("int8", "mps")
    assert check_quantize("none", "mps") is None


@pytest.mark.parametrize(("device", "library"), [("cpu", "torchao"), ("cuda", "bitsandbytes")])
def test_a_missing_library_is_named_with_its_install_command(monkeypatch, device, library):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        quantize.importlib.util, "find_spec", lambda name: None if name == library else real(name)
    )
    with pytest.raises(QuantizationUnavailable, match=f"needs {library}.*fromage\\[quant\\]"):
        check_quantize("int8", device)


def test_an_lm_without_linear_layers_is_refused(tmp_path):
    with pytest.raises(QuantizationUnavailable, match="Conv1D"):
        FromageModel.from_config(_config(tmp_path, "gpt2", "int8"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")
def test_the_bitsandbytes_layer_swap_of_the_gpu_path_runs_int8_on_cpu():
    """The CUDA path's swap, run where bitsandbytes int8 also runs (it quantizes on
    ``.to(cpu)`` too); on CUDA it is the same code with another device."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    reference = tiny_lm("llama", len(tokenizer)).eval()
    lm = tiny_lm("llama", len(tokenizer)).eval()
    lm.load_state_dict(reference.state_dict())
    names = quantizable_linears(lm)
    lm = quantize._bitsandbytes(lm, names, "int8").to("cpu").requires_grad_(False)
    assert all(type(lm.get_submodule(n)).__name__ == "Linear8bitLt" for n in names)
    assert lm.get_submodule(names[0]).weight.dtype == torch.int8
    ids = torch.tensor([tokenizer("a red star at the top left").input_ids])
    assert _relative_logit_error(lm, reference, ids) < LOGIT_TOLERANCE
    embeds = lm.get_input_embeddings()(ids).detach().requires_grad_(True)
    lm(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad.abs().sum() > 0
