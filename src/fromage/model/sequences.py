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


def concat_pairs(batch: EmbeddedBatch, length: int | None = None) -> EmbeddedBatch:
    """Rows (0, 1), (2, 3), ... become one row each, ``[row_a, row_b]``, padding at the end.

    An odd last row is kept alone. The result is cut to ``length``, by default its
    longest row (which costs a device-to-host sync).
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
    length = int(packed.mask.sum(1).max()) if length is None else length
    return EmbeddedBatch(
        packed.embeds[:, :length], packed.mask[:, :length], packed.labels[:, :length]
    )


@dataclass
class PackedSequences:
    """Several padded batches' sequences laid end to end in rows of ``capacity`` slots.

    ``position_ids`` restart at 0 for every sequence, and ``attention_mask`` gives the
    block-diagonal causal mask that keeps the sequences apart; an explicit 4D mask is
    passed as is by every transformers model, where not every model infers it from
    position ids. ``source`` and ``target`` map each real position of the inputs
    (flattened in order) to its slot.
    """

    embeds: torch.Tensor  # (R, capacity, D)
    position_ids: torch.Tensor  # (R, capacity)
    source: torch.Tensor
    target: torch.Tensor
    shapes: list[tuple[int, int]]  # (B, L) of each input batch

    def attention_mask(self, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """(R, 1, capacity, capacity) additive mask, 0 to attend and ``dtype``'s min not to:
        each slot sees the earlier slots of its own sequence, with ``window`` only the
        ``window - 1`` positions before it and itself (transformers' sliding window)."""
        positions = self.position_ids
        capacity = positions.shape[1]
        sequence = (positions == 0).cumsum(1)  # a new sequence starts at every position 0
        causal = torch.ones(capacity, capacity, dtype=torch.bool, device=positions.device).tril()
        allowed = (sequence[:, :, None] == sequence[:, None, :]) & causal
        if window is not None:
            allowed &= positions[:, :, None] - positions[:, None, :] < window
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
        return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """(R, capacity, H) outputs -> one (B, L, H) tensor per input batch, 0 at padding."""
        width = packed.shape[-1]
        flat = packed.new_zeros(sum(b * length for b, length in self.shapes), width)
        flat[self.source] = packed.reshape(-1, width)[self.target]
        sizes = [b * length for b, length in self.shapes]
        return [
            part.reshape(b, length, width)
            for part, (b, length) in zip(flat.split(sizes), self.shapes, strict=True)
        ]


def paired_lengths(lengths: list[int]) -> list[int]:
    """Row lengths after ``concat_pairs``."""
    return [sum(lengths[i : i + 2]) for i in range(0, len(lengths), 2)]


def pack_sequences(batches: list[EmbeddedBatch], lengths: list[list[int]]) -> PackedSequences:
    """Pack every row of ``batches`` (row lengths in ``lengths``, real positions first)
    into as few rows as first-fit-decreasing finds, each twice the longest sequence."""
    capacity = 2 * max(max(row) for row in lengths)
    sequences = [
        (length, batch_index, row)
        for batch_index, rows in enumerate(lengths)
        for row, length in enumerate(rows)
    ]
    free: list[int] = []  # free slots per packed row
    source, target, positions = [], [], []
    offsets = [0]
    for batch in batches[:-1]:
        offsets.append(offsets[-1] + batch.embeds.shape[0] * batch.embeds.shape[1])
    for length, batch_index, row in sorted(sequences, reverse=True):
        slot = next((i for i, room in enumerate(free) if room >= length), len(free))
        if slot == len(free):
            free.append(capacity)
        start = slot * capacity + capacity - free[slot]
        free[slot] -= length
        width = batches[batch_index].embeds.shape[1]
        source += range(
            offsets[batch_index] + row * width, offsets[batch_index] + row * width + length
        )
        target += range(start, start + length)
        positions += range(length)
    device = batches[0].embeds.device
    source_t = torch.tensor(source, device=device)
    target_t = torch.tensor(target, device=device)
    dim = batches[0].embeds.shape[-1]
    flat_inputs = torch.cat([b.embeds.reshape(-1, dim) for b in batches])
    embeds = flat_inputs.new_zeros(len(free) * capacity, dim).index_copy(
        0, target_t, flat_inputs[source_t]
    )
    position_ids = torch.zeros(len(free) * capacity, dtype=torch.long, device=device)
    position_ids[target_t] = torch.tensor(positions, device=device)
    return PackedSequences(
        embeds=embeds.reshape(len(free), capacity, dim),
        position_ids=position_ids.reshape(len(free), capacity),
        source=source_t,
        target=target_t,
        shapes=[(b.embeds.shape[0], b.embeds.shape[1]) for b in batches],
    )
