"""A multi-turn conversation as the model reads it, shared by ``fromage chat`` and the web demo.

Two layouts of a turn:

- ``plain``: each message read the way training read a pair (``[img] caption[RET]``),
  for small LMs that do not follow a dialogue format (the demo's 135M LM). A message
  of images alone is read alone, followed by the model's training prompt
  (``input_prompt``, e.g. "A picture of") so that the model goes on to caption it. A
  message of text is read together with the text messages just before it, joined as a
  story's captions are ("there is a diamond at the top left then it moves to ..."): a
  description the model learnt to end with ``[RET]``. A message with images and other
  text is a question about the images: the model first captions each image
  (``caption_question_images``), then reads, as text, one answered example question
  about another picture (``ANSWER_EXAMPLE``), its own captions and the question as
  ``Q: ...\nA:``. The example is what lets an LM too small to follow dialogue answer
  from what it saw; the image is not read a second time, as the demo's LM then copied
  the example's answer. Replies are not read back (training had no dialogue); the
  images they showed are still never shown again.
- ``qa``: ``Q: <text and images>\\nA:``, the layout of the authors' demo for LMs large
  enough to follow dialogue (OPT-6.7B).

In the ``qa`` layout each reply's text follows its turn, so the model sees the whole
conversation, images included. Bank images given as input or retrieved before are remembered, so they are
never shown again. When the conversation outgrows the LM's context, the oldest turns are
dropped first, then the start of the newest message is cut, and the caller is told how
much went.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from fromage.infer.bank import RetrievedImage
from fromage.infer.generation import Generation, GenerationConfig, generate
from fromage.model.fromage import FromageModel, Item

QUESTION, ANSWER = "Q: ", "\nA:"
LAYOUTS = ("plain", "qa")
# an LM this large follows the Q:/A: layout (the authors' demo: OPT-6.7B); smaller ones
# (the demo's SmolLM2-135M) answer it with a space and a newline
DIALOGUE_LM_PARAMETERS = 1_000_000_000
# One answered exchange about a picture unlike the demo's, read before a plain-layout
# question about images: with it the demo's frozen 135M LM answered each of five questions
# about 10 captions of the demo's shapes right; asked without it, it rambled.
# ``{prompt}`` is the model's caption prompt ("A picture of").
ANSWER_EXAMPLE = (
    "{prompt} a brown dog on a sandy beach.\n"
    "Q: What is in this picture?\nA: A brown dog on a sandy beach.\n"
    "Q: What colour is the dog?\nA: Brown.\n"
    "Q: Where is the dog?\nA: On a sandy beach.\n\n"
)
# a caption ends at [RET], as in training; this bounds one that does not
CAPTION = GenerationConfig(max_new_tokens=24, min_words=1, stop_at_ret=True)


def default_layout(model: FromageModel) -> str:
    """``qa`` for LMs of at least a billion parameters, ``plain`` below."""
    n = sum(p.numel() for p in model.lm.parameters())
    return "qa" if n >= DIALOGUE_LM_PARAMETERS else "plain"


@dataclass
class Dialogue:
    """The turns so far (each a list of prompt items) and the bank ids already shown.

    ``caption_prompt`` (the model's ``input_prompt``) follows a plain-layout message that
    ends with an image.
    """

    layout: str = "plain"
    caption_prompt: str = ""
    turns: list[list[Item]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    answering: bool = False  # the newest turn is a question laid out with its captions

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def ask(self, items: Sequence[Item], input_ids: Iterable[str] = ()) -> None:
        """Add a user message; ``input_ids`` are bank ids of its images (never retrieved)."""
        self.answering = False
        if self.layout == "qa":
            self.turns.append([QUESTION, *items, ANSWER])
        elif items and not isinstance(items[-1], str) and not _text(items).strip():
            self.turns.append([*items, self.caption_prompt] if self.caption_prompt else items)
        else:
            self.turns.append(list(items))
        self.seen.update(input_ids)

    @property
    def question_images(self) -> list[Item]:
        """The images of the newest message if it is a plain-layout question about them
        (images and text other than the caption prompt) not yet captioned, else []."""
        if self.layout != "plain" or not self.turns or self.answering:
            return []
        text = _text(self.turns[-1]).strip()
        if not text or text == self.caption_prompt.strip():
            return []
        return [item for item in self.turns[-1] if not isinstance(item, str)]

    def read_captions(self, captions: Sequence[str]) -> None:
        """Lay out the newest message, a question about its images, with the model's
        ``captions`` of them (see the module's docstring)."""
        question, images = _text(self.turns[-1]).strip(), self.question_images
        prompt = self.caption_prompt.strip()
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images asked about, {len(captions)} captions")
        read = [f"{prompt} {caption.strip().rstrip('.')}.\n".lstrip() for caption in captions]
        example = ANSWER_EXAMPLE.format(prompt=prompt).lstrip()
        # the images stay in the turn (earlier text is not read with it) but are not read
        self.turns[-1] = [*images, example + "".join(read) + f"{QUESTION}{question}{ANSWER}"]
        self.answering = True

    def answer(self, reply: Generation) -> None:
        """Remember the images the reply showed; in the ``qa`` layout, also append its text
        to the last turn."""
        if self.layout == "qa":
            self.turns[-1] += [p for p in reply.pieces if isinstance(p, str)] + ["\n"]
        self.seen.update(hit.id for hit in retrieved(reply.pieces))

    @property
    def asks_for_caption(self) -> bool:
        """Whether the newest plain message has images: the model is to caption them."""
        return self.layout == "plain" and bool(self.turns) and _has_image(self.turns[-1])

    def read_turns(self) -> list[list[Item]]:
        """The turns the model reads for the next reply (see the module's docstring)."""
        if self.answering:  # the question's text: the example, the captions, the question
            return [[item for item in self.turns[-1] if isinstance(item, str)]]
        if self.layout == "qa" or not self.turns or _has_image(self.turns[-1]):
            return self.turns if self.layout == "qa" else self.turns[-1:]
        start = len(self.turns)
        while start > 0 and not _has_image(self.turns[start - 1]):
            start -= 1
        return self.turns[start:]

    def prompt(self) -> list[Item]:
        """The turns the model reads as one interleaved prompt; neighbouring strings are
        joined, so each run of text is one piece (one text segment, as in training).
        Plain turns that meet in text are joined with a space, as stories' captions are."""
        items: list[Item] = []
        for turn in self.read_turns():
            for index, item in enumerate(turn):
                if not (isinstance(item, str) and items and isinstance(items[-1], str)):
                    items.append(item)
                    continue
                between = index == 0 and self.layout == "plain"
                space = (
                    " " if between and not (items[-1][-1:].isspace() or item[:1].isspace()) else ""
                )
                items[-1] += space + item
        return items

    def fit(self, model: FromageModel, reserve: int) -> str | None:
        """Shorten the conversation until it and ``reserve`` new tokens fit the LM's context.

        Returns what was cut, in words for the person chatting, or None if nothing was.
        """
        limit = model.max_positions
        if limit is None:
            return None
        budget = limit - reserve - len(model.prefix_ids)  # BOS comes once, at the start
        lengths = [sum(_positions(model, item) for item in turn) for turn in self.turns]
        dropped = 0
        while len(self.turns) > 1 and sum(lengths) > budget:
            self.turns.pop(0)
            dropped += lengths.pop(0)
        notes = [f"dropped the oldest turns ({dropped} positions)"] if dropped else []
        excess = sum(lengths) - budget
        if excess > 0:
            notes.append(self._cut_newest(model, excess))
        if not notes:
            return None
        return "; ".join(notes) + f" to fit the LM's context of {limit} positions"

    def _cut_newest(self, model: FromageModel, excess: int) -> str:
        """Cut ``excess`` tokens from the start of the newest turn's text (images stay)."""
        turn = self.turns[-1]
        cut = 0
        for index, item in enumerate(turn):
            if cut >= excess or not isinstance(item, str):
                continue
            ids = model.tokenizer(item, add_special_tokens=False).input_ids
            take = min(len(ids), excess - cut)
            turn[index] = model.tokenizer.decode(ids[take:])
            cut += take
        if cut < excess:
            raise ValueError(
                f"this message's images alone need {excess - cut} positions more than the "
                f"LM's context of {model.max_positions}: send fewer images"
            )
        return f"cut the first {cut} tokens of your message"


def caption_question_images(model: FromageModel, dialogue: Dialogue) -> list[str]:
    """If the newest message asks about its images, caption each greedily (as training
    laid captions out, up to its ``[RET]``) and lay the question out with the captions;
    returns the captions ([] when the message is no such question)."""
    prompt = [dialogue.caption_prompt] if dialogue.caption_prompt else []
    captions = [
        "".join(generate(model, [image, *prompt], None, CAPTION).pieces)
        for image in dialogue.question_images
    ]
    if captions:
        dialogue.read_captions(captions)
    return captions


def _has_image(turn: list[Item]) -> bool:
    return any(not isinstance(item, str) for item in turn)


def _text(turn: list[Item]) -> str:
    return " ".join(item for item in turn if isinstance(item, str))


def retrieved(pieces: Sequence[str | list[RetrievedImage]]) -> list[RetrievedImage]:
    """Every retrieved image of a reply, in order."""
    return [hit for piece in pieces if isinstance(piece, list) for hit in piece]


def _positions(model: FromageModel, item: Item) -> int:
    if isinstance(item, str):
        return len(model.tokenizer(item, add_special_tokens=False).input_ids)
    if isinstance(item, Image.Image) or item.dim() == 3:
        return model.n_visual_tokens
    raise TypeError(f"prompt items are str, PIL.Image or (3, H, W) tensors, got {type(item)}")
