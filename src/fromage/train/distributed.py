"""Gathering contrastive embeddings across data-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors


def gather_keeping_local_grad(local: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order (ranks may hold different counts); only this rank's
    rows carry gradient, as in the FROMAGe release. Identity outside distributed runs."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = gather_all_tensors(local.detach())
    parts[dist.get_rank()] = local
    return torch.cat(parts)
