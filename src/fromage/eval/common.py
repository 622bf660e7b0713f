"""What the benchmark evaluations share: loading a model, a split's image bank, recall tables."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fromage.config import add_override_argument
from fromage.data.image_sources import ImageRecord
from fromage.infer.bank import ImageBank
from fromage.infer.bank_build import FromageImageEmbedder, ImageEmbedder, build_bank
from fromage.model.fromage import FromageModel
from fromage.model.released import ARGS_FILE, load_released


def eval_parser(doc: str, data_help: str, batch_help: str) -> argparse.ArgumentParser:
    """The command line every benchmark takes; each adds its own options."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="save_pretrained directory or release directory")
    parser.add_argument("--data", type=Path, required=True, help=data_help)
    parser.add_argument("--out", type=Path, required=True, help="results JSON file")
    parser.add_argument("--batch-size", type=int, default=16, help=batch_help)
    add_override_argument(parser)
    return parser


def load_model(path: str | Path, overrides: Sequence[str] = ()) -> FromageModel:
    """A ``save_pretrained`` directory, or the paper's release (``model_args.json`` + pickle)."""
    path = Path(path)
    if (path / ARGS_FILE).exists():
        return load_released(path, list(overrides)).eval()
    return FromageModel.from_pretrained(path, overrides).eval()


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


def recall_at(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k (in %) from 0-based ranks of the right answer."""
    return {f"R@{k}": 100 * float((ranks < k).float().mean()) for k in ks}


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def write_results(path: str | Path, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
