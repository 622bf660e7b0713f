"""Bank builds from a folder and from one WebDataset shard of the same images, in images/s.

A shard build used to re-open and scan the tar for every member, so its cost grew with
the square of the shard's size (1,000 images: 256x the folder build's time). It now
reads each tar once; ``shard_over_folder``, the shard build's time over the folder
build's, should stay within 1.5. Both builds embed with the same model, store the same
thumbnails and hashes, and start from the page cache (the files were just written).
"""

from __future__ import annotations

import io
import itertools
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fromage.data.image_sources import folder_images, shard_images
from fromage.infer.bank_build import build_bank
from fromage.model.fromage import FromageModel


def synthetic_jpeg(size: int, generator: torch.Generator) -> bytes:
    """A ``size`` px JPEG of coloured 8 px blocks (noise compresses like a photo would)."""
    blocks = torch.randint(0, 256, (size // 8, size // 8, 3), generator=generator)
    pixels = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _seconds_to_build(model, records, directory: Path, batch_size: int, expected: int) -> float:
    start = time.perf_counter()
    summary = build_bank(model, records, directory, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    if summary.added != expected:
        raise RuntimeError(f"bank build added {summary.added} of {expected} images")
    return seconds


def run(model: FromageModel, images: int = 1000, size: int = 96, batch_size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        folder, shard = Path(scratch) / "images", Path(scratch) / "images.tar"
        folder.mkdir()
        with tarfile.open(shard, "w") as tar:
            for i in range(images):
                (folder / f"{i:06d}.jpg").write_bytes(synthetic_jpeg(size, generator))
                tar.add(folder / f"{i:06d}.jpg", arcname=f"{i:06d}.jpg")
        warm_up = list(itertools.islice(folder_images(folder), batch_size))
        _seconds_to_build(model, warm_up, Path(scratch) / "warm-up", batch_size, len(warm_up))
        from_folder = _seconds_to_build(
            model, folder_images(folder), Path(scratch) / "folder-bank", batch_size, images
        )
        from_shard = _seconds_to_build(
            model, shard_images([shard]), Path(scratch) / "shard-bank", batch_size, images
        )
    return {
        "images": images,
        "image_size": size,
        "folder_images_per_s": images / from_folder,
        "shard_images_per_s": images / from_shard,
        "shard_over_folder": from_shard / from_folder,
    }
