"""Embed images into an on-disk ``ImageBank`` in batches, resumably.

Images already in the bank are skipped, so re-running a build after a crash (or with a
folder that has grown) only embeds what is new. Images that cannot be loaded are
skipped and reported; they never stop the build. The embedder is a FromageModel
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

from fromage.data.image_sources import ImageLoadError, ImageRecord, open_image
from fromage.infer.bank import ImageBank, append_to_bank
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


@torch.no_grad()
def build_bank(
    model: FromageModel | ImageEmbedder,
    records: Iterable[ImageRecord],
    directory: str | Path,
    batch_size: int = 64,
    part_size: int = 50_000,
    progress: bool = True,
) -> BuildSummary:
    """Embed ``records`` into the bank at ``directory`` (created or appended to).

    A part is written every ``part_size`` images, so a crash loses at most one part.
    """
    directory = Path(directory)
    embedder = FromageImageEmbedder(model) if isinstance(model, FromageModel) else model
    existing = set(ImageBank.open(directory).ids) if (directory / "bank.json").exists() else set()
    summary = BuildSummary()
    new = _new_records(records, existing, summary)
    with tqdm(desc="embedding images", unit="img", disable=not progress) as bar:
        for part in chunks(new, part_size):
            vectors, kept = [], []
            for batch in chunks(part, batch_size):
                pixels = []
                for record in batch:
                    try:
                        pixels.append(embedder.preprocess(open_image(record.source)))
                        kept.append(record)
                    except ImageLoadError as error:
                        summary.failed.append((record.id, str(error)))
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
                )
                summary.added += len(kept)
    return summary


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
