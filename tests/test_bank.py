import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from data_prep.synthetic import write_split
from PIL import Image
from safetensors.torch import save_file

from fromage.data.datamodule import shard_list
from fromage.data.image_sources import (
    ImageLoadError,
    folder_images,
    listed_images,
    open_image,
    shard_images,
)
from fromage.infer import bank_build
from fromage.infer.bank import BankFileError, ImageBank, append_to_bank
from fromage.infer.bank_build import build_bank, check_bank_fits, embedder_fingerprint
from fromage.infer.display import interleaved_html
from fromage.infer.thumbnails import encode_thumbnail
from tiny import tiny_fromage

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (90, 40, 160)]


def write_images(folder, colours, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours, start):
        image = Image.new("RGB", (40, 40), colour)
        image.paste((255 - colour[0], 128, 0), (i * 5 % 30, 5, i * 5 % 30 + 10, 15))
        image.save(folder / f"img{i}.png")


def write_shard(shard, folder, names):
    """A WebDataset shard holding the files ``names`` of ``folder``."""
    with tarfile.open(shard, "w") as tar:
        for name in names:
            tar.add(folder / name, arcname=name)


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
    (tmp_path / "part-00001.thumbs").write_bytes(b"partial")
    assert ImageBank.open(tmp_path).ids == ["a", "b"]
    append_to_bank(tmp_path, vectors[2:], ["c"], ["c.jpg"], "m")
    bank = ImageBank.open(tmp_path)
    assert bank.ids == ["a", "b", "c"] and bank.sources[2] == "c.jpg"
    assert torch.allclose(bank.embeddings, torch.nn.functional.normalize(vectors, dim=-1))
    assert not (tmp_path / "part-00001.thumbs").exists()  # not taken for the new part's
    assert bank.thumbnail("c") is None


def overwrite_tensor_bytes(path, seed=0):
    """Overwrite a safetensors file's data with random bytes, its header left intact."""
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    noise = torch.randint(
        0,
        256,
        (len(data) - start,),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(seed),
    )
    path.write_bytes(data[:start] + noise.numpy().tobytes())


def test_damaged_bank_files_are_refused_naming_the_file(tmp_path):
    ImageBank(torch.randn(40, 64), [f"i{n}" for n in range(40)], embedder="m").save(tmp_path)
    vectors, table = tmp_path / "part-00000.safetensors", tmp_path / "part-00000.jsonl"
    saved = vectors.read_bytes()
    overwrite_tensor_bytes(vectors)
    with pytest.raises(BankFileError, match=r"part-00000\.safetensors: \d+ of 40 vectors are not"):
        ImageBank.open(tmp_path)
    vectors.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(BankFileError, match=r"part-00000\.safetensors is damaged or cut short"):
        ImageBank.open(tmp_path)
    vectors.write_bytes(saved)
    table.write_text(table.read_text()[:-20])  # cut inside the last row
    with pytest.raises(BankFileError, match=r"part-00000\.jsonl, line 40: not JSON.*fromage bank"):
        ImageBank.open(tmp_path)
    with pytest.raises(ValueError, match="non-finite or zero"):
        append_to_bank(tmp_path / "new", torch.zeros(1, 64), ["z"], ["z.jpg"], "m")


def test_non_finite_queries_are_refused_instead_of_ranking_by_nan():
    bank = ImageBank(torch.randn(3, 8), ["a", "b", "c"])
    query = torch.full((1, 8), float("nan"))
    with pytest.raises(ValueError, match="query embeddings are not finite"):
        bank.search(query, k=1)
    with pytest.raises(ValueError, match="query embeddings are not finite"):
        bank.ranks(query, ["a"])


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


def test_thumbnails_and_hashes_of_every_image_survive_append_and_reopen(tmp_path):
    model = tiny_fromage("opt")
    write_images(tmp_path / "images", COLOURS[:3])
    Image.new("RGB", (60, 30), (10, 200, 30)).save(tmp_path / "images" / "wide.jpg")
    build_bank(model, folder_images(tmp_path / "images"), tmp_path / "bank", thumbnail_size=16)
    write_images(tmp_path / "images", COLOURS[3:], start=3)
    build_bank(model, folder_images(tmp_path / "images"), tmp_path / "bank", thumbnail_size=16)

    bank = ImageBank.open(tmp_path / "bank")
    assert len(bank) == 7 and len(list((tmp_path / "bank").glob("part-*.thumbs"))) == 2
    for image_id in bank.ids:
        expected = (16, 8) if image_id == "wide.jpg" else (16, 16)
        assert bank.thumbnail(image_id).size == expected
        assert bank.hash_of(image_id) == sha256_of(tmp_path / "images" / image_id)
    query = direct_embedding(model, tmp_path / "images" / "img4.png")[None]
    hit = bank.search(query, k=1)[0][0]
    assert hit.sha256 == bank.hash_of("img4.png")
    assert Image.open(io.BytesIO(hit.thumbnail)).size == (16, 16)
    assert bank.duplicates() == [] and bank.verify() == []


def test_duplicates_and_verify_find_copies_changes_and_deletions(tmp_path):
    model = tiny_fromage("opt")
    images = tmp_path / "images"
    write_images(images, COLOURS[:4])
    shutil.copy(images / "img0.png", images / "copy.png")
    build_bank(model, folder_images(images), tmp_path / "bank", progress=False)
    bank = ImageBank.open(tmp_path / "bank")
    assert bank.duplicates() == [["copy.png", "img0.png"]]

    Image.new("RGB", (40, 40), (1, 2, 3)).save(images / "img1.png")
    (images / "img2.png").unlink()
    problems = dict(bank.verify())
    assert sorted(problems) == ["img1.png", "img2.png"]
    assert (
        problems["img1.png"].startswith("changed")
        and sha256_of(images / "img1.png") in (problems["img1.png"])
    )
    assert problems["img2.png"].startswith("missing")
    assert bank.verify(ids=["img0.png", "img2.png"]) == [("img2.png", problems["img2.png"])]

    # a page still shows the deleted image: from its stored thumbnail
    query = bank.embeddings[bank.ids.index("img2.png")][None]
    page = interleaved_html(["found", bank.search(query, k=1)[0]])
    assert "img2.png" in page and "<img" in page and "not loadable" not in page


def write_old_format_bank(directory, vectors, ids, sources):
    """A bank as written before thumbnails and hashes: bank.json, and per part a
    ``{"id", "source"}`` table and the vectors, nothing else."""
    directory.mkdir(parents=True)
    (directory / "bank.json").write_text(json.dumps({"dim": vectors.shape[1], "embedder": "old"}))
    rows = "".join(
        json.dumps({"id": i, "source": s}) + "\n" for i, s in zip(ids, sources, strict=True)
    )
    (directory / "part-00000.jsonl").write_text(rows)
    save_file({"embeddings": vectors}, directory / "part-00000.safetensors")


def test_an_old_format_bank_opens_searches_shows_and_grows(tmp_path):
    write_images(tmp_path / "images", COLOURS[:3])
    sources = [str(tmp_path / "images" / f"img{i}.png") for i in range(3)]
    vectors = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    write_old_format_bank(tmp_path / "bank", vectors, ["a", "b", "c"], sources)

    bank = ImageBank.open(tmp_path / "bank")
    hit = bank.search(vectors[1:2], k=1)[0][0]
    assert (hit.id, hit.source, hit.thumbnail, hit.sha256) == ("b", sources[1], None, None)
    assert bank.thumbnail("b") is None and bank.hash_of("b") is None
    assert bank.duplicates() == []
    (tmp_path / "images" / "img2.png").unlink()  # without hashes only absence is noticed
    assert [image_id for image_id, _ in bank.verify()] == ["c"]
    page = interleaved_html([[hit]])  # no thumbnail: opened from its source
    assert "<img" in page and "not loadable" not in page

    append_to_bank(
        tmp_path / "bank",
        torch.randn(1, 8),
        ["d"],
        ["d.jpg"],
        "old",
        hashes=["ab" * 32],
        thumbnails=[encode_thumbnail(Image.new("RGB", (9, 9)))],
    )
    grown = ImageBank.open(tmp_path / "bank")
    assert grown.ids == ["a", "b", "c", "d"] and grown.hash_of("d") == "ab" * 32
    assert grown.thumbnail("a") is None and grown.thumbnail("d").size == (9, 9)


@pytest.fixture
def counted_tar_opens(monkeypatch):
    """How many times ``tarfile.open`` was called."""
    calls = []
    real_open = tarfile.open

    def counting_open(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("name"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    return calls


def test_a_shard_build_reads_each_tar_once_and_equals_the_folder_build(
    tmp_path, counted_tar_opens, monkeypatch
):
    model = tiny_fromage("opt")
    images = tmp_path / "images"
    write_images(images, COLOURS)
    names = sorted(path.name for path in images.iterdir())
    write_shard(tmp_path / "shard-0.tar", images, names[:4])
    write_shard(tmp_path / "shard-1.tar", images, names[4:])
    shards = [tmp_path / "shard-0.tar", tmp_path / "shard-1.tar"]
    counted_tar_opens.clear()

    from_shards = build_bank(model, shard_images(shards), tmp_path / "shard_bank", batch_size=4)
    assert len(counted_tar_opens) == 2 and from_shards.added == 6
    build_bank(model, folder_images(images), tmp_path / "folder_bank")
    by_shard, by_folder = (
        ImageBank.open(tmp_path / "shard_bank"),
        ImageBank.open(tmp_path / "folder_bank"),
    )
    assert by_shard.ids == [Path(name).stem for name in by_folder.ids]  # keys have no suffix
    assert torch.allclose(by_shard.embeddings, by_folder.embeddings, atol=1e-6)
    assert by_shard.hashes == by_folder.hashes

    counted_tar_opens.clear()
    assert by_shard.verify() == [] and len(counted_tar_opens) == 2

    decoded = []
    monkeypatch.setattr(bank_build, "decode_image", lambda *a: decoded.append(a))
    again = build_bank(model, shard_images(shards), tmp_path / "shard_bank")
    assert (again.added, again.already_in_bank, decoded) == (0, 6, [])


def test_a_corrupt_shard_member_is_skipped_and_reported(tmp_path):
    model = tiny_fromage("opt")
    images = tmp_path / "images"
    write_images(images, COLOURS[:3])
    (images / "img1.png").write_bytes(b"\x89PNG truncated")
    write_shard(tmp_path / "shard.tar", images, ["img0.png", "img1.png", "img2.png"])
    summary = build_bank(model, shard_images([tmp_path / "shard.tar"]), tmp_path / "bank")
    assert summary.added == 2 and [image_id for image_id, _ in summary.failed] == ["img1"]
    assert ImageBank.open(tmp_path / "bank").ids == ["img0", "img2"]
