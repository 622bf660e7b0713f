"""Checking what a person uploads before the model sees it: a clear message, never a crash."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000  # a decompression bomb expands far past this


class UploadError(ValueError):
    """An upload the demo refuses, with the reason in words for the page."""


@dataclass(frozen=True)
class Upload:
    image: Image.Image  # RGB
    sha256: str  # of the file's bytes, as a bank hashes its images (to spot bank images)


def read_upload(
    path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS
) -> Upload:
    """An uploaded file, read once, as an RGB image and the hash of its bytes, or
    ``UploadError`` saying what is wrong with it."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(
            f"{path.name} is {size / 2**20:.1f} MB; images up to {max_bytes / 2**20:.0f} MB"
        )
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise UploadError(
                        f"{path.name} is {image.width}x{image.height} pixels, over the "
                        f"{max_pixels:,}-pixel limit (a decompression bomb?)"
                    )
                image.load()
                return Upload(image.convert("RGB"), hashlib.sha256(data).hexdigest())
    except UnidentifiedImageError:
        raise UploadError(f"{path.name} is not an image this demo can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(
            f"{path.name} would decompress to too many pixels (a decompression bomb?)"
        ) from None
    except OSError as error:
        raise UploadError(f"{path.name} could not be read as an image ({error})") from None
