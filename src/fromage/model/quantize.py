"""A frozen LM in 8 or 4 bits (``model.lm.quantize``), so the paper model fits a small GPU
and the demo a laptop.

Only the LM's transformer linear layers are quantized: they hold nearly all its weights
(OPT-6.7B: 6.4 of 6.7 B). The input embeddings stay in ``model.dtype`` because
``FromageModel`` reads them (the ``[RET]`` initialisation, the embedding norm that
``[RET]`` is rescaled to), and so does the output head, which computes the vocabulary
logits and in OPT is the same matrix. The trainable maps and ``[RET]`` are built by
``FromageModel`` afterwards and stay float32. Gradients still flow *through* the
quantized layers to the visual tokens and ``[RET]``: their weights are frozen, not
detached from the graph.

Which library where:

- CUDA: bitsandbytes, the library LLaVA-class codebases use. ``int8`` is LLM.int8()
  (per-row int8 weights, outlier activation columns above 6 kept in float16), ``int4`` is
  NF4 with blockwise scales, computing in ``model.dtype``. The layers are swapped on the
  CPU and quantized one by one as they move to the GPU, so the full-precision LM never
  sits on the GPU; both pass gradients to their inputs (QLoRA trains through them).
- CPU: torchao's ``Int8WeightOnlyConfig``: symmetric int8 weights with a scale per group
  of ``INT8_GROUP`` (16) weights of a row (per row where a row does not divide), dequantized
  inside the matmul by ordinary PyTorch ops, so it runs on any CPU and backpropagates.
  bitsandbytes on CPU casts activations to float16 (slow there) and fetches its 4-bit
  CPU kernels from the Hugging Face Hub at run time; torchao's int4 layouts need CUDA or
  XPU kernels. So ``int4`` on CPU is refused, naming ``int8`` and the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util

import torch
from torch import nn

QUANTIZE = ("none", "int8", "int4")
INT8_GROUP = 16  # CPU int8: weights of a row that share one scale
INSTALL = "pip install 'fromage[quant]'"
# LLM.int8(): activation columns with any |value| above this run in float16 (the
# threshold of the paper and of transformers' load_in_8bit)
INT8_OUTLIER_THRESHOLD = 6.0
# A backbone's full-precision weight samples, recorded before its layers are quantized
# or sharded, so a saved model's backbone signature matches however it is loaded or run.
SAMPLES_ATTRIBUTE = "fromage_weight_samples"


class QuantizationUnavailable(RuntimeError):
    """The chosen ``model.lm.quantize`` cannot run here; the message says what would."""


def check_quantize(setting: str, device: str | torch.device | None) -> str | None:
    """The library that quantizes ``setting`` on ``device`` (None for ``none``).

    Raises ``ValueError`` for an unknown setting and ``QuantizationUnavailable`` when the
    library is missing or the method does not run on this device, before anything loads.
    """
    if setting not in QUANTIZE:
        raise ValueError(f"model.lm.quantize must be one of {list(QUANTIZE)}, got {setting!r}")
    if setting == "none":
        return None
    kind = torch.device(device or "cpu").type
    if kind == "cuda":
        library = "bitsandbytes"
    elif kind == "cpu" and setting == "int8":
        library = "torchao"
    elif kind == "cpu":
        raise QuantizationUnavailable(
            "model.lm.quantize=int4 needs a CUDA GPU (bitsandbytes NF4); no maintained "
            "library runs 4-bit weights on CPU without fetching kernels at run time. "
            "On CPU use model.lm.quantize=int8 (torchao) or none"
        )
    else:
        raise QuantizationUnavailable(
            f"model.lm.quantize={setting} runs on cuda (bitsandbytes) or, for int8, cpu "
            f"(torchao), not on {kind}: use model.lm.quantize=none there"
        )
    if importlib.util.find_spec(library) is None:
        raise QuantizationUnavailable(
            f"model.lm.quantize={setting} on {kind} needs {library}, which is not installed: "
            f"`{INSTALL}` (or `pip install {library}`), or set model.lm.quantize=none"
        )
    return library


def weight_samples(module: nn.Module) -> list[float]:
    """The middle element of every weight: cheap, and different for other weights."""
    return [float(p.detach().reshape(-1)[p.numel() // 2]) for p in module.parameters()]


def remember_weight_samples(module: nn.Module) -> None:
    """Keep ``weight_samples`` of ``module`` as it is now, before quantizing or sharding it."""
    setattr(module, SAMPLES_ATTRIBUTE, weight_samples(module))


def loaded_weight_samples(module: nn.Module) -> list[float]:
    """``weight_samples`` of a backbone as loaded, before any quantization or sharding."""
    return getattr(module, SAMPLES_ATTRIBUTE, None) or weight_samples(module)


def quantizable_linears(lm: nn.Module) -> list[str]:
    """Names of the LM's ``nn.Linear`` layers, less the output head."""
    head = lm.get_output_embeddings()
    return [
        name
        for name, module in lm.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    ]


def quantize_language_model(
    lm: nn.Module, setting: str, device: str | torch.device | None = None
) -> nn.Module:
    """Quantize ``lm``'s transformer linear layers in place for ``device`` and move the LM
    there. ``lm`` must still be on the CPU when quantizing for CUDA (see the module doc)."""
    library = check_quantize(setting, device)
    if library is None:
        return lm if device is None else lm.to(device)
    names = quantizable_linears(lm)
    if not names:
        raise QuantizationUnavailable(
            f"{type(lm).__name__} has no nn.Linear layers to quantize (GPT-2 uses Conv1D): "
            "set model.lm.quantize=none"
        )
    remember_weight_samples(lm)
    if library == "torchao":
        return _torchao_int8(lm, set(names)).to(device or "cpu")
    return _bitsandbytes(lm, names, setting).to(device)


def _torchao_int8(lm: nn.Module, names: set[str]) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup, PerRow, quantize_

    # one scale per INT8_GROUP weights of a row where the row divides (per row otherwise):
    # on the demo model of raw tower features, per-row scales moved 7% of top-1 retrievals
    # and groups of 64 4%; on the one of normed features groups of 64, 32, 16 moved 7, 5, 3%.
    # set_inductor_config=False: nothing is compiled here, leave global settings alone
    grouped = {n for n in names if lm.get_submodule(n).in_features % INT8_GROUP == 0}
    for granularity, chosen in [(PerGroup(INT8_GROUP), grouped), (PerRow(), names - grouped)]:
        config = Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
        quantize_(lm, config, filter_fn=lambda module, name, chosen=chosen: name in chosen)
    _release_freed_memory()
    return lm


def _release_freed_memory() -> None:
    """Hand the replaced float weights back to the OS. glibc keeps freed blocks of this
    size in its heap (its mmap threshold grows as large blocks are freed), so without a
    trim the process keeps the float LM's footprint. Does nothing without glibc."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _bitsandbytes(lm: nn.Module, names: list[str], setting: str) -> nn.Module:
    """Swap each linear layer for its bitsandbytes twin, still holding the full-precision
    weight on the CPU; ``.to(cuda)`` then quantizes it layer by layer (bitsandbytes' own
    loading path)."""
    import bitsandbytes as bnb

    dtype = lm.get_input_embeddings().weight.dtype
    for name in names:
        parent, _, child = name.rpartition(".")
        old = lm.get_submodule(name)
        bias = old.bias is not None
        if setting == "int8":
            new = bnb.nn.Linear8bitLt(
                old.in_features,
                old.out_features,
                bias=bias,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
                device="meta",
            )
            new.weight = bnb.nn.Int8Params(
                old.weight.data, requires_grad=False, has_fp16_weights=False
            )
        else:
            new = bnb.nn.Linear4bit(
                old.in_features,
                old.out_features,
                bias=bias,
                compute_dtype=dtype,
                quant_type="nf4",
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                old.weight.data, requires_grad=False, quant_type="nf4", module=new
            )
        if bias:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        lm.get_submodule(parent).register_module(child, new)
    return lm
