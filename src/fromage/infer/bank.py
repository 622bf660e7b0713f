"""An image bank: normalised ``image_to_shared`` embeddings with their ids and sources,
and, so that results can be shown and the bank checked, each image's thumbnail and the
SHA-256 of its bytes.

On disk a bank is a directory of parts: ``part-NNNNN.jsonl`` (one ``{"id", "source",
"sha256"}`` row per image), ``part-NNNNN.thumbs`` (their thumbnails, see
``fromage.infer.thumbnails``) and ``part-NNNNN.safetensors`` (the matching ``(n, D)``
embeddings), plus ``bank.json`` (width and the fingerprint of the model that embedded the
images). Appending writes a new part, table and thumbnails first and embeddings last
through an atomic rename, so a crash mid-append leaves no part whose files disagree.
Nothing is pickled. Parts written before thumbnails and hashes existed (no ``.thumbs``,
no ``sha256``) still open and search; their images just have neither.

Search is exact (cosine, torch). ``use_faiss()`` switches to a FAISS index (the
``faiss`` extra), which pays off for banks in the millions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fromage.data.image_sources import ImageLoadError, read_sources
from fromage.infer.thumbnails import (
    THUMBNAIL_SUFFIX,
    PartsThumbnails,
    ThumbnailFile,
    decode_thumbnail,
    thumbnails_file_bytes,
)
from fromage.metrics import target_ranks

BANK_FILE = "bank.json"
NORM_TOLERANCE = 1e-3  # stored vectors are unit length to float32 rounding, far within this
REBUILD = "rebuild it: delete the bank directory and run `fromage bank` again"


class BankFileError(ValueError):
    """A bank file that is cut short, unreadable or holds vectors no search can use."""


@dataclass(frozen=True)
class RetrievedImage:
    id: str
    score: float
    source: str | None = None  # path, url or ``shard.tar#member`` to load the image from
    thumbnail: bytes | None = field(default=None, repr=False)  # JPEG; None in old banks
    sha256: str | None = None  # of the image's bytes at its source when it was embedded


class ImageBank:
    """(N, D) embeddings, N unique ids and their sources; top-k search that can exclude ids.

    ``embedder`` fingerprints the model whose ``image_to_shared`` made the embeddings
    (see ``fromage.bank_build.embedder_fingerprint``); a bank is only meaningful for it.
    ``hashes`` (hex SHA-256 of each image's bytes) and ``thumbnails`` (JPEG bytes) may be
    None for all or for some images (those of old banks).
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        ids: Sequence[str],
        sources: Sequence[str] | None = None,
        embedder: str | None = None,
        hashes: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
    ):
        sources = list(ids) if sources is None else list(sources)
        hashes = [None] * len(ids) if hashes is None else list(hashes)
        thumbnails = [None] * len(ids) if thumbnails is None else thumbnails
        if embeddings.dim() != 2 or not (
            len(embeddings) == len(ids) == len(sources) == len(hashes) == len(thumbnails)
        ):
            raise ValueError(
                f"need (N, D) embeddings for N ids, sources, hashes and thumbnails, got "
                f"{tuple(embeddings.shape)} for {len(ids)} ids, {len(sources)} sources, "
                f"{len(hashes)} hashes and {len(thumbnails)} thumbnails"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("image bank ids must be unique")
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.ids = list(ids)
        self.sources = sources
        self.embedder = embedder
        self.hashes = hashes
        self.thumbnails = thumbnails
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

    def ids_of_hashes(self, hashes: Collection[str]) -> set[str]:
        """Ids of the bank images whose bytes had any of these SHA-256s (uploads of them)."""
        wanted = set(hashes)
        return {i for i, digest in zip(self.ids, self.hashes, strict=True) if digest in wanted}

    # ----------------------------------------------------------------- thumbnails, hashes
    def thumbnail(self, image_id: str) -> Image.Image | None:
        """The stored thumbnail of an image, or None if its part has none (old banks)."""
        data = self.thumbnails[self._index[image_id]]
        return None if data is None else decode_thumbnail(data)

    def hash_of(self, image_id: str) -> str | None:
        """Hex SHA-256 of the image's bytes when it was embedded (None in old banks)."""
        return self.hashes[self._index[image_id]]

    def duplicates(self) -> list[list[str]]:
        """Groups of ids whose images had the same bytes, in bank order."""
        groups = defaultdict(list)
        for image_id, digest in zip(self.ids, self.hashes, strict=True):
            if digest is not None:
                groups[digest].append(image_id)
        return [group for group in groups.values() if len(group) > 1]

    def verify(self, ids: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """Re-read the sources of ``ids`` (default: every image) and list ``(id, problem)``
        for each image that is missing or whose bytes changed since it was embedded, in
        bank order. Each shard is read once. Images without a stored hash (old banks) can
        only be found missing."""
        rows = [self._index[i] for i in ids] if ids is not None else range(len(self))
        rows_of_source = defaultdict(list)
        for row in rows:
            rows_of_source[self.sources[row]].append(row)
        problems = []
        for source, data in read_sources(rows_of_source):
            digest = None if isinstance(data, ImageLoadError) else hashlib.sha256(data).hexdigest()
            for row in rows_of_source[source]:
                if digest is None:
                    problems.append((row, f"missing: {data}"))
                elif self.hashes[row] is not None and self.hashes[row] != digest:
                    problems.append((row, f"changed: sha256 {digest}, embedded {self.hashes[row]}"))
        return [(self.ids[row], problem) for row, problem in sorted(problems)]

    # ----------------------------------------------------------------- search
    def search(
        self, queries: torch.Tensor, k: int, exclude: Collection[str] = ()
    ) -> list[list[RetrievedImage]]:
        """Top-``k`` images for each (D,) row of ``queries``, never an id in ``exclude``;
        each hit carries its thumbnail (read from disk for an opened bank) and hash."""
        if len(self) == 0:
            raise ValueError("cannot search an empty image bank")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be (Q, {self.dim}) for this bank, got {tuple(queries.shape)}"
            )
        check_finite_queries(queries)
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
                RetrievedImage(self.ids[i], s, self.sources[i], self.thumbnails[i], self.hashes[i])
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
        check_finite_queries(queries)
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
        append_to_bank(
            directory,
            self.embeddings,
            self.ids,
            self.sources,
            self.embedder,
            hashes=self.hashes,
            thumbnails=self.thumbnails,
        )
        return directory

    @classmethod
    def open(cls, directory: str | Path) -> ImageBank:
        """Read every complete part of a bank directory, in order (thumbnails are only
        read from disk when asked for)."""
        directory = Path(directory)
        header = _read_header(directory)
        embeddings, ids, sources, hashes = [torch.empty(0, header["dim"])], [], [], []
        thumbnails = []
        for vectors_file in sorted(directory.glob("part-*.safetensors")):
            rows = read_jsonl(vectors_file.with_suffix(".jsonl"), REBUILD)
            vectors = read_vectors(vectors_file, header["dim"])
            thumbnails_file = vectors_file.with_suffix(THUMBNAIL_SUFFIX)
            part_thumbnails = (
                _readable(thumbnails_file, ThumbnailFile)
                if thumbnails_file.exists()
                else [None] * len(rows)
            )
            if not len(vectors) == len(rows) == len(part_thumbnails):
                raise ValueError(
                    f"{vectors_file}: {len(vectors)} vectors and {len(part_thumbnails)} "
                    f"thumbnails for {len(rows)} table rows"
                )
            embeddings.append(vectors)
            thumbnails.append(part_thumbnails)
            ids += [row["id"] for row in rows]
            sources += [row["source"] for row in rows]
            hashes += [row.get("sha256") for row in rows]
        return cls(
            torch.cat(embeddings),
            ids,
            sources,
            header["embedder"],
            hashes=hashes,
            thumbnails=PartsThumbnails(thumbnails),
        )


def append_to_bank(
    directory: str | Path,
    embeddings: torch.Tensor,
    ids: Sequence[str],
    sources: Sequence[str],
    embedder: str | None,
    hashes: Sequence[str | None] | None = None,
    thumbnails: Sequence[bytes | None] | None = None,
) -> None:
    """Add one part to the bank at ``directory`` (created if needed), with the images'
    SHA-256 ``hashes`` and JPEG ``thumbnails`` where given.

    Refuses vectors of another width, from another embedder, or ids already in the bank,
    and non-finite or zero vectors (no direction to search by); stores them normalised.
    """
    norms = embeddings.double().norm(dim=1)
    if not (torch.isfinite(norms) & (norms > 0)).all():
        raise ValueError(f"refusing non-finite or zero embeddings for {directory}")
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
    hashes = [None] * len(ids) if hashes is None else hashes
    rows = [
        {"id": i, "source": s} | ({} if h is None else {"sha256": h})
        for i, s, h in zip(ids, sources, hashes, strict=True)
    ]
    table = "".join(json.dumps(row) + "\n" for row in rows)
    _write_atomically(name.with_suffix(".jsonl"), table.encode())
    thumbnails_file = name.with_suffix(THUMBNAIL_SUFFIX)
    if thumbnails is not None and any(t is not None for t in thumbnails):
        _write_atomically(thumbnails_file, thumbnails_file_bytes(thumbnails))
    else:  # one left by an append that crashed would otherwise be read as this part's
        thumbnails_file.unlink(missing_ok=True)
    temporary = name.with_suffix(".safetensors.tmp")
    save_file({"embeddings": F.normalize(embeddings.float(), dim=-1).contiguous().cpu()}, temporary)
    os.replace(temporary, name.with_suffix(".safetensors"))


def check_finite_queries(queries: torch.Tensor) -> None:
    """Non-finite queries (a model whose weights hold NaN) would rank by NaN: refuse."""
    if not torch.isfinite(queries).all():
        raise ValueError(
            "the query embeddings are not finite: the model's trained weights hold NaN or "
            "inf (check the checkpoint it was loaded from)"
        )


def read_vectors(path: Path, dim: int) -> torch.Tensor:
    """A part's ``(n, dim)`` unit vectors, refusing a file that is cut short or whose
    vectors are not finite unit vectors (overwritten bytes): searched, they would
    rank by NaN or noise."""
    vectors = _readable(path, lambda p: load_file(p)["embeddings"])
    if vectors.dim() != 2 or vectors.shape[1] != dim:
        raise BankFileError(
            f"{path}: vectors of shape {tuple(vectors.shape)}, not (n, {dim}); {REBUILD}"
        )
    norms = vectors.double().norm(dim=1)
    bad = (~torch.isfinite(vectors).all(dim=1)) | ((norms - 1).abs() > NORM_TOLERANCE)
    if bad.any():
        raise BankFileError(
            f"{path}: {int(bad.sum())} of {len(vectors)} vectors are not finite unit vectors "
            f"(first at row {int(bad.nonzero()[0])}): the file is damaged; {REBUILD}"
        )
    return vectors


def _readable(path: Path, read):
    """``read(path)``, with a damaged file's error naming it and what to do."""
    try:
        return read(path)
    except (SafetensorError, KeyError, OSError) as error:
        raise BankFileError(f"{path} is damaged or cut short ({error}); {REBUILD}") from None


def _read_header(directory: Path) -> dict:
    header_file = directory / BANK_FILE
    if not header_file.is_file():
        raise FileNotFoundError(f"{directory} is not an image bank (no {BANK_FILE})")
    try:
        header = json.loads(header_file.read_text())
        return {"dim": int(header["dim"]), "embedder": header["embedder"]}
    except (ValueError, KeyError, TypeError) as error:
        raise BankFileError(f"{header_file} is damaged ({error!r}); {REBUILD}") from None


def read_jsonl(table: Path, fix: str = "write it again") -> list[dict]:
    """The JSON objects of a JSON Lines file; a damaged line is refused naming it and
    ``fix``, what to do about it."""
    rows = []
    for number, line in enumerate(table.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise BankFileError(f"{table}, line {number}: not JSON ({error}); {fix}") from None
    return rows


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
