"""Where bank images come from, and how one is opened from its ``source`` string.

A source is a local path, an ``http(s)://`` url, or ``SHARD.tar#MEMBER`` for an image
inside a WebDataset shard. Downloads have a timeout, a size limit and a content-type
check; nothing is unpickled.
"""

from __future__ import annotations

import io
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
DOWNLOAD_TIMEOUT_S = 10.0
MAX_DOWNLOAD_BYTES = 20 * 2**20


class ImageLoadError(RuntimeError):
    """An image that could not be fetched or decoded."""


@dataclass(frozen=True)
class ImageRecord:
    id: str
    source: str


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


def shard_images(shards: Sequence[str | Path]) -> Iterator[ImageRecord]:
    """The images of WebDataset shards (img2dataset layout); the id is the sample key and
    the source names the shard by its absolute path, so it opens from any directory."""
    for shard in map(Path.resolve, map(Path, shards)):
        with tarfile.open(shard) as tar:
            for member in tar:
                path = Path(member.name)
                if member.isfile() and path.suffix.lower() in IMAGE_SUFFIXES:
                    yield ImageRecord(path.with_suffix("").as_posix(), f"{shard}#{member.name}")


def open_image(source: str) -> Image.Image:
    """Load the RGB image behind a source string; raises ``ImageLoadError`` if it cannot."""
    try:
        if source.startswith(("http://", "https://")):
            data = fetch_bytes(source)
        elif "#" in source and source.split("#", 1)[0].endswith(".tar"):
            shard, member = source.split("#", 1)
            with tarfile.open(shard) as tar:
                data = tar.extractfile(member).read()
        else:
            data = Path(source).read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except ImageLoadError:
        raise
    except (OSError, KeyError, AttributeError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{source}: {error}") from error


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
