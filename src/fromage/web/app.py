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
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gradio as gr

from fromage.data.image_sources import ImageLoadError
from fromage.infer.bank import ImageBank, RetrievedImage
from fromage.infer.dialogue import Dialogue
from fromage.infer.display import retrieved_image
from fromage.infer.generation import GenerationConfig, generate, stream_generation
from fromage.infer.scoring import retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.tokens import RET_TOKEN
from fromage.web.uploads import UploadError, read_upload

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


def reply_messages(pieces, thumbnails: Thumbnails, min_score: float) -> list[dict]:
    """A reply's pieces as chat messages: text, then each retrieved image with its id and
    score, or a note where ``[RET]`` found nothing above the minimum score."""
    messages = []
    for piece in pieces:
        if isinstance(piece, str):
            messages.append({"role": "assistant", "content": piece})
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


class DemoApp:
    """The model, its bank and the handlers of the page's three tabs."""

    def __init__(
        self,
        model: FromageModel,
        bank: ImageBank | None,
        thumbnails_dir: Path,
        defaults: GenerationConfig | None = None,
    ):
        self.model, self.bank = model, bank
        self.defaults = defaults or GenerationConfig()
        self.thumbnails = Thumbnails(thumbnails_dir)

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
        dialogue.ask([*images, text] if text else images, in_bank)
        status = ""
        try:
            if note := dialogue.fit(self.model, reserve=config.max_new_tokens):
                status = f"The conversation was too long for the model: {note}."
        except ValueError as error:
            dialogue.turns.pop()
            yield messages, dialogue, f"**Not sent:** {error}", message
            return
        asked = (
            messages
            + [{"role": "user", "content": {"path": _file_path(f)}} for f in files]
            + ([{"role": "user", "content": text}] if text else [])
        )
        yield asked, dialogue, status, None
        reply = None
        try:
            for reply in stream_generation(
                self.model, dialogue.prompt(), self.bank, config, exclude_ids=dialogue.seen
            ):
                shown = reply_messages(reply.pieces, self.thumbnails, config.min_score)
                yield asked + shown, dialogue, status, None
        except Exception as error:  # a failed reply must not take the server down
            log.exception("generation failed")
            dialogue.turns.pop()
            yield messages, dialogue, f"**The model failed on this message:** {error}", message
            return
        shown = []
        if reply is not None:
            dialogue.answer(reply)
            shown = reply_messages(reply.pieces, self.thumbnails, config.min_score)
        yield asked + shown, dialogue, status or "Done.", None

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

    def caption(self, path: str | None, max_new_tokens: float) -> tuple[str, str]:
        if not path:
            return "", "Upload an image to caption."
        try:
            image = read_upload(path).image
        except UploadError as error:
            return "", f"**Not captioned:** {error}"
        config = GenerationConfig(max_new_tokens=int(max_new_tokens))
        prompt = [image, self.model.input_prompt]  # as training laid captions out
        pieces = generate(self.model, prompt, None, config).pieces
        return "".join(p for p in pieces if isinstance(p, str)).strip(), "Done."

    # ----------------------------------------------------------------- page
    def blocks(self) -> gr.Blocks:
        d = self.defaults
        with gr.Blocks(title="FROMAGe", analytics_enabled=False) as page:
            gr.Markdown(
                "# FROMAGe\nA frozen language model that reads images and answers with text "
                "and images **retrieved** from its bank."
            )
            with gr.Tab("Chat"):
                dialogue = gr.State(Dialogue())
                chatbot = gr.Chatbot(elem_id="chat", label="Conversation", height=460)
                box = gr.MultimodalTextbox(
                    elem_id="message",
                    label="Message",
                    file_count="multiple",
                    placeholder="Write a message; add images with the clip (any order, any turn)",
                )
                status = gr.Markdown(elem_id="status")
                clear = gr.Button("Clear conversation", elem_id="clear")
                with gr.Accordion("Settings", open=False):
                    settings = [
                        gr.Slider(0, 2, d.temperature, step=0.05, label="temperature (0: greedy)"),
                        gr.Slider(0.05, 1, d.top_p, step=0.05, label="top-p"),
                        gr.Slider(1, 128, d.max_new_tokens, step=1, label="max new tokens"),
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
                )
                clear.click(
                    lambda: ([], Dialogue(), "", None), None, [chatbot, dialogue, status, box]
                )
            with gr.Tab("Retrieve"):
                query = gr.Textbox(label="Describe an image", elem_id="query")
                k = gr.Slider(1, 20, 5, step=1, label="images")
                gallery = gr.Gallery(label="Top images of the bank", columns=5, elem_id="gallery")
                found = gr.Markdown()
                query.submit(self.retrieve, [query, k], [gallery, found])
            with gr.Tab("Caption"):
                picture = gr.Image(type="filepath", label="An image")
                length = gr.Slider(1, 64, 16, step=1, label="max new tokens")
                text = gr.Textbox(label="Caption", elem_id="caption")
                captioned = gr.Markdown()
                picture.change(self.caption, [picture, length], [text, captioned])
        return page


def _file_path(file) -> str:
    """Gradio hands uploads over as paths or as dicts with a ``path``."""
    return file if isinstance(file, str) else file["path"]


def launch(app: DemoApp, host: str, port: int, block: bool = True):
    """Serve ``app``; with ``block=False`` return at once (tests) and leave it running."""
    page = app.blocks().queue()
    page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(app.thumbnails.folder)],
        theme=THEME,
        quiet=True,
        footer_links=[],
    )
    return page
