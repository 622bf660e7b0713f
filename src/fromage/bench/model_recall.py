"""The search index's recall@10 against exact search on a trained model's own outputs
(``make bench``'s retrieval stage, after ``make demo``). Apart from ``bench.retrieval``,
whose probe processes import only what opening and searching a bank needs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torchvision.transforms import v2

from fromage.bench.retrieval import K, recall_against_exact
from fromage.data.datamodule import shard_list
from fromage.data.image_sources import shard_samples
from fromage.infer.bank import ImageBank, append_to_bank
from fromage.infer.bank_index import build_index
from fromage.infer.scoring import retrieval_queries
from fromage.model.load import load_model
from fromage.model.tokens import RET_TOKEN


@torch.no_grad()
def real_model_recall(
    model_path: str | Path, shards: str, copies: int = 40, n_queries: int = 100, seed: int = 0
) -> dict:
    """Recall@10 of an IVF-PQ index against exact search on a trained model's own outputs:
    a bank of ``copies`` random crops, flips and colour changes of every image of
    ``shards``, searched with the [RET] embeddings of their captions."""
    torch.manual_seed(seed)
    model = load_model(model_path)
    samples = list(shard_samples(shard_list(shards)))
    embeddings = []
    for record, _ in samples:
        image = record.open()
        augment = v2.Compose(
            [
                v2.RandomResizedCrop(image.size[::-1], scale=(0.6, 1.0)),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(0.3, 0.3, 0.3),
            ]
        )
        pixels = torch.stack([model.vision.preprocess(augment(image)) for _ in range(copies)])
        embeddings.append(model.image_embeddings(model.image_features(pixels)))
    embeddings = torch.cat(embeddings)
    captions = [caption for _, caption in samples[:n_queries]]
    queries = retrieval_queries(model, [[caption.rstrip() + RET_TOKEN] for caption in captions])
    ids = [str(i) for i in range(len(embeddings))]
    exact = [[int(h.id) for h in row] for row in ImageBank(embeddings, ids).search(queries, K)]
    with tempfile.TemporaryDirectory() as scratch:
        append_to_bank(scratch, embeddings, ids, ids, "real")
        build_index(scratch, "ivfpq")
        bank = ImageBank.open(scratch)
        found = [[int(h.id) for h in row] for row in bank.search(queries, K)]
    return {
        "bank": len(embeddings),
        "queries": len(queries),
        "search": bank.search_kind,
        "recall_at_10": recall_against_exact(found, torch.tensor(exact)),
    }
