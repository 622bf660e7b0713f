"""Generation speed: 32 new tokens with the KV cache versus re-running the whole prefix."""

from __future__ import annotations

import time

import torch

from fromage.model import FromageModel


def _timed(model: FromageModel, prompt, use_cache: bool, max_new_tokens: int):
    start = time.perf_counter()
    out = model.generate(
        prompt, max_new_tokens=max_new_tokens, use_cache=use_cache, stop_at_newline=False
    )
    return time.perf_counter() - start, out.token_ids


def run(model: FromageModel, new_tokens: int = 32, repeats: int = 2) -> dict:
    pixels = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(0))
    prompt = [pixels, "Once upon a time, in a small village by the sea, there lived"]
    _timed(model, prompt, True, 2)  # warm-up
    result = {}
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
