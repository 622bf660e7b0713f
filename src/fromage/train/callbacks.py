"""Callbacks of the training loop: paired and contextual recall@k at every validation."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from fromage.data.image_sources import open_image
from fromage.eval.vist import SETTINGS, read_split, setting_ranks
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
        self.metric.update(outputs["text_embeddings"], outputs["image_embeddings"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.metric.update_count:
            results = self.metric.compute()
            pl_module.log_dict({f"val/{k}": v for k, v in results.items()}, sync_dist=False)
        self.metric.reset()


class ContextualRecallCallback(L.Callback):
    """Logs ``val/ctx_<setting>_R@k``: VIST contextual retrieval (``eval.vist``'s ranking,
    the one ``make eval-vist`` runs) at every validation, beside the paired recall.

    A fixed random subset of ``n_stories`` stories (seeded) is ranked against all the
    split's images. The frozen tower's features of those images are computed once; each
    validation only re-projects them with the current ``image_to_shared``. Under DDP every
    process ranks its share of the stories against the whole bank, and ``RankRecall``
    gathers the ranks.
    """

    def __init__(
        self, stories_dir: str | Path, n_stories: int, ks: Sequence[int] = (1, 5, 10), seed=0
    ):
        stories, self.images = read_split(Path(stories_dir))
        self.stories = random.Random(seed).sample(stories, min(n_stories, len(stories)))
        self.metrics = {setting: RankRecall(ks) for setting in SETTINGS}
        self.features: torch.Tensor | None = None  # (N, d_vis), frozen: computed once

    @torch.no_grad()
    def bank(self, model: FromageModel) -> ImageBank:
        """The split's images embedded by the model as it is now."""
        device = model.image_to_lm.weight.device
        if self.features is None:
            self.features = torch.cat(
                [
                    model.image_features(
                        torch.stack(
                            [model.vision.preprocess(open_image(r.source)) for r in part]
                        ).to(device)
                    )
                    for part in chunks(self.images, 64)
                ]
            )
        return ImageBank(
            model.image_embeddings(self.features.to(device)),
            [r.id for r in self.images],
            [r.source for r in self.images],
        )

    def contextual_recall(
        self, model: FromageModel, rank: int = 0, world: int = 1
    ) -> dict[str, dict[str, float]]:
        """``{setting: {"R@k": percent}}`` over the stories (this process's share of them)."""
        bank = self.bank(model)
        mine = [s for s in self.stories[rank::world] if all(i in bank for i in s.image_ids)]
        results = {}
        for setting, metric in self.metrics.items():
            metric.to(bank.embeddings.device).update(setting_ranks(model, mine, bank, setting))
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
