"""Measured beside ``fromage plan``'s estimate (tests/test_plan.py): the peak resident
memory one training step adds to a fresh process, for a random LM of the given width.

    python tests/peak_memory.py DIRECTORY HIDDEN LAYERS BATCH  ->  JSON on stdout
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from fromage.config import compose
from fromage.data.datamodule import CaptionBatch
from fromage.model.fromage import FromageModel
from fromage.model.tokens import tokenize_captions
from fromage.train.module import FromageLitModule
from fromage.train.plan import ModelBytes, model_bytes, strategy_rows
from tiny import make_tokenizer

# a random LM from its saved config, a random timm ViT, float32, captions of 24 tokens
PEAK_OVERRIDES = [
    "model.lm.random_init=true",
    "model.vision.name=test_vit",
    "model.vision.backend=timm",
    "model.vision.pretrained=false",
    "model.vision.checkpoint=null",
    "model.vision.image_size=64",
    "model.dtype=float32",
    "data.max_len=24",
]


def resident_bytes(key: str) -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[key].split()[0]) * 1024


def experiment(directory: Path, hidden: int, layers: int, batch: int):
    """The demo experiment over a random Llama of that shape (its config saved) and a
    random timm ViT, captions of 24 tokens, ``batch`` pairs a step."""
    tokenizer = make_tokenizer()
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
    )
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return compose(
        "demo", [f"model.lm.name={directory}", *PEAK_OVERRIDES, f"data.batch_size={batch}"]
    )


def main(directory: str, hidden: int, layers: int, batch: int) -> dict:
    config = experiment(Path(directory), hidden, layers, batch)
    counted: ModelBytes = model_bytes(config)
    estimate = sum(strategy_rows("ddp", counted, 1).values())
    estimate += batch * counted.activations_per_sample
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (imports) is forgotten
    before = resident_bytes("VmRSS")
    model = FromageModel.from_config(config.model)
    module = FromageLitModule(config, model)
    optimizer = module.configure_optimizers()["optimizer"]
    captions = ["a" + " a" * 100] * batch
    ids, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, config.data.max_len)
    pixels = torch.rand(batch, 3, 64, 64)
    losses = module.model_step(
        CaptionBatch(pixels, ids, mask, [str(i) for i in range(batch)], mask.sum(1).tolist(), 0),
        concat_captions=True,
    )
    module.total(losses).backward()
    optimizer.step()
    return {"estimate": estimate, "measured": resident_bytes("VmHWM") - before}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *map(int, sys.argv[2:]))))
