"""A bank's stored search index: built, reopened memory-mapped, dropped on append, refused
when damaged; exact search and evaluation ranks unchanged."""

import json

import pytest
import torch

from fromage.bench.retrieval import ClusteredVectors
from fromage.infer.bank import BankFileError, ImageBank, append_to_bank
from fromage.infer.bank_index import build_index, index_settings

faiss = pytest.importorskip("faiss")
SMALL_INDEX = "IVF16,PQ8np"  # quick to train, where the test is not about recall


def clustered_bank(directory, size, dim=64, queries=40):
    """A saved bank of clustered unit vectors in two parts, and queries from its clusters."""
    vectors = ClusteredVectors(dim, clusters=40)
    embeddings, queries = vectors.draw(size), vectors.draw(queries)
    ids = [f"i{n}" for n in range(size)]
    half = size // 2
    append_to_bank(directory, embeddings[:half], ids[:half], ids[:half], "m")
    append_to_bank(directory, embeddings[half:], ids[half:], ids[half:], "m")
    return embeddings, ids, queries


def reference_top_k(embeddings, ids, queries, k, exclude=()):
    """The exact search as it always was: excluded ids masked, then top-k."""
    scores = queries @ embeddings.T
    scores[:, [ids.index(i) for i in exclude]] = float("-inf")
    top = scores.topk(k, dim=1)
    return [[ids[i] for i in row] for row in top.indices.tolist()], top.values


def hit_ids(results):
    return [[hit.id for hit in row] for row in results]


def test_an_ivfpq_index_is_stored_reopened_mapped_and_finds_the_exact_top_10(tmp_path):
    embeddings, ids, queries = clustered_bank(tmp_path, size=2000)
    entry = build_index(tmp_path, "ivfpq")
    assert entry == index_settings(2000, 64, "ivfpq") | {
        "parameters": "nprobe=8",
        "rows": 2000,
        "parts": [1000, 1000],
    }
    header = json.loads((tmp_path / "bank.json").read_text())
    assert (header["version"], header["index_kind"], header["index"]) == (2, "ivfpq", entry)

    bank = ImageBank.open(tmp_path)
    assert bank.search_kind == "IVF64,PQ64np"
    exclude = {"i3", "i1600"}
    found = hit_ids(bank.search(queries, k=10, exclude=exclude))
    exact, exact_scores = reference_top_k(embeddings, ids, queries, 10, exclude)
    recall = sum(len(set(f) & set(e)) for f, e in zip(found, exact, strict=True)) / (10 * 40)
    assert recall >= 0.95
    assert not exclude & {i for row in found for i in row}
    assert bank._embeddings is None  # searching read candidates' vectors, not all of them
    first = bank.search(queries[:1], k=10)[0]
    if [h.id for h in first] == exact[0]:  # hits are scored by their exact cosine
        assert [h.score for h in first] == pytest.approx(exact_scores[0].tolist(), abs=1e-5)


def test_exact_search_is_unchanged_and_ranks_stay_exact_with_an_index(tmp_path):
    embeddings, ids, queries = clustered_bank(tmp_path, size=2000)
    exclude = {"i1", "i7", "i1500"}
    expected, expected_scores = reference_top_k(embeddings, ids, queries, 10, exclude)
    targets = ids[:40]
    exact_ranks = ImageBank(embeddings, ids).ranks(queries, targets, [exclude] * 40)

    unindexed = ImageBank.open(tmp_path)
    build_index(tmp_path, "exact")
    opened = ImageBank.open(tmp_path)
    assert not (tmp_path / "index.faiss").exists()
    for bank in (ImageBank(embeddings, ids), unindexed, opened):
        results = bank.search(queries, k=10, exclude=exclude)
        assert bank.search_kind == "exact" and hit_ids(results) == expected
        scores = torch.tensor([[h.score for h in row] for row in results])
        assert torch.allclose(scores, expected_scores, atol=1e-6)

    build_index(tmp_path, SMALL_INDEX)
    indexed = ImageBank.open(tmp_path)
    assert indexed.search_kind == SMALL_INDEX
    assert torch.equal(indexed.ranks(queries, targets, [exclude] * 40), exact_ranks)


def test_a_bank_written_before_indexes_opens_searches_exactly_and_gets_one(tmp_path):
    embeddings, ids, queries = clustered_bank(tmp_path, size=1200)
    (tmp_path / "bank.json").write_text(json.dumps({"dim": 64, "embedder": "m"}))  # format 1
    old = ImageBank.open(tmp_path)
    assert old.search_kind == "exact" and old.ids == ids
    assert hit_ids(old.search(queries, k=5)) == reference_top_k(embeddings, ids, queries, 5)[0]
    build_index(tmp_path, "auto")
    header = json.loads((tmp_path / "bank.json").read_text())
    assert header["version"] == 2 and header["index"]["kind"] == "exact"  # fewer than EXACT_BELOW


def test_appending_drops_the_index_and_the_bank_searches_exactly(tmp_path):
    queries = clustered_bank(tmp_path, size=2000)[2]
    build_index(tmp_path, SMALL_INDEX)
    append_to_bank(tmp_path, queries[:1], ["new"], ["new.jpg"], "m")
    header = json.loads((tmp_path / "bank.json").read_text())
    assert "index" not in header and header["index_kind"] == SMALL_INDEX
    assert not (tmp_path / "index.faiss").exists() and not (tmp_path / "rows.safetensors").exists()
    bank = ImageBank.open(tmp_path)
    assert bank.search_kind == "exact" and len(bank) == 2001
    assert bank.search(queries[:1], k=1)[0][0].id == "new"


def test_a_damaged_index_or_row_table_is_refused_naming_it_and_the_fix(tmp_path):
    clustered_bank(tmp_path, size=2000)
    build_index(tmp_path, SMALL_INDEX)
    index_file, rows_file = tmp_path / "index.faiss", tmp_path / "rows.safetensors"
    saved = index_file.read_bytes()
    index_file.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(BankFileError, match=r"index\.faiss is missing, damaged or cut short.*"):
        ImageBank.open(tmp_path)
    with pytest.raises(BankFileError, match=rf"fromage index {tmp_path}"):
        ImageBank.open(tmp_path)
    index_file.write_bytes(saved)
    rows_file.write_bytes(rows_file.read_bytes()[:-100])
    with pytest.raises(BankFileError, match=r"rows\.safetensors is damaged or cut short"):
        ImageBank.open(tmp_path)
    build_index(tmp_path, SMALL_INDEX)  # the fix the messages name
    assert len(ImageBank.open(tmp_path).search(torch.randn(1, 64), k=3)[0]) == 3

    header = json.loads((tmp_path / "bank.json").read_text())
    (tmp_path / "bank.json").write_text(json.dumps(header | {"version": 3}))
    with pytest.raises(BankFileError, match=r"format version 3.*upgrade fromage"):
        ImageBank.open(tmp_path)


def test_index_kinds_that_cannot_be_built_are_refused_saying_why(tmp_path):
    clustered_bank(tmp_path, size=200)
    with pytest.raises(ValueError, match=r"ivfpq index needs at least 1024 images.*holds 200"):
        build_index(tmp_path, "ivfpq")
    with pytest.raises(ValueError, match="'IVF,nonsense' is neither one of auto, exact, ivfpq"):
        build_index(tmp_path, "IVF,nonsense")
    assert ImageBank.open(tmp_path).search_kind == "exact"  # no half-built index left
