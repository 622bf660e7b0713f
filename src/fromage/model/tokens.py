"""The ``[RET]`` token and caption tokenization, for any HF tokenizer."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

RET_TOKEN = "[RET]"


def add_ret_token(tokenizer: PreTrainedTokenizerBase, token: str = RET_TOKEN) -> int:
    """Add ``token`` once (a no-op if present), give the tokenizer a pad token, return its id.

    ``[RET]`` must be the tokenizer's last id: the model's output logits are the LM's
    columns below it plus one ``[RET]`` column, so no id may come after it.
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the release did; padding is masked anyway
    ret_id = tokenizer.convert_tokens_to_ids(token)
    if ret_id != len(tokenizer) - 1:
        raise ValueError(
            f"{token} has id {ret_id} but the tokenizer has {len(tokenizer)} tokens: "
            f"{token} must be the last token added"
        )
    return ret_id


def special_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before any text (``[BOS]`` for OPT/Llama, nothing for GPT-2)."""
    with_specials = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return (
        with_specials[: len(with_specials) - len(plain)]
        if with_specials[-len(plain) :] == plain
        else []
    )


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase, captions: list[str], ret_id: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> right-padded ``(ids, mask)``, each row ending in exactly one ``[RET]``.

    Tokenized as ``caption + "[RET]"`` with the tokenizer's usual BOS handling, truncated
    to ``max_len``; when truncation cut ``[RET]`` off, the last kept token becomes ``[RET]``.
    Padding is only as long as the longest caption in the batch.
    """
    ret_token = tokenizer.convert_ids_to_tokens(ret_id)
    texts = [caption.replace(ret_token, "") + ret_token for caption in captions]
    batch = tokenizer(
        texts,
        add_special_tokens=True,
        truncation=True,
        max_length=max_len,
        padding="longest",
        padding_side="right",
        return_tensors="pt",
    )
    ids, mask = batch.input_ids, batch.attention_mask
    last = (mask.sum(1) - 1).clamp(min=0)
    ids = ids.scatter(1, last[:, None], ret_id)
    return ids, mask
