"""Generation speed: 32 new tokens with the KV cache versus re-running the whole prefix."""

from __future__ import annotations

import time

import torch

from fromage.bench.training_step import input_size
from fromage.infer.generation import GenerationConfig, generate
from fromage.model.fromage import FromageModel


def _timed(model: FromageModel, prompt, use_cache: bool, max_new_tokens: int):
    start = time.perf_counter()
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, use_cache=use_cache, stop_at_newline=False
    )
    out = generate(model, prompt, config=config)
    return time.perf_counter() - start, out.token_ids


DIALOGUE = (
    "Q: what is in the picture? A: a small boat on a lake.\n"
    "Q: what colour is the boat? A: it is red with a white stripe.\n"
    "Q: is anyone in the boat? A: yes, an old man with a fishing rod.\n"
    "Q: what is the weather like? A: sunny, with a few clouds over the hills.\n"
    "Q: tell me a story about the man and his boat. A:"
)


def run(model: FromageModel, new_tokens: int = 32, repeats: int = 2) -> dict:
    """Two prompts: an image with a short text, and an image with a dialogue (~100 tokens)."""
    pixels = torch.randn(3, *input_size(model), generator=torch.Generator().manual_seed(0))
    prompts = {
        "short_prompt": [pixels, "Once upon a time, in a small village by the sea, there lived"],
        "dialogue_prompt": [pixels, DIALOGUE],
    }
    return {name: _compare(model, prompt, new_tokens, repeats) for name, prompt in prompts.items()}


def _compare(model: FromageModel, prompt, new_tokens: int, repeats: int) -> dict:
    _timed(model, prompt, True, 2)  # warm-up
    result = {"prompt_positions": model.embed_interleaved([prompt]).embeds.shape[1]}
    for name, use_cache in [("kv_cache", True), ("no_cache", False)]:
        first = min(_timed(model, prompt, use_cache, 1)[0] for _ in range(repeats))
        total, tokens = min(_timed(model, prompt, use_cache, new_tokens) for _ in range(repeats))
        result[name] = {
            "tokens": len(tokens),
            "tokens_per_s": len(tokens) / total,
            "time_to_first_token_s": first,
            "token_ids": tokens,
        }
    if result["kv_cache"]["token_ids"] != result["no_cache"]["token_ids"]:
        raise AssertionError("the KV cache changed the generated tokens")
    result["speedup"] = result["kv_cache"]["tokens_per_s"] / result["no_cache"]["tokens_per_s"]
    for name in ("kv_cache", "no_cache"):
        del result[name]["token_ids"]
    return result
