"""An image bank: normalised ``image_to_shared`` embeddings with their ids and sources,
and, so that results can be shown and the bank checked, each image's thumbnail and the
SHA-256 of its bytes.

On disk a bank is a directory of parts: ``part-NNNNN.jsonl`` (one ``{"id", "source",
"sha256"}`` row per image), ``part-NNNNN.thumbs`` (their thumbnails, see
``fromage.infer.thumbnails``) and ``part-NNNNN.safetensors`` (the matching ``(n, D)``
embeddings), plus ``bank.json`` (format version, width, the fingerprint of the model
that embedded the images and, once built, the search index: see
``fromage.infer.bank_index``). Appending writes a new part, table and thumbnails first
and embeddings last through an atomic rename, so a crash mid-append leaves no part whose
files disagree; it drops the index first. Nothing is pickled. Parts written before
thumbnails and hashes existed (no ``.thumbs``, no ``sha256``) and banks written before
indexes (no ``version``) still open and search, exactly; their images just have neither.

``search`` uses the bank's index (``search_kind`` says which: ``"exact"`` or a FAISS
factory string) and always scores its hits by their exact cosine; ``ranks``
(evaluation) is exact whatever the index. A bank with an index opens memory-mapped:
its rows, index and vectors are read as they are needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fromage.data.image_sources import ImageLoadError, read_sources
from fromage.infer.bank_rows import ROWS_FILE, PartVectors, open_rows, vector_layout
from fromage.infer.thumbnails import (
    THUMBNAIL_SUFFIX,
    PartsThumbnails,
    ThumbnailFile,
    decode_thumbnail,
    thumbnails_file_bytes,
)
from fromage.ranks import target_ranks

BANK_FILE = "bank.json"
BANK_VERSION = 2  # 1 (no "version"): no index; 2: "index" and "index_kind" may be present
INDEX_FILE = "index.faiss"
NORM_TOLERANCE = 1e-3  # stored vectors are unit length to float32 rounding, far within this
REBUILD = "rebuild it: delete the bank directory and run `fromage bank` again"
REINDEX = "build the index again (the vectors are kept): fromage index {directory}"


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
        self._assemble(embeddings.shape[1], list(ids), sources, embedder, hashes, thumbnails)
        self._embeddings = F.normalize(embeddings.float(), dim=-1)

    def _assemble(self, dim, ids, sources, embedder, hashes, thumbnails, vectors=None) -> None:
        """Set what every bank has; ``vectors`` (a ``PartVectors``) stands in for the
        embeddings of an opened bank until they are needed whole."""
        self._dim, self.ids, self.sources, self.embedder = dim, ids, sources, embedder
        self.hashes, self.thumbnails = hashes, thumbnails
        self._vectors, self._embeddings = vectors, None
        self._faiss, self._refine, self.search_kind = None, 0, "exact"

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def embeddings(self) -> torch.Tensor:
        """All (N, D) vectors; an opened bank reads (and checks) them on first use."""
        if self._embeddings is None:
            self._embeddings = torch.cat(
                [torch.empty(0, self.dim)]
                + [read_vectors(path, self.dim) for path in self._vectors.files]
            )
        return self._embeddings

    @cached_property
    def _index(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.ids)}

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
        """Top-``k`` images for each (D,) row of ``queries``, never an id in ``exclude``,
        found with the bank's index (``search_kind``) and scored by exact cosine; each
        hit carries its thumbnail (read from disk for an opened bank) and hash."""
        if len(self) == 0:
            raise ValueError("cannot search an empty image bank")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be (Q, {self.dim}) for this bank, got {tuple(queries.shape)}"
            )
        check_finite_queries(queries)
        exclude = set(exclude)
        wanted = min(len(self), k + len(exclude))  # enough to drop the excluded ones
        if self._faiss is None:
            scores = queries.float().to(self.embeddings.device) @ self.embeddings.T
            top_scores, top_rows = scores.topk(wanted, dim=1)
            found = [
                zip(rows.tolist(), row_scores.tolist(), strict=True)
                for rows, row_scores in zip(top_rows, top_scores, strict=True)
            ]
        else:
            found = self._indexed_hits(queries.float().cpu().numpy(), wanted)
        results = []
        for hits in found:
            kept = [(row, score) for row, score in hits if self.ids[row] not in exclude][:k]
            results.append([self._hit(row, score) for row, score in kept])
        return results

    def _hit(self, row: int, score: float) -> RetrievedImage:
        return RetrievedImage(
            self.ids[row], score, self.sources[row], self.thumbnails[row], self.hashes[row]
        )

    def _indexed_hits(self, queries: np.ndarray, wanted: int) -> list[list[tuple[int, float]]]:
        """The index's best ``refine`` (at least ``wanted``) rows of each query, re-ranked
        by exact cosine: the refined top ``wanted``, as (row, score)."""
        candidates = min(len(self), max(wanted, self._refine))
        _, rows = self._faiss.search(queries, candidates)
        found = []
        for query, query_rows in zip(queries, rows, strict=True):
            query_rows = query_rows[query_rows >= 0]
            if self._embeddings is not None:
                vectors = self._embeddings[torch.from_numpy(query_rows)].numpy()
            else:
                vectors = self._vectors.rows(query_rows)
            scores = vectors @ query
            best = np.argsort(-scores, kind="stable")[:wanted]
            found.append(list(zip(query_rows[best].tolist(), scores[best].tolist(), strict=True)))
        return found

    def ranks(
        self,
        queries: torch.Tensor,
        targets: Sequence[str],
        exclude: Sequence[Collection[str]] | None = None,
    ) -> torch.Tensor:
        """0-based rank of each query's target image among the bank images not in its
        ``exclude`` set (ties count against the target): recall@k is ``ranks < k``.
        Always exact, whatever the bank's index: evaluation compares models, not indexes."""
        check_finite_queries(queries)
        scores = queries.float().to(self.embeddings.device) @ self.embeddings.T
        for row, excluded in enumerate(exclude or []):
            scores[row, [self._index[i] for i in excluded if i in self._index]] = float("-inf")
        columns = torch.tensor([self._index[t] for t in targets], device=scores.device)
        return target_ranks(scores, columns)

    def use_faiss(self, index_factory: str = "Flat") -> ImageBank:
        """Search with a FAISS inner-product index built in memory by
        ``faiss.index_factory`` (``"Flat"`` is exact; e.g. ``"IVF4096,Flat"`` or
        ``"HNSW32"`` are approximate). ``fromage.infer.bank_index`` builds and stores
        one with a bank instead."""
        faiss = import_faiss()
        index = faiss.index_factory(self.dim, index_factory, faiss.METRIC_INNER_PRODUCT)
        vectors = self.embeddings.cpu().numpy()
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        self._faiss, self._refine, self.search_kind = index, 0, index_factory
        return self

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
        """The bank at ``directory``: with an index, its rows, vectors and index
        memory-mapped; without (banks written before indexes, or just appended to),
        every complete part read in order. Thumbnails are read when asked for."""
        directory = Path(directory)
        header = _read_header(directory)
        if "index" in header:
            return cls._open_indexed(directory, header)
        embeddings, ids, sources, hashes = [torch.empty(0, header["dim"])], [], [], []
        thumbnails = []
        for vectors_file in vector_files(directory):
            rows = read_jsonl(vectors_file.with_suffix(".jsonl"), REBUILD)
            vectors = read_vectors(vectors_file, header["dim"])
            part_thumbnails = _part_thumbnails(vectors_file, len(rows))
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

    @classmethod
    def _open_indexed(cls, directory: Path, header: dict) -> ImageBank:
        entry, dim = header["index"], header["dim"]
        fix = REINDEX.format(directory=directory)
        files = vector_files(directory)
        layouts = [_readable(path, lambda p: vector_layout(p, dim)) for path in files]
        vectors = PartVectors(files, layouts, dim)
        if vectors.counts != entry["parts"]:
            raise BankFileError(
                f"{directory / BANK_FILE}: its index covers parts of {entry['parts']} rows, the "
                f"directory holds parts of {vectors.counts} (files changed by hand?); {fix}"
            )
        rows_file = directory / ROWS_FILE
        ids, sources, hashes = _readable(rows_file, open_rows, fix)
        if len(ids) != len(vectors):
            raise BankFileError(f"{rows_file}: {len(ids)} rows for {len(vectors)} vectors; {fix}")
        thumbnails = [
            _part_thumbnails(path, count) for path, count in zip(files, vectors.counts, strict=True)
        ]
        bank = cls.__new__(cls)
        bank._assemble(
            dim, ids, sources, header["embedder"], hashes, PartsThumbnails(thumbnails), vectors
        )
        if entry["kind"] != "exact":
            bank._faiss = _open_faiss_index(directory / INDEX_FILE, entry, dim, fix)
            bank._refine, bank.search_kind = entry["refine"], entry["factory"]
        return bank


def _part_thumbnails(vectors_file: Path, rows: int) -> Sequence[bytes | None]:
    thumbnails_file = vectors_file.with_suffix(THUMBNAIL_SUFFIX)
    if thumbnails_file.exists():
        return _readable(thumbnails_file, ThumbnailFile)
    return [None] * rows


def _open_faiss_index(path: Path, entry: dict, dim: int, fix: str):
    """The stored index, memory-mapped read-only, with its search parameters set."""
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as error:
        why = str(error).splitlines()[0].rsplit(": ", 1)[-1]
        raise BankFileError(f"{path} is missing, damaged or cut short ({why}); {fix}") from None
    if (index.ntotal, index.d) != (entry["rows"], dim):
        raise BankFileError(
            f"{path} indexes {index.ntotal} {index.d}-d vectors, the bank holds "
            f"{entry['rows']} {dim}-d ones; {fix}"
        )
    if entry["parameters"]:
        faiss.ParameterSpace().set_index_parameters(index, entry["parameters"])
    return index


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("FAISS search needs the extra: pip install 'fromage[faiss]'") from None
    return faiss


def vector_files(directory: Path) -> list[Path]:
    """The complete parts' vector files, in bank order."""
    return sorted(directory.glob("part-*.safetensors"))


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
    if (directory / BANK_FILE).exists():
        header = _read_header(directory)
        if (header["dim"], header["embedder"]) != (dim, embedder):
            raise ValueError(
                f"{directory} holds {header['dim']}-d vectors from embedder {header['embedder']}; "
                f"refusing {dim}-d vectors from {embedder}"
            )
        if "index" in header:  # the index would miss the new part: drop it, then its files
            del header["index"]
            _write_header(directory, header)
            for name in (INDEX_FILE, ROWS_FILE):
                (directory / name).unlink(missing_ok=True)
    else:
        _write_header(directory, {"dim": dim, "embedder": embedder})
    parts = vector_files(directory)
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


def _readable(path: Path, read, fix: str = REBUILD):
    """``read(path)``, with a damaged file's error naming it and ``fix``, what to do."""
    try:
        return read(path)
    except (SafetensorError, KeyError, OSError, ValueError) as error:
        raise BankFileError(f"{path} is damaged or cut short ({error!r}); {fix}") from None


def _read_header(directory: Path) -> dict:
    """bank.json, checked: its width and embedder, and any index record as written."""
    header_file = directory / BANK_FILE
    if not header_file.is_file():
        raise FileNotFoundError(f"{directory} is not an image bank (no {BANK_FILE})")
    try:
        header = json.loads(header_file.read_text())
        header |= {"dim": int(header["dim"]), "embedder": header["embedder"]}
        version = header.get("version", 1)
    except (ValueError, KeyError, TypeError) as error:
        raise BankFileError(f"{header_file} is damaged ({error!r}); {REBUILD}") from None
    if version > BANK_VERSION:
        raise BankFileError(
            f"{header_file}: format version {version}, this fromage reads up to "
            f"{BANK_VERSION}; upgrade fromage"
        )
    return header


def _write_header(directory: Path, header: dict) -> None:
    header = {"version": BANK_VERSION} | header
    _write_atomically(directory / BANK_FILE, (json.dumps(header, indent=1) + "\n").encode())


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
