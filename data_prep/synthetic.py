"""Synthetic image-caption shards, written in the layout img2dataset writes.

Each image is one coloured shape at one of five places on a noisy background, captioned
from templates ("a red star at the top left"). Thousands of pairs take seconds, so the
whole pipeline (training, recall@k, generation) runs offline.

    python -m data_prep.synthetic --out data/synthetic --train 4000 --val 500

``--image-size 224`` writes the images at the paper towers' input size (`make gpu-check`
measures decoding at that size); the default, 96 px, is what the demo trains on.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "orange": (250, 140, 0),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLACES = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "centre": (0.5, 0.5),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
TEMPLATES = ("a {c} {s} at the {p}", "a {c} {s} in the {p}", "there is a {c} {s} at the {p}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def make_pair(rng: random.Random, size: int = 96) -> tuple[Image.Image, str, dict]:
    """One random (image, caption, attributes) triple."""
    colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
    grey = rng.randint(90, 170)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # clutter so that no two images are alike
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        shade = grey + rng.randint(-40, 40)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(shade, shade, shade))
    fx, fy = PLACES[place]
    jitter = size * 0.05
    cx, cy = fx * size + rng.uniform(-jitter, jitter), fy * size + rng.uniform(-jitter, jitter)
    draw_shape(draw, shape, cx, cy, size * rng.uniform(0.13, 0.2), COLOURS[colour])
    caption = rng.choice(TEMPLATES).format(c=colour, s=shape, p=place)
    return image, caption, {"colour": colour, "shape": shape, "place": place}


def write_split(
    out_dir: Path, n: int, per_shard: int, seed: int, image_size: int = 96
) -> list[Path]:
    """Write ``n`` pairs of ``image_size`` px images as shards ``00000.tar``, ... of
    ``per_shard`` samples each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_shards = math.ceil(n / per_shard)
    paths = []
    for shard in range(n_shards):
        path = out_dir / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                image, caption, attributes = make_pair(rng, image_size)
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=90)
                key = f"{shard:05d}{i % per_shard:04d}"
                meta = {
                    "key": key,
                    "caption": caption,
                    "status": "success",
                    "width": image.width,
                    "height": image.height,
                    **attributes,
                }
                sink.write(
                    {
                        "__key__": key,
                        "jpg": jpeg.getvalue(),
                        "txt": caption,
                        "json": json.dumps(meta),
                    }
                )
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96, help="side of the square images")
    args = parser.parse_args(argv)
    size = args.image_size
    train = write_split(args.out / "train", args.train, args.per_shard, args.seed, size)
    val = write_split(args.out / "val", args.val, args.per_shard, args.seed + 1, size)
    print(f"wrote {len(train)} train and {len(val)} val shards under {args.out}")


if __name__ == "__main__":
    main()
