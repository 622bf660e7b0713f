"""Embed images into an on-disk ``ImageBank`` in batches, resumably.

Images already in the bank are skipped without being decoded, so re-running a build
after a crash (or with a folder that has grown) only embeds what is new. Images that
cannot be loaded are skipped and reported; they never stop the build. Each image's
bytes are read once (shard records arrive with theirs, each shard read in one pass),
then hashed, decoded, thumbnailed and preprocessed. The embedder is a FromageModel
(its ``image_to_shared`` space) or any ``ImageEmbedder``, e.g. a CLIP baseline.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from fromage.data.image_sources import ImageLoadError, ImageRecord, decode_image
from fromage.infer.bank import ImageBank, append_to_bank
from fromage.infer.thumbnails import DEFAULT_THUMBNAIL_SIZE, encode_thumbnail
from fromage.model.fromage import FromageModel


def embedder_fingerprint(model: FromageModel) -> str:
    """A short hash of ``image_to_shared``: banks embedded by another model do not fit."""
    digest = hashlib.sha256()
    for tensor in model.image_to_shared.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_bank_fits(bank: ImageBank, model: FromageModel) -> None:
    """Refuse a bank whose vectors another model's ``image_to_shared`` produced."""
    if bank.embedder != embedder_fingerprint(model):
        raise ValueError(
            f"this image bank was embedded by model {bank.embedder}, not by this model "
            f"({embedder_fingerprint(model)}): rebuild it with `fromage bank`"
        )


class ImageEmbedder(Protocol):
    """What a bank needs of a model: preprocessing, batched embedding, and a fingerprint."""

    fingerprint: str
    device: torch.device

    def preprocess(self, image) -> torch.Tensor: ...

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


class FromageImageEmbedder:
    """Images -> normalised ``image_to_shared`` embeddings of a FromageModel."""

    def __init__(self, model: FromageModel):
        self.model = model
        self.fingerprint = embedder_fingerprint(model)
        self.device = model.image_to_shared.weight.device
        self.preprocess = model.vision.preprocess

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_embeddings(self.model.image_features(pixels))


@dataclass
class BuildSummary:
    added: int = 0
    already_in_bank: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, why)


@dataclass(frozen=True)
class _Row:
    """What the bank stores of an image besides its vector."""

    id: str
    source: str
    sha256: str
    thumbnail: bytes | None


@torch.no_grad()
def build_bank(
    model: FromageModel | ImageEmbedder,
    records: Iterable[ImageRecord],
    directory: str | Path,
    batch_size: int = 64,
    part_size: int = 50_000,
    thumbnail_size: int | None = DEFAULT_THUMBNAIL_SIZE,
    progress: bool = True,
) -> BuildSummary:
    """Embed ``records`` into the bank at ``directory`` (created or appended to), storing
    each image's SHA-256 and a JPEG thumbnail at most ``thumbnail_size`` pixels a side
    (None: no thumbnails).

    A part is written every ``part_size`` records, so a crash loses at most one part
    (its thumbnails, a few KB an image, are held in memory until then).
    """
    directory = Path(directory)
    embedder = FromageImageEmbedder(model) if isinstance(model, FromageModel) else model
    existing = set(ImageBank.open(directory).ids) if (directory / "bank.json").exists() else set()
    summary = BuildSummary()
    new = _new_records(records, existing, summary)
    with tqdm(desc="embedding images", unit="img", disable=not progress) as bar:
        for first in new:  # a part is ``first`` and the next part_size - 1 records
            part = itertools.chain([first], itertools.islice(new, part_size - 1))
            vectors, kept = [], []
            for batch in chunks(part, batch_size):
                pixels = []
                for record in batch:
                    try:
                        image_pixels, row = _load(record, embedder.preprocess, thumbnail_size)
                    except ImageLoadError as error:
                        summary.failed.append((record.id, str(error)))
                        continue
                    pixels.append(image_pixels)
                    kept.append(row)
                if pixels:
                    vectors.append(embedder(torch.stack(pixels).to(embedder.device)).cpu())
                bar.update(len(batch))
            if kept:
                append_to_bank(
                    directory,
                    torch.cat(vectors),
                    [r.id for r in kept],
                    [r.source for r in kept],
                    embedder.fingerprint,
                    hashes=[r.sha256 for r in kept],
                    thumbnails=[r.thumbnail for r in kept],
                )
                summary.added += len(kept)
    return summary


def _load(record: ImageRecord, preprocess, thumbnail_size: int | None) -> tuple[torch.Tensor, _Row]:
    """The image's model input and bank row, from one read of its bytes."""
    data = record.read()
    image = decode_image(data, record.source)
    thumbnail = None if thumbnail_size is None else encode_thumbnail(image, thumbnail_size)
    row = _Row(record.id, record.source, hashlib.sha256(data).hexdigest(), thumbnail)
    return preprocess(image), row


def _new_records(records: Iterable[ImageRecord], seen: set[str], summary: BuildSummary):
    """Records whose id is neither in the bank nor earlier in ``records``."""
    for record in records:
        if record.id in seen:
            summary.already_in_bank += 1
        else:
            seen.add(record.id)
            yield record


def chunks(items: Iterable, size: int):
    """Lists of up to ``size`` consecutive items."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
