"""The two training objectives of docs/method.md, every step, for a batch of image-caption pairs.

Captioning (image -> text): ``[v_1..v_k] [BOS] [prompt] caption``, next-token
cross-entropy on BOS and the caption tokens (as the paper's release trained them). Retrieval (text -> image): ``caption [RET]``, cross-entropy
on the caption tokens and ``[RET]``, plus symmetric InfoNCE between the ``[RET]`` state's
embedding and the image's. Both objectives' sequences run in one padding-free LM pass
when the model packs sequences (the same losses as two padded passes, faster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPast

from fromage.model.fromage import FromageModel
from fromage.model.sequences import (
    IGNORE,
    EmbeddedBatch,
    concat_pairs,
    pack_sequences,
    paired_lengths,
)

# Maps a local (B, D) tensor to the (world * B, D) global batch; the local rows must keep
# their gradient (e.g. all-gather without grad, then put the local tensor back in place).
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    text_to_image_acc: torch.Tensor
    image_to_text_acc: torch.Tensor


@dataclass
class FromageLosses:
    caption: torch.Tensor  # CE on caption tokens, image -> text
    retrieval_lm: torch.Tensor  # CE on caption tokens incl. [RET], text only
    contrastive: torch.Tensor  # InfoNCE between [RET] and image embeddings
    text_to_image_acc: torch.Tensor
    image_to_text_acc: torch.Tensor
    text_embeddings: torch.Tensor  # (B, shared_dim), normalised [RET] embeddings
    image_embeddings: torch.Tensor  # (B, shared_dim), normalised image embeddings
    # target tokens that ``caption`` / ``retrieval_lm`` average over (0-dim): a
    # data-parallel step weights each rank's mean by them (train.distributed)
    caption_tokens: torch.Tensor | None = None
    retrieval_tokens: torch.Tensor | None = None

    def total(self, caption_weight: float = 1.0, retrieval_weight: float = 1.0) -> torch.Tensor:
        """cap_scale * CE_caption + ret_scale * (CE_retrieval + InfoNCE)."""
        return caption_weight * self.caption + retrieval_weight * (
            self.retrieval_lm + self.contrastive
        )


def contrastive_loss(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Gather | None = None,
) -> ContrastiveOutput:
    """InfoNCE over L2-normalised (B, D) embeddings; row i of each is a positive pair.

    With ``gather`` every rank contrasts against the global batch, as the release did;
    the gather decides which rows carry gradient (see ``gather_with_global_grad``).
    """
    if gather is not None:
        text_emb, image_emb = gather(text_emb), gather(image_emb)
    logits_per_image = logit_scale.exp() * image_emb @ text_emb.T  # (N, N)
    logits_per_text = logits_per_image.T
    target = torch.arange(len(text_emb), device=text_emb.device)
    loss = (
        F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_image, target)
    ) / 2
    return ContrastiveOutput(
        loss=loss,
        text_to_image_acc=(logits_per_text.argmax(1) == target).float().mean().detach(),
        image_to_text_acc=(logits_per_image.argmax(1) == target).float().mean().detach(),
    )


def caption_inputs(
    model: FromageModel,
    features: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    ret_input: bool = False,
) -> EmbeddedBatch:
    """``[v_1..v_k] [prefix] [prompt] caption``; targets are the prefix (BOS) and the
    caption tokens, as the paper's release laid captions out: the final ``[RET]`` is
    masked out (no input: a second caption concatenated by ``concat_pairs`` follows the
    first caption's last word) and the prompt is never a target. ``ret_input`` keeps
    the ``[RET]`` as an input (never a target), a separator between concatenated pairs.

    features (B, d_vis), ids/mask (B, L) with one ``[RET]`` per row -> embeds
    (B, k + L', d_emb), whose mask holds one position fewer per row than ``mask``
    unless ``ret_input``.
    """
    ids, mask, n_context = _with_prompt(model, ids, mask)
    if not ret_input:
        mask = mask.masked_fill(ids == model.ret_id, 0)
    columns = torch.arange(ids.shape[1], device=ids.device)
    in_prompt = (columns >= len(model.prefix_ids)) & (columns < n_context)
    is_target = ~in_prompt & (mask == 1) & (ids != model.ret_id)
    visual = model.visual_tokens(features)  # (B, k, d_emb)
    b, k = visual.shape[:2]
    return EmbeddedBatch(
        embeds=torch.cat([visual.to(model.lm_dtype), model.embed_ids(ids)], dim=1),
        mask=torch.cat([mask.new_ones(b, k), mask], dim=1),
        labels=torch.cat([ids.new_full((b, k), IGNORE), ids.masked_fill(~is_target, IGNORE)], 1),
    )


def _with_prompt(model: FromageModel, ids: torch.Tensor, mask: torch.Tensor):
    """Insert the training prompt after the special prefix; return ids, mask, n_context."""
    n_prefix = len(model.prefix_ids)
    if len(model.prompt_ids) == 0:
        return ids, mask, n_prefix
    prompt = model.prompt_ids.to(ids.device).expand(len(ids), -1)
    ids = torch.cat([ids[:, :n_prefix], prompt, ids[:, n_prefix:]], dim=1)
    mask = torch.cat([mask[:, :n_prefix], torch.ones_like(prompt), mask[:, n_prefix:]], dim=1)
    return ids, mask, n_prefix + prompt.shape[1]


def retrieval_inputs(model: FromageModel, ids: torch.Tensor, mask: torch.Tensor) -> EmbeddedBatch:
    """``[prefix] caption [RET]``; targets are the caption tokens and ``[RET]``."""
    columns = torch.arange(ids.shape[1], device=ids.device)
    is_target = (columns >= len(model.prefix_ids)) & (mask == 1)
    return EmbeddedBatch(model.embed_ids(ids), mask, ids.masked_fill(~is_target, IGNORE))


def n_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets in ``labels`` (B, L): the count ``mean_nll`` divides by (0-dim)."""
    return (labels[:, 1:] != IGNORE).sum()


def mean_nll(model: FromageModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions of ``labels`` (B, L)."""
    return -model.token_log_likelihoods(hidden, labels).sum() / n_targets(labels)


def fromage_losses(
    model: FromageModel,
    features: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    concat_captions: bool = False,
    gather: Gather | None = None,
    lengths: Sequence[int] | None = None,
    ret_in_caption: bool = False,
) -> FromageLosses:
    """Both objectives for (image features (B, d_vis), tokenized captions (B, L)) pairs.

    ``ids``/``mask`` come from ``tokenize_captions`` (each row ends in ``[RET]``);
    ``concat_captions`` pairs examples as ``[img_a, cap_a, img_b, cap_b]``;
    ``ret_in_caption`` keeps each caption's ``[RET]`` as an input there (see
    ``caption_inputs``).
    ``lengths`` (the mask's row sums, known on the host at collation) spare the step a
    device-to-host sync.
    """
    lengths = mask.sum(1).tolist() if lengths is None else list(lengths)
    captions = caption_inputs(model, features, ids, mask, ret_input=ret_in_caption)
    extra = captions.embeds.shape[1] - ids.shape[1]  # visual tokens and prompt
    dropped = 0 if ret_in_caption else 1  # the [RET] that is no input
    caption_lengths = [extra + length - dropped for length in lengths]
    if concat_captions:
        caption_lengths = paired_lengths(caption_lengths)
        captions = concat_pairs(captions, max(caption_lengths))
    retrieval = retrieval_inputs(model, ids, mask)
    if model.pack_sequences:
        caption_hidden, output = _packed_pass(
            model, captions, retrieval, [caption_lengths, lengths]
        )
    else:
        caption_hidden = model.run_lm(captions.embeds, captions.mask).last_hidden_state
        output = model.run_lm(
            retrieval.embeds, mask, all_hidden_states=model.needs_all_hidden_states
        )
    text_emb = model.retrieval_embeddings(output, model.ret_positions(ids))  # (B, shared)
    image_emb = model.image_embeddings(features)  # (B, shared)
    contrastive = contrastive_loss(text_emb, image_emb, model.logit_scale, gather)
    return FromageLosses(
        caption=mean_nll(model, caption_hidden, captions.labels),
        retrieval_lm=mean_nll(model, output.last_hidden_state, retrieval.labels),
        contrastive=contrastive.loss,
        text_to_image_acc=contrastive.text_to_image_acc,
        image_to_text_acc=contrastive.image_to_text_acc,
        text_embeddings=text_emb,
        image_embeddings=image_emb,
        caption_tokens=n_targets(captions.labels),
        retrieval_tokens=n_targets(retrieval.labels),
    )


def _packed_pass(
    model: FromageModel,
    captions: EmbeddedBatch,
    retrieval: EmbeddedBatch,
    lengths: list[list[int]],
) -> tuple[torch.Tensor, BaseModelOutputWithPast]:
    """Both objectives' sequences in one LM pass without padding; returns the caption
    hidden states and the retrieval output, laid out as the padded batches were."""
    packed = pack_sequences([captions, retrieval], lengths)
    output = model.run_lm(
        packed.embeds,
        packed.attention_mask.to(model.lm_dtype),
        position_ids=packed.position_ids,
        all_hidden_states=model.needs_all_hidden_states,
    )
    caption_hidden, retrieval_hidden = packed.unpack(output.last_hidden_state)
    layers = None
    if output.hidden_states is not None:
        layers = tuple(packed.unpack(h)[1] for h in output.hidden_states)
    return caption_hidden, BaseModelOutputWithPast(
        last_hidden_state=retrieval_hidden, hidden_states=layers
    )
