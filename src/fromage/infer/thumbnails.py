"""Bank thumbnails: a small JPEG of every image, so a page can show results without the
images' sources (which may be gone, remote, or inside a large shard).

Each bank part has one ``part-NNNNN.thumbs`` file beside its table and vectors. It is a
safetensors file of two tensors: ``data`` (the part's JPEGs concatenated, uint8) and
``offsets`` ((n + 1,) int64; the thumbnail of the part's row i is
``data[offsets[i]:offsets[i + 1]]``, empty for a row without one). Why this and not a tar
or zip of files named by id: it is the container the vectors already use (no pickle, no
new dependency), it is written whole and renamed into place like the other part files so
appends stay atomic, reading one thumbnail maps the file and copies only that
thumbnail's bytes (a tar would be scanned), and ids, which may hold ``/`` or ``..``,
never become member names. JPEG rather than WebP because every Pillow build and every
browser decodes it.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save

THUMBNAIL_SUFFIX = ".thumbs"
DEFAULT_THUMBNAIL_SIZE = 128  # pixels on the longest side
JPEG_QUALITY = 85


def encode_thumbnail(image: Image.Image, size: int = DEFAULT_THUMBNAIL_SIZE) -> bytes:
    """``image`` shrunk (never enlarged) to at most ``size`` pixels a side, as JPEG."""
    small = image.convert("RGB")  # a copy: ``thumbnail`` resizes in place
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def decode_thumbnail(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def thumbnails_file_bytes(thumbnails: Sequence[bytes | None]) -> bytes:
    """The ``.thumbs`` file for a part whose rows have these thumbnails (None: none)."""
    blobs = [t or b"" for t in thumbnails]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return save({"data": data, "offsets": offsets})


class ThumbnailFile(Sequence):
    """One part's thumbnails, each read from disk when it is asked for."""

    def __init__(self, path: Path):
        self.path = path
        with safe_open(path, "numpy") as stored:
            self.offsets = stored.get_tensor("offsets")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> bytes | None:
        row = range(len(self))[row]
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        if start == end:
            return None
        with safe_open(self.path, "numpy") as stored:
            return stored.get_slice("data")[start:end].tobytes()


class PartsThumbnails(Sequence):
    """A bank's thumbnails: those of its parts (files, lists, or all None) end to end."""

    def __init__(self, parts: Sequence[Sequence[bytes | None]]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, row: int) -> bytes | None:
        row = range(len(self))[row]
        part = bisect.bisect_right(self.starts, row) - 1
        return self.parts[part][row - self.starts[part]]
