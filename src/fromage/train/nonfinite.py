"""Where a non-finite loss came from: the first input, weight or layer output holding NaN/inf.

The training step checks only the loss (one host sync a step). When it is not finite,
the step is run again without gradients with a hook on every module, and the first
module, in the order they ran, whose output is not finite is named, with what to change.
That costs one extra forward pass, and only on the step that failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504


@dataclass(frozen=True)
class NonFiniteSource:
    """The first place a NaN/inf appeared, and what to change."""

    where: str
    advice: str

    def __str__(self) -> str:
        return f"the first non-finite value is in {self.where}; {self.advice}"


def _tensors(value) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a module's output (tensors, tuples, dicts, ModelOutput)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value.to_local() if isinstance(value, DTensor) else value
    elif dataclasses.is_dataclass(value):  # FromageLosses
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _all_finite(value) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in _tensors(value))


def _dtype_advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return (
            f"float16 holds magnitudes up to {FLOAT16_MAX:.0f} and this LM's activations "
            "exceed it: use model.dtype=bfloat16 (GPUs since Ampere) or model.dtype=float32"
        )
    return f"it overflowed in {dtype}: try model.dtype=float32, or a lower optim.lr"


def first_nonfinite(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    keys: Sequence[str],
    rerun: Callable[[], object],
) -> NonFiniteSource | None:
    """The first source of a NaN/inf in ``rerun()`` (a forward pass of ``model``): a row of
    one of the batch's ``inputs`` (rows named by ``keys``), a weight of ``model``, or the
    output of one of its modules. None when everything, the output included, is finite."""
    for name, tensor in inputs.items():
        if tensor.is_floating_point():
            bad_rows = (~torch.isfinite(tensor.flatten(1))).any(1)  # (B,)
            if bad_rows.any():
                samples = [keys[i] for i in bad_rows.nonzero()[:, 0].tolist()][:8]
                return NonFiniteSource(
                    f"the batch's {name} of samples {samples}",
                    "fix or drop those samples (loss.on_nonfinite=skip skips such batches)",
                )
    for name, weight in model.named_parameters():
        if not _all_finite(weight):
            return NonFiniteSource(
                f"the weight {name} ({'trainable' if weight.requires_grad else 'frozen'})",
                "an earlier optimizer step made it so: lower optim.lr or clip gradients "
                "(trainer.gradient_clip_val)",
            )
    found: list[NonFiniteSource] = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args, kwargs, output) -> None:
            if found:
                return
            kind = f"{type(module).__name__}"
            if not _all_finite((args, kwargs)):  # made between modules, by their parent
                dtype = next(t.dtype for t in _tensors((args, kwargs)) if not t.isfinite().all())
                parent = name.rpartition(".")[0] or "the model"
                where = f"the input of {name} ({kind}), computed in {parent} outside its modules"
                found.append(NonFiniteSource(f"{where} ({_name(dtype)})", _dtype_advice(dtype)))
            elif not _all_finite(output):
                dtype = next(t.dtype for t in _tensors(output) if not t.isfinite().all())
                where = f"the output of {name} ({kind}, {_name(dtype)})"
                found.append(NonFiniteSource(where, _dtype_advice(dtype)))

        return hook

    handles = [
        module.register_forward_hook(record(name), with_kwargs=True)
        for name, module in model.named_modules()
        if name  # the root's output is the loss itself: checked below
    ]
    try:
        with torch.no_grad():
            output = rerun()
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return found[0]
    if not _all_finite(output):
        return NonFiniteSource(
            "the loss, computed from finite layer outputs",
            "look for an overflow in the loss terms (loss.*) or the logit scale",
        )
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
