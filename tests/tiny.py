"""Tiny real models and a tokenizer trained in-process: tests run offline and in seconds."""

from __future__ import annotations

import itertools
import json

import timm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from fromage.config import LanguageModelConfig, ModelConfig, VisionConfig
from fromage.model.backbones import CLIPVisionTower, TimmVisionTower
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


def make_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; with ``bos`` it prepends ``<s>`` like OPT and Llama."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CAPTIONS * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


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


def tiny_lm(family: str, vocab_size: int, positions: int = 128):
    """A 2-layer causal LM of ``family``: ``opt`` (tied, vocabulary padded beyond the
    tokenizer like the real OPT), ``llama`` (untied head) or ``gpt2`` (tied, no BOS)."""
    if family == "opt":
        config = OPTConfig(
            vocab_size=vocab_size + 8,
            hidden_size=WIDTH,
            word_embed_proj_dim=WIDTH,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=positions,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            init_std=INIT_STD,
        )
        return OPTForCausalLM(config)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
            initializer_range=INIT_STD,
        )
        return LlamaForCausalLM(config)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=WIDTH,
            n_layer=2,
            n_head=4,
            n_positions=positions,
            bos_token_id=0,
            eos_token_id=1,
            initializer_range=INIT_STD,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(family)


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


def tiny_clip_tower() -> CLIPVisionTower:
    return CLIPVisionTower(
        CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)), tiny_clip_processor()
    )


def tiny_timm_tower() -> TimmVisionTower:
    return TimmVisionTower(timm.create_model("test_vit", pretrained=False, num_classes=0))


def tiny_fromage(family: str = "opt", seed: int = 0, **kwargs) -> FromageModel:
    """A FromageModel over a tiny LM of ``family`` and a tiny CLIP tower."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(bos=family != "gpt2")
    lm = tiny_lm(family, vocab_size=len(tokenizer))
    return FromageModel(lm, tokenizer, tiny_clip_tower(), **kwargs)


def random_pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def tiny_model_config(directory, family: str = "opt", seed: int = 0) -> ModelConfig:
    """Save a tiny LM + tokenizer under ``directory`` and return a ModelConfig naming it
    (with a seeded random timm tower), so ``FromageModel.from_config`` can load it."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(bos=family != "gpt2")
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
    return VisionConfig(name=str(directory), backend="hf_clip")
