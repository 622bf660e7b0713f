"""FromageModel: a frozen causal LM and a frozen image tower joined by a few trainable layers.

The architecture of docs/method.md ("Parts"), read top to bottom:

- an image enters the LM as ``k`` visual token embeddings: ``image_to_lm(pooled)``;
- a learned ``[RET]`` token is substituted on input (``embed_ids``) and scored as one
  extra logit column on output (``token_logits``), so the LM's own embedding matrix is
  never trained;
- the ``[RET]`` hidden state, mapped by ``ret_to_shared``, and the image, mapped by
  ``image_to_shared``, meet in a shared retrieval space (``retrieval_embeddings``,
  ``image_embeddings``).

``forward`` computes both training objectives from these parts (the losses themselves
are in ``objectives.py``); generation and scoring are in ``fromage.infer``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.distributed.tensor.experimental import implicit_replication
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPast

from fromage.config import ModelConfig
from fromage.model.backbones import (
    Device,
    VisionTower,
    freeze,
    load_language_model,
    load_vision_tower,
)
from fromage.model.objectives import FromageLosses, Gather, contrastive_loss, n_targets
from fromage.model.packed_attention import packed_attention_masks, why_packing_is_inexact
from fromage.model.sequences import (
    IGNORE,
    EmbeddedBatch,
    concat_pairs,
    pack_sequences,
    paired_lengths,
)
from fromage.model.tokens import add_ret_token, special_prefix_ids

log = logging.getLogger(__name__)

# One element of an interleaved prompt: text, a PIL image, or preprocessed (3, H, W) pixels.
Item = str | Image.Image | torch.Tensor
# Which strings of an interleaved prompt start with the tokenizer's BOS (``embed_interleaved``).
TEXT_PREFIXES = ("first_piece", "every_piece")


class FromageModel(nn.Module):
    """The frozen backbones plus the trainable parts of docs/method.md.

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
        inexact = why_packing_is_inexact(lm.config) if pack_sequences else None
        if inexact:
            log.warning("pack_sequences is off for this LM: %s", inexact)
        self.pack_sequences = pack_sequences and not inexact
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
        self.image_to_lm = nn.Linear(vision.dim, n_visual_tokens * d_emb)  # d_vis -> k * d_emb
        self.image_to_shared = nn.Linear(vision.dim, shared_dim)  # d_vis -> shared
        self.ret_to_shared = nn.ModuleList(  # one d_hidden -> shared map per chosen layer
            nn.Linear(self._hidden_width(layer), shared_dim) for layer in self.ret_layers
        )

        vocabulary = input_embeddings.weight[: self.ret_id].float()
        self.register_buffer("embedding_norm", vocabulary.norm(dim=-1).mean(), persistent=False)
        self.ret_embedding = nn.Parameter(vocabulary.mean(0))  # (d_emb,) the [RET] input
        self.tied_output = output_embeddings.weight is input_embeddings.weight
        self.ret_output = (
            None
            if self.tied_output
            else nn.Parameter(output_embeddings.weight[: self.ret_id].float().mean(0))
        )
        # (1,) log 1/T; not 0-dim: DeepSpeed views every parameter as bytes to broadcast it
        self.logit_scale = nn.Parameter(torch.full((1,), float(logit_scale_init)))
        self.normalize_ret_embedding()

        self.prefix_ids = special_prefix_ids(tokenizer)
        self.input_prompt = input_prompt
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
    def from_config(cls, config: ModelConfig, device: Device = None) -> FromageModel:
        """Load the configured backbones and add fresh trainable parts, all on ``device``
        (default: the CPU; random backbones are built there directly)."""
        lm, tokenizer = load_language_model(config.lm, config.dtype, device)
        model = cls(
            lm,
            tokenizer,
            load_vision_tower(config.vision, config.dtype, device),
            n_visual_tokens=config.n_visual_tokens,
            shared_dim=config.shared_dim,
            ret_layers=list(config.ret_layers),
            input_prompt=config.input_prompt,
            pack_sequences=config.pack_sequences,
        )
        model.config = config
        return model if device is None else model.to(device)

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
        if "logit_scale" in state and state["logit_scale"].dim() == 0:  # saved before (1,)
            state = {**state, "logit_scale": state["logit_scale"].reshape(1)}
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
        """Rescale ``[RET]`` to the mean norm of the frozen embeddings; call after each step.
        (Sharded, ``[RET]`` is a DTensor and the norm a plain buffer read by every rank.)"""
        with implicit_replication():
            self.ret_embedding.mul_(self.embedding_norm / self.ret_embedding.norm())

    # ----------------------------------------------------------------- images
    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features of the frozen tower, (B, d_vis), in float32."""
        dtype = next(self.vision.parameters()).dtype
        return self.vision(pixel_values.to(dtype)).float()

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d_vis) -> (B, k, d_emb): the image as k LM input embeddings."""
        return _apply(self.image_to_lm, features).unflatten(-1, (self.n_visual_tokens, -1))

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d_vis) -> L2-normalised (B, shared_dim) retrieval embeddings."""
        return F.normalize(_apply(self.image_to_shared, features), dim=-1)

    # ----------------------------------------------------------------- LM plumbing
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> LM input embeddings, the trainable ``[RET]`` vector at ``[RET]`` ids."""
        is_ret = ids == self.ret_id
        embeds = self.lm.get_input_embeddings()(ids.masked_fill(is_ret, 0))
        return torch.where(is_ret[..., None], self.ret_embedding.to(embeds.dtype), embeds)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., H) -> float32 logits (..., ret_id + 1), ``[RET]`` last."""
        lm_logits = self.lm.get_output_embeddings()(hidden)[..., : self.ret_id]  # (..., ret_id)
        ret_vector = self.ret_embedding if self.tied_output else self.ret_output
        ret_logit = hidden @ ret_vector.to(hidden.dtype)
        return torch.cat([lm_logits, ret_logit[..., None]], dim=-1).float()

    def run_lm(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
        cache=None,
        all_hidden_states: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPast:
        """One pass of the LM body (no vocabulary projection) over (B, L, d_emb) input
        embeddings; ``last_hidden_state`` is (B, L, H). ``mask`` is (B, L) padding, or a
        packed pass's 4D mask (one per layer type where some layers slide)."""
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

    def retrieval_embeddings(
        self, output: BaseModelOutputWithPast, positions: torch.Tensor
    ) -> torch.Tensor:
        """L2-normalised sum over ``ret_layers`` of ``ret_to_shared(h_layer[b, positions[b]])``."""
        rows = torch.arange(len(positions), device=positions.device)
        mapped = [
            _apply(head, _layer_state(output, layer)[rows, positions])
            for layer, head in zip(self.ret_layers, self.ret_to_shared, strict=True)
        ]
        return F.normalize(torch.stack(mapped).sum(0), dim=-1)

    @property
    def needs_all_hidden_states(self) -> bool:
        """Whether ``[RET]`` reads layers other than the last, so every state is needed."""
        return self.ret_layers != [-1]

    def ret_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the last ``[RET]`` in each row (-1 where there is none)."""
        columns = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return torch.where(ids == self.ret_id, columns, -1).amax(1)

    # ----------------------------------------------------------------- training
    def forward(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        concat_captions: bool = False,
        gather: Gather | None = None,
        lengths: Sequence[int] | None = None,
        ret_in_caption: bool = False,
    ) -> FromageLosses:
        """Both objectives of docs/method.md on a batch of image-caption pairs.

        images: (B, 3, H, W) pixels for the tower, or its (B, d_vis) pooled features
        precomputed; ids/mask: (B, L) from ``tokenize_captions``, each row ending in
        ``[RET]``. ``concat_captions`` pairs examples as ``[img_a, cap_a, img_b, cap_b]``;
        ``ret_in_caption`` keeps each caption's ``[RET]`` as an input there;
        ``gather`` contrasts against the global batch of every rank; ``lengths`` (the
        mask's row sums, known on the host at collation) spare a device-to-host sync.
        """
        features = self._features(images)  # (B, d_vis)
        lengths = mask.sum(1).tolist() if lengths is None else list(lengths)
        # image -> text: [v_1..v_k] BOS [prompt] caption, cross-entropy on the caption
        captions = self.caption_inputs(features, ids, mask, ret_input=ret_in_caption)
        extra = captions.embeds.shape[1] - ids.shape[1]  # visual tokens and prompt
        dropped = 0 if ret_in_caption else 1  # the [RET] that is no input
        caption_lengths = [extra + length - dropped for length in lengths]
        if concat_captions:
            caption_lengths = paired_lengths(caption_lengths)
            captions = concat_pairs(captions, max(caption_lengths))
        # text -> image: BOS caption [RET], cross-entropy on the caption and [RET] ...
        retrieval = self.retrieval_inputs(ids, mask)
        caption_hidden, output = self._run_both(captions, retrieval, [caption_lengths, lengths])
        # ... and InfoNCE between the [RET] state's embedding and the image's
        text_emb = self.retrieval_embeddings(output, self.ret_positions(ids))  # (B, shared)
        image_emb = self.image_embeddings(features)  # (B, shared)
        contrastive = contrastive_loss(text_emb, image_emb, self.logit_scale, gather)
        return FromageLosses(
            caption=self.mean_nll(caption_hidden, captions.labels),
            retrieval_lm=self.mean_nll(output.last_hidden_state, retrieval.labels),
            contrastive=contrastive.loss,
            text_to_image_acc=contrastive.text_to_image_acc,
            image_to_text_acc=contrastive.image_to_text_acc,
            text_embeddings=text_emb,
            image_embeddings=image_emb,
            caption_tokens=n_targets(captions.labels),
            retrieval_tokens=n_targets(retrieval.labels),
        )

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels through the tower, or (B, d_vis) features as they are."""
        if images.dim() == 4:
            return self.image_features(images)
        if images.shape[1] != self.vision.dim:
            raise ValueError(
                f"precomputed features are {images.shape[1]}-d but the vision tower's "
                f"are {self.vision.dim}-d: recompute them with this model's tower"
            )
        return images

    def caption_inputs(
        self,
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
        ids, mask, n_context = self._with_prompt(ids, mask)
        if not ret_input:
            mask = mask.masked_fill(ids == self.ret_id, 0)
        columns = torch.arange(ids.shape[1], device=ids.device)
        in_prompt = (columns >= len(self.prefix_ids)) & (columns < n_context)
        is_target = ~in_prompt & (mask == 1) & (ids != self.ret_id)
        visual = self.visual_tokens(features)  # (B, k, d_emb)
        b, k = visual.shape[:2]
        return EmbeddedBatch(
            embeds=torch.cat([visual.to(self.lm_dtype), self.embed_ids(ids)], dim=1),
            mask=torch.cat([mask.new_ones(b, k), mask], dim=1),
            labels=torch.cat(
                [ids.new_full((b, k), IGNORE), ids.masked_fill(~is_target, IGNORE)], 1
            ),
        )

    def _with_prompt(self, ids: torch.Tensor, mask: torch.Tensor):
        """Insert the training prompt after the special prefix; return ids, mask, n_context."""
        n_prefix = len(self.prefix_ids)
        if len(self.prompt_ids) == 0:
            return ids, mask, n_prefix
        prompt = self.prompt_ids.to(ids.device).expand(len(ids), -1)
        ids = torch.cat([ids[:, :n_prefix], prompt, ids[:, n_prefix:]], dim=1)
        mask = torch.cat([mask[:, :n_prefix], torch.ones_like(prompt), mask[:, n_prefix:]], dim=1)
        return ids, mask, n_prefix + prompt.shape[1]

    def retrieval_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> EmbeddedBatch:
        """``[prefix] caption [RET]``; targets are the caption tokens and ``[RET]``."""
        columns = torch.arange(ids.shape[1], device=ids.device)
        is_target = (columns >= len(self.prefix_ids)) & (mask == 1)
        return EmbeddedBatch(self.embed_ids(ids), mask, ids.masked_fill(~is_target, IGNORE))

    def mean_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the target positions of ``labels`` (B, L)."""
        return -self.token_log_likelihoods(hidden, labels).sum() / n_targets(labels)

    def _run_both(
        self, captions: EmbeddedBatch, retrieval: EmbeddedBatch, lengths: list[list[int]]
    ) -> tuple[torch.Tensor, BaseModelOutputWithPast]:
        """The caption hidden states (B', L', H) and the retrieval output: in one LM pass
        without padding when the model packs sequences, else in two padded passes."""
        if not self.pack_sequences:
            caption_hidden = self.run_lm(captions.embeds, captions.mask).last_hidden_state
            return caption_hidden, self.run_lm(
                retrieval.embeds, retrieval.mask, all_hidden_states=self.needs_all_hidden_states
            )
        packed = pack_sequences([captions, retrieval], lengths)
        output = self.run_lm(
            packed.embeds,
            packed_attention_masks(self.lm.config, packed, self.lm_dtype),
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
    def embed_interleaved(
        self, prompts: Sequence[Sequence[Item]], text_prefix: str = "first_piece"
    ) -> EmbeddedBatch:
        """Interleaved prompts -> right-padded embeddings; labels are the text token ids
        (``IGNORE`` on visual tokens and padding), so the batch can also be scored.

        Images become their k visual tokens (all images of the batch go through the tower
        in one call); strings their token embeddings. ``text_prefix`` says which strings
        get the tokenizer's special prefix (BOS, where it adds one), the two layouts of
        the paper's release (``TEXT_PREFIXES``): ``"first_piece"``, BOS once before the
        first string (its interleaved generation and scoring API); ``"every_piece"``, BOS
        before every string (its VIST evaluation: ``BOS c1 [img1] BOS c2 ... BOS c5[RET]``,
        each caption read as training read it, ``[img] BOS caption``).
        """
        if text_prefix not in TEXT_PREFIXES:
            raise ValueError(f"text_prefix must be one of {TEXT_PREFIXES}, got {text_prefix!r}")
        device = self.image_to_lm.weight.device
        images = [item for prompt in prompts for item in prompt if not isinstance(item, str)]
        if images:
            pixels = torch.stack([self._pixels(image) for image in images]).to(device)
            visual = iter(self.visual_tokens(self.image_features(pixels)).to(self.lm_dtype))
        rows, row_ids = [], []
        for number, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {number} is empty: give it some text or an image")
            pieces, piece_ids, prefix = [], [], list(self.prefix_ids)
            for item in prompt:
                if isinstance(item, str):
                    ids = torch.tensor(
                        prefix + self.tokenizer(item, add_special_tokens=False).input_ids,
                        dtype=torch.long,
                        device=device,
                    )
                    if text_prefix == "first_piece":
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


def _apply(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A trainable map on inputs cast to its weights' dtype: float32 normally, bf16 where
    DeepSpeed's bf16 mode has cast every parameter (fp32 master weights in its optimizer)."""
    return layer(x.to(layer.weight.dtype))


def _layer_state(output: BaseModelOutputWithPast, layer: int) -> torch.Tensor:
    """Hidden state of one layer; only the last is available without ``all_hidden_states``."""
    return output.last_hidden_state if output.hidden_states is None else output.hidden_states[layer]
