"""Exact checks for data whose images are described by a few attributes (the synthetic set).

Recall@k only says whether the paired image came first; two held-out images of "a red
circle at the top left" are equally right answers, and a caption can be judged exactly
by the attributes it names. The synthetic shards record each image's attributes in its
``.json`` (``colour``, ``shape``, ``place``), so the vocabulary and the truth come from
the shards themselves; a caption is parsed by the phrases of that vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

import webdataset as wds

ATTRIBUTES = ("colour", "shape", "place")

Attributes = dict[str, str]  # attribute -> value, e.g. {"colour": "red", "place": "top left"}
Vocabulary = dict[str, list[str]]  # attribute -> every value it takes


def shard_attributes(
    shards: Sequence[str], attributes: Sequence[str] = ATTRIBUTES
) -> dict[str, Attributes]:
    """key -> attributes, from the ``.json`` of every sample that records all of them
    (none for shards of real captions, such as CC3M)."""
    found = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(list(shards)), wds.tarfile_to_samples()):
        meta = json.loads(sample.get("json", b"{}"))
        if all(a in meta for a in attributes):
            found[sample["__key__"]] = {a: meta[a] for a in attributes}
    return found


def vocabulary_of(truths: Sequence[Attributes]) -> Vocabulary:
    """Every value each attribute takes in ``truths``."""
    names = {a for truth in truths for a in truth}
    return {a: sorted({truth[a] for truth in truths}) for a in sorted(names)}


def parse(caption: str, vocabulary: Vocabulary) -> dict[str, str | None]:
    """The value a caption names for each attribute, or None where it names none or
    several (a caption naming two colours names no colour). Values may be several words
    ("top left"); they match whole words, case and spacing ignored."""
    text = " ".join(re.findall(r"[a-z0-9]+", caption.lower()))
    parsed = {}
    for attribute, values in vocabulary.items():
        named = [v for v in values if re.search(rf"\b{re.escape(v.lower())}\b", text)]
        parsed[attribute] = named[0] if len(named) == 1 else None
    return parsed


def names_exactly(caption: str, truth: Attributes, vocabulary: Vocabulary) -> bool:
    """Whether ``caption`` names every attribute of ``truth`` and nothing contradicting it."""
    return parse(caption, vocabulary) == {a: truth.get(a) for a in vocabulary}


def caption_accuracy(
    captions: Sequence[str], truths: Sequence[Attributes], vocabulary: Vocabulary
) -> float:
    """Percent of generated captions that name their image's attributes exactly."""
    right = [names_exactly(c, t, vocabulary) for c, t in zip(captions, truths, strict=True)]
    return 100 * sum(right) / len(right)


def retrieval_accuracy(
    query_keys: Sequence[str], retrieved_keys: Sequence[str], truths: Mapping[str, Attributes]
) -> float:
    """Percent of queries whose retrieved image has the queried attributes: query i asks
    for the attributes of image ``query_keys[i]`` (its caption) and got ``retrieved_keys[i]``."""
    right = [truths[q] == truths[r] for q, r in zip(query_keys, retrieved_keys, strict=True)]
    return 100 * sum(right) / len(right)
