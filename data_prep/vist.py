"""Visual Storytelling (SIS) for contextual retrieval: stories in order, and their images.

Reads the official ``SIS`` JSON (e.g. ``sis/val.story-in-sequence.json`` from
https://visionandlanguage.net/VIST/): ``annotations`` is a list of one-element lists with
``story_id``, ``text``, ``photo_flickr_id`` and ``worker_arranged_photo_order``;
``images`` lists ``id`` and urls. Writes to ``--out``:

- ``stories.jsonl``: one ``{"story_id", "captions", "image_ids"}`` per story, in order;
- ``images.jsonl``: one ``{"id", "source"}`` per image that was found or downloaded:
  the image bank.

The bank is the paper's: the authors' evaluation embedded only the images that the SIS
file gives an original-size url (``url_o``) for, so an image listed with ``url_m`` alone
is left out (and its story skipped) unless ``--any-url`` keeps it.

Images are located as ``--images DIR/ID.{jpg,png,...}``, or with ``--download`` fetched
from ``url_o`` (else ``url_m``) with a timeout, a size limit and a content-type check.
Flickr images disappear over time; stories with a missing image are skipped (and
counted) by the evaluation.

    python -m data_prep.vist --sis sis/val.story-in-sequence.json --images vist_images --out data/vist/val
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from fromage.data.image_sources import IMAGE_SUFFIXES, ImageLoadError, fetch_bytes

ANNOTATION_FIELDS = ("story_id", "text", "photo_flickr_id", "worker_arranged_photo_order")


def read_stories(sis: dict, source: str = "the SIS file") -> list[dict]:
    """Group the annotations by story, each ordered by ``worker_arranged_photo_order``;
    an annotation without one of its fields is refused naming it and its story."""
    if not isinstance(sis, dict) or not {"annotations", "images"} <= sis.keys():
        raise ValueError(f"{source} has no 'annotations' and 'images': not a VIST SIS file")
    steps = defaultdict(list)
    for number, entry in enumerate(sis["annotations"]):
        annotation = entry[0] if isinstance(entry, list) and len(entry) == 1 else entry
        missing = [
            f for f in ANNOTATION_FIELDS if not isinstance(annotation, dict) or f not in annotation
        ]
        if missing:
            story = annotation.get("story_id", "?") if isinstance(annotation, dict) else "?"
            raise ValueError(
                f"{source}: annotation {number} (story {story}) has no {missing}; "
                "give the official story-in-sequence (SIS) JSON"
            )
        steps[annotation["story_id"]].append(annotation)
    stories = []
    for story_id, story in steps.items():
        story.sort(key=lambda a: int(a["worker_arranged_photo_order"]))
        stories.append(
            {
                "story_id": story_id,
                "captions": [a["text"] for a in story],
                "image_ids": [a["photo_flickr_id"] for a in story],
            }
        )
    return stories


def locate_image(folder: Path, image_id: str) -> Path | None:
    for suffix in sorted(IMAGE_SUFFIXES):
        path = folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def download_image(image: dict, folder: Path) -> Path | None:
    url = image.get("url_o") or image.get("url_m")
    if not url:
        return None
    try:
        data = fetch_bytes(url)
    except (ImageLoadError, OSError):
        return None
    path = folder / f"{image['id']}.jpg"
    path.write_bytes(data)
    return path


def prepare(
    sis_file: Path, out: Path, images: Path | None, download: bool, any_url: bool = False
) -> dict:
    try:
        sis = json.loads(sis_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{sis_file} is not JSON ({error}): cut short? download or unpack it again"
        ) from None
    stories = read_stories(sis, str(sis_file))
    needed = {i for story in stories for i in story["image_ids"]}
    out.mkdir(parents=True, exist_ok=True)
    folder = images or out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    found, without_url_o = {}, set()
    for image in sis["images"]:
        if image["id"] not in needed or image["id"] in found:
            continue
        if not (any_url or image.get("url_o")):
            without_url_o.add(image["id"])
            continue
        path = locate_image(folder, image["id"])
        if path is None and download:
            path = download_image(image, folder)
        if path is not None:
            found[image["id"]] = str(path.resolve())
    with open(out / "stories.jsonl", "w") as f:
        f.writelines(json.dumps(story) + "\n" for story in stories)
    with open(out / "images.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "source": s}) + "\n" for i, s in found.items())
    summary = {"stories": len(stories), "images_needed": len(needed), "images_found": len(found)}
    return {**summary, "left_out_without_url_o": len(without_url_o)} if without_url_o else summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sis", type=Path, required=True, help="official SIS json of one split")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path, help="folder with ID.jpg files (or to download to)")
    parser.add_argument("--download", action="store_true", help="fetch missing images by url")
    parser.add_argument(
        "--any-url",
        action="store_true",
        help="keep images listed without url_o (the paper's bank leaves them out)",
    )
    args = parser.parse_args(argv)
    print(prepare(args.sis, args.out, args.images, args.download, args.any_url))


if __name__ == "__main__":
    main()
