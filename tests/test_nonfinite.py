"""float16 LMs (GPUs without bf16): they train, or stop at the first overflow, named."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fromage.config import compose
from fromage.train.nonfinite import first_nonfinite
from fromage.train.run import train
from test_training import configured_tiny_overrides
from tiny import random_pixels, tiny_fromage


def float16_run(shards, tmp_path, *overrides):
    return train(
        compose(
            "demo",
            configured_tiny_overrides(shards, tmp_path, *overrides, family="llama"),
        )
    )


def test_a_float16_lm_trains_with_finite_losses_and_float32_trainable_parts(shards, tmp_path):
    trainer, module = float16_run(shards, tmp_path, "model.dtype=float16")
    assert trainer.global_step == 2
    model = module.model
    assert (
        model.lm_dtype == torch.float16 and next(model.vision.parameters()).dtype == torch.float16
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(torch.isfinite(p).all() for p in trainable)
    for name in ("train/loss", "train/caption_ce", "train/contrastive", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[name]), name


def overflow_in_float16(lm_folder) -> None:
    """Scale the first MLP's output weights of a saved tiny Llama so that its activations
    (about 1.4e5) stay finite in float32 and overflow float16 (at most 65504)."""
    weights = load_file(lm_folder / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] *= 3e4
    save_file(weights, lm_folder / "model.safetensors", metadata={"format": "pt"})


def test_a_float16_overflow_stops_training_naming_the_layer_and_what_to_use(shards, tmp_path):
    overrides = configured_tiny_overrides(shards, tmp_path, family="llama")
    overflow_in_float16(tmp_path / "lm-llama")
    trainer, _ = train(compose("demo", overrides))  # float32: finite
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    with pytest.raises(FloatingPointError) as stopped:
        train(
            compose(
                "demo", [*overrides, "model.dtype=float16", "output_dir=" + str(tmp_path / "16")]
            )
        )
    message = str(stopped.value)
    assert "non-finite loss" in message and "step 0" in message
    assert "the output of lm.model.layers.0.mlp.down_proj (Linear, float16)" in message
    assert "model.dtype=bfloat16" in message and "65504" in message


def test_a_nonfinite_trainable_weight_is_named():
    model = tiny_fromage("llama")
    with torch.no_grad():
        model.image_to_lm.weight[3, 1] = float("nan")
    pixels = random_pixels(2)
    ids = torch.randint(0, model.ret_id, (2, 6))
    source = first_nonfinite(
        model, {"pixels": pixels}, ["a", "b"], lambda: model(pixels, ids, torch.ones_like(ids))
    )
    assert source is not None and source.where == "the weight image_to_lm.weight (trainable)"
    assert "optim.lr" in source.advice


def test_a_nonfinite_value_made_between_modules_names_the_parent():
    class Overflowing(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.second(self.first(x) * 1e38 * 1e38)  # float32 overflow, no module's

    model = Overflowing()
    found = first_nonfinite(model, {}, [], lambda: model(torch.ones(2, 4)))
    assert found is not None
    assert found.where.startswith("the input of second (Linear), computed in the model outside")
    clean = first_nonfinite(model.first, {}, [], lambda: model.first(torch.ones(2, 4)))
    assert clean is None
