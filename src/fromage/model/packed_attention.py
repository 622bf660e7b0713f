"""The attention masks of a packed LM pass, layer type by layer type.

A packed pass hands the LM an explicit 4D mask, which transformers models use as given,
so the mask must carry everything the model's own masks would: the block-diagonal causal
pattern that keeps the sequences apart and, for LMs whose attention slides, the window.
An LM whose layers all slide (Mistral, Phi-3, Starcoder2) takes one windowed mask; one
that mixes sliding and full layers (Gemma 2/3, Qwen 2/3 with ``use_sliding_window``)
takes a mask per layer type, as a dict keyed like ``config.layer_types``.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from fromage.model.sequences import PackedSequences

FULL = "full_attention"
SLIDING = "sliding_attention"


def _attention_layout(config: PretrainedConfig) -> tuple[int | None, set[str]]:
    """(sliding window or None, the layer types named by the config, maybe empty)."""
    text = config.get_text_config()
    return getattr(text, "sliding_window", None), set(getattr(text, "layer_types", None) or [])


def why_packing_is_inexact(config: PretrainedConfig) -> str | None:
    """Why one packed pass cannot reproduce this LM's padded passes, or None if it can."""
    text = config.get_text_config()
    if getattr(text, "use_bidirectional_attention", False):
        return "its attention is bidirectional, so sequences packed in one row would see later ones"
    _, layer_types = _attention_layout(config)
    unknown = sorted(layer_types - {FULL, SLIDING})
    if unknown:
        return f"its layer types {unknown} take masks that packing does not build"
    return None


def packed_attention_masks(
    config: PretrainedConfig, packed: PackedSequences, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` argument for a packed pass of the LM described by ``config``:
    one (R, 1, C, C) mask, or one per layer type when some layers slide and some do not."""
    window, layer_types = _attention_layout(config)
    full = packed.attention_mask(dtype)
    if window is None or (layer_types and SLIDING not in layer_types):
        return full
    windowed = packed.attention_mask(dtype, window)
    return {FULL: full, SLIDING: windowed} if layer_types else windowed  # else: all slide
