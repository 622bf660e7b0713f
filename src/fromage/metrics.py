"""Recall@k for paired text/image embeddings, as a torchmetrics metric and a callback."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def rank_of_positive(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For pair i: how many keys score higher than key i for query i (0 = ranked first).

    Ties count against the positive. Computed in row chunks so 10^4+ pairs fit in memory.
    """
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.T
        positive = scores.diagonal(offset=start)[:, None]
        ranks.append((scores > positive).sum(1) + (scores == positive).sum(1) - 1)
    return torch.cat(ranks)


class PairedRecall(Metric):
    """Recall@k in both directions for N (text, image) pairs, row i of each a positive.

    Embeddings from every rank are concatenated before computing, so the ranking is over
    the whole validation set.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10)):
        super().__init__()
        self.ks = list(ks)
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.add_state("image", default=[], dist_reduce_fx="cat")

    def update(self, text: torch.Tensor, image: torch.Tensor) -> None:
        self.text.append(text.detach().float())
        self.image.append(image.detach().float())

    def compute(self) -> dict[str, torch.Tensor]:
        text, image = dim_zero_cat(self.text), dim_zero_cat(self.image)
        t2i, i2t = rank_of_positive(text, image), rank_of_positive(image, text)
        results = {}
        for k in self.ks:
            results[f"t2i_R@{k}"] = (t2i < k).float().mean()
            results[f"i2t_R@{k}"] = (i2t < k).float().mean()
        results["n_pairs"] = torch.tensor(float(len(text)))
        return results


class RetrievalRecallCallback(L.Callback):
    """Logs ``val/t2i_R@k`` and ``val/i2t_R@k`` over the validation stream.

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
