"""Streaming image-caption pairs from WebDataset shards (the layout img2dataset writes).

Each sample is ``KEY.jpg`` (or png/webp) + ``KEY.txt`` (+ ``KEY.json``), or, in shards
written by ``data_prep/precompute_features.py``, ``KEY.feat.npy`` (the frozen tower's
pooled features, so training skips the tower) + ``KEY.txt``. Shards are split
across ranks and dataloader workers, so one epoch reads every sample once. A sample
whose image does not decode or whose caption is empty is dropped and counted; the count
travels with the next batch (``CaptionBatch.n_skipped``) so the training loop can log it;
when none decodes, training stops naming the shards (``NoGoodSamples``).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fromage.config import DataConfig
from fromage.model.tokens import tokenize_captions

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FEATURES = "feat.npy"


@dataclass
class Example:
    image: torch.Tensor  # (3, H, W) pixels, or (d_vis,) precomputed features
    caption: str
    key: str
    skipped_before: int = 0  # bad samples dropped since the previous good one


@dataclass
class Skipped:
    key: str
    reason: str


@dataclass
class CaptionBatch:
    images: torch.Tensor  # (B, 3, H, W) pixels, or (B, d_vis) precomputed features
    ids: torch.Tensor  # (B, L) right-padded to the longest caption, each ending in [RET]
    mask: torch.Tensor  # (B, L)
    keys: list[str]
    # host-side facts, known at collation, so the training step never waits on the device
    lengths: list[int]  # caption tokens per row (mask sums)
    n_skipped: int  # samples dropped while this batch was assembled
    padding: bool = False  # a repeat that only keeps the ranks in step (``in_lockstep``)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_features(self) -> bool:
        return self.images.dim() == 2


def shard_list(spec: str, how_to_make: str = "") -> list[str]:
    """A directory (all its .tar files) or a brace pattern -> existing shard paths.

    Missing shards fail fast with the command that makes them.
    """
    hint = f"; make them with: {how_to_make}" if how_to_make else ""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {spec}{hint}")
        return shards
    shards = list(wds.shardlists.expand_urls(spec))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}{hint}"
        )
    return shards


def check_every_rank_has_shards(shards: list[str], world_size: int, resampled: bool) -> None:
    """Training shards are split across ranks; a rank without any would leave the others
    waiting for it in every collective (a silent hang), so refuse that up front.
    (Validation splits samples, not shards: any number of shards will do.)"""
    if shards and not resampled and len(shards) < world_size:
        raise ValueError(
            f"train: {len(shards)} shard(s) for {world_size} ranks; every rank needs at "
            "least one (write smaller shards, or set data.resampled=true)"
        )


def every_nth(rank: int, world: int, samples: Iterator[dict]) -> Iterator[dict]:
    """Samples ``rank``, ``rank + world``, ...: this rank's share of a stream that every
    rank reads whole, so each sample is counted once by exactly one rank."""
    return itertools.islice(samples, rank, None, world)


def decode_sample(
    preprocess: Callable[[Image.Image], torch.Tensor], sample: dict
) -> Example | Skipped:
    """Raw WebDataset sample -> ``Example``, or ``Skipped`` with the reason."""
    key = sample.get("__key__", "?")
    image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if (image_bytes is None and FEATURES not in sample) or "txt" not in sample:
        return Skipped(key, "no image or no caption")
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        return Skipped(key, "empty caption")
    if image_bytes is None:
        try:
            features = np.load(io.BytesIO(sample[FEATURES]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            return Skipped(key, f"unreadable features ({error})")
        return Example(torch.from_numpy(features).float(), caption, key)
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            pixels = preprocess(image)
    except Exception as error:  # any undecodable image: PIL raises many types
        return Skipped(key, f"undecodable image ({type(error).__name__}: {error})")
    return Example(pixels, caption, key)


# A stream stops after this many bad samples or broken shards in a row: a resampled
# stream of undecodable shards would otherwise draw them forever without a step.
MAX_BAD_IN_A_ROW = 1000
WARNINGS_SHOWN = (
    20  # per worker; later bad samples are counted (CaptionBatch.n_skipped), not logged
)


class NoGoodSamples(RuntimeError):
    """Training shards from which no sample decodes."""


class StreamHealth:
    """One worker's bad samples and broken shards (cut mid-record, unreadable): counted,
    warned about a bounded number of times, and the stream stopped, naming the shards,
    when good samples stop coming. Also the WebDataset handler for broken shards."""

    def __init__(self, shards: list[str]):
        self.shards = shards
        self.pending = 0  # shard errors not yet attached to a good sample
        self.in_a_row = 0
        self.warnings = 0

    def __call__(self, error: Exception) -> bool:
        self.pending += 1
        self.bad(f"skipping the rest of a shard: {error}")
        return True

    def bad(self, message: str) -> None:
        self.in_a_row += 1
        self.warnings += 1
        if self.warnings <= WARNINGS_SHOWN:
            log.warning(message)
            if self.warnings == WARNINGS_SHOWN:
                log.warning("further bad samples and shards are counted, not logged")
        if self.in_a_row >= MAX_BAD_IN_A_ROW:
            self.stop(f"{self.in_a_row} bad samples or broken shards in a row (last: {message})")

    def good(self) -> None:
        self.in_a_row = 0

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count

    def stop(self, why: str) -> None:
        where = (
            self.shards[0]
            if len(self.shards) == 1
            else f"{len(self.shards)} shards from {self.shards[0]}"
        )
        raise NoGoodSamples(
            f"no training sample decodes: {why}. Check or remake the shards ({where}); "
            "a sample needs an image (jpg/png/webp or feat.npy) and a non-empty txt caption"
        )


def drop_skipped(
    samples: Iterator[Example | Skipped], health: StreamHealth, finite: bool = False
) -> Iterator[Example]:
    """Drop bad samples, attaching how many were dropped (and how many shards broke
    off) to the next good one. A ``finite`` pass with bad samples and not one good one
    stops: the next pass would read the same shards again, without end."""
    skipped, good = 0, 0
    for sample in samples:
        skipped += health.take()
        if isinstance(sample, Skipped):
            skipped += 1
            health.bad(f"skipping sample {sample.key}: {sample.reason}")
            continue
        health.good()
        good += 1
        sample.skipped_before, skipped = skipped, 0
        yield sample
    skipped += health.take()
    if finite and not good and skipped:
        health.stop(f"a whole pass over this process's shards gave {skipped} bad and no good one")


def collate(
    tokenizer: PreTrainedTokenizerBase, ret_id: int, max_len: int, examples: list[Example]
) -> CaptionBatch:
    """Examples -> ``CaptionBatch``, padded only to the longest caption of the batch."""
    ids, mask = tokenize_captions(tokenizer, [e.caption for e in examples], ret_id, max_len)
    return CaptionBatch(
        images=torch.stack([e.image for e in examples]),
        ids=ids,
        mask=mask,
        keys=[e.key for e in examples],
        lengths=mask.sum(1).tolist(),
        n_skipped=sum(e.skipped_before for e in examples),
    )


@dataclass
class StreamPosition:
    """Where a training stream is: its epoch, and the batches of it already trained on."""

    epoch: int = 0
    batches: int = 0


class SkipOnce:
    """Drop a resumed epoch's consumed batches in the first pass, in each worker.

    The DataLoader takes batches from its W workers in turn, always starting with worker
    0, so each worker drops ``n // W`` of its own; the remaining ``n % W`` are dropped by
    ``ResumingLoader`` in the main process, which keeps the order exact.
    """

    def __init__(self, n: int):
        self.n = n

    def __call__(self, batches: Iterator[CaptionBatch]) -> Iterator[CaptionBatch]:
        info = torch.utils.data.get_worker_info()
        skip = self.n // (info.num_workers if info else 1)
        self.n = 0  # this object lives on in each worker: later epochs start at their beginning
        for index, batch in enumerate(batches):
            if index >= skip:
                yield batch


def in_lockstep(batches: Iterable[CaptionBatch], device: torch.device) -> Iterator[CaptionBatch]:
    """``batches``, then, until every rank is done, repeats of the last marked ``padding``.

    A sharded model gathers its weights from every rank in each forward, so each rank
    must run as many validation batches as the rank with the most, which a split of the
    validation samples does not give. One all-reduce per batch says which ranks have more.
    """
    last = None
    for batch in itertools.chain(batches, itertools.repeat(None)):
        # (this rank has a batch, this rank has none at all), the largest over the ranks
        state = torch.tensor([batch is not None, batch is None and last is None], device=device)
        torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MAX)
        if state[1]:
            raise ValueError(
                "validation: a rank got no validation sample (fewer samples than ranks "
                "and the batch size allow): give more validation samples or fewer processes"
            )
        if not state[0]:
            return
        if batch is None:
            yield dataclasses.replace(last, padding=True)
        else:
            last = batch
            yield batch


class LockstepLoader:
    """A validation loader whose ranks stay in step (``in_lockstep``)."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[CaptionBatch]:
        return in_lockstep(self.loader, self.device)


class ResumingLoader(DataLoader):
    """A DataLoader whose first pass drops its first ``drop_first`` batches (see SkipOnce)."""

    def __init__(self, *args, drop_first: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_first = drop_first

    def __iter__(self):
        iterator = super().__iter__()
        for _ in range(self.drop_first):
            next(iterator, None)
        self.drop_first = 0
        return iterator


def caption_pipeline(
    shards: list[str],
    preprocess: Callable[[Image.Image], torch.Tensor],
    collate_fn: Callable[[list[Example]], CaptionBatch],
    batch_size: int,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    seed: int = 0,
    start: StreamPosition | None = None,
    sample_split: tuple[int, int] | None = None,
    must_yield: bool = False,
) -> wds.DataPipeline:
    """Shards -> batches: split by rank and worker, shuffle, decode, drop bad, batch.

    The shuffle (and with ``resampled``, the shard draws, per rank and worker) is seeded
    by ``seed`` and the epoch, so a stream can be replayed; with ``start`` the first pass
    begins at that epoch, after the batches already consumed (read and dropped again).
    ``sample_split=(rank, world)`` splits by samples instead of shards across ranks
    (every rank reads every shard): any number of shards serves any number of ranks.
    With ``must_yield`` (training) a stream of shards none of whose samples decode stops
    with ``NoGoodSamples`` instead of yielding nothing forever.
    """
    start = start or StreamPosition()
    if resampled:
        source = [wds.ResampledShards(shards, seed=seed + start.epoch, deterministic=True)]
    elif sample_split:
        source = [wds.SimpleShardList(shards), wds.split_by_worker]
    else:
        source = [wds.SimpleShardList(shards), wds.split_by_node, wds.split_by_worker]
    health = StreamHealth(shards)
    stages = [
        *source,
        wds.tarfile_to_samples(handler=health),
        partial(every_nth, *sample_split) if sample_split else None,
        wds.detshuffle(shuffle_buffer, seed=seed, epoch=start.epoch - 1)
        if shuffle_buffer
        else None,
        wds.map(partial(decode_sample, preprocess)),
        partial(drop_skipped, health=health, finite=must_yield and not resampled),
        wds.batched(batch_size, collation_fn=collate_fn, partial=True),
        SkipOnce(start.batches),
    ]
    return wds.DataPipeline(*[s for s in stages if s is not None])


class CaptionDataModule(L.LightningDataModule):
    """Train and validation streams of ``CaptionBatch`` from shards in ``DataConfig``.

    ``batch_size`` is this process's share of a micro-batch (training derives it from the
    global ``config.batch_size``: ``fromage.train.batching``); a single process reading
    alone defaults to the configured per-device batch, else the global one.
    ``lockstep_validation``: every rank runs as many validation batches (``in_lockstep``),
    as a sharded model needs.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        ret_id: int,
        preprocess: Callable[[Image.Image], torch.Tensor],
        seed: int = 0,
        batch_size: int | None = None,
        lockstep_validation: bool = False,
    ):
        super().__init__()
        self.lockstep_validation = lockstep_validation
        self.config = config
        self.batch_size = batch_size or config.per_device_batch_size or config.batch_size
        self.preprocess = preprocess
        self.collate_fn = partial(collate, tokenizer, ret_id, config.max_len)
        self.train_shards = shard_list(config.train_shards, config.how_to_make)
        self.val_shards = (
            shard_list(config.val_shards, config.how_to_make) if config.val_shards else []
        )
        self.seed = seed
        self.resume_at = StreamPosition()

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints: where the training stream was, so a resumed run goes on
        with the very batches the interrupted one would have seen next."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = StreamPosition(**state)

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        check_every_rank_has_shards(self.train_shards, world, self.config.resampled)

    def _loader(self, shards: list[str], train: bool) -> DataLoader:
        pipeline = caption_pipeline(
            shards,
            self.preprocess,
            self.collate_fn,
            self.batch_size,
            shuffle_buffer=self.config.shuffle_buffer if train else 0,
            resampled=train and self.config.resampled,
            seed=self.seed,
            start=self.resume_at if train else None,
            sample_split=None if train else self._rank_and_world(),
            must_yield=train,
        )
        workers = min(self.config.num_workers, len(shards))
        resuming = train and workers > 0
        return ResumingLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_first=self.resume_at.batches % workers if resuming else 0,
        )

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_shards, train=True)

    def val_dataloader(self) -> DataLoader | LockstepLoader | list:
        if not self.val_shards:
            return []
        loader = self._loader(self.val_shards, train=False)
        if self.lockstep_validation and self.trainer is not None and self.trainer.world_size > 1:
            return LockstepLoader(loader, self.trainer.strategy.root_device)
        return loader
