"""Checking what a person uploads before the model sees it: a clear message, never a crash."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000  # a decompression bomb expands far past this


class UploadError(ValueError):
    """An upload the demo refuses, with the reason in words for the page."""


def open_upload(
    path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """An uploaded file as an RGB image, or ``UploadError`` saying what is wrong with it."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(
            f"{path.name} is {size / 2**20:.1f} MB; images up to {max_bytes / 2**20:.0f} MB"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    raise UploadError(
                        f"{path.name} is {image.width}x{image.height} pixels, over the "
                        f"{max_pixels:,}-pixel limit (a decompression bomb?)"
                    )
                image.load()
                return image.convert("RGB")
    except UnidentifiedImageError:
        raise UploadError(f"{path.name} is not an image this demo can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(
            f"{path.name} would decompress to too many pixels (a decompression bomb?)"
        ) from None
    except OSError as error:
        raise UploadError(f"{path.name} could not be read as an image ({error})") from None
