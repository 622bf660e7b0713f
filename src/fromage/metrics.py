"""Recall@k while training, as torchmetrics metrics that gather over processes.

torchmetrics' ``RetrievalRecall`` would need every (query, candidate) score flattened
with an index per query; ranking against the target's own score (``fromage.ranks``)
needs only one (Q, N) score block at a time, which keeps 10^4 x 10^4 validation sets in
memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fromage.ranks import paired_ranks, recall_at_k


class PairedRecall(Metric):
    """Recall@k (percent) in both directions for N (text, image) pairs, row i of each a
    positive. Embeddings from every rank are concatenated before computing, so the
    ranking is over the whole validation set."""

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10)):
        super().__init__()
        self.ks = list(ks)
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.add_state("image", default=[], dist_reduce_fx="cat")

    def update(self, text: torch.Tensor, image: torch.Tensor) -> None:
        self.text.append(text.detach().float())
        self.image.append(image.detach().float())

    def compute(self) -> dict[str, float]:
        text, image = dim_zero_cat(self.text), dim_zero_cat(self.image)
        results = {"n_pairs": float(len(text))}
        for direction, ranks in [
            ("t2i", paired_ranks(text, image)),
            ("i2t", paired_ranks(image, text)),
        ]:
            results.update({f"{direction}_{k}": v for k, v in recall_at_k(ranks, self.ks).items()})
        return results


class RankRecall(Metric):
    """Recall@k (percent) from 0-based ranks gathered over every rank's queries, so each
    data-parallel process can rank its share of the queries against the whole bank."""

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10)):
        super().__init__()
        self.ks = list(ks)
        self.add_state("ranks", default=[], dist_reduce_fx="cat")

    def update(self, ranks: torch.Tensor) -> None:
        self.ranks.append(ranks.detach().long())

    def compute(self) -> dict[str, float]:
        return recall_at_k(dim_zero_cat(self.ranks), self.ks)
