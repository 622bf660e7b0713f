"""FromageModel: a frozen causal LM and a frozen image tower joined by a few trainable layers.

The method is specified in DESIGN.md. In short: images enter the LM as ``k`` visual
token embeddings (``image_to_lm``); a learned ``[RET]`` token's hidden state, mapped by
``ret_to_shared``, is contrasted with ``image_to_shared`` of the image, so the LM can
answer with retrieved images. The LM's own embedding matrix is never trained: ``[RET]``
is a separate parameter substituted on input and appended as one logit column on output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPast

from fromage.model.backbones import VisionTower, freeze, load_language_model, load_vision_tower
from fromage.model.objectives import Gather, contrastive_loss
from fromage.model.sequences import (
    IGNORE,
    EmbeddedBatch,
    concat_pairs,
    pack_sequences,
    paired_lengths,
)
from fromage.model.tokens import add_ret_token, special_prefix_ids

if TYPE_CHECKING:
    from fromage.config import ModelConfig

# One element of an interleaved prompt: text, a PIL image, or preprocessed (3, H, W) pixels.
Item = str | Image.Image | torch.Tensor


@dataclass
class FromageLosses:
    caption: torch.Tensor  # CE on caption tokens, image -> text
    retrieval_lm: torch.Tensor  # CE on caption tokens incl. [RET], text only
    contrastive: torch.Tensor  # InfoNCE between [RET] and image embeddings
    text_to_image_acc: torch.Tensor
    image_to_text_acc: torch.Tensor
    text_embeddings: torch.Tensor  # (B, shared_dim), normalised [RET] embeddings
    image_embeddings: torch.Tensor  # (B, shared_dim), normalised image embeddings

    def total(self, caption_weight: float = 1.0, retrieval_weight: float = 1.0) -> torch.Tensor:
        return caption_weight * self.caption + retrieval_weight * (
            self.retrieval_lm + self.contrastive
        )


class FromageModel(nn.Module):
    """The frozen backbones plus the trainable parts of DESIGN.md.

    Args:
        lm: any causal LM from transformers (frozen here).
        tokenizer: its tokenizer; ``[RET]`` is added to it.
        vision: a ``VisionTower`` (frozen here).
        n_visual_tokens: k, the visual token embeddings per image.
        shared_dim: width of the retrieval space.
        ret_layers: LM hidden-state layers (indices into ``hidden_states``) whose
            ``[RET]`` states are mapped and summed into the retrieval embedding.
        input_prompt: text placed between the visual tokens and the caption in training.
        pack_sequences: run both objectives' sequences in one padding-free LM pass
            (packed rows, positions restarting per sequence); off, two padded passes.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vision: VisionTower,
        n_visual_tokens: int = 1,
        shared_dim: int = 256,
        ret_layers: Sequence[int] = (-1,),
        input_prompt: str = "",
        logit_scale_init: float = math.log(1 / 0.07),
        pack_sequences: bool = True,
    ):
        super().__init__()
        self.pack_sequences = pack_sequences
        self.lm = freeze(lm)
        self.vision = freeze(vision)
        self.tokenizer = tokenizer
        self.ret_id = add_ret_token(tokenizer)
        self.n_visual_tokens = n_visual_tokens
        self.ret_layers = list(ret_layers)

        input_embeddings = lm.get_input_embeddings()
        output_embeddings = lm.get_output_embeddings()
        if self.ret_id > input_embeddings.num_embeddings:
            raise ValueError(
                f"tokenizer has {self.ret_id} tokens before [RET] but the LM embeds only "
                f"{input_embeddings.num_embeddings}: tokenizer and LM do not match"
            )
        d_emb = input_embeddings.embedding_dim
        self.image_to_lm = nn.Linear(vision.dim, n_visual_tokens * d_emb)
        self.image_to_shared = nn.Linear(vision.dim, shared_dim)
        self.ret_to_shared = nn.ModuleList(
            nn.Linear(self._hidden_width(layer), shared_dim) for layer in self.ret_layers
        )

        vocabulary = input_embeddings.weight[: self.ret_id].float()
        self.register_buffer("embedding_norm", vocabulary.norm(dim=-1).mean(), persistent=False)
        self.ret_embedding = nn.Parameter(vocabulary.mean(0))
        self.tied_output = output_embeddings.weight is input_embeddings.weight
        self.ret_output = (
            None
            if self.tied_output
            else nn.Parameter(output_embeddings.weight[: self.ret_id].float().mean(0))
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.normalize_ret_embedding()

        self.prefix_ids = special_prefix_ids(tokenizer)
        self.register_buffer(
            "prompt_ids",
            torch.tensor(
                tokenizer(input_prompt, add_special_tokens=False).input_ids, dtype=torch.long
            ),
            persistent=False,
        )

    # Set by ``from_config``: names the backbones when the model is saved.
    config: ModelConfig | None = None

    @classmethod
    def from_config(cls, config: ModelConfig) -> FromageModel:
        """Load the configured backbones and add fresh trainable parts."""
        lm, tokenizer = load_language_model(config.lm, config.dtype)
        model = cls(
            lm,
            tokenizer,
            load_vision_tower(config.vision, config.dtype),
            n_visual_tokens=config.n_visual_tokens,
            shared_dim=config.shared_dim,
            ret_layers=list(config.ret_layers),
            input_prompt=config.input_prompt,
            pack_sequences=config.pack_sequences,
        )
        model.config = config
        return model

    @classmethod
    def from_pretrained(cls, path, overrides: Sequence[str] = ()) -> FromageModel:
        """A model saved by ``save_pretrained``; see ``fromage.pretrained.load_pretrained``."""
        from fromage.model.pretrained import load_pretrained

        return load_pretrained(path, list(overrides))

    def save_pretrained(self, path, dtype: str | None = None, config: ModelConfig | None = None):
        """Save the trainable weights and the backbones' config (``config`` for models that
        were not built by ``from_config``); see ``fromage.model.pretrained``."""
        from fromage.model.pretrained import save_pretrained

        if (config or self.config) is None:
            raise ValueError("pass the ModelConfig that names this model's backbones")
        return save_pretrained(self, path, config or self.config, dtype)

    # ----------------------------------------------------------------- structure
    def _hidden_width(self, layer: int) -> int:
        n_layers = self.lm.config.get_text_config().num_hidden_layers
        if layer in (-1, n_layers):  # the final state, after the LM's last norm/projection
            return self.lm.get_output_embeddings().in_features
        return self.lm.config.get_text_config().hidden_size

    def train(self, mode: bool = True) -> FromageModel:
        """Train the projections; the frozen backbones stay in eval mode (no dropout)."""
        super().train(mode)
        self.lm.eval()
        self.vision.eval()
        return self

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained weights: megabytes even for the OPT-6.7B model."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load trained weights, refusing (naming the keys) any that do not fit this model."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [
            (k, tuple(state[k].shape), tuple(v.shape))
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source} does not fit this model (another LM or vision tower?): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"wrong shape (saved, expected) {wrong[:5]}"
            )
        self.load_state_dict(state, strict=False)

    @torch.no_grad()
    def normalize_ret_embedding(self) -> None:
        """Rescale ``[RET]`` to the mean norm of the frozen embeddings; call after each step."""
        self.ret_embedding.mul_(self.embedding_norm / self.ret_embedding.norm())

    # ----------------------------------------------------------------- images
    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features of the frozen tower, (B, d_vis), in float32."""
        dtype = next(self.vision.parameters()).dtype
        return self.vision(pixel_values.to(dtype)).float()

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d_vis) -> (B, k, d_emb): the image as k LM input embeddings."""
        return self.image_to_lm(features).unflatten(-1, (self.n_visual_tokens, -1))

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d_vis) -> L2-normalised (B, shared_dim) retrieval embeddings."""
        return F.normalize(self.image_to_shared(features), dim=-1)

    # ----------------------------------------------------------------- LM plumbing
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> LM input embeddings, the trainable ``[RET]`` vector at ``[RET]`` ids."""
        is_ret = ids == self.ret_id
        embeds = self.lm.get_input_embeddings()(ids.masked_fill(is_ret, 0))
        return torch.where(is_ret[..., None], self.ret_embedding.to(embeds.dtype), embeds)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> float32 logits over the tokenizer's ids, ``[RET]`` last."""
        lm_logits = self.lm.get_output_embeddings()(hidden)[..., : self.ret_id]
        ret_vector = self.ret_embedding if self.tied_output else self.ret_output
        ret_logit = hidden @ ret_vector.to(hidden.dtype)
        return torch.cat([lm_logits, ret_logit[..., None]], dim=-1).float()

    def run_lm(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache=None,
        all_hidden_states: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPast:
        """One pass of the LM body (no vocabulary projection) over input embeddings."""
        return self.lm.base_model(
            inputs_embeds=embeds.to(self.lm_dtype),
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=all_hidden_states,
        )

    def token_log_likelihoods(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, L) log p(labels[:, t] | ..t-1), 0 where not a target; logits only at targets."""
        targets = labels[:, 1:]
        is_target = targets != IGNORE
        logits = self.token_logits(hidden[:, :-1][is_target])
        picked = logits.log_softmax(-1).gather(1, targets[is_target][:, None])[:, 0]
        return torch.zeros_like(targets, dtype=picked.dtype).masked_scatter(is_target, picked)

    def mean_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the target positions of ``labels``."""
        return -self.token_log_likelihoods(hidden, labels).sum() / (labels[:, 1:] != IGNORE).sum()

    def retrieval_embeddings(
        self, output: BaseModelOutputWithPast, positions: torch.Tensor
    ) -> torch.Tensor:
        """L2-normalised sum over ``ret_layers`` of ``ret_to_shared(h_layer[b, positions[b]])``."""
        rows = torch.arange(len(positions), device=positions.device)
        mapped = [
            head(_layer_state(output, layer)[rows, positions].float())
            for layer, head in zip(self.ret_layers, self.ret_to_shared, strict=True)
        ]
        return F.normalize(torch.stack(mapped).sum(0), dim=-1)

    @property
    def needs_all_hidden_states(self) -> bool:
        """Whether ``[RET]`` reads layers other than the last, so every state is needed."""
        return self.ret_layers != [-1]

    # ----------------------------------------------------------------- training
    def _with_prompt(self, ids: torch.Tensor, mask: torch.Tensor):
        """Insert the training prompt after the special prefix; return ids, mask, n_context."""
        n_prefix = len(self.prefix_ids)
        if len(self.prompt_ids) == 0:
            return ids, mask, n_prefix
        prompt = self.prompt_ids.to(ids.device).expand(len(ids), -1)
        ids = torch.cat([ids[:, :n_prefix], prompt, ids[:, n_prefix:]], dim=1)
        mask = torch.cat([mask[:, :n_prefix], torch.ones_like(prompt), mask[:, n_prefix:]], dim=1)
        return ids, mask, n_prefix + prompt.shape[1]

    def caption_batch(
        self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> EmbeddedBatch:
        """``[v_1..v_k] [prefix] [prompt] caption [RET]``; targets are the caption tokens only."""
        ids, mask, n_context = self._with_prompt(ids, mask)
        columns = torch.arange(ids.shape[1], device=ids.device)
        is_target = (columns >= n_context) & (mask == 1) & (ids != self.ret_id)
        visual = self.visual_tokens(features)
        b, k = visual.shape[:2]
        return EmbeddedBatch(
            embeds=torch.cat([visual.to(self.lm_dtype), self.embed_ids(ids)], dim=1),
            mask=torch.cat([mask.new_ones(b, k), mask], dim=1),
            labels=torch.cat(
                [ids.new_full((b, k), IGNORE), ids.masked_fill(~is_target, IGNORE)], 1
            ),
        )

    def retrieval_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> EmbeddedBatch:
        """``[prefix] caption [RET]``; targets are the caption tokens and ``[RET]``."""
        columns = torch.arange(ids.shape[1], device=ids.device)
        is_target = (columns >= len(self.prefix_ids)) & (mask == 1)
        return EmbeddedBatch(self.embed_ids(ids), mask, ids.masked_fill(~is_target, IGNORE))

    def ret_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the last ``[RET]`` in each row (-1 where there is none)."""
        columns = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return torch.where(ids == self.ret_id, columns, -1).amax(1)

    def forward(
        self,
        features: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        concat_captions: bool = False,
        gather: Gather | None = None,
        lengths: Sequence[int] | None = None,
    ) -> FromageLosses:
        """Both objectives for a batch of (image features, tokenized caption) pairs.

        ``ids``/``mask`` come from ``tokenize_captions`` (each row ends in ``[RET]``);
        ``concat_captions`` pairs examples as ``[img_a, cap_a, img_b, cap_b]``.
        ``lengths`` (the mask's row sums, known on the host at collation) spare the
        step a device-to-host sync.
        """
        lengths = mask.sum(1).tolist() if lengths is None else list(lengths)
        captions = self.caption_batch(features, ids, mask)
        extra = captions.embeds.shape[1] - ids.shape[1]  # visual tokens and prompt
        caption_lengths = [extra + length for length in lengths]
        if concat_captions:
            caption_lengths = paired_lengths(caption_lengths)
            captions = concat_pairs(captions, max(caption_lengths))
        retrieval = self.retrieval_batch(ids, mask)
        if self.pack_sequences:
            caption_hidden, output = self._packed_pass(
                captions, retrieval, [caption_lengths, lengths]
            )
        else:
            caption_hidden = self.run_lm(captions.embeds, captions.mask).last_hidden_state
            output = self.run_lm(
                retrieval.embeds, mask, all_hidden_states=self.needs_all_hidden_states
            )
        text_emb = self.retrieval_embeddings(output, self.ret_positions(ids))
        image_emb = self.image_embeddings(features)
        contrastive = contrastive_loss(text_emb, image_emb, self.logit_scale, gather)
        return FromageLosses(
            caption=self.mean_nll(caption_hidden, captions.labels),
            retrieval_lm=self.mean_nll(output.last_hidden_state, retrieval.labels),
            contrastive=contrastive.loss,
            text_to_image_acc=contrastive.text_to_image_acc,
            image_to_text_acc=contrastive.image_to_text_acc,
            text_embeddings=text_emb,
            image_embeddings=image_emb,
        )

    def _packed_pass(
        self, captions: EmbeddedBatch, retrieval: EmbeddedBatch, lengths: list[list[int]]
    ) -> tuple[torch.Tensor, BaseModelOutputWithPast]:
        """Both objectives' sequences in one LM pass without padding; returns the caption
        hidden states and the retrieval output, laid out as the padded batches were."""
        packed = pack_sequences([captions, retrieval], lengths)
        output = self.run_lm(
            packed.embeds,
            packed.attention_mask.to(self.lm_dtype),
            position_ids=packed.position_ids,
            all_hidden_states=self.needs_all_hidden_states,
        )
        caption_hidden, retrieval_hidden = packed.unpack(output.last_hidden_state)
        layers = None
        if output.hidden_states is not None:
            layers = tuple(packed.unpack(h)[1] for h in output.hidden_states)
        return caption_hidden, BaseModelOutputWithPast(
            last_hidden_state=retrieval_hidden, hidden_states=layers
        )

    # ----------------------------------------------------------------- inference
    def embed_interleaved(self, prompts: Sequence[Sequence[Item]]) -> EmbeddedBatch:
        """Interleaved prompts -> right-padded embeddings; labels are the text token ids
        (``IGNORE`` on visual tokens and padding), so the batch can also be scored.

        Images become their k visual tokens (all images of the batch go through the tower
        in one call); strings their token embeddings. The special prefix (BOS) comes once,
        with the first string, which is where training put it (``[img] BOS caption``).
        """
        device = self.image_to_lm.weight.device
        images = [item for prompt in prompts for item in prompt if not isinstance(item, str)]
        if images:
            pixels = torch.stack([self._pixels(image) for image in images]).to(device)
            visual = iter(self.visual_tokens(self.image_features(pixels)).to(self.lm_dtype))
        rows, row_ids = [], []
        for prompt in prompts:
            pieces, piece_ids, prefix = [], [], list(self.prefix_ids)
            for item in prompt:
                if isinstance(item, str):
                    ids = torch.tensor(
                        prefix + self.tokenizer(item, add_special_tokens=False).input_ids,
                        dtype=torch.long,
                        device=device,
                    )
                    prefix = []
                    pieces.append(self.embed_ids(ids))
                    piece_ids.append(ids)
                else:
                    pieces.append(next(visual))
                    piece_ids.append(torch.full((self.n_visual_tokens,), IGNORE, device=device))
            rows.append(torch.cat(pieces))
            row_ids.append(torch.cat(piece_ids))
        self.check_fits(max(len(r) for r in rows))
        lengths = torch.tensor([len(r) for r in rows], device=device)
        embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        ids = nn.utils.rnn.pad_sequence(row_ids, batch_first=True, padding_value=IGNORE)
        mask = (torch.arange(embeds.shape[1], device=device) < lengths[:, None]).long()
        return EmbeddedBatch(embeds, mask, ids)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the LM reads (``max_position_embeddings``), if it says."""
        return getattr(self.lm.config.get_text_config(), "max_position_embeddings", None)

    def check_fits(self, positions: int, what: str = "prompt") -> None:
        """Refuse an input longer than the LM's context, instead of failing deep inside it."""
        if self.max_positions is not None and positions > self.max_positions:
            raise ValueError(
                f"{what} is {positions} positions (visual tokens included) but the LM reads "
                f"at most {self.max_positions}: shorten it"
            )

    def _pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self.vision.preprocess(image)
        if isinstance(image, torch.Tensor) and image.dim() == 3:
            return image
        raise TypeError(
            f"prompt items must be str, PIL.Image or (3, H, W) pixel tensors, got {type(image).__name__}"
        )

    @torch.no_grad()
    def retrieval_queries(self, prompts: Sequence[Sequence[Item]]) -> torch.Tensor:
        """Interleaved prompts, each ending in ``[RET]`` -> normalised (B, shared_dim) queries.

        This is contextual retrieval: the ``[RET]`` state sees every image and caption before it.
        """
        batch = self.embed_interleaved(prompts)
        last = batch.mask.sum(1) - 1
        if not (batch.labels.gather(1, last[:, None]) == self.ret_id).all():
            raise ValueError("every retrieval prompt must end with [RET]")
        output = self.run_lm(
            batch.embeds, batch.mask, all_hidden_states=self.needs_all_hidden_states
        )
        return self.retrieval_embeddings(output, last)

    @torch.no_grad()
    def log_likelihood(self, context: Sequence[Item], continuations: Sequence[str]) -> torch.Tensor:
        """Summed log-probability of each continuation given the interleaved context, (n,).

        The context runs once; its KV cache is shared by all continuations, which then
        run as one batch (VisDial: 100 candidate answers per round).
        """
        prompt = self.embed_interleaved([context])
        n = len(continuations)
        tokenized = self.tokenizer(
            list(continuations),
            add_special_tokens=False,
            padding="longest",
            padding_side="right",
            return_tensors="pt",
        ).to(prompt.embeds.device)
        self.check_fits(prompt.embeds.shape[1] + tokenized.input_ids.shape[1], "context + answer")
        cache = DynamicCache(config=self.lm.config)
        context_last = self.run_lm(prompt.embeds, prompt.mask, cache=cache).last_hidden_state[
            :, -1:
        ]
        cache.batch_repeat_interleave(n)
        mask = torch.cat([prompt.mask.expand(n, -1), tokenized.attention_mask], 1)
        hidden = self.run_lm(
            self.embed_ids(tokenized.input_ids), mask, cache=cache
        ).last_hidden_state
        labels = tokenized.input_ids.masked_fill(tokenized.attention_mask == 0, IGNORE)
        return self.token_log_likelihoods(
            torch.cat([context_last.expand(n, -1, -1), hidden], 1),
            torch.cat([labels.new_full((n, 1), IGNORE), labels], 1),
        ).sum(1)

    def generate(self, prompt: Sequence[Item], **kwargs):
        """Interleaved generation; see ``fromage.generation.generate`` for the options."""
        from fromage.infer.generation import generate

        return generate(self, prompt, **kwargs)


def _layer_state(output: BaseModelOutputWithPast, layer: int) -> torch.Tensor:
    """Hidden state of one layer; only the last is available without ``all_hidden_states``."""
    return output.last_hidden_state if output.hidden_states is None else output.hidden_states[layer]
