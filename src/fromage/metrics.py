"""Retrieval metrics, one implementation for training, evaluation and benchmarks.

A query's rank is the number of candidates scoring above its target (ties count against
the target), so 0 is ranked first and recall@k is the percentage of ranks below k.
Recall is reported **in percent** everywhere, as the paper's tables are.

torchmetrics' ``RetrievalRecall`` would need every (query, candidate) score flattened
with an index per query; ranking against the target's own score needs only one
(Q, N) score block at a time, which keeps 10^4 x 10^4 validation sets in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column in (Q, N) ``scores``; targets (Q,).

    Candidates excluded from a query's ranking should have score ``-inf``.
    """
    target_scores = scores.gather(1, targets[:, None])  # (Q, 1)
    return (scores >= target_scores).sum(1) - 1


def paired_ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Ranks of key i for query i among all keys; (N, D) x (N, D) -> (N,), in row chunks."""
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.T  # (chunk, N)
        rows = torch.arange(start, start + len(scores), device=scores.device)
        ranks.append(target_ranks(scores, rows))
    return torch.cat(ranks)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """``{"R@k": percent}`` from 0-based ranks; none is refused (their mean is NaN)."""
    if ranks.numel() == 0:
        raise ValueError("recall@k of no queries: nothing was ranked")
    return {f"R@{k}": 100 * float((ranks < k).float().mean()) for k in ks}


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
