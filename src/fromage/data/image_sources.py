"""Where bank images come from, and how one is opened from its ``source`` string.

A source is a local path, an ``http(s)://`` url, or ``SHARD.tar#MEMBER`` for an image
inside a WebDataset shard. Downloads have a timeout, a size limit and a content-type
check; nothing is unpickled.

Reading is split from decoding (``read_source``, ``decode_image``) so that a bank build
can hash the exact bytes it embeds. A tar has no index: finding one member means reading
the headers before it, so shard records carry their bytes, read in one sequential pass
per shard (``shard_images``), and ``read_sources`` reads many members with one pass per
shard; ``open_image`` on a ``SHARD.tar#MEMBER`` is for one-off use only.
"""

from __future__ import annotations

import io
import tarfile
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
DOWNLOAD_TIMEOUT_S = 10.0
MAX_DOWNLOAD_BYTES = 20 * 2**20


class ImageLoadError(RuntimeError):
    """An image that could not be fetched or decoded."""


@dataclass(frozen=True)
class ImageRecord:
    """An image to put in a bank; ``data`` holds its bytes when they were read already
    (shard members), so nothing has to go back to the source for them."""

    id: str
    source: str
    data: bytes | None = field(default=None, repr=False, compare=False)

    def read(self) -> bytes:
        return self.data if self.data is not None else read_source(self.source)

    def open(self) -> Image.Image:
        """The RGB image; raises ``ImageLoadError`` if it cannot be read or decoded."""
        return decode_image(self.read(), self.source)


def folder_images(root: str | Path) -> Iterator[ImageRecord]:
    """Every image file under ``root`` (recursively, sorted); the id is its relative path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder {root}")
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield ImageRecord(path.relative_to(root).as_posix(), str(path.resolve()))


def listed_images(sources: Sequence[str]) -> Iterator[ImageRecord]:
    """Paths or urls given one by one; each is its own id."""
    for source in sources:
        yield ImageRecord(source, source)


def shard_samples(shards: Sequence[str | Path]) -> Iterator[tuple[ImageRecord, str]]:
    """Every sample of WebDataset shards (img2dataset layout) that has an image: the image
    with its bytes, and the sample's ``.txt`` caption ("" if none), in order, each shard
    read once from start to end. The id is the sample key and the source names the shard
    by its absolute path, so it opens from any directory. A member whose bytes cannot be
    read comes without them, so that loading it fails and is reported like any other."""
    for shard in map(Path.resolve, map(Path, shards)):
        with tarfile.open(shard) as tar:
            members = (m for m in tar if m.isfile())
            for key, sample in groupby(members, lambda m: Path(m.name).with_suffix("").as_posix()):
                files = {Path(m.name).suffix.lower(): m for m in sample}
                image = next((m for suffix, m in files.items() if suffix in IMAGE_SUFFIXES), None)
                if image is not None:
                    caption = (_member_bytes(tar, files.get(".txt")) or b"").decode(
                        errors="replace"
                    )
                    record = ImageRecord(key, f"{shard}#{image.name}", _member_bytes(tar, image))
                    yield record, caption.strip()


def shard_images(shards: Sequence[str | Path]) -> Iterator[ImageRecord]:
    """The images of ``shard_samples``."""
    return (record for record, _ in shard_samples(shards))


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> bytes | None:
    if member is None:
        return None
    try:
        return tar.extractfile(member).read()
    except (OSError, tarfile.TarError):
        return None


def open_image(source: str) -> Image.Image:
    """Load the RGB image behind a source string; raises ``ImageLoadError`` if it cannot."""
    return decode_image(read_source(source), source)


def decode_image(data: bytes, source: str) -> Image.Image:
    """The RGB image encoded in ``data`` (read from ``source``, named in errors)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{source}: {error}") from error


def read_source(source: str) -> bytes:
    """The bytes behind a source string; raises ``ImageLoadError`` if they cannot be read."""
    try:
        if source.startswith(("http://", "https://")):
            return fetch_bytes(source)
        shard, member = _shard_member(source)
        if shard is None:
            return Path(source).read_bytes()
        with tarfile.open(shard) as tar:
            return tar.extractfile(member).read()
    except ImageLoadError:
        raise
    except (OSError, KeyError, AttributeError, ValueError, tarfile.TarError) as error:
        raise ImageLoadError(f"{source}: {error}") from error


def read_sources(sources: Iterable[str]) -> Iterator[tuple[str, bytes | ImageLoadError]]:
    """The bytes behind each of ``sources`` (or why they could not be read), reading every
    shard once for all of its members that are asked for; in no particular order."""
    members: dict[str, set[str]] = defaultdict(set)
    for source in sources:
        shard, member = _shard_member(source)
        if shard is None:
            try:
                yield source, read_source(source)
            except ImageLoadError as error:
                yield source, error
        else:
            members[shard].add(member)
    for shard, wanted in members.items():
        yield from _read_members(shard, wanted)


def _read_members(shard: str, wanted: set[str]) -> Iterator[tuple[str, bytes | ImageLoadError]]:
    wanted = set(wanted)
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name in wanted:
                    wanted.discard(member.name)
                    yield f"{shard}#{member.name}", tar.extractfile(member).read()
    except (OSError, AttributeError, tarfile.TarError) as error:
        problem = str(error)
    else:
        problem = "no such member"
    for member in sorted(wanted):
        yield f"{shard}#{member}", ImageLoadError(f"{shard}#{member}: {problem}")


def _shard_member(source: str) -> tuple[str | None, str | None]:
    """``(shard, member)`` for a ``SHARD.tar#MEMBER`` source, else ``(None, None)``."""
    shard, hash_sign, member = source.partition("#")
    return (shard, member) if hash_sign and shard.endswith(".tar") else (None, None)


def fetch_bytes(
    url: str, timeout: float = DOWNLOAD_TIMEOUT_S, max_bytes: int = MAX_DOWNLOAD_BYTES
) -> bytes:
    """Download an image: refuse non-image content types and bodies over ``max_bytes``."""
    request = urllib.request.Request(url, headers={"User-Agent": "fromage"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        kind = response.headers.get_content_type()
        if not kind.startswith("image/"):
            raise ImageLoadError(f"{url}: content type {kind}, not an image")
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageLoadError(f"{url}: larger than {max_bytes} bytes")
    return data
