"""Tiny real models and a tokenizer trained in-process: tests run offline and in seconds."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import timm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    GPT2Tokenizer,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from fromage.config import LanguageModelConfig, ModelConfig, VisionConfig
from fromage.model.backbones import HFVisionTower, TimmVisionTower
from fromage.model.fromage import FromageModel

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "centre"]
CAPTIONS = [f"a {c} {s} at the {p}" for c, s, p in itertools.product(COLOURS, SHAPES, PLACES)]
IMAGE_SIZE = 32
WIDTH = 32
# Larger than the usual 0.02 so that a 2-layer random LM reacts to its inputs and
# its logits are far from uniform, as a pretrained LM's are.
INIT_STD = 0.2


def make_tokenizer(
    bos: bool = True, pad: str | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; with ``bos`` it prepends ``<s>`` like OPT and Llama, with
    ``pad`` it has that pad token of its own (else none, like GPT-2 and Llama)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", *([pad] if pad else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CAPTIONS * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token=pad,
        padding_side=padding_side,
    )


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """``make_tokenizer`` with the habits of ``family``'s own tokenizer."""
    spec = FAMILIES[family]
    return make_tokenizer(bos=spec.bos, pad=spec.pad, padding_side=spec.padding_side)


def make_opt_tokenizer() -> GPT2Tokenizer:
    """OPT's tokenizer in miniature: the slow-API ``GPT2Tokenizer`` with ``add_bos_token``,
    BOS = EOS = ``</s>`` (id 2), ``<pad>`` id 1, over ``make_tokenizer``'s merges."""
    trained = json.loads(make_tokenizer(bos=False).backend_tokenizer.to_str())["model"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    return GPT2Tokenizer(
        vocab=vocab,
        merges=[tuple(merge) for merge in trained["merges"]],
        add_bos_token=True,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


# A sliding window shorter than the test sequences, for the families whose attention slides.
WINDOW = 6
# The tiny shape of every Llama-like family: grouped-query attention and a gated MLP.
LLAMA_SHAPE = dict(
    hidden_size=WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=INIT_STD,
)


@dataclass(frozen=True)
class Family:
    """A causal LM family in miniature: its transformers ``model_type``, the config
    settings that make it tiny (and exercise what sets it apart), and its tokenizer's
    habits (BOS, an own pad token, the padding side)."""

    model_type: str
    example: str  # a checkpoint of the family, for the docs table
    settings: dict
    bos: bool = True
    pad: str | None = None
    padding_side: str = "right"

    @property
    def slides(self) -> bool:
        return "sliding_window" in self.settings


SLIDING = dict(sliding_window=WINDOW)
FAMILIES = {
    # OPT: tied head, vocabulary padded beyond the tokenizer like the real OPT
    "opt": Family(
        "opt",
        "facebook/opt-6.7b",
        dict(
            hidden_size=WIDTH,
            word_embed_proj_dim=WIDTH,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            pad_token_id=1,
            init_std=INIT_STD,
        ),
    ),
    "gpt2": Family(
        "gpt2",
        "gpt2-xl",
        dict(n_embd=WIDTH, n_layer=2, n_head=4, initializer_range=INIT_STD),
        bos=False,
    ),
    "llama": Family(
        "llama", "meta-llama/Llama-3.1-8B", dict(LLAMA_SHAPE, tie_word_embeddings=False)
    ),
    "mistral": Family(
        "mistral", "mistralai/Mistral-7B-v0.1", dict(LLAMA_SHAPE, **SLIDING), padding_side="left"
    ),
    # Qwen 2/3: the layers from max_window_layers on slide, the ones before attend fully;
    # the pad token is the one Qwen's tokenizer class (which a saved qwen LM loads) names
    "qwen2": Family(
        "qwen2",
        "Qwen/Qwen2.5-7B",
        dict(LLAMA_SHAPE, use_sliding_window=True, max_window_layers=1, **SLIDING),
        bos=False,
        pad="<|endoftext|>",
    ),
    "qwen3": Family(
        "qwen3",
        "Qwen/Qwen3-8B",
        dict(LLAMA_SHAPE, head_dim=8, use_sliding_window=True, max_window_layers=1, **SLIDING),
        bos=False,
        pad="<|endoftext|>",
    ),
    "gemma": Family(
        "gemma", "google/gemma-7b", dict(LLAMA_SHAPE, head_dim=8), pad="<pad>", padding_side="left"
    ),
    "gemma2": Family(
        "gemma2",
        "google/gemma-2-9b",
        dict(LLAMA_SHAPE, head_dim=8, **SLIDING),
        pad="<pad>",
        padding_side="left",
    ),
    "gemma3": Family(
        "gemma3_text",
        "google/gemma-3-1b-pt",
        dict(
            LLAMA_SHAPE,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
            **SLIDING,
        ),
        pad="<pad>",
        padding_side="left",
    ),
    "phi": Family(
        "phi", "microsoft/phi-2", dict(LLAMA_SHAPE, partial_rotary_factor=0.5), bos=False
    ),
    "phi3": Family(
        "phi3",
        "microsoft/Phi-3-mini-4k-instruct",
        dict(LLAMA_SHAPE, pad_token_id=None, **SLIDING),
        pad="<pad>",
        padding_side="left",
    ),
    "gpt_neox": Family(
        "gpt_neox",
        "EleutherAI/pythia-6.9b",
        dict(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            initializer_range=INIT_STD,
        ),
        bos=False,
    ),
    "falcon": Family(
        "falcon",
        "tiiuae/falcon-7b",
        dict(
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            initializer_range=INIT_STD,
        ),
        bos=False,
    ),
    "starcoder2": Family(
        "starcoder2", "bigcode/starcoder2-7b", dict(LLAMA_SHAPE, **SLIDING), bos=False
    ),
}


def tiny_lm(family: str, vocab_size: int, positions: int = 128, window: int | None = None):
    """A 2-layer causal LM of ``family`` (a key of ``FAMILIES``), random weights;
    ``window`` replaces the sliding window of the families whose attention slides."""
    spec = FAMILIES[family]
    settings = dict(spec.settings)
    if window is not None and spec.slides:
        settings["sliding_window"] = window
    extra = 8 if family == "opt" else 0  # OPT's embedding rows beyond its tokenizer
    position_key = "n_positions" if family == "gpt2" else "max_position_embeddings"
    config = AutoConfig.for_model(
        spec.model_type,
        vocab_size=vocab_size + extra,
        bos_token_id=0,
        eos_token_id=1,
        **{position_key: positions},
        **settings,
    )
    return AutoModelForCausalLM.from_config(config)


TINY_CLIP_VISION = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=8,
)


def tiny_clip_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def tiny_clip_tower() -> HFVisionTower:
    return HFVisionTower(
        CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)), tiny_clip_processor()
    )


def tiny_timm_tower() -> TimmVisionTower:
    return TimmVisionTower(timm.create_model("test_vit", pretrained=False, num_classes=0))


SQUARE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
# the image towers of the tower matrix (tests/test_towers.py): transformers' by config
# and image processor (each model's own recipe: CLIP and DINOv2 resize the short side and
# crop, SigLIP resizes to a square), timm's by name
HF_TOWERS = {
    "clip": (CLIPVisionConfig, lambda: tiny_clip_processor()),
    "siglip": (SiglipVisionConfig, lambda: SiglipImageProcessor(size=SQUARE)),
    "dinov2": (
        Dinov2Config,
        lambda: BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=SQUARE),
    ),
}
TIMM_TOWERS = {"timm-vit": "test_vit", "timm-convnext": "test_convnext"}
TOWERS = [*HF_TOWERS, *TIMM_TOWERS]


def tiny_tower_config(tower: str, directory) -> VisionConfig:
    """The VisionConfig of a tiny random tower of ``TOWERS``; a transformers one has its
    config and image processor saved under ``directory`` (no weights: built from a seed)."""
    if tower in TIMM_TOWERS:
        return VisionConfig(
            name=TIMM_TOWERS[tower], backend="timm", pretrained=False, image_size=IMAGE_SIZE
        )
    config_class, processor = HF_TOWERS[tower]
    config_class(**TINY_CLIP_VISION).save_pretrained(directory)
    processor().save_pretrained(directory)
    return VisionConfig(name=str(directory), backend="hf", pretrained=False)


def tiny_fromage(family: str = "opt", seed: int = 0, **kwargs) -> FromageModel:
    """A FromageModel over a tiny LM of ``family`` and a tiny CLIP tower."""
    torch.manual_seed(seed)
    tokenizer = family_tokenizer(family)
    lm = tiny_lm(family, vocab_size=len(tokenizer))
    return FromageModel(lm, tokenizer, tiny_clip_tower(), **kwargs)


def random_pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def tiny_model_config(directory, family: str = "opt", seed: int = 0) -> ModelConfig:
    """Save a tiny LM + tokenizer under ``directory`` and return a ModelConfig naming it
    (with a seeded random timm tower), so ``FromageModel.from_config`` can load it."""
    torch.manual_seed(seed)
    tokenizer = family_tokenizer(family)
    # 512 positions: long enough for a whole VisDial dialogue as context
    tiny_lm(family, vocab_size=len(tokenizer), positions=512).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return ModelConfig(
        lm=LanguageModelConfig(name=str(directory)),
        vision=VisionConfig(
            name="test_vit", backend="timm", pretrained=False, image_size=IMAGE_SIZE, init_seed=seed
        ),
    )


def save_tiny_clip(directory, seed: int = 0) -> VisionConfig:
    """Save a tiny full CLIP model (text and image towers), its processor and a tokenizer,
    and return the VisionConfig that loads its image tower."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(bos=False)
    # like CLIP's: <bos> text <eos>, padded with <eos> (CLIP pools at the first <eos>)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    tokenizer.pad_token = tokenizer.eos_token
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=TINY_CLIP_VISION,
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tiny_clip_processor().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return VisionConfig(name=str(directory), backend="hf")
