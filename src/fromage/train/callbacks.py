"""Callbacks of the training loop: paired and contextual recall@k at every validation."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from PIL import Image

from fromage.data.datamodule import shard_list
from fromage.data.image_sources import ImageLoadError, ImageRecord
from fromage.eval.vist import SETTINGS, Story, read_split, setting_ranks, shard_stories
from fromage.infer.bank import ImageBank
from fromage.infer.bank_build import chunks
from fromage.metrics import PairedRecall, RankRecall
from fromage.model.fromage import FromageModel


class RetrievalRecallCallback(L.Callback):
    """Logs ``val/t2i_R@k`` and ``val/i2t_R@k`` (percent) over the validation stream.

    Reads the ``text_embeddings`` / ``image_embeddings`` that ``validation_step`` returns.
    """

    def __init__(self, ks: Sequence[int] = (1, 5, 10)):
        self.metric = PairedRecall(ks)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.metric = self.metric.to(pl_module.device)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if outputs:  # none from a padding batch (``datamodule.in_lockstep``)
            self.metric.update(outputs["text_embeddings"], outputs["image_embeddings"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.metric.update_count:
            results = self.metric.compute()
            pl_module.log_dict({f"val/{k}": v for k, v in results.items()}, sync_dist=False)
        self.metric.reset()


class ContextualRecallCallback(L.Callback):
    """Logs ``val/ctx_<setting>_R@k``: VIST contextual retrieval (``eval.vist``'s ranking,
    the one ``make eval-vist`` runs) at every validation, beside the paired recall.

    The stories that ``contexts()`` returns are ranked against all of its images (see
    ``contextual_recall_callback`` for where they come from). The frozen tower's features
    of the images are computed once; each validation only re-projects them with the
    current ``image_to_shared``. Under DDP every process ranks its share of the stories
    against the whole bank, and ``RankRecall`` gathers the ranks. An image that cannot be
    decoded is left out of the bank (counted in ``skipped_images``) and the stories that
    need it are not ranked.
    """

    def __init__(
        self,
        contexts: Callable[[], tuple[Sequence[Story], Sequence[ImageRecord]]],
        ks: Sequence[int] = (1, 5, 10),
    ):
        self.contexts = contexts
        self.stories: list[Story] = []
        self.records: dict[str, ImageRecord] = {}
        self.metrics = {setting: RankRecall(ks) for setting in SETTINGS}
        self.features: torch.Tensor | None = None  # (N, d_vis), frozen: computed once
        self.ids: list[str] = []  # of the rows of ``features``
        self.skipped_images = 0

    def load(self) -> None:
        """Read the stories and their images: on first use, not when the Trainer is built."""
        if not self.records:
            stories, images = self.contexts()
            self.stories, self.records = list(stories), {r.id: r for r in images}

    def image(self, image_id: str) -> Image.Image:
        return self.records[image_id].open()

    @torch.no_grad()
    def bank(self, model: FromageModel) -> ImageBank:
        """The images embedded by the model as it is now."""
        device = model.image_to_lm.weight.device
        self.load()
        if self.features is None:
            pixels = []
            for image_id in self.records:
                try:
                    pixels.append(model.vision.preprocess(self.image(image_id)))
                    self.ids.append(image_id)
                except ImageLoadError:
                    self.skipped_images += 1
            if not pixels:
                raise ImageLoadError(f"none of the {len(self.records)} context images decodes")
            self.features = torch.cat(
                [model.image_features(torch.stack(part).to(device)) for part in chunks(pixels, 64)]
            )
        return ImageBank(
            model.image_embeddings(self.features.to(device)),
            self.ids,
            [self.records[i].source for i in self.ids],
        )

    def contextual_recall(
        self, model: FromageModel, rank: int = 0, world: int = 1
    ) -> dict[str, dict[str, float]]:
        """``{setting: {"R@k": percent}}`` over the stories (this process's share of them)."""
        bank = self.bank(model)
        mine = [s for s in self.stories[rank::world] if all(i in bank for i in s.image_ids)]
        results = {}
        for setting, metric in self.metrics.items():
            ranks = setting_ranks(model, mine, bank, setting, image_of=self.image)
            metric.to(bank.embeddings.device).update(ranks)
            results[setting] = metric.compute()
            metric.reset()
        return results

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        results = self.contextual_recall(pl_module.model, trainer.global_rank, trainer.world_size)
        for setting, recalls in results.items():
            slug = setting.replace(",", "").replace(" ", "_")
            for name, value in recalls.items():
                pl_module.log(f"val/ctx_{slug}_{name}", value, sync_dist=False)


def contextual_recall_callback(
    data: DictConfig, ks: Sequence[int], seed: int = 0
) -> ContextualRecallCallback | None:
    """Contextual recall over ``data.stories_per_validation`` stories (none when 0): a fixed
    random subset of ``data.stories`` (VIST or the synthetic stories, as
    ``data_prep/vist.py`` writes them), or else contexts made from the validation shards
    (``eval.vist.shard_stories``)."""
    n = data.stories_per_validation
    if n <= 0 or not (data.stories or data.val_shards):
        return None

    def contexts() -> tuple[list[Story], list[ImageRecord]]:
        if not data.stories:
            return shard_stories(shard_list(data.val_shards, data.how_to_make), n)
        stories, images = read_split(Path(data.stories))
        return random.Random(seed).sample(stories, min(n, len(stories))), images

    return ContextualRecallCallback(contexts, ks)
