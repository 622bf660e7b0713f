import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from data_prep.fixtures import write_vist
from data_prep.synthetic import COLOURS as SYNTHETIC_COLOURS
from data_prep.synthetic import SHAPES as SYNTHETIC_SHAPES
from data_prep.synthetic import write_split, write_stories
from data_prep.vist import prepare
from PIL import Image

from fromage.data.image_sources import ImageRecord, open_image
from fromage.eval.clip_baseline import CLIPBaseline
from fromage.eval.common import ProtocolEmbedder, split_bank, squash
from fromage.eval.vist import Story, evaluate_vist, main, read_split, shard_stories, story_prompt
from fromage.infer.bank import ImageBank, append_to_bank
from fromage.infer.bank_build import FromageImageEmbedder, embedder_fingerprint
from fromage.model.fromage import FromageModel
from fromage.model.pretrained import save_pretrained
from tiny import save_tiny_clip, tiny_fromage, tiny_model_config

# Scores (cosine with the one [RET] query) hand-set per image: story -> (inputs, target).
# Every other image scores in [-0.5, 0.5]; story 3's target scores lowest of all.
SCORES = {0: ([], 0.9), 1: ([0.85, 0.8], 0.75), 2: ([0.99, 0.98], 0.97), 3: ([], -0.9)}
# 0-based rank of each target, without and with its 4 input images excluded:
#   story 0: 3 (behind story 2's three) | 3;  story 1: 5 | 4;  story 2: 2 | 0;  story 3: 23 | 20
EXPECTED_TEXT_ONLY = {"R@1": 0.0, "R@5": 50.0, "R@10": 75.0}
EXPECTED_WITH_IMAGES = {"R@1": 25.0, "R@5": 75.0, "R@10": 75.0}


@pytest.fixture(scope="module")
def vist(tmp_path_factory):
    root = tmp_path_factory.mktemp("vist")
    write_vist(root / "raw", n_stories=5, missing=1)
    summary = prepare(
        root / "raw/sis/val.story-in-sequence.json", root / "val", root / "raw/images", False
    )
    assert summary == {"stories": 5, "images_needed": 25, "images_found": 24}
    return root


def constant_query_model(root):
    """A model whose [RET] query is the same vector q for every prompt: the LM's final
    state is a constant u (final layer norm: weight 0, bias u)."""
    config = tiny_model_config(root / "lm")
    config.vision = save_tiny_clip(root / "clip")
    model = FromageModel.from_config(config)
    u = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0)
    with torch.no_grad():
        model.lm.model.decoder.final_layer_norm.weight.zero_()
        model.lm.model.decoder.final_layer_norm.bias.copy_(u)
    model.lm.save_pretrained(root / "lm")
    save_pretrained(model, root / "model")
    return model, F.normalize(model.ret_to_shared[0](u), dim=-1).detach()


def hand_set_bank(directory, model, q, stories, images):
    generator = torch.Generator().manual_seed(0)
    score = {r.id: float(torch.rand((), generator=generator)) - 0.5 for r in images}
    for n, (inputs, target) in SCORES.items():
        story = stories[n]
        score.update(zip(story.image_ids, inputs, strict=False))  # the first len(inputs)
        score[story.image_ids[-1]] = target
    ids = sorted(score)
    others = torch.randn(len(ids), q.shape[0], generator=generator)
    others = F.normalize(others - (others @ q)[:, None] * q, dim=-1)  # orthogonal to q
    s = torch.tensor([score[i] for i in ids])[:, None]
    vectors = s * q + (1 - s**2).sqrt() * others
    source = {r.id: r.source for r in images}
    sources = [source[i] for i in ids]
    append_to_bank(directory, vectors, ids, sources, embedder_fingerprint(model))


def test_stories_are_grouped_in_order_and_missing_images_left_out(vist):
    stories, images = read_split(vist / "val")
    sis = json.loads((vist / "raw/sis/val.story-in-sequence.json").read_text())
    first = sorted(
        (a for (a,) in sis["annotations"] if a["story_id"] == stories[0].story_id),
        key=lambda a: a["worker_arranged_photo_order"],
    )
    assert stories[0].captions == [a["text"] for a in first]
    assert stories[0].image_ids == [a["photo_flickr_id"] for a in first]
    assert len(images) == 24 and all(open_image(r.source) for r in images[:2])


def test_vist_recall_matches_the_hand_set_answer(vist, tmp_path):
    stories, images = read_split(vist / "val")
    stories = sorted(stories, key=lambda s: s.story_id)
    model, q = constant_query_model(tmp_path)
    # the default image protocol, the paper's, has a bank of its own
    bank_dir = vist / "val" / "banks" / f"{embedder_fingerprint(model)}-paper"
    hand_set_bank(bank_dir, model, q, stories, images)
    forwards = []
    model_forward = FromageModel.run_lm

    def counting_run_lm(self, embeds, *args, **kwargs):
        forwards.append(len(embeds))
        return model_forward(self, embeds, *args, **kwargs)

    FromageModel.run_lm = counting_run_lm
    try:
        results = main(
            [
                str(tmp_path / "model"),
                "--data",
                str(vist / "val"),
                "--out",
                str(tmp_path / "vist.json"),
            ]
        )
    finally:
        FromageModel.run_lm = model_forward
    assert forwards == [4, 4, 4]  # one batched LM pass per setting, not one per story
    assert results["n_stories"] == 4 and results["n_skipped_missing_images"] == 1
    assert (results["image_protocol"], results["text_prefix"]) == ("paper", "every_piece")
    recall = results["recall"]
    assert recall["FROMAGe, 1 caption"] == pytest.approx(EXPECTED_TEXT_ONLY)
    assert recall["FROMAGe, 5 captions"] == pytest.approx(EXPECTED_TEXT_ONLY)
    assert recall["FROMAGe, 5 captions, 4 images"] == pytest.approx(EXPECTED_WITH_IMAGES)
    assert json.loads((tmp_path / "vist.json").read_text())["recall"] == recall

    # CLIP rows, against ranks computed one story at a time from CLIP's own towers, on
    # images squashed as the paper's protocol does
    clip = CLIPBaseline(str(tmp_path / "clip"))
    bank = {r.id: clip(clip.preprocess(squash(open_image(r.source)))[None])[0] for r in images}
    usable = [s for s in stories if all(i in bank for i in s.image_ids)]
    ranks = []
    for story in usable:
        text = clip.text_embeddings([story.captions[-1]])[0]
        target = text @ bank[story.image_ids[-1]]
        ranks.append(sum(float(text @ v) >= float(target) for v in bank.values()) - 1)
    expected = {f"R@{k}": 100 * sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    assert recall["CLIP, 1 caption"] == pytest.approx(expected)


def test_images_without_an_original_url_are_left_out_of_the_bank_as_the_paper_did(vist, tmp_path):
    sis = json.loads((vist / "raw/sis/val.story-in-sequence.json").read_text())
    first = sis["images"][0]
    first["url_m"] = first.pop("url_o")
    (tmp_path / "sis.json").write_text(json.dumps(sis))
    images = vist / "raw/images"
    paper = prepare(tmp_path / "sis.json", tmp_path / "paper", images, False)
    assert paper["images_found"] == 23 and paper["left_out_without_url_o"] == 1
    _, records = read_split(tmp_path / "paper")
    assert first["id"] not in {r.id for r in records}
    assert prepare(tmp_path / "sis.json", tmp_path / "any", images, False, any_url=True) == {
        "stories": 5,
        "images_needed": 25,
        "images_found": 24,
    }


def half_red_landscape(path) -> ImageRecord:
    """A 96x48 image: the left quarter red, the rest blue (a centre crop keeps no red)."""
    image = Image.new("RGB", (96, 48), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 24, 48))
    image.save(path)
    return ImageRecord("landscape", str(path))


def test_paper_image_protocol_squashes_a_non_square_image_before_the_processor(tmp_path):
    model = tiny_fromage("opt")  # CLIP processor: shortest side to 32 px, centre crop 32x32
    record = half_red_landscape(tmp_path / "landscape.png")
    image = open_image(record.source)
    embedder = FromageImageEmbedder(model)
    squashed = ProtocolEmbedder(embedder, "paper").preprocess(image)  # (3, 32, 32)
    cropped = ProtocolEmbedder(embedder, "crop").preprocess(image)
    assert squashed.shape == cropped.shape == (3, 32, 32)
    red = squashed[0] > squashed[2]  # (32, 32): where red beats blue
    assert red[:, :7].all() and not red[:, 9:].any()  # the left quarter, squashed
    assert not (cropped[0] > cropped[2]).any()  # the crop cut the red quarter away
    assert torch.equal(
        squashed, model.vision.preprocess(image.resize((224, 224), Image.Resampling.BICUBIC))
    )

    banks = {p: split_bank(model, [record], tmp_path / "banks", p) for p in ("paper", "crop")}
    for pixels, protocol in [(squashed, "paper"), (cropped, "crop")]:
        expected = model.image_embeddings(model.image_features(pixels[None]))
        assert torch.allclose(banks[protocol].embeddings, expected, atol=1e-5)
    assert not torch.allclose(banks["paper"].embeddings, banks["crop"].embeddings, atol=1e-3)


def test_interleaved_prompt_alternates_captions_and_images(vist):
    stories, images = read_split(vist / "val")
    bank = ImageBank(
        torch.randn(len(images), 4), [r.id for r in images], [r.source for r in images]
    )
    story = next(s for s in stories if all(i in bank.ids for i in s.image_ids))
    image_of = lambda image_id: open_image(bank.source_of(image_id))  # noqa: E731
    prompt = story_prompt(story, "5 captions, 4 images", image_of)
    assert [type(p).__name__ for p in prompt] == ["str", "Image"] * 4 + ["str"]
    assert prompt[::2] == [*story.captions[:-1], story.captions[-1] + "[RET]"]
    assert prompt[1] == image_of(story.image_ids[0])
    assert story_prompt(story, "1 caption", image_of) == [story.captions[-1] + "[RET]"]
    assert story_prompt(story, "5 captions", image_of) == [" ".join(story.captions) + "[RET]"]


def test_synthetic_stories_need_their_context(tmp_path):
    """The first caption names the shape, the others only places; no caption names the
    colour, which stays the same in all five images (only the images tell it)."""
    write_stories(tmp_path, n=20, seed=0, image_size=32)
    stories, images = read_split(tmp_path)
    assert len(stories) == 20 and len(images) == 100
    assert all(Path(image.source).is_file() for image in images)
    sources = {image.id: image.source for image in images}
    for story in stories:
        assert len(story.captions) == len(story.image_ids) == 5
        assert any(shape in story.captions[0] for shape in SYNTHETIC_SHAPES)
        assert all(c.startswith("then it moves to the") for c in story.captions[1:])
        assert not any(colour in c for colour in SYNTHETIC_COLOURS for c in story.captions)
        assert len({shape_colour(sources[i]) for i in story.image_ids}) == 1


def shape_colour(path: str) -> str:
    """The palette colour that covers most pixels of a synthetic image (its shape's)."""
    pixels = torch.tensor(np.asarray(open_image(path)), dtype=torch.float32).flatten(0, 1)
    palette = torch.tensor(list(SYNTHETIC_COLOURS.values()), dtype=torch.float32)  # (C, 3)
    near = torch.cdist(pixels, palette) < 40  # (H*W, C)
    return list(SYNTHETIC_COLOURS)[near.sum(0).argmax()]


def test_shard_stories_are_runs_of_consecutive_validation_pairs(tmp_path):
    shards = write_split(tmp_path / "val", n=12, per_shard=7, seed=0)  # a story spans 2 shards
    with wds.TarWriter(str(tmp_path / "val" / "00002.tar")) as sink:
        sink.write({"__key__": "nocaption", "jpg": b"\xff\xd8"})  # passed over: no caption
        sink.write({"__key__": "last", "jpg": b"\xff\xd8", "txt": "the last one"})
    shards.append(tmp_path / "val" / "00002.tar")
    samples = list(wds.WebDataset([str(s) for s in shards[:2]], shardshuffle=False))
    stories, images = shard_stories(shards, n_stories=3)
    assert [s.story_id for s in stories] == ["shards00000", "shards00001"]  # 11 pairs: 2 whole
    assert [r.id for r in images] == [s["__key__"] for s in samples[:10]]
    assert [c for s in stories for c in s.captions] == [s["txt"].decode() for s in samples[:10]]
    assert [i for s in stories for i in s.image_ids] == [r.id for r in images]
    assert images[7].data == samples[7]["jpg"] and images[7].source.endswith(
        "00001.tar#000010000.jpg"
    )


def test_a_truncated_or_incomplete_vist_file_is_refused_naming_it_and_the_story(tmp_path):
    sis_file = write_vist(tmp_path / "raw", n_stories=2, missing=0)
    text = sis_file.read_text()
    sis_file.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"story-in-sequence\.json is not JSON .*cut short"):
        prepare(sis_file, tmp_path / "out", tmp_path / "raw/images", False)
    sis = json.loads(text)
    story = sis["annotations"][3][0]["story_id"]
    del sis["annotations"][3][0]["text"]
    sis_file.write_text(json.dumps(sis))
    with pytest.raises(ValueError, match=rf"annotation 3 \(story {story}\) has no \['text'\]"):
        prepare(sis_file, tmp_path / "out", tmp_path / "raw/images", False)
    (tmp_path / "split").mkdir()
    (tmp_path / "split/stories.jsonl").write_text(json.dumps({"story_id": "s", "captions": []}))
    (tmp_path / "split/images.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"stories\.jsonl, row 1: .*image_ids.*data_prep/vist\.py"):
        read_split(tmp_path / "split")


def test_stories_none_of_whose_images_are_in_the_bank_are_refused_not_scored_nan():
    model = tiny_fromage("opt")
    bank = ImageBank(torch.randn(2, model.image_to_shared.out_features), ["x", "y"])
    stories = [Story("s", ["a red star"] * 5, ["gone"] * 5)]
    with pytest.raises(ValueError, match="none of the 1 stories has all its images"):
        evaluate_vist(model, stories, bank)
