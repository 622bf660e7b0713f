"""Synthetic image-caption shards, written in the layout img2dataset writes.

Each image is one coloured shape at one of five places on a noisy background, captioned
from templates ("a red star at the top left"). Thousands of pairs take seconds, so the
whole pipeline (training, recall@k, generation) runs offline. Held-out five-step stories
(one object that moves; its colour is only seen) test contextual retrieval as VIST does.

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

# The demo's sizes: its 300 steps of 16 pairs see each of 4,000 training pairs about once;
# 500 held-out pairs put chance R@1 at 0.2%; shards of 500 pairs (8 for training) leave
# the loader shards to spread over its workers; stories have five steps, as VIST's do.
TRAIN_PAIRS, VAL_PAIRS, PAIRS_PER_SHARD = 4000, 500, 500
STORIES, STORY_STEPS = 100, 5
IMAGE_SIZE = 96  # px; the demo tower reads them at 64 px (conf/model/smollm2-demo.yaml)
JPEG_QUALITY = 90  # small files, no visible artefacts on flat colours
# Scene drawing, in grey levels or fractions of the image side. The clutter makes every
# image unique, so no two held-out images are the same picture.
BACKGROUND_GREY = (90, 170)  # the background's grey level, uniform in this range
CLUTTER_DOTS, CLUTTER_SHADE = 12, 40  # dots of radius 2 px, within +-40 grey levels of it
PLACE_JITTER = 0.05  # the shape's centre lies up to this far from its place's centre
SHAPE_RADIUS = (0.13, 0.2)  # the shape stays inside the image: 0.27 - 0.05 - 0.2 > 0
# Each part is drawn from its own seed: the base seed for train, +1 val, +2 stories.
VAL_SEED_OFFSET, STORY_SEED_OFFSET = 1, 2


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


def make_pair(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, str, dict]:
    """One random (image, caption, attributes) triple."""
    colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
    image = draw_scene(rng, colour, shape, place, size)
    caption = rng.choice(TEMPLATES).format(c=colour, s=shape, p=place)
    return image, caption, {"colour": colour, "shape": shape, "place": place}


def draw_scene(rng: random.Random, colour: str, shape: str, place: str, size: int) -> Image.Image:
    """One shape on a cluttered grey background (the clutter makes every image unique)."""
    grey = rng.randint(*BACKGROUND_GREY)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for _ in range(CLUTTER_DOTS):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        shade = grey + rng.randint(-CLUTTER_SHADE, CLUTTER_SHADE)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(shade, shade, shade))
    fx, fy = PLACES[place]
    jitter = size * PLACE_JITTER
    cx, cy = fx * size + rng.uniform(-jitter, jitter), fy * size + rng.uniform(-jitter, jitter)
    draw_shape(draw, shape, cx, cy, size * rng.uniform(*SHAPE_RADIUS), COLOURS[colour])
    return image


def make_story(
    rng: random.Random, steps: int = STORY_STEPS, size: int = IMAGE_SIZE
) -> list[tuple[Image.Image, str]]:
    """One object in ``steps`` (image, caption) steps, told as VIST tells a story: the
    captions say what happens, the images show what it looks like. The first caption names
    the object's shape and place, each later one only where it moves; its colour is in the
    images alone. So the last caption leaves shape and colour open, five captions leave the
    colour open, and the four images close it: the paper's three settings, in that order."""
    colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
    story = [(place, f"there is a {shape} at the {place}")]
    for _ in range(1, steps):
        place = rng.choice([p for p in PLACES if p != place])
        story.append((place, f"then it moves to the {place}"))
    return [(draw_scene(rng, colour, shape, p, size), caption) for p, caption in story]


def write_stories(out_dir: Path, n: int, seed: int, image_size: int = IMAGE_SIZE) -> Path:
    """``n`` stories in the layout ``data_prep/vist.py`` writes (``stories.jsonl``,
    ``images.jsonl``, ``images/``), so VIST's evaluation reads them unchanged."""
    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    stories, images = [], []
    for s in range(n):
        ids = []
        for step, (image, caption) in enumerate(make_story(rng, size=image_size)):
            image_id = f"story{s:04d}-{step}"
            path = (out_dir / "images" / f"{image_id}.jpg").resolve()
            image.save(path, format="JPEG", quality=JPEG_QUALITY)
            images.append({"id": image_id, "source": str(path)})
            ids.append((image_id, caption))
        stories.append(
            {
                "story_id": f"story{s:04d}",
                "captions": [c for _, c in ids],
                "image_ids": [i for i, _ in ids],
            }
        )
    for name, rows in [("stories.jsonl", stories), ("images.jsonl", images)]:
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def write_split(
    out_dir: Path, n: int, per_shard: int, seed: int, image_size: int = IMAGE_SIZE
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
                image.save(jpeg, format="JPEG", quality=JPEG_QUALITY)
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
    parser.add_argument("--train", type=int, default=TRAIN_PAIRS)
    parser.add_argument("--val", type=int, default=VAL_PAIRS)
    parser.add_argument("--per-shard", type=int, default=PAIRS_PER_SHARD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stories", type=int, default=STORIES, help="held-out 5-step stories")
    parser.add_argument(
        "--image-size", type=int, default=IMAGE_SIZE, help="side of the square images"
    )
    args = parser.parse_args(argv)
    size = args.image_size
    train = write_split(args.out / "train", args.train, args.per_shard, args.seed, size)
    val = write_split(args.out / "val", args.val, args.per_shard, args.seed + VAL_SEED_OFFSET, size)
    stories = write_stories(args.out / "stories", args.stories, args.seed + STORY_SEED_OFFSET, size)
    print(
        f"wrote {len(train)} train and {len(val)} val shards and {args.stories} stories "
        f"({stories}) under {args.out}"
    )


if __name__ == "__main__":
    main()
