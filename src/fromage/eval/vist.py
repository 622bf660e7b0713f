"""VIST contextual image retrieval (the paper's Table 1).

For every story of five (caption, image) steps, the model gets the story up to the last
caption with ``[RET]`` appended, and the last image is ranked among all images of the
split's bank. Three settings: the last caption only; all five captions; five captions
with the first four images interleaved (``c1 i1 c2 i2 c3 i3 c4 i4 c5[RET]``). Images
given as input are excluded from the ranking. With a full CLIP vision tower, CLIP's own
text-to-image retrieval (last caption; all captions) adds the baseline rows.

By default this is the paper's protocol, as its authors' evaluation script computed
Table 1: every caption tokenized with the tokenizer's BOS (``--text-prefix every_piece``:
``BOS c1 [img1] BOS c2 [img2] ... BOS c5[RET]``) and every image, in the bank and in the
prompts, squashed to 224x224 before the processor (``--image-protocol paper``).
``--text-prefix first_piece`` puts BOS only before the first caption (the release's
interleaved generation API), ``--image-protocol crop`` keeps the aspect ratio (the
processor's resize and centre crop, as in training).

    python -m fromage.eval.vist MODEL --data data/vist/val --out runs/eval/vist.json

MODEL is anything ``load_model`` reads: a saved model, the paper's release, a run or a .ckpt. ``--data`` is
what ``data_prep/vist.py`` writes. Stories with a missing image are skipped and counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fromage.data.image_sources import ImageRecord, open_image, shard_samples
from fromage.eval.clip_baseline import CLIPBaseline
from fromage.eval.common import (
    add_image_protocol_argument,
    eval_parser,
    image_preparation,
    split_bank,
)
from fromage.infer.bank import ImageBank, read_jsonl
from fromage.infer.bank_build import chunks
from fromage.infer.scoring import retrieval_queries
from fromage.model.fromage import TEXT_PREFIXES, FromageModel, Item
from fromage.model.load import load_model
from fromage.model.tokens import RET_TOKEN
from fromage.ranks import recall_at_k
from fromage.reporting import markdown_table, write_json

SETTINGS = ("1 caption", "5 captions", "5 captions, 4 images")


@dataclass(frozen=True)
class Story:
    story_id: str
    captions: list[str]
    image_ids: list[str]


def read_split(directory: Path) -> tuple[list[Story], list[ImageRecord]]:
    """The stories and images data_prep/vist.py wrote, refusing damaged rows by name."""
    return _rows(directory / "stories.jsonl", Story), _rows(directory / "images.jsonl", ImageRecord)


def _rows(path: Path, row_class) -> list:
    fix = "write it again with data_prep/vist.py"
    rows = []
    for number, row in enumerate(read_jsonl(path, fix), 1):
        try:
            rows.append(row_class(**row))
        except TypeError as error:
            raise ValueError(f"{path}, row {number}: {error}; {fix}") from None
    return rows


def shard_stories(
    shards: Sequence[str | Path], n_stories: int, steps: int = 5
) -> tuple[list[Story], list[ImageRecord]]:
    """Contexts made from (validation) shards where no stories are configured: each run of
    ``steps`` consecutive pairs is one story, the first ``n_stories`` of them, and their
    images are the bank. Unlike VIST's, the steps are unrelated, so context cannot help;
    the numbers show whether the model still finds the last caption's image past it."""
    captioned = ((record, caption) for record, caption in shard_samples(shards) if caption)
    stories, images = [], []
    for i, steps_of_story in enumerate(
        chunks(itertools.islice(captioned, n_stories * steps), steps)
    ):
        if len(steps_of_story) == steps:
            images += [record for record, _ in steps_of_story]
            ids = [record.id for record, _ in steps_of_story]
            captions = [caption for _, caption in steps_of_story]
            stories.append(Story(f"shards{i:05d}", captions, ids))
    return stories, images


def story_prompt(story: Story, setting: str, image_of: Callable[[str], Image.Image]) -> list[Item]:
    """The model's input for one setting; the last caption ends in ``[RET]``. ``image_of``
    opens an input image by its id."""
    last = story.captions[-1] + RET_TOKEN
    if setting == "1 caption":
        return [last]
    if setting == "5 captions":
        return [" ".join([*story.captions[:-1], last])]
    prompt: list[Item] = []
    for caption, image_id in zip(story.captions[:-1], story.image_ids[:-1], strict=True):
        prompt += [caption, image_of(image_id)]
    return [*prompt, last]


def input_images(story: Story, setting: str) -> list[str]:
    return story.image_ids[:-1] if setting == "5 captions, 4 images" else []


@torch.no_grad()
def setting_ranks(
    model: FromageModel,
    stories: Sequence[Story],
    bank: ImageBank,
    setting: str,
    batch_size: int = 16,
    image_of: Callable[[str], Image.Image] | None = None,
    text_prefix: str = "every_piece",
) -> torch.Tensor:
    """0-based rank of each story's last image among the bank's images (minus the story's
    input images), for one of ``SETTINGS``; one LM pass per ``batch_size`` stories.
    Input images are opened by ``image_of`` (default: from the bank's sources, as they
    are); ``text_prefix`` places BOS (default: before every caption, as the paper did)."""
    image_of = image_of or (lambda image_id: open_image(bank.source_of(image_id)))
    ranks = [
        bank.ranks(
            retrieval_queries(
                model, [story_prompt(s, setting, image_of) for s in batch], text_prefix
            ),
            [s.image_ids[-1] for s in batch],
            exclude=[input_images(s, setting) for s in batch],
        )
        for batch in chunks(stories, batch_size)
    ]
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def evaluate_vist(
    model: FromageModel,
    stories: Sequence[Story],
    bank: ImageBank,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 16,
    clip: CLIPBaseline | None = None,
    clip_bank: ImageBank | None = None,
    text_prefix: str = "every_piece",
    image_protocol: str = "paper",
) -> dict:
    """Recall@k per setting (and CLIP rows) over the stories whose images are all in the
    bank; input images are opened with ``image_protocol`` (the banks must have been
    embedded with the same)."""
    usable = [s for s in stories if all(image_id in bank for image_id in s.image_ids)]
    if not usable:
        raise ValueError(
            f"none of the {len(stories)} stories has all its images among the bank's "
            f"{len(bank)}: check the images data_prep/vist.py found (images.jsonl)"
        )
    prepare = image_preparation(image_protocol)
    image_of = lambda image_id: prepare(open_image(bank.source_of(image_id)))  # noqa: E731
    rows = {
        f"FROMAGe, {setting}": recall_at_k(
            setting_ranks(model, usable, bank, setting, batch_size, image_of, text_prefix), ks
        )
        for setting in SETTINGS
    }
    if clip is not None:
        for name, text in [
            ("1 caption", lambda s: s.captions[-1]),
            ("5 captions", lambda s: " ".join(s.captions)),
        ]:
            ranks = [
                clip_bank.ranks(
                    clip.text_embeddings([text(s) for s in batch]), [s.image_ids[-1] for s in batch]
                )
                for batch in chunks(usable, batch_size)
            ]
            rows[f"CLIP, {name}"] = recall_at_k(torch.cat(ranks), ks)
    return {
        "image_protocol": image_protocol,
        "text_prefix": text_prefix,
        "n_stories": len(usable),
        "n_skipped_missing_images": len(stories) - len(usable),
        "n_bank_images": len(bank),
        "recall": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = eval_parser(__doc__, "output of data_prep/vist.py", "stories per LM forward")
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP baseline rows")
    add_image_protocol_argument(parser)
    parser.add_argument(
        "--text-prefix",
        choices=TEXT_PREFIXES,
        default="every_piece",
        help="every_piece: BOS before every caption, as the paper's evaluation (default); "
        "first_piece: BOS once, before the first caption",
    )
    args = parser.parse_args(argv)

    model = load_model(args.model, args.override)
    stories, images = read_split(args.data)
    banks = args.data / "banks"
    bank = split_bank(model, images, banks, args.image_protocol)
    clip = clip_bank = None
    if not args.no_clip and CLIPBaseline.available_for(model.config.vision):
        clip = CLIPBaseline(model.config.vision.name, device=model.image_to_lm.weight.device)
        clip_bank = split_bank(clip, images, banks, args.image_protocol)
    results = evaluate_vist(
        model,
        stories,
        bank,
        batch_size=args.batch_size,
        clip=clip,
        clip_bank=clip_bank,
        text_prefix=args.text_prefix,
        image_protocol=args.image_protocol,
    )
    results = {"model": str(args.model), **results}
    write_json(args.out, results)
    print(markdown_table(results["recall"]))
    print(
        f"image protocol {args.image_protocol}, BOS {args.text_prefix.replace('_', ' ')}: "
        f"{results['n_stories']} stories ({results['n_skipped_missing_images']} skipped: missing "
        f"images), {results['n_bank_images']} images in the bank; results in {args.out}"
    )
    return results


if __name__ == "__main__":
    main()
