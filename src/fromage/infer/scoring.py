"""Scoring with a trained model: contextual retrieval queries and answer log-likelihoods."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from fromage.model.fromage import FromageModel, Item
from fromage.model.sequences import IGNORE


@torch.no_grad()
def retrieval_queries(
    model: FromageModel, prompts: Sequence[Sequence[Item]], text_prefix: str = "first_piece"
) -> torch.Tensor:
    """Interleaved prompts, each ending in ``[RET]`` -> normalised (B, shared_dim) queries.

    This is contextual retrieval: the ``[RET]`` state sees every image and caption before it.
    ``text_prefix``: where BOS goes (``FromageModel.embed_interleaved``); the paper's VIST
    evaluation put it before every caption (``"every_piece"``).
    """
    batch = model.embed_interleaved(prompts, text_prefix)
    last = batch.mask.sum(1) - 1  # (B,) position of each row's final token
    if not (batch.labels.gather(1, last[:, None]) == model.ret_id).all():
        raise ValueError("every retrieval prompt must end with [RET]")
    output = model.run_lm(batch.embeds, batch.mask, all_hidden_states=model.needs_all_hidden_states)
    return model.retrieval_embeddings(output, last)


@torch.no_grad()
def log_likelihood(
    model: FromageModel,
    context: Sequence[Item],
    continuations: Sequence[str],
    text_prefix: str = "first_piece",
) -> torch.Tensor:
    """Summed log-probability of each continuation given the interleaved context, (n,).

    The context runs once; its KV cache is shared by all continuations, which then
    run as one batch (VisDial: 100 candidate answers per round). ``text_prefix`` lays out
    the context (``FromageModel.embed_interleaved``); continuations get no BOS.
    """
    prompt = model.embed_interleaved([context], text_prefix)
    n = len(continuations)
    tokenized = model.tokenizer(
        list(continuations),
        add_special_tokens=False,
        padding="longest",
        padding_side="right",
        return_tensors="pt",
    ).to(prompt.embeds.device)
    model.check_fits(prompt.embeds.shape[1] + tokenized.input_ids.shape[1], "context + answer")
    cache = DynamicCache(config=model.lm.config)
    context_output = model.run_lm(prompt.embeds, prompt.mask, cache=cache)
    context_last = context_output.last_hidden_state[:, -1:]  # (1, 1, H): predicts token 1
    cache.batch_repeat_interleave(n)
    mask = torch.cat([prompt.mask.expand(n, -1), tokenized.attention_mask], 1)
    hidden = model.run_lm(
        model.embed_ids(tokenized.input_ids), mask, cache=cache
    ).last_hidden_state  # (n, T, H)
    labels = tokenized.input_ids.masked_fill(tokenized.attention_mask == 0, IGNORE)
    return model.token_log_likelihoods(
        torch.cat([context_last.expand(n, -1, -1), hidden], 1),
        torch.cat([labels.new_full((n, 1), IGNORE), labels], 1),
    ).sum(1)
