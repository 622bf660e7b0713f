"""``trainer=fsdp``: the frozen LM and tower sharded over the processes with FSDP2, so a
language model bigger than one device can be grounded.

Each process holds 1/W of every weight. A repeated block (a decoder layer, a ViT block)
is one FSDP unit, gathered only while it runs; the rest of ``FromageModel`` (the LM's
embeddings, head and final norm, the tower's stem, and every trainable part) is the root
unit, gathered for the whole of ``FromageModel.forward``, which is why both objectives
run inside it. Gradients of the trainable parts are reduce-scattered (their mean over the
ranks, as DDP's), and each rank keeps AdamW state for its shard only.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from fromage.model.fromage import FromageModel
from fromage.model.quantize import remember_weight_samples

STRATEGY = "fsdp2"  # trainer.strategy of conf/trainer/fsdp.yaml


def sharded_strategy(processes: int) -> ModelParallelStrategy:
    """Lightning's FSDP2 strategy over every process (no tensor parallelism). Checkpoints
    are one file, written by rank 0: they hold only the trainable weights and their
    AdamW state (``FromageLitModule.state_dict``), megabytes at any LM size."""
    return ModelParallelStrategy(
        data_parallel_size=processes, tensor_parallel_size=1, save_distributed_checkpoint=False
    )


def repeated_blocks(module: nn.Module) -> nn.ModuleList | nn.Sequential | None:
    """The ``ModuleList`` or ``Sequential`` holding most of ``module``'s parameters (an
    LM's decoder layers, a ViT's blocks: timm keeps them in a ``Sequential``), found by
    size so that any transformers LM or timm/HF tower works."""
    containers = (nn.ModuleList, nn.Sequential)
    lists = [m for m in module.modules() if isinstance(m, containers) and len(m) > 1]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def shard_model(model: FromageModel, mesh: DeviceMesh) -> None:
    """Make every repeated block of the LM and of the tower an FSDP unit, then the model
    the root unit (see the module docstring)."""
    for backbone in (model.lm, model.vision):
        remember_weight_samples(backbone)  # for the saved model's signature: whole weights
        for block in repeated_blocks(backbone) or []:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def bytes_held(module: nn.Module) -> tuple[int, int]:
    """``(bytes of module's parameters this process holds, bytes of the whole)``."""

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p

    params = list(module.parameters())
    return (
        sum(local(p).numel() * p.element_size() for p in params),
        sum(p.numel() * p.element_size() for p in params),
    )


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank must call it),
    or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_trainable_state(model: FromageModel) -> dict[str, torch.Tensor]:
    """``model.trainable_state_dict()`` with every shard gathered (on every rank)."""
    return {name: full_tensor(v) for name, v in model.trainable_state_dict().items()}
