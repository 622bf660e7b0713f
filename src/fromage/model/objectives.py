"""The retrieval objective: symmetric InfoNCE between ``[RET]`` and image embeddings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Maps a local (B, D) tensor to the (world * B, D) global batch; the local rows must keep
# their gradient (e.g. all-gather without grad, then put the local tensor back in place).
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    text_to_image_acc: torch.Tensor
    image_to_text_acc: torch.Tensor


def contrastive_loss(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Gather | None = None,
) -> ContrastiveOutput:
    """InfoNCE of DESIGN.md over L2-normalised embeddings; row i of each is a positive pair.

    With ``gather`` every rank contrasts against the global batch, as the release did.
    """
    if gather is not None:
        text_emb, image_emb = gather(text_emb), gather(image_emb)
    logits_per_image = logit_scale.exp() * image_emb @ text_emb.T
    logits_per_text = logits_per_image.T
    target = torch.arange(len(text_emb), device=text_emb.device)
    loss = (
        F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_image, target)
    ) / 2
    return ContrastiveOutput(
        loss=loss,
        text_to_image_acc=(logits_per_text.argmax(1) == target).float().mean().detach(),
        image_to_text_acc=(logits_per_image.argmax(1) == target).float().mean().detach(),
    )
