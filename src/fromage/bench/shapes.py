"""Size presets of `make gpu-check` and the random-weight stand-ins they describe.

``paper`` is the paper's model with random weights: OPT-6.7B (Zhang et al. 2022, Table 1)
with a tokenizer of the real OPT size, and CLIP ViT-L/14 at 224 px; ``tiny`` is the same
two families at 2 layers, so the very same code path runs on a CPU in seconds. Only
configs, a tokenizer and an image processor are written: the weights are drawn when the
model is built (``lm.random_init``, ``vision.pretrained: false``), on the device.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessor, CLIPVisionConfig, OPTConfig, PreTrainedTokenizerFast

# OPT's special tokens, at OPT's ids; like OPT, every text starts with </s>
SPECIAL_TOKENS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
IMAGE_SIZE = 224  # the paper tower's input, and the synthetic shards' image size


@dataclass(frozen=True)
class Size:
    """Model shapes, the batch, and each stage's step budget for one gpu-check size."""

    lm: dict  # OPTConfig arguments
    tokenizer_size: int  # tokens before [RET]
    vision: dict  # CLIPVisionConfig arguments
    batch_size: int
    warmup_steps: int  # untimed steps at the start of the bare loop and of fit
    bare_steps: int  # timed steps of the bare loop
    fit_steps: int  # timed steps of Lightning fit
    new_tokens: int  # generated per prompt
    loader_batches: int
    samples: int  # synthetic pairs written (the training stream resamples them)
    per_shard: int
    num_workers: int
    min_fit_ratio: float  # fit samples/s over the bare loop's, below which the check fails
    timeouts_s: dict = field(default_factory=dict)  # per stage; the default below otherwise
    default_timeout_s: int = 120


SIZES = {
    "paper": Size(
        lm=dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            ffn_dim=16384,
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=4096,
        ),
        tokenizer_size=50265,
        vision=dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            patch_size=14,
            image_size=IMAGE_SIZE,
        ),
        batch_size=180,
        warmup_steps=2,
        bare_steps=8,
        fit_steps=12,
        new_tokens=32,
        loader_batches=4,
        samples=1024,
        per_shard=128,
        num_workers=8,
        min_fit_ratio=0.9,
        timeouts_s={"fit_zero2_pixels": 180, "fit_zero2_features": 180, "matmul_peak": 60},
    ),
    # Lightning's fixed per-step cost is most of a tiny step: its fit/bare ratio is
    # reported, not gated.
    "tiny": Size(
        lm=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            vocab_size=512,
            max_position_embeddings=256,  # room for the generation benchmark's dialogue
            word_embed_proj_dim=64,
        ),
        tokenizer_size=500,
        vision=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            patch_size=32,
            image_size=IMAGE_SIZE,
        ),
        batch_size=8,
        warmup_steps=1,
        bare_steps=3,
        fit_steps=3,
        new_tokens=8,
        loader_batches=3,
        samples=64,
        per_shard=32,
        num_workers=1,
        min_fit_ratio=0.0,
        default_timeout_s=90,
    ),
}


def write_stand_ins(size: Size, shards: list[str], directory: Path) -> tuple[Path, Path]:
    """Write the LM's config and tokenizer (its words: those of the shards' captions) and
    the tower's config and image processor; return the two directories."""
    lm_dir, clip_dir = directory / "lm", directory / "clip"
    special = dict(bos_token_id=2, eos_token_id=2, pad_token_id=1)
    OPTConfig(**size.lm, **special).save_pretrained(lm_dir)
    stand_in_tokenizer(size.tokenizer_size, shard_captions(shards)).save_pretrained(lm_dir)
    CLIPVisionConfig(**size.vision).save_pretrained(clip_dir)
    side = size.vision["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(clip_dir)
    return lm_dir, clip_dir


def stand_in_tokenizer(n_tokens: int, texts: Iterator[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly ``n_tokens`` tokens: OPT's specials, the words of
    ``texts``, then filler tokens (so the embedding and vocabulary matmuls are OPT's)."""
    vocab = dict(SPECIAL_TOKENS)
    for text in texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    if len(vocab) > n_tokens:
        raise ValueError(f"{len(vocab)} distinct words do not fit a {n_tokens}-token tokenizer")
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), n_tokens)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", SPECIAL_TOKENS["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def shard_captions(shards: list[str]) -> Iterator[str]:
    """The ``.txt`` captions of WebDataset shards, in order."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8")
