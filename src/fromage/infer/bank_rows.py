"""A bank's rows and vectors read from disk on demand, so that opening a bank of millions
neither parses its JSON Lines tables nor loads its vectors.

``rows.safetensors`` (written with a bank's index, see ``fromage.infer.bank_index``)
holds the ids, sources and SHA-256s of every row, each column as its UTF-8 strings
concatenated (``<name>_data``, uint8) and ``(n + 1,)`` int64 ``<name>_offsets``, the
layout of ``.thumbs`` files. Both are memory-mapped: a column costs nothing until rows
are read. A part's vectors are read a few rows at a time (the refinement of an
approximate search) from a mapping held for that read only, which leaves them in the
page cache, not in the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save

COLUMNS = ("id", "source", "sha256")
ROWS_FILE = "rows.safetensors"
_DTYPES = {"U8": np.uint8, "I64": np.int64, "F32": np.float32}


def rows_file_bytes(ids: Sequence[str], sources: Sequence[str], hashes: Sequence[str | None]):
    """The ``rows.safetensors`` of a bank with these rows (a None hash is stored empty)."""
    tensors = {}
    for name, values in zip(COLUMNS, (ids, sources, hashes), strict=True):
        blobs = [(v or "").encode() for v in values]
        tensors[f"{name}_offsets"] = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        tensors[f"{name}_data"] = np.frombuffer(b"".join(blobs) or b"\0", dtype=np.uint8)
    return save(tensors)


def safetensors_layout(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Each tensor's dtype, shape and byte offset in a safetensors file, from its header
    alone. Raises ``ValueError`` for a file too short for its header or tensors."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
        size = os.fstat(file.fileno()).st_size
    start = 8 + header_size
    layout = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if start + end > size:
            raise ValueError(f"tensor {name} ends at byte {start + end} of {size}")
        layout[name] = (np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"]), start + begin)
    return layout


def mapped(path: Path, layout: dict, name: str) -> np.ndarray:
    dtype, shape, offset = layout[name]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class StringColumn(Sequence):
    """One column of ``rows.safetensors``: its strings decoded as they are asked for."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, empty_is_none: bool = False):
        self.data, self.offsets, self.empty_is_none = data, offsets, empty_is_none

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str | None:
        row = range(len(self))[row]
        value = self.data[self.offsets[row] : self.offsets[row + 1]].tobytes().decode()
        return None if self.empty_is_none and not value else value

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


def open_rows(path: Path) -> tuple[StringColumn, StringColumn, StringColumn]:
    """The ids, sources and hashes of ``rows.safetensors``, memory-mapped."""
    layout = safetensors_layout(path)
    return tuple(
        StringColumn(
            mapped(path, layout, f"{name}_data"),
            mapped(path, layout, f"{name}_offsets"),
            empty_is_none=name == "sha256",
        )
        for name in COLUMNS
    )


def vector_layout(path: Path, dim: int) -> tuple[int, int]:
    """Where a part's float32 ``(n, dim)`` vectors start in its file, and ``n``."""
    dtype, shape, offset = safetensors_layout(path)["embeddings"]
    if dtype != np.float32 or len(shape) != 2 or shape[1] != dim:
        raise ValueError(f"vectors of shape {shape} ({dtype}), not (n, {dim}) float32")
    return offset, shape[0]


class PartVectors:
    """The vectors of a bank's parts, given each file's ``vector_layout``, read by row."""

    def __init__(self, files: Sequence[Path], layouts: Sequence[tuple[int, int]], dim: int):
        self.files, self.dim = list(files), dim
        self.offsets = [offset for offset, _ in layouts]
        self.counts = [count for _, count in layouts]
        self.starts = np.cumsum([0, *self.counts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (bank order), gathered from each part's file mapped for
        this call only: unmapped after, the pages read stay in the page cache, not in
        this process's resident memory."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        parts = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(parts).tolist():
            chosen = parts == part
            vectors = np.memmap(
                self.files[part],
                dtype=np.float32,
                mode="r",
                offset=self.offsets[part],
                shape=(self.counts[part], self.dim),
            )
            out[chosen] = vectors[rows[chosen] - self.starts[part]]
            del vectors  # unmaps the file
        return out
