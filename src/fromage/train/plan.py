"""``fromage plan``: the memory each GPU needs for an experiment, before anything loads.

The model is built on PyTorch's meta device (shapes and dtypes, no storage), so even a
70B LM is planned in seconds, from its config: its weights are counted exactly, and one
forward pass of both objectives at the experiment's longest captions, run on meta
tensors, counts the activations autograd saves for the backward pass. Then for each
strategy (``trainer=ddp``, ``deepspeed-zero2``, ``fsdp``) the bytes one GPU holds, the
micro-batch and accumulation that the global batch needs to fit, and which fit.

What is counted and what is estimated:
- counted: frozen weights and buffers, trainable weights, their gradients and AdamW state
  (fp32: 16 bytes a parameter), activations saved for backward per sample;
- estimated: under ``fsdp``, the working set of gathered weights (the root unit, which
  holds the embeddings and head, plus two decoder layers: the one running and the next);
  under ``deepspeed-zero2``, a bf16 copy of the trainable parts beside their sharded
  fp32 state; and a margin (``HEADROOM``) for what no count sees: transient buffers
  (logits before the loss, attention scores), the allocator's caching, CUDA's context.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import torch
import torch.fx.experimental._config as fx_config
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fromage.model.fromage import FromageModel
from fromage.model.tokens import tokenize_captions
from fromage.train.batching import BatchSizeError, plan_batches
from fromage.train.sharding import repeated_blocks

# of a GPU's memory, kept free for what is not counted (see above): on CPU, what is
# counted came to 0.73-0.87 of the measured peak of a training step (tests/test_plan.py)
HEADROOM = 0.3
TRAINABLE_BYTES = 16  # fp32 weight, gradient, and AdamW's two moments
STRATEGIES = ("ddp", "deepspeed-zero2", "fsdp")  # conf/trainer/*.yaml
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """``80GB``, ``80G``, ``40GiB`` or a number of bytes -> bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"a memory size such as 80GB, got {text!r}")
    return int(float(match[1]) * UNITS[match[2].upper()])


@dataclass(frozen=True)
class ModelBytes:
    """What the model holds and needs, counted on the meta device."""

    lm: int  # frozen LM weights and buffers
    tower: int  # frozen tower weights and buffers
    trainable_parameters: int
    root_unit: int  # weights outside the LM's and tower's repeated blocks (FSDP's root)
    largest_block: int  # the largest decoder layer / tower block
    activations_per_sample: int  # saved for backward, at the longest captions


@dataclass
class StrategyPlan:
    strategy: str
    rows: dict[str, int] = field(default_factory=dict)  # bytes per GPU, fixed parts
    per_sample: int = 0  # activation bytes per pair held at once
    micro_batch: int | None = None  # pairs per GPU per micro-batch (None: none fits)
    accumulate: int | None = None
    why_not: str = ""

    @property
    def fixed(self) -> int:
        return sum(self.rows.values())

    def total(self) -> int:
        return self.fixed + self.per_sample * (self.micro_batch or 0)


def meta_model(config: DictConfig) -> FromageModel:
    """The experiment's model with shapes and dtypes only: the LM from its config (no
    weights read), the tower built the same way."""
    model_config = OmegaConf.merge(
        config.model,
        {
            "lm": {"random_init": True, "quantize": "none"},
            "vision": {"pretrained": False, "checkpoint": None},
        },
    )
    return FromageModel.from_config(model_config, device="meta")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_bytes(module: torch.nn.Module) -> int:
    return _bytes(module.parameters()) + _bytes(module.buffers())


def saved_activation_bytes(model: FromageModel, config: DictConfig, batch: int = 2) -> int:
    """Bytes autograd saves for backward in one training forward of ``batch`` pairs whose
    captions all reach ``data.max_len``, concatenated in pairs where the experiment ever
    concatenates (the longer sequences); on the meta device when planning, or on a real
    one to check the count."""
    device = model.image_to_lm.weight.device  # meta when planning
    size = model.vision.preprocess(Image.new("RGB", (256, 256))).shape  # (3, H, W)
    captions = ["a" + " a" * 4 * config.data.max_len] * batch  # cut to max_len tokens
    ids, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, config.data.max_len)
    # each saved tensor once, by the tensor it views, and never the model's own weights
    # (a frozen linear layer saves its weight, not a copy of it)
    weights = {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, torch.Tensor] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in weights:
            saved[id(base)] = base
        return tensor

    # boolean indexing has no shape on meta tensors: assume every position is a target
    # (captions at max_len are nearly all targets anyway), an upper bound
    previous = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            model(
                torch.zeros(batch, *size, device=device),
                ids.to(device),
                mask.to(device),
                concat_captions=config.loss.concat_captions_prob > 0,
                lengths=mask.sum(1).tolist(),
                ret_in_caption=config.loss.ret_in_caption,
            )
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = previous
    return _bytes(saved.values())


def model_bytes(config: DictConfig) -> ModelBytes:
    model = meta_model(config)
    blocks = [repeated_blocks(backbone) for backbone in (model.lm, model.vision)]
    in_blocks = sum(_module_bytes(b) for b in blocks if b is not None)
    largest = max((_module_bytes(layer) for b in blocks if b is not None for layer in b), default=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ModelBytes(
        lm=_module_bytes(model.lm),
        tower=_module_bytes(model.vision),
        trainable_parameters=sum(p.numel() for p in trainable),
        root_unit=_module_bytes(model) - in_blocks,
        largest_block=largest,
        activations_per_sample=saved_activation_bytes(model, config, batch=2) // 2,
    )


def strategy_rows(strategy: str, counted: ModelBytes, gpus: int) -> dict[str, int]:
    """Bytes one of ``gpus`` GPUs holds under ``strategy``, whatever the batch."""
    frozen = counted.lm + counted.tower
    state = counted.trainable_parameters * TRAINABLE_BYTES
    if strategy == "ddp":
        return {"frozen weights": frozen, "trainable + grads + AdamW (fp32)": state}
    if strategy == "deepspeed-zero2":  # a bf16 working copy, the fp32 state sharded
        return {
            "frozen weights": frozen,
            "trainable, bf16 copy": counted.trainable_parameters * 2,
            "trainable + grads + AdamW (fp32), sharded": state // gpus,
        }
    return {
        "frozen weights, sharded": frozen // gpus,
        "trainable + grads + AdamW (fp32), sharded": state // gpus,
        "gathered weights (estimate)": counted.root_unit + 2 * counted.largest_block,
    }


def plan(config: DictConfig, gpus: int, gpu_memory: int) -> list[StrategyPlan]:
    """For each strategy: the bytes a GPU holds, and the largest micro-batch that fits
    ``gpu_memory`` less ``HEADROOM`` with the global batch split as training splits it."""
    counted = model_bytes(config)
    usable = int(gpu_memory * (1 - HEADROOM))
    plans = []
    for strategy in STRATEGIES:
        result = StrategyPlan(strategy, strategy_rows(strategy, counted, gpus))
        result.per_sample = counted.activations_per_sample
        room = usable - result.fixed
        cap = room // max(1, result.per_sample)  # pairs a GPU can hold at once
        if room <= 0:
            result.why_not = "the weights alone exceed the usable memory"
        elif cap == 0:
            result.why_not = "no room left for the activations of one pair"
        else:
            held = min(cap, config.data.per_device_batch_size or cap)
            accumulate = config.trainer.accumulate_grad_batches
            try:
                batches = plan_batches(config.data.batch_size, held, gpus, accumulate)
            except BatchSizeError as error:
                result.why_not = str(error)
            else:
                result.micro_batch = batches.largest_per_process
                result.accumulate = batches.accumulate
        plans.append(result)
    return plans


def gib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(plans: list[StrategyPlan], gpus: int, gpu_memory: int) -> str:
    """The plan as Markdown: one table of bytes per GPU, then which strategy fits."""
    names = list(dict.fromkeys(name for p in plans for name in p.rows))
    header = "| per GPU | " + " | ".join(f"trainer={p.strategy}" for p in plans) + " |"
    lines = [header, "|---" * (len(plans) + 1) + "|"]
    for name in names:
        cells = [gib(p.rows[name]) if name in p.rows else "-" for p in plans]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| activations per pair (saved for backward) | "
        + " | ".join(gib(p.per_sample) for p in plans)
        + " |"
    )
    lines.append(
        "| micro-batch x accumulation | "
        + " | ".join(f"{p.micro_batch} x {p.accumulate}" if p.micro_batch else "-" for p in plans)
        + " |"
    )
    lines.append(
        "| total | " + " | ".join(gib(p.total()) if p.micro_batch else "-" for p in plans) + " |"
    )
    usable = gpu_memory * (1 - HEADROOM)
    lines += [
        "",
        f"{gpus} GPU(s) of {gib(gpu_memory)}, {gib(usable)} usable ({HEADROOM:.0%} kept free):",
    ]
    for p in plans:
        verdict = (
            f"fits: {p.micro_batch} pairs per GPU, {p.accumulate} micro-batch(es) a step"
            if p.micro_batch
            else f"does not fit: {p.why_not}"
        )
        lines.append(f"- trainer={p.strategy}: {verdict}")
    return "\n".join(lines)
