"""Small VIST and VisDial splits in their official file formats, drawn from synthetic shapes.

They are the default data of ``make eval-vist`` / ``make eval-visdial`` (so both run
offline end to end) and the tests' fixtures. Real data goes through the same
``data_prep/vist.py`` and ``data_prep/visdial.py``.

    python -m data_prep.fixtures --out data/fixtures
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageOps

from data_prep.synthetic import COLOURS, PLACES, SHAPES, make_pair

STEPS = 5  # images per VIST story
ROUNDS = 10  # rounds per VisDial dialog
OPTIONS = 100  # candidate answers per round


def write_vist(root: Path, n_stories: int, seed: int = 0, missing: int = 1) -> Path:
    """``root/sis/val.story-in-sequence.json`` and ``root/images/ID.jpg``; the images of
    the last ``missing`` stories lose one file, as taken-down Flickr photos do. Images are
    4:3 landscape, as most Flickr photos are (each square scene stretched), so the paper's
    squash to 224x224 and the processor's centre crop see different pixels."""
    rng = random.Random(seed)
    (root / "sis").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    annotations, images = [], []
    for story in range(n_stories):
        for order in range(STEPS):
            image, caption, _ = make_pair(rng)
            image = image.resize((image.width * 4 // 3, image.height), Image.Resampling.BICUBIC)
            image_id = str(700000 + story * STEPS + order)
            image.save(root / "images" / f"{image_id}.jpg", quality=90)
            images.append({"id": image_id, "url_o": f"https://example.invalid/{image_id}.jpg"})
            annotations.append(
                [
                    {
                        "story_id": str(40000 + story),
                        "album_id": str(story),
                        "text": caption,
                        "original_text": caption.capitalize() + ".",
                        "photo_flickr_id": image_id,
                        "worker_arranged_photo_order": order,
                        "storylet_id": str(len(annotations)),
                    }
                ]
            )
    rng.shuffle(annotations)  # the official file is not in story order either
    for story in range(n_stories - missing, n_stories):
        (root / "images" / f"{700000 + story * STEPS + 2}.jpg").unlink()
    path = root / "sis" / "val.story-in-sequence.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def landscape(image: Image.Image) -> Image.Image:
    """A square scene widened to 4:3 with its background colour, as COCO's photos are wider
    than tall: a centre crop gives the scene back, a 224 x 224 squash distorts it."""
    width, height = image.size
    return ImageOps.pad(image, (width * 4 // 3, height), color=image.getpixel((0, 0)))


def write_visdial(root: Path, n_dialogs: int, seed: int = 0) -> tuple[Path, Path]:
    """``visdial_1.0_val.json``, its dense annotations and ``VisualDialog_val2018/`` 4:3
    images."""
    rng = random.Random(seed)
    folder = root / "VisualDialog_val2018"
    folder.mkdir(parents=True, exist_ok=True)
    answers = [*COLOURS, *SHAPES, *PLACES, "yes", "no"]
    answers += [f"i can not tell, sorry {i}" for i in range(OPTIONS - len(answers) + 20)]
    questions = ["what colour is the shape", "what shape is it", "where is it", "is it big"]
    dialogs, dense = [], []
    for n in range(n_dialogs):
        image, caption, facts = make_pair(rng)
        image = landscape(image)
        image_id = 185000 + n
        image.save(folder / f"VisualDialog_val2018_{image_id:012d}.jpg", quality=90)
        truth = [facts["colour"], facts["shape"], facts["place"], "yes"]
        rounds = []
        for r in range(ROUNDS):
            answer = answers.index(truth[r % len(questions)])
            options = rng.sample([i for i in range(len(answers)) if i != answer], OPTIONS - 1)
            options.insert(rng.randrange(OPTIONS), answer)
            rounds.append(
                {
                    "question": r % len(questions),
                    "answer": answer,
                    "answer_options": options,
                    "gt_index": options.index(answer),
                }
            )
        dialogs.append({"image_id": image_id, "caption": caption, "dialog": rounds})
        round_id = rng.randint(1, ROUNDS)  # 1-based, as in the official file
        relevance = [0.0] * OPTIONS
        relevance[rounds[round_id - 1]["gt_index"]] = 1.0
        for other in rng.sample(range(OPTIONS), 3):
            relevance[other] = max(relevance[other], 0.5)
        dense.append({"image_id": image_id, "round_id": round_id, "gt_relevance": relevance})
    data = {"questions": questions, "answers": answers, "dialogs": dialogs}
    dialog_file = root / "visdial_1.0_val.json"
    dialog_file.write_text(json.dumps({"version": "1.0", "split": "val", "data": data}))
    dense_file = root / "visdial_1.0_val_dense_annotations.json"
    dense_file.write_text(json.dumps(dense))
    return dialog_file, dense_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/fixtures"))
    parser.add_argument("--vist-stories", type=int, default=40)
    parser.add_argument("--visdial-dialogs", type=int, default=6)
    args = parser.parse_args(argv)
    write_vist(args.out / "vist", args.vist_stories)
    write_visdial(args.out / "visdial", args.visdial_dialogs)
    print(f"wrote VIST and VisDial fixtures under {args.out}")


if __name__ == "__main__":
    main()
