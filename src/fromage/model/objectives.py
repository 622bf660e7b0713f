"""The losses of the two training objectives (docs/method.md); ``FromageModel.forward``
lays out their sequences and runs the LM.

Captioning (image -> text): next-token cross-entropy on BOS and the caption tokens after
``[v_1..v_k] [BOS] [prompt]`` (as the paper's release trained them). Retrieval (text ->
image): cross-entropy on the tokens of ``caption [RET]``, plus symmetric InfoNCE between
the ``[RET]`` state's embedding and the image's (``contrastive_loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fromage.model.sequences import IGNORE

# Maps a local (B, D) tensor to the (world * B, D) global batch; the local rows must keep
# their gradient (e.g. all-gather without grad, then put the local tensor back in place).
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    text_to_image_acc: torch.Tensor
    image_to_text_acc: torch.Tensor


@dataclass
class FromageLosses:
    caption: torch.Tensor  # CE on caption tokens, image -> text
    retrieval_lm: torch.Tensor  # CE on caption tokens incl. [RET], text only
    contrastive: torch.Tensor  # InfoNCE between [RET] and image embeddings
    text_to_image_acc: torch.Tensor
    image_to_text_acc: torch.Tensor
    text_embeddings: torch.Tensor  # (B, shared_dim), normalised [RET] embeddings
    image_embeddings: torch.Tensor  # (B, shared_dim), normalised image embeddings
    # target tokens that ``caption`` / ``retrieval_lm`` average over (0-dim): a
    # data-parallel step weights each rank's mean by them (train.distributed)
    caption_tokens: torch.Tensor | None = None
    retrieval_tokens: torch.Tensor | None = None

    def total(self, caption_weight: float = 1.0, retrieval_weight: float = 1.0) -> torch.Tensor:
        """cap_scale * CE_caption + ret_scale * (CE_retrieval + InfoNCE)."""
        return caption_weight * self.caption + retrieval_weight * (
            self.retrieval_lm + self.contrastive
        )


def contrastive_loss(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Gather | None = None,
) -> ContrastiveOutput:
    """InfoNCE over L2-normalised (B, D) embeddings; row i of each is a positive pair.

    With ``gather`` every rank contrasts against the global batch, as the release did;
    the gather decides which rows carry gradient (see ``gather_with_global_grad``).
    """
    if gather is not None:
        text_emb, image_emb = gather(text_emb), gather(image_emb)
    logits_per_image = logit_scale.exp() * image_emb @ text_emb.T  # (N, N)
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


def n_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets in ``labels`` (B, L): the count ``FromageModel.mean_nll`` divides by (0-dim)."""
    return (labels[:, 1:] != IGNORE).sum()
