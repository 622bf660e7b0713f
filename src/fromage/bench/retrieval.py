"""Top-10 retrieval from saved banks of 10^5 to 3.3x10^6 (CC3M's size) 256-d vectors,
exact and indexed: latency per query, recall@10 against exact search on the same
queries, resident memory, open time and index build time, through ``build_index``,
``ImageBank.open`` and ``search``, as the CLI and the web demo use them.

The vectors are unit vectors from a mixture of ``CLUSTERS`` Gaussian clusters, the
structure of real embeddings (uniform random ones have no near neighbours, and an index
finds them at random); the queries are fresh draws from the same mixture. Each size grows
the bank of the one before (appending drops its index, which is built again), and each
bank is opened and searched in a fresh process, so open time and memory are the bank's.
``bench.model_recall`` checks the index's recall on the demo model's own embeddings.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fromage.infer.bank import INDEX_FILE, ImageBank, append_to_bank
from fromage.infer.bank_index import build_index

CLUSTERS = 3000
# per-dimension std of a cluster around its unit centre: two images of a cluster meet at
# cosine ~0.7, of two clusters at ~0, and a query's nearest of 3.3M at ~0.8
SPREAD = 0.04
PART = 500_000  # vectors per bank part
K = 10


class ClusteredVectors:
    """Draws of unit vectors from a fixed mixture of Gaussian clusters."""

    def __init__(self, dim: int, clusters: int = CLUSTERS, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.centres = F.normalize(torch.randn(clusters, dim, generator=self.generator), dim=-1)

    def draw(self, n: int) -> torch.Tensor:
        which = torch.randint(0, len(self.centres), (n,), generator=self.generator)
        noise = torch.randn(n, self.centres.shape[1], generator=self.generator)
        return F.normalize(self.centres[which] + SPREAD * noise, dim=-1)


def _resident_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def _probe(directory: str, queries: np.ndarray, k: int) -> dict:
    """In a fresh process: open the bank, search each query alone, report the hits."""
    before = _resident_mb()[0]
    start = time.perf_counter()
    bank = ImageBank.open(directory)
    open_s = time.perf_counter() - start
    queries = torch.from_numpy(queries)
    start = time.perf_counter()
    bank.search(queries[:1], k=k)  # an exact bank reads its vectors here
    first_s = time.perf_counter() - start
    rows, start = [], time.perf_counter()
    for query in queries:
        rows.append([int(hit.id) for hit in bank.search(query[None], k=k)[0]])
    ms = 1000 * (time.perf_counter() - start) / len(queries)
    rss, peak = _resident_mb()
    return {
        "search": bank.search_kind,
        "open_s": open_s,
        "first_search_s": first_s,
        "ms_per_query": ms,
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "rss_before_open_mb": before,
        "rows": rows,
    }


def _in_fresh_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def recall_against_exact(found: list[list[int]], exact: torch.Tensor) -> float:
    """Mean share of the exact top-k found in each query's top-k."""
    return float(
        np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact.tolist(), strict=True)])
    )


def _grow(directory: Path, vectors: ClusteredVectors, start: int, stop: int, queries, top):
    """Append rows ``start:stop`` to the bank in parts; returns the queries' exact top-k
    over the grown bank, merged part by part with ``top`` (scores, rows)."""
    for first in range(start, stop, PART):
        part = vectors.draw(min(PART, stop - first))
        ids = [str(i) for i in range(first, first + len(part))]
        append_to_bank(directory, part, ids, ids, "synthetic")
        scores, rows = (queries @ part.T).topk(K, dim=1)
        scores, rows = torch.cat([top[0], scores], 1), torch.cat([top[1], rows + first], 1)
        best = scores.topk(K, dim=1).indices
        top = (scores.gather(1, best), rows.gather(1, best))
    return top


def run(
    sizes=(10**5, 10**6, 3_300_000),
    dim: int = 256,
    n_queries: int = 100,
    kinds=("exact", "ivfpq"),
    workdir: str | None = None,
) -> dict:
    vectors = ClusteredVectors(dim)
    queries = vectors.draw(n_queries)
    top = (torch.empty(n_queries, 0), torch.empty(n_queries, 0, dtype=torch.long))
    result, grown = {}, 0
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        directory = Path(scratch) / "bank"
        for size in sorted(sizes):
            top = _grow(directory, vectors, grown, size, queries, top)
            grown = size
            for kind in kinds:
                start = time.perf_counter()
                entry = build_index(directory, kind)
                build_s = time.perf_counter() - start
                probe = _in_fresh_process(_probe, str(directory), queries.numpy(), K)
                index_file = directory / INDEX_FILE
                result[f"{size} {kind}"] = {
                    "size": size,
                    "kind": kind,
                    "index": entry,
                    "build_s": build_s,
                    "index_mb": index_file.stat().st_size / 2**20 if index_file.exists() else 0,
                    "recall_at_10": recall_against_exact(probe.pop("rows"), top[1]),
                } | probe
    return result


def growth(result: dict) -> list[str]:
    """How latency, memory and open time grow from each size to the next, per kind:
    the exponent e of cost ~ size^e."""
    lines = []
    by_kind = {}
    for row in result.values():
        if isinstance(row, dict) and "kind" in row:
            by_kind.setdefault(row["kind"], []).append(row)
    for kind, rows in by_kind.items():
        for small, large in itertools.pairwise(rows):
            ratio = math.log(large["size"] / small["size"])
            exponents = {
                key: math.log(large[key] / small[key]) / ratio
                for key in ("ms_per_query", "rss_mb", "open_s")
            }
            lines.append(
                f"  {kind} {small['size']:,} -> {large['size']:,}: latency ~ size^"
                f"{exponents['ms_per_query']:.2f}, RSS ~ size^{exponents['rss_mb']:.2f}, "
                f"open ~ size^{exponents['open_s']:.2f}"
            )
    return lines


def summary(result: dict) -> list[str]:
    lines = [
        "retrieval, top-10 from saved banks of clustered 256-d unit vectors "
        "(one query at a time; recall@10 against exact search):"
    ]
    for row in result.values():
        if not isinstance(row, dict) or "kind" not in row:
            continue
        lines.append(
            f"  {row['size']:>9,} {row['search']:<13} {row['ms_per_query']:7.2f} ms/query, "
            f"recall@10 {row['recall_at_10']:.3f}, RSS {row['rss_mb']:6.0f} MB (peak "
            f"{row['peak_rss_mb']:.0f}), open {row['open_s']:.2f} s (first search "
            f"{row['first_search_s']:.2f} s), index {row['index_mb']:.0f} MB built in "
            f"{row['build_s']:.0f} s"
        )
    lines += growth(result)
    if "real_model" in result:
        r = result["real_model"]
        lines.append(
            f"  demo model's embeddings ({r['bank']:,} augmented images, {r['queries']} caption "
            f"queries, {r['search']}): recall@10 {r['recall_at_10']:.3f} against exact"
        )
    return lines
