"""Your own image-caption pairs as training shards, with a held-out split.

    python -m data_prep.pairs PAIRS --out data/finetune/NAME [--val-fraction 0.1]

PAIRS is a folder of images each with a caption file of the same name (``dog.jpg`` +
``dog.txt``), or a TSV file of ``path_or_url<TAB>caption`` lines (paths relative to the
TSV). Every pair is checked: a missing file, an image that does not decode and an empty
caption are skipped, counted and listed in ``OUT/skipped.tsv``; the rest are written as
WebDataset shards (``OUT/train``, ``OUT/val``, the img2dataset layout the training data
module reads) and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from fromage.data.image_sources import ImageLoadError, folder_images, open_image

PER_SHARD = 1000


@dataclass(frozen=True)
class Pair:
    key: str
    source: str  # path or url of the image
    caption: str


def folder_pairs(root: Path) -> Iterator[Pair]:
    """Images under ``root`` with the caption in the ``.txt`` file beside each."""
    for record in folder_images(root):
        text = Path(record.source).with_suffix(".txt")
        caption = text.read_text(errors="replace").strip() if text.is_file() else ""
        yield Pair(str(Path(record.id).with_suffix("")), record.source, caption)


def tsv_pairs(table: Path) -> Iterator[Pair]:
    """``path_or_url<TAB>caption`` lines; relative paths are relative to the table."""
    for number, line in enumerate(table.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        source, _, caption = line.partition("\t")
        if not source.startswith(("http://", "https://")) and not Path(source).is_absolute():
            source = str(table.parent / source)
        yield Pair(f"{number:09d}", source, caption.strip())


def checked_jpeg(pair: Pair) -> bytes:
    """The pair's image as JPEG bytes; ``ValueError`` saying why the pair is unusable."""
    if not pair.caption:
        raise ValueError("empty caption")
    try:
        image = open_image(pair.source)
    except ImageLoadError as error:
        raise ValueError(f"unreadable image ({error})") from None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def write_pairs(pairs_spec: Path, out: Path, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Check every pair, split them (seeded) and write the shards; returns the summary."""
    pairs = list(folder_pairs(pairs_spec) if pairs_spec.is_dir() else tsv_pairs(pairs_spec))
    good, skipped = [], []
    for pair in pairs:
        try:
            good.append((pair, checked_jpeg(pair)))
        except ValueError as why:
            skipped.append((pair, str(why)))
    random.Random(seed).shuffle(good)
    n_val = max(1, round(val_fraction * len(good))) if len(good) > 1 else 0
    splits = {"val": good[:n_val], "train": good[n_val:]}
    for split, rows in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for start in range(0, len(rows), PER_SHARD):
            with wds.TarWriter(str(out / split / f"{start // PER_SHARD:05d}.tar")) as sink:
                for pair, jpeg in rows[start : start + PER_SHARD]:
                    meta = {"key": pair.key, "caption": pair.caption, "source": pair.source}
                    sink.write(
                        {
                            "__key__": pair.key.replace("/", "_").replace(".", "_"),
                            "jpg": jpeg,
                            "txt": pair.caption,
                            "json": json.dumps(meta),
                        }
                    )
    (out / "skipped.tsv").write_text("".join(f"{pair.source}\t{why}\n" for pair, why in skipped))
    summary = {
        "pairs": len(pairs),
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "skipped": len(skipped),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", type=Path, help="a folder of image + .txt pairs, or a TSV")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.pairs.exists():
        raise SystemExit(f"no pairs at {args.pairs}: give a folder of images + .txt, or a TSV")
    summary = write_pairs(args.pairs, args.out, args.val_fraction, args.seed)
    print(
        f"{summary['pairs']} pairs: {summary['train']} train, {summary['val']} held out, "
        f"{summary['skipped']} skipped (listed in {args.out / 'skipped.tsv'})"
    )
    if summary["train"] == 0:
        raise SystemExit("no usable training pairs")
    return summary


if __name__ == "__main__":
    main()
