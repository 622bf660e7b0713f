import io
import itertools
import random

import numpy as np
import pytest
import webdataset as wds
from data_prep.synthetic import COLOURS, PLACES, SHAPES, TEMPLATES, make_pair, write_split
from PIL import Image

from fromage.eval.attributes import (
    caption_accuracy,
    names_exactly,
    parse,
    retrieval_accuracy,
    shard_attributes,
    vocabulary_of,
)

VOCABULARY = {"colour": sorted(COLOURS), "place": sorted(PLACES), "shape": sorted(SHAPES)}


def test_every_synthetic_caption_parses_back_to_its_attributes():
    for template, colour, shape, place in itertools.product(TEMPLATES, COLOURS, SHAPES, PLACES):
        caption = template.format(c=colour, s=shape, p=place)
        assert parse(caption, VOCABULARY) == {"colour": colour, "shape": shape, "place": place}


@pytest.mark.parametrize(
    "caption",
    [
        "a blue circle at the top left",  # wrong colour
        "a red square at the top left",  # wrong shape
        "a red circle at the top right",  # wrong place
        "a red circle",  # no place
        "a red circle at the top",  # a place cut short is no place
        "a red and blue circle at the top left",  # two colours name none
        "a red circle at the top left and a red circle at the centre",
        "a reddish circlet at the top left",  # whole words only
    ],
)
def test_a_wrong_caption_is_wrong(caption):
    truth = {"colour": "red", "shape": "circle", "place": "top left"}
    assert not names_exactly(caption, truth, VOCABULARY)
    assert names_exactly("There is a RED  circle at the top-left.", truth, VOCABULARY)


def test_accuracies_count_exact_matches():
    truths = {
        "a": {"colour": "red", "shape": "circle", "place": "centre"},
        "b": {"colour": "red", "shape": "circle", "place": "centre"},  # same as a
        "c": {"colour": "blue", "shape": "cross", "place": "top left"},
    }
    vocabulary = vocabulary_of(list(truths.values()))
    assert vocabulary["place"] == ["centre", "top left"]
    generated = ["a red circle at the centre", "a blue circle at the centre", "a blue cross"]
    assert caption_accuracy(generated, list(truths.values()), vocabulary) == pytest.approx(100 / 3)
    # a retrieved twin with the queried attributes is right; another image is wrong
    assert retrieval_accuracy(["a", "b", "c"], ["b", "a", "a"], truths) == pytest.approx(200 / 3)


def test_shard_attributes_are_the_generators(tmp_path):
    """The truths behind the report's accuracies: for every sample, the attributes the
    generator drew for it (replayed from its seed), and what its image shows."""
    size = 96
    write_split(tmp_path, n=12, per_shard=6, seed=3, image_size=size)
    truths = shard_attributes([str(p) for p in sorted(tmp_path.glob("*.tar"))])
    rng = random.Random(3)
    drawn = {f"{i // 6:05d}{i % 6:04d}": make_pair(rng, size)[2] for i in range(12)}
    assert truths == drawn
    images = {
        sample["__key__"]: Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        for sample in wds.DataPipeline(
            wds.SimpleShardList(sorted(str(p) for p in tmp_path.glob("*.tar"))),
            wds.tarfile_to_samples(),
        )
    }
    for key, truth in truths.items():
        colour, (x, y) = shown(np.asarray(images[key], dtype=float))
        assert colour == truth["colour"], key
        px, py = PLACES[truth["place"]]
        assert abs(x - px * size) < 0.12 * size and abs(y - py * size) < 0.12 * size, key


def shown(pixels: np.ndarray) -> tuple[str, tuple[float, float]]:
    """The generator's colour with the most pixels near it in an (H, W, 3) image, and the
    centroid (x, y) of those pixels."""
    near = {name: (np.abs(pixels - np.array(rgb)).max(-1) < 30) for name, rgb in COLOURS.items()}
    name = max(near, key=lambda n: near[n].sum())
    ys, xs = np.nonzero(near[name])
    return name, (xs.mean(), ys.mean())
