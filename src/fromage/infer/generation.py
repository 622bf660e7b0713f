"""Interleaved generation: text with ``[RET]``-triggered image retrieval, on the KV cache."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from fromage.infer.bank import ImageBank, RetrievedImage
from fromage.model.fromage import FromageModel, Item


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt; the ``help`` of each field is the CLI's and the web demo's."""

    max_new_tokens: int = field(default=32, metadata={"help": "length limit of a reply"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy decoding"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    ret_scale: float = field(
        default=1.0, metadata={"help": "multiplies the [RET] logit: >1 retrieves more"}
    )
    min_words: int = field(
        default=0, metadata={"help": "generated tokens before [RET] may be produced"}
    )
    images_per_ret: int = field(default=1, metadata={"help": "images shown for each [RET]"})
    min_score: float = field(
        default=-1.0,
        metadata={"help": "cosine score below which a [RET] shows no image (-1: always show)"},
    )
    stop_at_newline: bool = field(default=True, metadata={"help": "stop at a newline"})
    stop_at_ret: bool = field(
        default=False,
        metadata={"help": "end at the first [RET], retrieving nothing (where captions end)"},
    )
    use_cache: bool = field(
        default=True, metadata={"help": "KV cache (off: re-run the prefix, the reference)"}
    )

    def __post_init__(self):
        """Refuse settings no generation can use, by name (the CLI's --options too)."""
        rules = {
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "temperature": (self.temperature >= 0, ">= 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "min_words": (self.min_words >= 0, ">= 0"),
            "images_per_ret": (self.images_per_ret >= 1, ">= 1"),
        }
        for name, (valid, wanted) in rules.items():
            if not valid:
                raise ValueError(f"{name}={getattr(self, name)}: it must be {wanted}")


@dataclass
class Generation:
    """``pieces`` alternates text and lists of retrieved images, in generation order.

    A list is what one ``[RET]`` retrieved; it is empty when no bank image scored at least
    ``GenerationConfig.min_score``.
    """

    pieces: list[str | list[RetrievedImage]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def set_text(self, text: str) -> None:
        """Make ``text`` the text after the last retrieval (it grows token by token)."""
        if self.pieces and isinstance(self.pieces[-1], str):
            self.pieces[-1] = text
        elif text:
            self.pieces.append(text)


class ScaleTokenLogit(LogitsProcessor):
    """Multiply one token's logit by a factor (the release's ``ret_scale_factor``)."""

    def __init__(self, token_id: int, factor: float):
        self.token_id, self.factor = token_id, factor

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.token_id] *= self.factor
        return scores


class _LMSteps:
    """Feeds new input embeddings to the LM and returns the output at the last position.

    With the KV cache only the new positions are run; without it the whole sequence is
    re-run each step (the slow reference the cache is checked and benchmarked against).
    """

    def __init__(self, model: FromageModel, use_cache: bool, all_hidden_states: bool):
        self.model, self.all_hidden_states = model, all_hidden_states
        self.cache = DynamicCache(config=model.lm.config) if use_cache else None
        self.sequence: torch.Tensor | None = None

    def __call__(self, new_embeds: torch.Tensor):
        if self.cache is None:
            self.sequence = (
                new_embeds if self.sequence is None else torch.cat([self.sequence, new_embeds], 1)
            )
            new_embeds = self.sequence
        return self.model.run_lm(
            new_embeds, cache=self.cache, all_hidden_states=self.all_hidden_states
        )


def _logits_processors(
    model: FromageModel, bank: ImageBank | None, config: GenerationConfig
) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if bank is None and not config.stop_at_ret:  # nothing to retrieve from: text only
        processors.append(SuppressTokensLogitsProcessor([model.ret_id], device="cpu"))
    else:
        processors.append(ScaleTokenLogit(model.ret_id, config.ret_scale))
        processors.append(MinNewTokensLengthLogitsProcessor(0, config.min_words, model.ret_id))
    if config.temperature > 0:
        processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_p < 1:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


def generate(
    model: FromageModel,
    prompt: Sequence[Item],
    bank: ImageBank | None = None,
    config: GenerationConfig = GenerationConfig(),
    exclude_ids: Collection[str] = (),
    generator: torch.Generator | None = None,
    text_prefix: str = "first_piece",
) -> Generation:
    """Continue an interleaved prompt with text, retrieving images wherever ``[RET]`` comes;
    the whole reply at once (``stream_generation`` yields it as it grows)."""
    last = deque(
        stream_generation(model, prompt, bank, config, exclude_ids, generator, text_prefix),
        maxlen=1,
    )
    return last[0] if last else Generation()


@torch.no_grad()
def stream_generation(
    model: FromageModel,
    prompt: Sequence[Item],
    bank: ImageBank | None = None,
    config: GenerationConfig = GenerationConfig(),
    exclude_ids: Collection[str] = (),
    generator: torch.Generator | None = None,
    text_prefix: str = "first_piece",
) -> Iterator[Generation]:
    """Continue an interleaved prompt, yielding the growing ``Generation`` after each token.

    Greedy when ``config.temperature`` is 0, else temperature / top-p sampling.
    ``ret_scale`` multiplies the ``[RET]`` logit; ``[RET]`` is forbidden during the first
    ``min_words`` generated tokens (the release counted tokens). Stops at EOS or (unless
    ``stop_at_newline`` is off) a newline. Each ``[RET]`` is embedded from its own hidden
    state, as in training, and its top ``images_per_ret`` bank images scoring at least
    ``min_score`` are inserted, never one shown before or in ``exclude_ids``. Without a
    bank, ``[RET]`` is suppressed, unless ``stop_at_ret`` makes it the end. The same object is yielded each time, updated in place.
    ``text_prefix`` says where BOS goes (``FromageModel.embed_interleaved``); the default,
    once before the first string, is the paper's release's interleaved generation.
    """
    tokenizer = model.tokenizer
    processors = _logits_processors(model, bank, config)
    step = _LMSteps(model, config.use_cache, all_hidden_states=model.needs_all_hidden_states)
    prompt_embeds = model.embed_interleaved([prompt], text_prefix).embeds
    max_new_tokens = config.max_new_tokens
    if model.max_positions is not None:  # stop where the LM's context ends
        max_new_tokens = min(max_new_tokens, model.max_positions - prompt_embeds.shape[1])
    output = step(prompt_embeds)
    result, text_ids, shown = Generation(), [], set(exclude_ids)
    generated = torch.empty(1, 0, dtype=torch.long, device=model.image_to_lm.weight.device)

    for _ in range(max_new_tokens):
        scores = processors(generated, model.token_logits(output.last_hidden_state[:, -1]))
        if config.temperature > 0:
            next_id = torch.multinomial(scores.softmax(-1), 1, generator=generator)
        else:
            next_id = scores.argmax(-1, keepdim=True)
        token = int(next_id)
        if (
            token == tokenizer.eos_token_id
            or (config.stop_at_newline and "\n" in tokenizer.decode([token]))
            or (config.stop_at_ret and token == model.ret_id)
        ):
            break
        generated = torch.cat([generated, next_id], dim=1)
        result.token_ids.append(token)
        output = step(model.embed_ids(next_id))
        if token != model.ret_id:
            text_ids.append(token)
            result.set_text(tokenizer.decode(text_ids, skip_special_tokens=True))
            yield result
            continue
        position = torch.tensor([output.last_hidden_state.shape[1] - 1], device=generated.device)
        query = model.retrieval_embeddings(output, position)
        hits = bank.search(query, config.images_per_ret, exclude=shown)[0]
        images = [hit for hit in hits if hit.score >= config.min_score]
        shown.update(image.id for image in images)
        result.pieces.append(images)
        text_ids = []
        yield result


@torch.no_grad()
def greedy_captions(model: FromageModel, images: Sequence[Item], max_new_tokens: int) -> list[str]:
    """Greedy text-only captions of many images at once, each read as training laid
    captions out (``[img] [prefix] [prompt] caption``), up to EOS or a newline.

    ``generate`` continues one interleaved prompt; here every prompt has the same length,
    so the whole batch runs on one KV cache without padding: a held-out set in seconds.
    """
    # the string adds the prefix (BOS) and the training prompt, as training laid them out
    prompts = model.embed_interleaved([[image, model.input_prompt] for image in images])
    step = _LMSteps(model, use_cache=True, all_hidden_states=False)
    output = step(prompts.embeds)
    tokens = []
    for _ in range(max_new_tokens):
        logits = model.token_logits(output.last_hidden_state[:, -1])  # (B, ret_id + 1)
        next_ids = logits[:, : model.ret_id].argmax(-1, keepdim=True)  # (B, 1), never [RET]
        tokens.append(next_ids)
        output = step(model.embed_ids(next_ids))
    captions = []
    for row in torch.cat(tokens, 1).tolist():  # (B, max_new_tokens)
        if model.tokenizer.eos_token_id in row:
            row = row[: row.index(model.tokenizer.eos_token_id)]
        captions.append(model.tokenizer.decode(row, skip_special_tokens=True).split("\n")[0])
    return captions
