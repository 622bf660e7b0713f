import itertools

import pytest
from data_prep.synthetic import COLOURS, PLACES, SHAPES, TEMPLATES, write_split

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
    [shard] = write_split(tmp_path, n=6, per_shard=6, seed=0)
    truths = shard_attributes([str(shard)])
    assert len(truths) == 6 and set(next(iter(truths.values()))) == {"colour", "shape", "place"}
