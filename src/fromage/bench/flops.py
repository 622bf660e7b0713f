"""Model FLOPs per sample of one training step, and the throughput that bounds.

Counting (multiply-add = 2 FLOPs): every LM token costs ``2 * P`` in its matmuls
(P = non-embedding weights) plus attention scores; the vocabulary projection is paid
only at target positions. Backward flows through the frozen LM to the visual tokens and
``[RET]`` but computes no weight gradients, so it costs about one more forward. The
frozen vision tower runs forward only (or not at all with precomputed features); a built
model's tower is counted by PyTorch's FlopCounterMode, whatever its architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from fromage.model.fromage import FromageModel

H100_BF16_DENSE_PEAK = 989.4e12  # FLOP/s, H100 SXM, dense bf16 tensor cores


@dataclass(frozen=True)
class Transformer:
    layers: int
    width: int
    ffn: int
    # the weights of a built model's matmuls, counted from its layers (grouped-query
    # attention, gated MLPs); None: the classic layout below
    matmul_weights: int | None = None

    @property
    def weights(self) -> int:
        """Matmul weights: attention (4 d^2) and MLP (2 d ffn) per layer, unless counted."""
        if self.matmul_weights is not None:
            return self.matmul_weights
        return self.layers * (4 * self.width**2 + 2 * self.width * self.ffn)

    def forward_flops(self, tokens: int) -> float:
        attention_scores = 4 * self.layers * self.width * tokens  # QK^T and AV, per token
        return tokens * (2 * self.weights + attention_scores)


# Published architectures: OPT-6.7B (Zhang et al. 2022), CLIP ViT-L/14 at 224 px (257 tokens).
OPT_6_7B = Transformer(layers=32, width=4096, ffn=16384)
OPT_VOCABULARY = 50272
CLIP_VIT_L14 = Transformer(layers=24, width=1024, ffn=4096)
CLIP_TOKENS = 257


def step_flops_per_sample(
    lm: Transformer = OPT_6_7B,
    vocabulary: int = OPT_VOCABULARY,
    caption_tokens: float = 14.0,
    visual_tokens: int = 1,
    vision: Transformer | None = CLIP_VIT_L14,
    vision_tokens: int = CLIP_TOKENS,
    prompt_tokens: int = 0,
) -> dict[str, float]:
    """FLOPs of one sample in one step (caption pass + retrieval pass, forward + backward).

    ``caption_tokens`` counts BOS and ``[RET]``; CC3M captions average about 12 words.
    ``prompt_tokens``: the training prompt between the visual tokens and the caption.
    """
    caption_pass = lm.forward_flops(round(visual_tokens + prompt_tokens + caption_tokens))
    retrieval_pass = lm.forward_flops(round(caption_tokens))
    targets = (caption_tokens - 2) + (caption_tokens - 1)  # captioning; retrieval incl. [RET]
    head = 2 * lm.width * vocabulary * targets
    lm_total = 2 * (caption_pass + retrieval_pass + head)  # forward, then input-gradient backward
    tower = vision.forward_flops(vision_tokens) if vision is not None else 0.0
    return {"lm": lm_total, "vision": tower, "total": lm_total + tower}


def model_flops_per_sample(
    model: FromageModel, caption_tokens: float, precomputed_features: bool = False
) -> dict[str, float]:
    """``step_flops_per_sample`` with the shapes of ``model``'s own LM, plus its tower's
    forward as counted on one image (left out when the features are precomputed)."""
    flops = step_flops_per_sample(
        lm_shape(model),
        vocabulary=model.lm.get_output_embeddings().out_features,
        caption_tokens=caption_tokens,
        visual_tokens=model.n_visual_tokens,
        vision=None,
        prompt_tokens=len(model.prompt_ids),
    )
    if not precomputed_features:
        flops["vision"] = tower_forward_flops(model)
        flops["total"] += flops["vision"]
    return flops


def lm_shape(model: FromageModel) -> Transformer:
    """The LM as a ``Transformer`` whose matmul weights are counted from its layers: every
    linear map (``nn.Linear``, GPT-2's ``Conv1D``) but the vocabulary head."""
    text = model.lm.config.get_text_config()
    head = model.lm.get_output_embeddings()
    weights = sum(
        module.weight.numel()
        for module in model.lm.modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head
    )
    ffn = next(
        (
            getattr(text, k)
            for k in ("ffn_dim", "intermediate_size", "n_inner")
            if getattr(text, k, None)
        ),
        4 * text.hidden_size,
    )
    return Transformer(text.num_hidden_layers, text.hidden_size, ffn, matmul_weights=weights)


def tower_forward_flops(model: FromageModel) -> float:
    """The frozen tower's forward FLOPs on one image, counted by PyTorch's FlopCounterMode
    (matmuls and convolutions; any architecture: ViT, CLIP, CNN)."""
    device = model.image_to_lm.weight.device
    pixels = torch.zeros(1, 3, *input_size(model), device=device)  # (1, 3, H, W)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.image_features(pixels)
    return float(counter.get_total_flops())


def input_size(model: FromageModel) -> tuple[int, int]:
    """(H, W) of the tower's preprocessed images."""
    return tuple(model.vision.preprocess(Image.new("RGB", (256, 256))).shape[1:])


def paper_config_report(batch_size: int = 180) -> dict:
    with_tower = step_flops_per_sample()
    features = step_flops_per_sample(vision=None)
    return {
        "config": "OPT-6.7B + CLIP ViT-L/14, k=1, ~14 caption tokens, batch 180",
        "gflops_per_sample": with_tower["total"] / 1e9,
        "gflops_per_sample_precomputed_features": features["total"] / 1e9,
        "h100_bf16_peak_samples_per_s": H100_BF16_DENSE_PEAK / with_tower["total"],
        "h100_bf16_peak_samples_per_s_precomputed_features": H100_BF16_DENSE_PEAK
        / features["total"],
        "h100_bf16_peak_s_per_step": batch_size * with_tower["total"] / H100_BF16_DENSE_PEAK,
    }
