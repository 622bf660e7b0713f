"""Data-parallel arithmetic: what W processes compute so that one optimizer step equals
one process's step on the whole global batch.

DDP averages the gradients of the W processes. A loss that is a mean over the global
batch therefore has to be computed by each process as ``W x`` its own share of that
mean; these helpers do so, and return the global value for logging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors


def world_size() -> int:
    """Processes in the default group; 1 outside a distributed run."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _scale_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` itself (a new autograd node), whose gradient is multiplied by ``factor``."""
    out = tensor.view_as(tensor)
    if out.requires_grad:
        out.register_hook(lambda grad: grad * factor)
    return out


def gather_with_global_grad(local: torch.Tensor) -> torch.Tensor:
    """(B_rank, D) -> (sum of B_rank, D): all ranks' rows in rank order (ranks may hold
    different counts). Identity outside distributed runs.

    Only this rank's rows carry gradient, and it is multiplied by W: every rank computes
    the same loss over the gathered rows, so rank r's gradient holds exactly the terms of
    its own rows, and DDP's mean over ranks then equals one process's gradient of that
    loss (without the factor, the contrastive gradient would shrink as 1/W). Parameters
    that enter the loss directly (the logit scale) get the full gradient on every rank,
    which the mean leaves as it is.
    """
    world = world_size()
    if world == 1:
        return local
    parts = gather_all_tensors(local.detach())
    parts[dist.get_rank()] = _scale_grad(local, world)
    return torch.cat(parts)


def global_token_means(
    means: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean losses over every rank's tokens.

    ``means`` (P,) are this rank's mean losses over ``counts`` (P,) tokens each. Returns
    ``(for_backward, value)``: ``for_backward`` (P,) differs per rank, and DDP's mean of
    its gradients is the gradient of the global mean; ``value`` (P,) is the global mean
    itself (the same on every rank, detached), what one process with the whole batch
    computes. One all-reduce of 2P numbers; identity outside distributed runs.
    """
    world = world_size()
    if world == 1:
        return means, means.detach()
    sums_and_counts = torch.cat([means.detach() * counts, counts.to(means.dtype)])  # (2P,)
    dist.all_reduce(sums_and_counts)
    total_sums, total_counts = sums_and_counts.chunk(2)
    return means * (counts * world / total_counts), total_sums / total_counts
