"""An image bank: normalised ``image_to_shared`` embeddings with their ids and sources.

On disk a bank is a directory of parts: ``part-NNNNN.jsonl`` (one ``{"id", "source"}``
row per image) and ``part-NNNNN.safetensors`` (the matching ``(n, D)`` embeddings),
plus ``bank.json`` (width and the fingerprint of the model that embedded the images).
Appending writes a new part, table first and embeddings last through an atomic rename,
so a crash mid-append leaves no part whose rows and vectors disagree. Nothing is pickled.

Search is exact (cosine, torch). ``use_faiss()`` switches to a FAISS index (the
``faiss`` extra), which pays off for banks in the millions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fromage.metrics import target_ranks

BANK_FILE = "bank.json"


@dataclass(frozen=True)
class RetrievedImage:
    id: str
    score: float
    source: str | None = None  # path, url or ``shard.tar#member`` to load the image from


class ImageBank:
    """(N, D) embeddings, N unique ids and their sources; top-k search that can exclude ids.

    ``embedder`` fingerprints the model whose ``image_to_shared`` made the embeddings
    (see ``fromage.bank_build.embedder_fingerprint``); a bank is only meaningful for it.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        ids: Sequence[str],
        sources: Sequence[str] | None = None,
        embedder: str | None = None,
    ):
        sources = list(ids) if sources is None else list(sources)
        if embeddings.dim() != 2 or not len(embeddings) == len(ids) == len(sources):
            raise ValueError(
                f"need (N, D) embeddings for N ids and sources, got {tuple(embeddings.shape)} "
                f"for {len(ids)} ids and {len(sources)} sources"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("image bank ids must be unique")
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.ids = list(ids)
        self.sources = sources
        self.embedder = embedder
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}
        self._faiss = None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def source_of(self, image_id: str) -> str:
        return self.sources[self._index[image_id]]

    def ids_of_sources(self, sources: Collection[str]) -> set[str]:
        """Ids of the bank images loaded from any of ``sources`` (to exclude input images)."""
        wanted = set(sources)
        return {i for i, source in zip(self.ids, self.sources, strict=True) if source in wanted}

    # ----------------------------------------------------------------- search
    def search(
        self, queries: torch.Tensor, k: int, exclude: Collection[str] = ()
    ) -> list[list[RetrievedImage]]:
        """Top-``k`` images for each (D,) row of ``queries``, never an id in ``exclude``."""
        if len(self) == 0:
            raise ValueError("cannot search an empty image bank")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be (Q, {self.dim}) for this bank, got {tuple(queries.shape)}"
            )
        excluded = [self._index[i] for i in set(exclude) if i in self._index]
        k = min(k, len(self) - len(excluded))
        if self._faiss is not None:
            scores, indices = self._faiss_search(queries, k, set(excluded))
        else:
            scores = queries.float().to(self.embeddings.device) @ self.embeddings.T
            scores[:, excluded] = float("-inf")
            scores, indices = scores.topk(k, dim=1)
        return [
            [
                RetrievedImage(self.ids[i], s, self.sources[i])
                for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True)
            ]
            for row_ids, row_scores in zip(indices, scores, strict=True)
        ]

    def ranks(
        self,
        queries: torch.Tensor,
        targets: Sequence[str],
        exclude: Sequence[Collection[str]] | None = None,
    ) -> torch.Tensor:
        """0-based rank of each query's target image among the bank images not in its
        ``exclude`` set (ties count against the target): recall@k is ``ranks < k``."""
        scores = queries.float().to(self.embeddings.device) @ self.embeddings.T
        for row, excluded in enumerate(exclude or []):
            scores[row, [self._index[i] for i in excluded if i in self._index]] = float("-inf")
        columns = torch.tensor([self._index[t] for t in targets], device=scores.device)
        return target_ranks(scores, columns)

    def use_faiss(self, index_factory: str = "Flat") -> ImageBank:
        """Search with a FAISS inner-product index built by ``faiss.index_factory``
        (``"Flat"`` is exact; e.g. ``"IVF4096,Flat"`` or ``"HNSW32"`` are approximate)."""
        try:
            import faiss
        except ImportError:
            raise ImportError(
                "FAISS search needs the extra: pip install 'fromage[faiss]'"
            ) from None
        index = faiss.index_factory(self.dim, index_factory, faiss.METRIC_INNER_PRODUCT)
        vectors = self.embeddings.cpu().numpy()
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        self._faiss = index
        return self

    def _faiss_search(self, queries: torch.Tensor, k: int, excluded: set[int]):
        """Ask for ``k`` more than the excluded count, then drop the excluded hits."""
        scores, indices = self._faiss.search(queries.float().cpu().numpy(), k + len(excluded))
        kept = [
            [(s, i) for s, i in zip(row_s, row_i, strict=True) if i >= 0 and i not in excluded][:k]
            for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
        return (
            torch.tensor([[s for s, _ in row] for row in kept]),
            torch.tensor([[i for _, i in row] for row in kept], dtype=torch.long),
        )

    # ----------------------------------------------------------------- storage
    def save(self, directory: str | Path) -> Path:
        """Write this bank to a new, empty directory (use ``append_to_bank`` to grow one)."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"{directory} is not empty; append to it with append_to_bank")
        append_to_bank(directory, self.embeddings, self.ids, self.sources, self.embedder)
        return directory

    @classmethod
    def open(cls, directory: str | Path) -> ImageBank:
        """Read every complete part of a bank directory, in order."""
        directory = Path(directory)
        header = _read_header(directory)
        embeddings, ids, sources = [torch.empty(0, header["dim"])], [], []
        for vectors_file in sorted(directory.glob("part-*.safetensors")):
            rows = read_jsonl(vectors_file.with_suffix(".jsonl"))
            vectors = load_file(vectors_file)["embeddings"]
            if len(vectors) != len(rows):
                raise ValueError(
                    f"{vectors_file}: {len(vectors)} vectors for {len(rows)} table rows"
                )
            embeddings.append(vectors)
            ids += [row["id"] for row in rows]
            sources += [row["source"] for row in rows]
        return cls(torch.cat(embeddings), ids, sources, header["embedder"])


def append_to_bank(
    directory: str | Path,
    embeddings: torch.Tensor,
    ids: Sequence[str],
    sources: Sequence[str],
    embedder: str | None,
) -> None:
    """Add one part to the bank at ``directory`` (created if needed).

    Refuses vectors of another width, from another embedder, or ids already in the bank.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dim = embeddings.shape[1]
    header_file = directory / BANK_FILE
    if header_file.exists():
        header = _read_header(directory)
        if (header["dim"], header["embedder"]) != (dim, embedder):
            raise ValueError(
                f"{directory} holds {header['dim']}-d vectors from embedder {header['embedder']}; "
                f"refusing {dim}-d vectors from {embedder}"
            )
    else:
        _write_atomically(header_file, json.dumps({"dim": dim, "embedder": embedder}).encode())
    parts = sorted(directory.glob("part-*.safetensors"))
    existing = {row["id"] for part in parts for row in read_jsonl(part.with_suffix(".jsonl"))}
    clashes = existing.intersection(ids)
    if clashes:
        raise ValueError(f"ids already in {directory}: {sorted(clashes)[:5]}")
    name = directory / f"part-{len(parts):05d}"
    table = "".join(
        json.dumps({"id": i, "source": s}) + "\n" for i, s in zip(ids, sources, strict=True)
    )
    _write_atomically(name.with_suffix(".jsonl"), table.encode())
    temporary = name.with_suffix(".safetensors.tmp")
    save_file({"embeddings": embeddings.float().contiguous().cpu()}, temporary)
    os.replace(temporary, name.with_suffix(".safetensors"))


def _read_header(directory: Path) -> dict:
    header_file = directory / BANK_FILE
    if not header_file.is_file():
        raise FileNotFoundError(f"{directory} is not an image bank (no {BANK_FILE})")
    return json.loads(header_file.read_text())


def read_jsonl(table: Path) -> list[dict]:
    """The JSON objects of a JSON Lines file."""
    return [json.loads(line) for line in table.read_text().splitlines() if line]


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
