"""The web demo: chat with images in and images out, retrieval, and captioning, in Gradio.

Gradio is what the peers (the FROMAGe and GILL releases, LLaVA) demo with: uploads,
streaming and per-browser-session state come with it, and it runs offline. Every
session keeps its own ``Dialogue`` in ``gr.State``, so two browsers never see each
other's conversation. Every handler turns bad input (not an image, too large, a
decompression bomb, an empty message, too long a conversation) into a message in the
page's status line; the server keeps serving.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gradio as gr

from fromage.data.image_sources import ImageLoadError
from fromage.infer.bank import ImageBank, RetrievedImage
from fromage.infer.dialogue import LAYOUTS, Dialogue, caption_question_images, default_layout
from fromage.infer.display import retrieved_image
from fromage.infer.generation import GenerationConfig, stream_generation
from fromage.infer.scoring import retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.tokens import RET_TOKEN
from fromage.web.uploads import MAX_UPLOAD_BYTES, UploadError, read_upload

log = logging.getLogger(__name__)
THUMBNAIL_PX = 160
# system fonts only: the page must not wait on a font server it cannot reach offline
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)


class Thumbnails:
    """PNG files of retrieved images in one folder that the server may hand to the page:
    the bank's stored thumbnail, or (old banks) one made from the image's source."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, hit: RetrievedImage) -> str | None:
        """The thumbnail file of a retrieved image, made on first use; None if unreadable."""
        target = self.folder / f"{hashlib.sha256(hit.id.encode()).hexdigest()[:24]}.png"
        if not target.exists():
            try:
                image = retrieved_image(hit)
            except ImageLoadError as error:
                log.warning("cannot show %s: %s", hit.id, error)
                return None
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            image.save(target)
        return str(target)


def caption_of(hit: RetrievedImage) -> str:
    return f"{hit.id} · score {hit.score:.2f}"


def read_as(caption: str, dialogue: Dialogue) -> str:
    """What the model made of an image it was asked about, shown before its answer."""
    return f"*Read the image as:* {dialogue.caption_prompt} {caption.strip()}".replace("  ", " ")


LAYOUT_HELP = {
    "plain": "**plain**: each message as the model was trained to read a pair: an image "
    "is followed by the training prompt, so the model captions it; a description, such as "
    "*a red circle at the top left*, makes it retrieve, read together with the "
    "descriptions just before it as one story; an image with a question, such as *What "
    "colour is the shape?*, is captioned first and the question answered from what the "
    "model saw; a reply ends at the model's first image",
    "qa": "**Q:/A:**: each message as `Q: ... A:`, for language models large enough to "
    "follow a dialogue",
}
EMPTY_REPLY = (
    "*(The model ended its reply without any text or image.)* Try the **plain** layout, "
    "an image alone (it gets the training prompt), or a short description such as "
    "*a red circle at the top left*; or raise the retrieval scale in the settings."
)


def reply_messages(pieces, thumbnails: Thumbnails, min_score: float) -> list[dict]:
    """A reply's pieces as chat messages: text, then each retrieved image with its id and
    score, or a note where ``[RET]`` found nothing above the minimum score."""
    messages = []
    for piece in pieces:
        if isinstance(piece, str):
            if piece.strip():
                messages.append({"role": "assistant", "content": piece.strip()})
        elif not piece:
            messages.append(
                {
                    "role": "assistant",
                    "content": f"*(no image in the bank scores at least {min_score:.2f})*",
                }
            )
        for hit in piece if isinstance(piece, list) else []:
            path = thumbnails.path(hit)
            if path is not None:
                messages.append(
                    {"role": "assistant", "content": {"path": path, "alt_text": caption_of(hit)}}
                )
            messages.append({"role": "assistant", "content": f"`{caption_of(hit)}`"})
    return messages


STORY = ("there is a diamond at the top left", "then it moves to the bottom right")


def bank_examples(
    bank: ImageBank | None, thumbnails: Thumbnails
) -> tuple[list[tuple[dict, str]], dict[str, str]]:
    """Messages to click that the demo model answers well: an image of the bank with the
    training prompt (a caption), a description (a retrieval) and a two-turn story; and
    the example image's bank id by the hash of its file (it is never retrieved for itself)."""
    examples = [
        ({"text": "a red circle at the top left", "files": []}, "Find: a description"),
        ({"text": STORY[0], "files": []}, "Story, turn 1"),
        ({"text": STORY[1], "files": []}, "Story, turn 2"),
    ]
    hit = next((h for h in _first_hits(bank) if h.thumbnail is not None), None)
    if hit is None or (path := thumbnails.path(hit)) is None:
        return examples, {}
    examples.insert(0, ({"text": "A picture of", "files": [path]}, "Caption: an image"))
    return examples, {hashlib.sha256(Path(path).read_bytes()).hexdigest(): hit.id}


def _first_hits(bank: ImageBank | None, n: int = 8) -> list[RetrievedImage]:
    """The first ``n`` images of the bank as hits (score 1), thumbnails included."""
    if bank is None or len(bank) == 0:
        return []
    return [
        RetrievedImage(bank.ids[i], 1.0, bank.sources[i], bank.thumbnails[i], bank.hashes[i])
        for i in range(min(n, len(bank)))
    ]


class DemoApp:
    """The model, its bank and the handlers of the page's three tabs.

    ``layout`` is how the chat lays out a conversation for the model (``plain`` or ``qa``,
    see ``fromage.infer.dialogue``); by default the one that suits the model's LM.
    ``examples`` are (message, label) pairs the page offers to click; a message is a
    ``{"text": ..., "files": [...]}`` dict as the message box holds it.
    """

    def __init__(
        self,
        model: FromageModel,
        bank: ImageBank | None,
        thumbnails_dir: Path,
        defaults: GenerationConfig | None = None,
        layout: str | None = None,
        examples: list[tuple[dict, str]] | None = None,
    ):
        self.model, self.bank = model, bank
        self.defaults = defaults or GenerationConfig()
        self.thumbnails = Thumbnails(thumbnails_dir)
        self.layout = layout or default_layout(model)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        self.examples, self._example_ids = (
            bank_examples(bank, self.thumbnails) if examples is None else (examples, {})
        )
        self.generating = 0  # replies being generated now
        self.left_early = 0  # replies stopped because the visitor left (closed the tab)
        self._lock = threading.Lock()

    def new_dialogue(self, layout: str | None = None) -> Dialogue:
        return Dialogue(layout or self.layout, caption_prompt=self.model.input_prompt)

    def settings(
        self, temperature, top_p, max_new_tokens, ret_scale, images_per_ret, min_score
    ) -> GenerationConfig:
        """The page's sliders as a ``GenerationConfig`` (sliders may hand counts as floats)."""
        return replace(
            self.defaults,
            temperature=float(temperature),
            top_p=float(top_p),
            max_new_tokens=int(max_new_tokens),
            ret_scale=float(ret_scale),
            images_per_ret=int(images_per_ret),
            min_score=float(min_score),
        )

    def _replies(self, prompt, config: GenerationConfig, exclude, first_ret_ends: bool):
        """``stream_generation``, counted in ``generating`` while it runs; with
        ``first_ret_ends`` it ends at the first ``[RET]``, where a caption ends in training.
        Gradio stops iterating when the visitor's tab closes, which ends the generation."""
        with self._lock:
            self.generating += 1
        reply = None
        try:
            for reply in stream_generation(self.model, prompt, self.bank, config, exclude):
                yield reply
                if first_ret_ends and reply.pieces and isinstance(reply.pieces[-1], list):
                    return
        except GeneratorExit:  # Gradio dropped the reply: its visitor left
            with self._lock:
                self.left_early += 1
            log.info(
                "a visitor left; the reply stopped after %d tokens",
                len(reply.token_ids) if reply else 0,
            )
            raise
        finally:
            with self._lock:
                self.generating -= 1

    # ----------------------------------------------------------------- chat
    def chat(self, message: dict, messages: list, dialogue: Dialogue, *settings) -> Iterator[tuple]:
        """Stream the reply to one message (text and images in any order)."""
        config = self.settings(*settings)
        text, files = (message or {}).get("text", "").strip(), (message or {}).get("files", [])
        if not text and not files:
            yield messages, dialogue, "Type a message or add an image first.", message
            return
        try:
            uploads = [read_upload(_file_path(f)) for f in files]
        except UploadError as error:  # keep the text; the attachments go, to be added again
            keep = {"text": text, "files": []}
            yield messages, dialogue, f"**Not sent:** {error}. Attach images only.", keep
            return
        images = [u.image for u in uploads]
        hashes = {u.sha256 for u in uploads}
        in_bank = self.bank.ids_of_hashes(hashes) if self.bank is not None else set()
        in_bank |= {self._example_ids[h] for h in hashes if h in self._example_ids}
        dialogue.ask([*images, text] if text else images, in_bank)
        asked = (
            messages
            + [{"role": "user", "content": {"path": _file_path(f)}} for f in files]
            + ([{"role": "user", "content": text}] if text else [])
        )
        if dialogue.question_images:  # a question about them: the model captions them first
            yield asked, dialogue, "Reading the image…", None
        try:
            captions = caption_question_images(self.model, dialogue)
        except Exception as error:  # a failed reply must not take the server down
            yield self._failed(messages, dialogue, message, error)
            return
        status = ""
        try:
            if note := dialogue.fit(self.model, reserve=config.max_new_tokens):
                status = f"The conversation was too long for the model: {note}."
        except ValueError as error:
            dialogue.turns.pop()
            yield messages, dialogue, f"**Not sent:** {error}", message
            return
        asked += [{"role": "assistant", "content": read_as(c, dialogue)} for c in captions]
        yield asked, dialogue, status or "Answering…", None
        reply = None
        first_ret_ends = dialogue.layout == "plain"
        if dialogue.asks_for_caption or captions:  # a caption or answer starts with words
            config = replace(config, min_words=max(config.min_words, 1))
        try:
            for reply in self._replies(dialogue.prompt(), config, dialogue.seen, first_ret_ends):
                shown = reply_messages(reply.pieces, self.thumbnails, config.min_score)
                yield asked + shown, dialogue, status or "Answering…", None
        except Exception as error:  # a failed reply must not take the server down
            yield self._failed(messages, dialogue, message, error)
            return
        shown = []
        if reply is not None:
            dialogue.answer(reply)
            shown = reply_messages(reply.pieces, self.thumbnails, config.min_score)
        if not shown:
            shown = [{"role": "assistant", "content": EMPTY_REPLY}]
            status = status or "The model gave an empty reply."
        yield asked + shown, dialogue, status or "Done.", None

    @staticmethod
    def _failed(messages: list, dialogue: Dialogue, message: dict, error: Exception) -> tuple:
        """The page as it was before ``message``, which stays in the box to send again."""
        log.exception("generation failed")
        dialogue.turns.pop()
        return messages, dialogue, f"**The model failed on this message:** {error}", message

    # ----------------------------------------------------------------- retrieval, captioning
    def retrieve(self, query: str, k: float) -> tuple[list, str]:
        if self.bank is None:
            return [], "This server has no image bank: start it with `--bank`."
        query = (query or "").strip()
        if not query:
            return [], "Type a description of the image to find."
        try:
            vector = retrieval_queries(self.model, [[query + RET_TOKEN]])
        except ValueError as error:
            return [], f"**Not searched:** {error}"
        hits = self.bank.search(vector, k=int(k))[0]
        gallery = [(self.thumbnails.path(h), caption_of(h)) for h in hits]
        return [(path, text) for path, text in gallery if path is not None], f"Top {len(hits)}."

    def caption(self, path: str | None, max_new_tokens: float) -> Iterator[tuple[str, str]]:
        """Stream the caption of an image, laid out as in training (image, training prompt),
        up to where the model ends it: ``[RET]`` (training put it after every caption),
        EOS or a newline. Without a bank ``[RET]`` cannot be generated; the caption then
        runs to EOS, a newline or the length limit."""
        if not path:
            yield "", "Upload an image to caption."
            return
        try:
            image = read_upload(path).image
        except UploadError as error:
            yield "", f"**Not captioned:** {error}"
            return
        config = replace(
            self.defaults,
            max_new_tokens=int(max_new_tokens),
            temperature=0.0,
            min_words=max(self.defaults.min_words, 1),  # a caption comes before its [RET]
        )
        prompt = [image, self.model.input_prompt]
        text = ""
        for reply in self._replies(prompt, config, (), first_ret_ends=True):
            text = "".join(p for p in reply.pieces if isinstance(p, str)).strip()
            yield text, "Captioning…"
        yield text, "Done." if text else "The model ended without a caption."

    # ----------------------------------------------------------------- page
    def blocks(self, cache_seconds: int = 3600) -> gr.Blocks:
        """The page. Gradio's copies of uploads are deleted ``cache_seconds`` after they
        were made (checked as often), so hours of uploads do not fill the disk."""
        d = self.defaults
        cache = (cache_seconds, cache_seconds)
        with gr.Blocks(title="FROMAGe", analytics_enabled=False, delete_cache=cache) as page:
            gr.Markdown(
                "# FROMAGe\nA frozen language model that reads images and answers with text "
                "and images **retrieved** from its bank."
            )
            with gr.Tab("Chat"):
                dialogue = gr.State(self.new_dialogue())
                chatbot = gr.Chatbot(elem_id="chat", label="Conversation", height=460)
                box = gr.MultimodalTextbox(
                    elem_id="message",
                    label="Message",
                    file_count="multiple",
                    file_types=["image"],
                    placeholder="Write a message; add images with the clip (any order, any turn)",
                )
                if self.examples:
                    gr.Examples(
                        [[message] for message, _ in self.examples],
                        [box],
                        label="Examples (click one, then press enter)",
                        example_labels=[label for _, label in self.examples],
                    )
                status = gr.Markdown(elem_id="status")
                layout_help = gr.Markdown(self._layout_note(self.layout), elem_id="layout-note")
                clear = gr.Button("Clear conversation", elem_id="clear")
                with gr.Accordion("Settings", open=False):
                    layout = gr.Radio(
                        [("plain", "plain"), ("Q:/A:", "qa")],
                        value=self.layout,
                        label="Layout of the conversation (changing it clears it)",
                        elem_id="layout",
                    )
                    settings = [
                        gr.Slider(0, 2, d.temperature, step=0.05, label="temperature (0: greedy)"),
                        gr.Slider(0.05, 1, d.top_p, step=0.05, label="top-p"),
                        gr.Slider(1, 512, d.max_new_tokens, step=1, label="max new tokens"),
                        gr.Slider(
                            0, 5, d.ret_scale, step=0.1, label="retrieval scale ([RET] logit x)"
                        ),
                        gr.Slider(1, 5, d.images_per_ret, step=1, label="images per [RET]"),
                        gr.Slider(-1, 1, d.min_score, step=0.05, label="minimum retrieval score"),
                    ]
                box.submit(
                    self.chat,
                    [box, chatbot, dialogue, *settings],
                    [chatbot, dialogue, status, box],
                    concurrency_id="model",
                )
                clear.click(
                    lambda choice: ([], self.new_dialogue(choice), "", None),
                    [layout],
                    [chatbot, dialogue, status, box],
                )
                layout.change(
                    lambda choice: ([], self.new_dialogue(choice), "", self._layout_note(choice)),
                    [layout],
                    [chatbot, dialogue, status, layout_help],
                )
            with gr.Tab("Retrieve"):
                query = gr.Textbox(label="Describe an image", elem_id="query")
                k = gr.Slider(1, 20, 5, step=1, label="images")
                gallery = gr.Gallery(label="Top images of the bank", columns=5, elem_id="gallery")
                found = gr.Markdown()
                query.submit(self.retrieve, [query, k], [gallery, found], concurrency_id="model")
            with gr.Tab("Caption"):
                picture = gr.Image(type="filepath", label="An image", elem_id="picture")
                length = gr.Slider(1, 64, 16, step=1, label="max new tokens")
                text = gr.Textbox(label="Caption", elem_id="caption")
                captioned = gr.Markdown(elem_id="captioned")
                picture.change(
                    self.caption, [picture, length], [text, captioned], concurrency_id="model"
                )
        return page

    def _layout_note(self, layout: str) -> str:
        chosen = " (this model's default)" if layout == self.layout else ""
        return f"Layout{chosen}: {LAYOUT_HELP[layout]}."


def _file_path(file) -> str:
    """Gradio hands uploads over as paths or as dicts with a ``path``."""
    return file if isinstance(file, str) else file["path"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(
    app: DemoApp,
    host: str,
    port: int,
    block: bool = True,
    auth: tuple[str, str] | None = None,
    concurrency: int = 2,
    max_queue: int = 32,
    cache_seconds: int = 3600,
):
    """Serve ``app``; with ``block=False`` return at once (tests) and leave it running.

    ``concurrency`` replies are generated at once; up to ``max_queue`` more wait, and a
    waiting visitor sees their place in the queue. Uploads over ``MAX_UPLOAD_BYTES`` are
    refused by Gradio before they are written to disk, and only the thumbnail folder (and
    Gradio's own upload cache) can be fetched."""
    page = app.blocks(cache_seconds).queue(
        max_size=max_queue, default_concurrency_limit=concurrency
    )
    page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(app.thumbnails.folder)],
        max_file_size=MAX_UPLOAD_BYTES,
        auth=auth,
        theme=THEME,
        quiet=True,
        footer_links=[],
    )
    return page
