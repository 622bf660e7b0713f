import re

import pytest

from fromage.config import ConfigError, compose, model_differences, split_model_overrides
from fromage.train.run import train


def test_paper_setting_composes_from_groups():
    config = compose("paper")
    assert config.model.lm.name == "facebook/opt-6.7b"
    assert config.model.vision.name == "openai/clip-vit-large-patch14"
    assert config.model.n_visual_tokens == 1 and config.model.dtype == "bfloat16"
    assert config.data.batch_size == 180 and config.data.max_len == 24
    assert (config.optim.lr, list(config.optim.betas)) == (3e-4, [0.9, 0.95])
    # bf16 backbones, fp32 trainable maps, no autocast (README: Precision)
    assert config.trainer.strategy == "ddp" and config.trainer.precision == "32-true"
    assert compose("paper", ["trainer=deepspeed-zero2"]).trainer.precision == "bf16-mixed"
    assert compose("paper-vis4").model.n_visual_tokens == 4


def test_overrides_pick_groups_and_set_keys():
    config = compose(
        "paper", ["trainer=deepspeed-zero2", "optim.lr=1e-4", "model.ret_layers=[-1,-2]"]
    )
    assert config.trainer.strategy == "deepspeed_stage_2"
    assert config.optim.lr == 1e-4 and list(config.model.ret_layers) == [-1, -2]
    assert compose("demo", ["trainer=cpu"]).trainer.accelerator == "cpu"


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["model.n_visual_tokenz=4"], "n_visual_tokenz"),
        (["trainer.max_step=3"], "max_step"),
        (["optim.lr=fast"], "optim.lr"),
        (["trainer=tpu-pod"], "tpu-pod"),
    ],
)
def test_unknown_keys_values_and_groups_fail_with_their_name(overrides, named):
    with pytest.raises(ConfigError, match=named):
        compose("paper", overrides)


def test_unknown_key_in_a_group_file_is_named(tmp_path):
    for group, text in {
        "model": "lm:\n  name: x\n  gguf: y\n",
        "data": "{}\n",
        "trainer": "{}\n",
        "experiment": "defaults:\n  model: m\n  data: d\n  trainer: t\n",
    }.items():
        (tmp_path / group).mkdir()
        name = {"model": "m", "data": "d", "trainer": "t", "experiment": "e"}[group]
        (tmp_path / group / f"{name}.yaml").write_text(text)
    with pytest.raises(ConfigError, match="gguf"):
        compose("e", conf_dir=tmp_path)


def test_paper_training_without_data_fails_fast_and_says_how_to_make_it(tmp_path):
    config = compose("paper", [f"data.train_shards={tmp_path}/cc3m/train"])
    with pytest.raises(FileNotFoundError, match="make data-cc3m"):
        train(config)  # before any model is loaded: no network needed


def test_model_overrides_are_split_from_the_experiments():
    model, others = split_model_overrides(["model.lm.quantize=int8", "name=x", "model.dtype=bf16"])
    assert model == ["lm.quantize=int8", "dtype=bf16"] and others == ["name=x"]


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=-1",
        "optim.warmup_steps=-1",
        "optim.betas=[0.9,1.0]",
        "optim.weight_decay=-0.1",
        "data.batch_size=0",
        "trainer.max_steps=0",
        "trainer.checkpoint_every_n_steps=0",
    ],
)
def test_values_training_cannot_use_are_refused_naming_the_key_before_loading(override, tmp_path):
    key = override.partition("=")[0]
    config = compose("demo", [override, f"output_dir={tmp_path}", "data.train_shards=nowhere"])
    # "nowhere" holds no shards: the refusal comes before the shards, and the models, are read
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* cannot train: it must be"):
        train(config)


def test_models_saved_under_the_hf_backends_older_name_match_the_hf_backend():
    saved = compose("paper", ["model.vision.backend=hf_clip"]).model
    current = compose("paper").model
    assert current.vision.backend == "hf"
    assert model_differences(saved, current) == []
    siglip = compose("paper", ["model.vision.name=google/siglip-base-patch16-224"]).model
    assert model_differences(saved, siglip) == [
        "vision.name: 'openai/clip-vit-large-patch14' -> 'google/siglip-base-patch16-224'"
    ]
