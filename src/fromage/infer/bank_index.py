"""A bank's search index: chosen by size, trained on the bank's vectors, stored beside them.

``build_index(directory, kind)`` writes ``index.faiss`` (a FAISS index of the bank's rows
in bank order; none for ``exact``) and ``rows.safetensors`` (ids, sources and hashes in
a memory-mappable layout, see ``fromage.infer.bank_rows``), then records both in
``bank.json`` under ``"index"``, last, so that a crash leaves no index that disagrees
with the bank. ``ImageBank.open`` memory-maps them; appending a part drops them (the bank
searches exactly until the index is built again, which ``fromage bank`` does after every
build and ``fromage index`` does on its own).

Kinds: ``exact`` (torch, every vector; the float vectors are loaded on the first
search), ``ivfpq`` (an inverted file of ``nlist`` lists with 64-byte product-quantised
codes: 3.3M images take 240 MB, and searching reads a few lists, then re-ranks the best
``refine`` candidates by their exact cosine, read from the parts), ``auto`` (exact below
``EXACT_BELOW`` images, ivfpq from there), or any ``faiss.index_factory`` string (an
``HNSW32`` graph, for instance, holds its own copy of the float vectors in memory).
docs/python-api.md has the measurements behind these settings (`make bench`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from fromage.infer.bank import (
    BANK_FILE,
    INDEX_FILE,
    _read_header,
    _readable,
    _write_atomically,
    _write_header,
    import_faiss,
    read_jsonl,
    read_vectors,
    vector_files,
)
from fromage.infer.bank_rows import ROWS_FILE, rows_file_bytes, vector_layout

KINDS = ("auto", "exact", "ivfpq")
EXACT_BELOW = 30_000  # exact top-10: 14.3 ms at 10^5 on 2 cores, linear in size; see the docs
PQ_BYTES = 64  # bytes per vector (4 dimensions of a 256-d one each) where the width allows
NPROBE = 8  # lists searched per query: with REFINE, recall@10 0.999 at 3.3M (docs)
EF_SEARCH = 128  # an HNSW graph's search breadth
IVFPQ_MIN = 1024
REFINE = 300  # candidates re-ranked by their exact cosine
POINTS_PER_LIST = 40  # k-means training points per list (faiss warns below 39)
MIN_TRAINING = 100_000  # at least: product quantisers trained on fewer rank worse
ADD_BATCH = 100_000


def index_settings(size: int, dim: int, kind: str = "auto") -> dict:
    """What ``build_index`` builds for a bank of ``size`` ``dim``-d vectors asked for ``kind``."""
    if kind == "auto":
        kind = "exact" if size < EXACT_BELOW else "ivfpq"
    if kind == "exact":
        return {"kind": "exact"}
    if kind == "ivfpq":
        if size < IVFPQ_MIN:
            raise ValueError(
                f"an ivfpq index needs at least {IVFPQ_MIN} images (its quantisers learn 256 "
                f"codes each), this bank holds {size}: use exact or auto"
            )
        # a power of two near 2 sqrt(size): half the codes per list searched that sqrt(size)
        # lists hold, for twice the k-means training (most of a build on 2 cores)
        nlist = 2 ** max(4, round(math.log2(2 * math.sqrt(size))))
        return {
            "kind": "ivfpq",
            "factory": f"IVF{nlist},PQ{math.gcd(dim, PQ_BYTES)}np",  # np: no polysemous training
            "refine": REFINE,
        }
    return {"kind": kind, "factory": kind, "refine": REFINE}


def search_parameters(index) -> str:
    """The stored search-time settings of a trained index (``faiss.ParameterSpace``)."""
    faiss = import_faiss()
    if faiss.try_extract_index_ivf(index) is not None:
        return f"nprobe={NPROBE}"
    return f"efSearch={EF_SEARCH}" if "HNSW" in type(index).__name__ else ""


def check_index_kind(kind: str, dim: int) -> None:
    """Refuse a kind that is neither one of ``KINDS`` nor a FAISS factory string for
    ``dim``-d vectors, before anything is embedded or read."""
    if kind in KINDS:
        return
    faiss = import_faiss()
    try:
        faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        why = str(error).splitlines()[0].rsplit(": ", 1)[-1]
        raise ValueError(
            f"index kind {kind!r} is neither one of {', '.join(KINDS)} nor a FAISS "
            f"index_factory string for {dim}-d vectors ({why})"
        ) from None


def requested_index_kind(directory: str | Path, kind: str | None) -> str:
    """``kind``, else the kind the bank's index was last built as, else ``auto``."""
    if kind is not None or not (Path(directory) / BANK_FILE).exists():
        return kind or "auto"
    return _read_header(Path(directory)).get("index_kind", "auto")


def index_is_current(directory: str | Path, kind: str) -> bool:
    """Whether the bank has an index, built as ``kind`` (appending drops it)."""
    header = _read_header(Path(directory))
    return "index" in header and header.get("index_kind") == kind


def build_index(directory: str | Path, kind: str = "auto", seed: int = 0) -> dict:
    """Build the index ``kind`` of the bank at ``directory`` and record it in bank.json;
    returns that record. A FAISS index reads every vector into memory once (4 bytes x
    dim a row); ``exact`` reads none."""
    directory = Path(directory)
    header = _read_header(directory)
    check_index_kind(kind, header["dim"])
    header.pop("index", None)  # first: a crash below must not leave a stale index in use
    _write_header(directory, header)
    files = vector_files(directory)
    rows = [row for path in files for row in read_jsonl(path.with_suffix(".jsonl"))]
    counts = [_readable(path, lambda p: vector_layout(p, header["dim"]))[1] for path in files]
    if sum(counts) != len(rows):
        raise ValueError(f"{directory}: {sum(counts)} vectors for {len(rows)} table rows")
    settings = index_settings(len(rows), header["dim"], kind)
    index_file = directory / INDEX_FILE
    if settings["kind"] == "exact":
        index_file.unlink(missing_ok=True)
    else:
        vectors = _all_vectors(files, counts, header["dim"])
        index = _trained_index(vectors, settings["factory"], seed)
        settings["parameters"] = search_parameters(index)
        _write_faiss_index(index_file, index)
    _write_atomically(
        directory / ROWS_FILE,
        rows_file_bytes(
            [r["id"] for r in rows], [r["source"] for r in rows], [r.get("sha256") for r in rows]
        ),
    )
    header |= {"index_kind": kind, "index": settings | {"rows": len(rows), "parts": counts}}
    _write_header(directory, header)
    return header["index"]


def _all_vectors(files: list[Path], counts: list[int], dim: int) -> np.ndarray:
    """Every part's vectors (checked: finite, unit length) in one array."""
    vectors = np.empty((sum(counts), dim), dtype=np.float32)
    start = 0
    for path, count in zip(files, counts, strict=True):
        vectors[start : start + count] = read_vectors(path, dim).numpy()
        start += count
    return vectors


def _trained_index(vectors: np.ndarray, factory: str, seed: int):
    faiss = import_faiss()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        nlist = getattr(faiss.try_extract_index_ivf(index), "nlist", 0)
        sample = min(len(vectors), max(POINTS_PER_LIST * nlist, MIN_TRAINING))
        chosen = np.random.default_rng(seed).choice(len(vectors), sample, replace=False)
        try:
            index.train(vectors[np.sort(chosen)])
        except RuntimeError as error:  # e.g. fewer vectors than the index has lists
            why = str(error).splitlines()[0].rsplit(": ", 1)[-1]
            raise ValueError(f"cannot train a {factory} index on {sample} vectors: {why}") from None
    for start in range(0, len(vectors), ADD_BATCH):
        index.add(vectors[start : start + ADD_BATCH])
    return index


def _write_faiss_index(path: Path, index) -> None:
    temporary = path.with_name(path.name + ".tmp")
    import_faiss().write_index(index, str(temporary))
    os.replace(temporary, path)
