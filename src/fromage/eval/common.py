"""What the benchmark evaluations share: their command line and a split's image bank."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fromage.config import add_override_argument
from fromage.data.image_sources import ImageRecord
from fromage.infer.bank import ImageBank
from fromage.infer.bank_build import FromageImageEmbedder, ImageEmbedder, build_bank
from fromage.model.fromage import FromageModel


def eval_parser(doc: str, data_help: str, batch_help: str) -> argparse.ArgumentParser:
    """The command line every benchmark takes; each adds its own options."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", type=Path, help="a saved model, the paper's release, a run or a .ckpt"
    )
    parser.add_argument("--data", type=Path, required=True, help=data_help)
    parser.add_argument("--out", type=Path, required=True, help="results JSON file")
    parser.add_argument("--batch-size", type=int, default=16, help=batch_help)
    add_override_argument(parser)
    return parser


def split_bank(
    embedder: FromageModel | ImageEmbedder, records: Sequence[ImageRecord], directory: Path
) -> ImageBank:
    """The split's images embedded once per embedder, under ``directory/FINGERPRINT``;
    a later run reuses (and completes) it."""
    if isinstance(embedder, FromageModel):
        embedder = FromageImageEmbedder(embedder)
    location = Path(directory) / embedder.fingerprint.replace("/", "_").replace(":", "_")
    summary = build_bank(embedder, records, location)
    for image_id, why in summary.failed:
        print(f"unreadable image {image_id}: {why}")
    return ImageBank.open(location)
