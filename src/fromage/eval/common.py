"""What the benchmark evaluations share: their command line, how images are opened
(the image protocol) and a split's image bank."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from fromage.config import add_override_argument, positive_int
from fromage.data.image_sources import ImageRecord
from fromage.infer.bank import ImageBank
from fromage.infer.bank_build import FromageImageEmbedder, ImageEmbedder, build_bank
from fromage.model.fromage import FromageModel

# How an evaluation image reaches the encoder's processor. "paper": squashed to 224 x 224
# first (aspect ratio not kept), as the paper's evaluation scripts and demo open every
# image; "crop": the original image, so the processor resizes its shortest side and
# crops the centre, as training data is read.
IMAGE_PROTOCOLS = ("paper", "crop")
PAPER_IMAGE_SIZE = 224


def image_preparation(name: str) -> Callable[[Image.Image], Image.Image]:
    """The PIL -> PIL step that ``name`` (one of ``IMAGE_PROTOCOLS``) puts before the processor."""
    if name == "paper":
        return squash
    if name == "crop":
        return lambda image: image
    raise ValueError(f"image protocol must be one of {IMAGE_PROTOCOLS}, got {name!r}")


def squash(image: Image.Image, size: int = PAPER_IMAGE_SIZE) -> Image.Image:
    """``size`` x ``size`` whatever the aspect ratio (PIL's bicubic resize), as the paper's
    evaluation opened images before CLIP's processor."""
    return image.resize((size, size), Image.Resampling.BICUBIC)


class ProtocolEmbedder:
    """An ``ImageEmbedder`` whose images pass through an image protocol before its own
    preprocessing; the same vectors and fingerprint otherwise."""

    def __init__(self, embedder: ImageEmbedder, protocol: str):
        self.embedder, self.prepare = embedder, image_preparation(protocol)
        self.fingerprint, self.device = embedder.fingerprint, embedder.device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.embedder.preprocess(self.prepare(image))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embedder(pixels)


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
    parser.add_argument("--batch-size", type=positive_int, default=16, help=batch_help)
    add_override_argument(parser)
    return parser


def add_image_protocol_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-protocol",
        choices=IMAGE_PROTOCOLS,
        default="paper",
        help="paper: every image squashed to 224x224 before the processor, as the paper's "
        "evaluation did (default); crop: the processor's shortest-side resize and centre crop",
    )


def split_bank(
    embedder: FromageModel | ImageEmbedder,
    records: Sequence[ImageRecord],
    directory: Path,
    image_protocol: str = "crop",
) -> ImageBank:
    """The split's images embedded once per embedder and image protocol, under
    ``directory/FINGERPRINT`` (crop) or ``directory/FINGERPRINT-PROTOCOL``; a later run
    reuses (and completes) it."""
    if isinstance(embedder, FromageModel):
        embedder = FromageImageEmbedder(embedder)
    name = embedder.fingerprint.replace("/", "_").replace(":", "_")
    if image_protocol != "crop":
        name, embedder = f"{name}-{image_protocol}", ProtocolEmbedder(embedder, image_protocol)
    location = Path(directory) / name
    summary = build_bank(embedder, records, location)
    for image_id, why in summary.failed:
        print(f"unreadable image {image_id}: {why}")
    return ImageBank.open(location)
