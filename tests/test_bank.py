import pytest
import torch
from data_prep.synthetic import write_split
from PIL import Image

from fromage.data.datamodule import shard_list
from fromage.data.image_sources import (
    ImageLoadError,
    folder_images,
    listed_images,
    open_image,
    shard_images,
)
from fromage.infer.bank import ImageBank, append_to_bank
from fromage.infer.bank_build import build_bank, check_bank_fits, embedder_fingerprint
from tiny import tiny_fromage

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (90, 40, 160)]


def write_images(folder, colours, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours, start):
        image = Image.new("RGB", (40, 40), colour)
        image.paste((255 - colour[0], 128, 0), (i * 5 % 30, 5, i * 5 % 30 + 10, 15))
        image.save(folder / f"img{i}.png")


def direct_embedding(model, path):
    pixels = model.vision.preprocess(Image.open(path))[None]
    return model.image_embeddings(model.image_features(pixels))[0]


def test_build_append_reopen_keeps_ids_and_vectors_aligned(tmp_path):
    model = tiny_fromage("opt")
    write_images(tmp_path / "images", COLOURS[:4])
    first = build_bank(model, folder_images(tmp_path / "images"), tmp_path / "bank", batch_size=3)
    assert (first.added, first.already_in_bank) == (4, 0)

    write_images(tmp_path / "images", COLOURS[4:], start=4)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    second = build_bank(model, folder_images(tmp_path / "images"), tmp_path / "bank", part_size=1)
    assert (second.added, second.already_in_bank) == (2, 4)
    assert [image_id for image_id, _ in second.failed] == ["broken.png"]

    bank = ImageBank.open(tmp_path / "bank")
    assert sorted(bank.ids) == [f"img{i}.png" for i in range(6)]
    assert len(list((tmp_path / "bank").glob("part-*.safetensors"))) == 3
    for i, image_id in enumerate(bank.ids):
        expected = direct_embedding(model, tmp_path / "images" / image_id)
        assert torch.allclose(bank.embeddings[i], expected, atol=1e-5)
        assert bank.sources[i] == str((tmp_path / "images" / image_id).resolve())
    for image_id in bank.ids:
        query = direct_embedding(model, tmp_path / "images" / image_id)[None]
        assert bank.search(query, k=1)[0][0].id == image_id
        hits = bank.search(query, k=10, exclude={image_id})[0]
        assert len(hits) == 5 and image_id not in {h.id for h in hits}
    check_bank_fits(bank, model)
    with pytest.raises(ValueError, match="not by this model"):
        check_bank_fits(bank, tiny_fromage("opt", seed=3))


def test_bank_refuses_other_widths_embedders_and_duplicate_ids(tmp_path):
    append_to_bank(tmp_path, torch.randn(2, 8), ["a", "b"], ["a.jpg", "b.jpg"], "model-1")
    with pytest.raises(ValueError, match="refusing 4-d"):
        append_to_bank(tmp_path, torch.randn(1, 4), ["c"], ["c.jpg"], "model-1")
    with pytest.raises(ValueError, match="from embedder model-1"):
        append_to_bank(tmp_path, torch.randn(1, 8), ["c"], ["c.jpg"], "model-2")
    with pytest.raises(ValueError, match="ids already in"):
        append_to_bank(tmp_path, torch.randn(1, 8), ["b"], ["b.jpg"], "model-1")
    with pytest.raises(FileExistsError):
        ImageBank(torch.randn(1, 8), ["z"]).save(tmp_path)
    assert ImageBank.open(tmp_path).ids == ["a", "b"]


def test_half_written_part_is_ignored_and_then_replaced(tmp_path):
    """A crash after the id table but before the vectors were renamed into place."""
    vectors = torch.randn(3, 8)
    ImageBank(vectors[:2], ["a", "b"], embedder="m").save(tmp_path)
    (tmp_path / "part-00001.jsonl").write_text('{"id": "lost", "source": "lost"}\n')
    (tmp_path / "part-00001.safetensors.tmp").write_bytes(b"partial")
    assert ImageBank.open(tmp_path).ids == ["a", "b"]
    append_to_bank(tmp_path, vectors[2:], ["c"], ["c.jpg"], "m")
    bank = ImageBank.open(tmp_path)
    assert bank.ids == ["a", "b", "c"] and bank.sources[2] == "c.jpg"
    assert torch.allclose(bank.embeddings, torch.nn.functional.normalize(vectors, dim=-1))


def test_shard_images_use_sample_keys_and_open_from_the_tar(tmp_path, monkeypatch):
    write_split(tmp_path / "val", n=6, per_shard=4, seed=0)
    monkeypatch.chdir(tmp_path)
    records = list(shard_images(shard_list("val")))
    monkeypatch.chdir(tmp_path / "val")  # sources stay valid from another directory
    assert len(records) == 6 and len({r.id for r in records}) == 6
    assert all("#" in r.source and r.source.split("#")[0].endswith(".tar") for r in records)
    assert open_image(records[5].source).mode == "RGB"
    with pytest.raises(ImageLoadError):
        open_image(records[0].source.replace(".jpg", ".png"))
    with pytest.raises(ImageLoadError):
        open_image(str(tmp_path / "missing.jpg"))


def test_listed_images_and_unloadable_sources_are_counted(tmp_path):
    model = tiny_fromage("opt")
    write_images(tmp_path, COLOURS[:2])
    sources = [str(tmp_path / "img0.png"), str(tmp_path / "nope.png"), str(tmp_path / "img1.png")]
    summary = build_bank(model, listed_images(sources), tmp_path / "bank", progress=False)
    assert summary.added == 2 and [i for i, _ in summary.failed] == [sources[1]]
    assert ImageBank.open(tmp_path / "bank").embedder == embedder_fingerprint(model)


def test_faiss_search_matches_exact_search_with_exclusions():
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    bank = ImageBank(torch.randn(500, 16), [f"i{n}" for n in range(500)])
    queries = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    exclude = {"i1", "i7", "i300"}
    exact = bank.search(queries, k=10, exclude=exclude)
    approximate = bank.use_faiss("Flat").search(queries, k=10, exclude=exclude)
    assert [[h.id for h in row] for row in exact] == [[h.id for h in row] for row in approximate]
    assert [h.score for h in exact[0]] == pytest.approx([h.score for h in approximate[0]], abs=1e-5)


def test_queries_of_another_width_and_empty_banks_are_refused():
    with pytest.raises(ValueError, match="queries must be"):
        ImageBank(torch.randn(3, 8), ["a", "b", "c"]).search(torch.randn(1, 4), k=1)
    with pytest.raises(ValueError, match="empty"):
        ImageBank(torch.empty(0, 8), []).search(torch.randn(1, 8), k=1)
