"""Top-10 query latency against banks of random 256-d vectors: exact torch, and FAISS."""

from __future__ import annotations

import time

import torch

from fromage.infer.bank import ImageBank


def _latency(bank: ImageBank, queries: torch.Tensor) -> float:
    bank.search(queries[:1], k=10)  # warm-up
    start = time.perf_counter()
    for query in queries:
        bank.search(query[None], k=10)
    return (time.perf_counter() - start) / len(queries)


def run(sizes=(10**4, 10**5, 10**6), dim: int = 256, n_queries: int = 20) -> dict:
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(
        torch.randn(n_queries, dim, generator=generator), dim=-1
    )
    result = {}
    for size in sizes:
        bank = ImageBank(torch.randn(size, dim, generator=generator), [str(i) for i in range(size)])
        row = {"torch_ms": 1000 * _latency(bank, queries)}
        try:
            row["faiss_flat_ms"] = 1000 * _latency(bank.use_faiss("Flat"), queries)
        except ImportError:
            row["faiss_flat_ms"] = None
        result[str(size)] = row
    return result
