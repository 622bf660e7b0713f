"""Callbacks of the training loop: paired recall@k at every validation."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from fromage.metrics import PairedRecall


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
