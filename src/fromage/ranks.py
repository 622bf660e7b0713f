"""Ranks and recall@k, one implementation for training, evaluation, banks and benchmarks.

A query's rank is the number of candidates scoring above its target (ties count against
the target), so 0 is ranked first and recall@k is the percentage of ranks below k.
Recall is reported **in percent** everywhere, as the paper's tables are. Plain torch:
searching a bank needs these without torchmetrics (``fromage.metrics``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
