"""Right-padded batches of input embeddings with their targets, and how to reshape them.

All operations are whole-tensor ops: no Python loop runs over tokens or rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of a position that is not a target (cross-entropy's ignore_index)


@dataclass
class EmbeddedBatch:
    """``embeds`` (B, L, D); ``mask`` (B, L), 1 for real positions; ``labels`` (B, L).

    ``labels[b, t]`` is the token at position t when that token is a target of the
    prediction made at t - 1, else ``IGNORE``.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]


def pack_left(batch: EmbeddedBatch) -> EmbeddedBatch:
    """Move every row's real positions to its front, in order, and padding to its end."""
    order = torch.argsort((batch.mask == 0).int(), dim=1, stable=True)
    return EmbeddedBatch(
        embeds=batch.embeds.gather(1, order[..., None].expand_as(batch.embeds)),
        mask=batch.mask.gather(1, order),
        labels=batch.labels.gather(1, order),
    )


def concat_pairs(batch: EmbeddedBatch) -> EmbeddedBatch:
    """Rows (0, 1), (2, 3), ... become one row each, ``[row_a, row_b]``, padding at the end.

    An odd last row is kept alone. The result is cut to its longest row.
    """
    if len(batch) % 2:
        batch = EmbeddedBatch(
            embeds=torch.cat([batch.embeds, torch.zeros_like(batch.embeds[:1])]),
            mask=torch.cat([batch.mask, torch.zeros_like(batch.mask[:1])]),
            labels=torch.cat([batch.labels, torch.full_like(batch.labels[:1], IGNORE)]),
        )
    paired = EmbeddedBatch(
        *(torch.cat([t[0::2], t[1::2]], dim=1) for t in (batch.embeds, batch.mask, batch.labels))
    )
    packed = pack_left(paired)
    length = int(packed.mask.sum(1).max())
    return EmbeddedBatch(
        packed.embeds[:, :length], packed.mask[:, :length], packed.labels[:, :length]
    )
