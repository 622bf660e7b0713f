"""An image bank: normalised ``image_to_shared`` embeddings with their ids, searched exactly."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RetrievedImage:
    id: str
    score: float


class ImageBank:
    """(N, D) embeddings and N unique ids; cosine top-k search that can exclude ids."""

    def __init__(self, embeddings: torch.Tensor, ids: Sequence[str]):
        if embeddings.dim() != 2 or len(embeddings) != len(ids):
            raise ValueError(
                f"need (N, D) embeddings for N ids, got {tuple(embeddings.shape)} for {len(ids)} ids"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("image bank ids must be unique")
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.ids = list(ids)
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def search(
        self, queries: torch.Tensor, k: int, exclude: Collection[str] = ()
    ) -> list[list[RetrievedImage]]:
        """Top-``k`` images for each (D,) row of ``queries``, never an id in ``exclude``."""
        if len(self) == 0:
            raise ValueError("cannot search an empty image bank")
        scores = queries.float().to(self.embeddings.device) @ self.embeddings.T
        excluded = [self._index[i] for i in exclude if i in self._index]
        scores[:, excluded] = float("-inf")
        k = min(k, len(self) - len(excluded))
        top = scores.topk(k, dim=1)
        return [
            [
                RetrievedImage(self.ids[i], s)
                for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=False)
            ]
            for row_ids, row_scores in zip(top.indices, top.values, strict=False)
        ]
