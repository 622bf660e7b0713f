"""Generation speed: 32 new tokens with the KV cache versus re-running the whole prefix.

The cache must not change what is generated, up to rounding: in float32 the cached and
re-run passes agree to ~1e-6, but in bf16 they sum in another order and differ by about
one bf16 step of the logits, which can flip a near-tie in greedy decoding and from there
the rest of the continuation. So the first cached step's logits are compared within a
tolerance of their scale, and the greedy tokens must agree on a fraction of positions.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from fromage.bench.flops import input_size
from fromage.infer.generation import GenerationConfig, generate
from fromage.model.fromage import FromageModel


def timed_generate(model: FromageModel, prompt, use_cache: bool, max_new_tokens: int):
    """Seconds to generate up to ``max_new_tokens`` greedily (device synchronised: each
    token is read back to the host), and the token ids."""
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


# max |cached - re-run| logit over max |logit|, and the least fraction of equal greedy
# tokens, for float32 backbones and for bf16/fp16 ones
LOGIT_TOLERANCE = {torch.float32: 1e-4, "reduced": 3e-2}
TOKEN_AGREEMENT = {torch.float32: 1.0, "reduced": 0.5}


@torch.no_grad()
def first_cached_step_error(model: FromageModel, prompt) -> float:
    """Relative max difference of the logits after one generated token, computed with
    the KV cache and by re-running the whole sequence."""
    embeds = model.embed_interleaved([prompt]).embeds  # (1, L, d_emb)
    cache = DynamicCache(config=model.lm.config)
    first = model.run_lm(embeds, cache=cache).last_hidden_state[:, -1]
    next_embeds = model.embed_ids(model.token_logits(first).argmax(-1, keepdim=True))
    cached = model.token_logits(model.run_lm(next_embeds, cache=cache).last_hidden_state[:, -1])
    rerun_hidden = model.run_lm(torch.cat([embeds, next_embeds], 1)).last_hidden_state[:, -1]
    rerun = model.token_logits(rerun_hidden)  # (1, ret_id + 1)
    return float((cached - rerun).abs().max() / rerun.abs().max())


def check_kv_cache(model: FromageModel, prompt, cached: list[int], rerun: list[int]) -> dict:
    """Raise unless the cache's logits and greedy tokens agree with the re-run's within
    the tolerances of the backbones' dtype; return what was measured."""
    key = torch.float32 if model.lm_dtype == torch.float32 else "reduced"
    error = first_cached_step_error(model, prompt)
    # EOS may end one continuation sooner: count positions of the longer one
    same = sum(a == b for a, b in zip(cached, rerun, strict=False))
    agreement = same / max(len(cached), len(rerun), 1)
    if error > LOGIT_TOLERANCE[key] or agreement < TOKEN_AGREEMENT[key]:
        raise AssertionError(
            f"the KV cache changed generation ({model.lm_dtype}): first-step logits differ "
            f"by {error:.2e} of their scale (allowed {LOGIT_TOLERANCE[key]:.0e}), greedy "
            f"tokens agree on {agreement:.0%} (required {TOKEN_AGREEMENT[key]:.0%})"
        )
    return {"first_step_logit_error": error, "token_agreement": agreement}


def _compare(model: FromageModel, prompt, new_tokens: int, repeats: int) -> dict:
    timed_generate(model, prompt, True, 2)  # warm-up
    result = {"prompt_positions": model.embed_interleaved([prompt]).embeds.shape[1]}
    for name, use_cache in [("kv_cache", True), ("no_cache", False)]:
        first = min(timed_generate(model, prompt, use_cache, 1)[0] for _ in range(repeats))
        total, tokens = min(
            timed_generate(model, prompt, use_cache, new_tokens) for _ in range(repeats)
        )
        result[name] = {
            "tokens": len(tokens),
            "tokens_per_s": len(tokens) / total,
            "time_to_first_token_s": first,
            "token_ids": tokens,
        }
    tokens = [result[name]["token_ids"] for name in ("kv_cache", "no_cache")]
    result["kv_cache_check"] = check_kv_cache(model, prompt, *tokens)
    result["speedup"] = result["kv_cache"]["tokens_per_s"] / result["no_cache"]["tokens_per_s"]
    for name in ("kv_cache", "no_cache"):
        del result[name]["token_ids"]
    return result
