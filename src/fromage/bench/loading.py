"""Data loading: decoded and preprocessed images per second, per dataloader worker."""

from __future__ import annotations

import time

from fromage.config import DataConfig
from fromage.data.datamodule import CaptionDataModule
from fromage.model.fromage import FromageModel


def run(model: FromageModel, shards: str, batch_size: int = 64, batches: int = 8) -> dict:
    config = DataConfig(
        train_shards=shards, val_shards=None, batch_size=batch_size, num_workers=0, shuffle_buffer=0
    )
    data = CaptionDataModule(config, model.tokenizer, model.ret_id, model.vision.preprocess)
    loader = iter(data.train_dataloader())
    next(loader)  # opening the first shard
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images += len(next(loader))
        except StopIteration:
            break
    return {"images_per_s_per_worker": images / (time.perf_counter() - start), "images": images}
