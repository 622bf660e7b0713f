"""Interleaved prompts and generations as HTML, for notebooks: text inline, images as thumbnails.

A retrieved image is drawn from the thumbnail its bank stored, so a page needs neither the
image's source nor a pass over its shard; only images of old banks (no thumbnail) are
opened from their source.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import torch
from PIL import Image

from fromage.data.image_sources import ImageLoadError, open_image
from fromage.infer.bank import RetrievedImage
from fromage.infer.thumbnails import decode_thumbnail

Piece = str | Image.Image | torch.Tensor | list[RetrievedImage]


def interleaved_html(pieces: Sequence[Piece], thumbnail: int = 96) -> str:
    """One HTML block: strings as text, PIL images and retrieved bank images as thumbnails
    (with id and score underneath). Pixel tensors are shown as a placeholder."""
    parts = []
    for piece in pieces:
        if isinstance(piece, str):
            parts.append(f"<span>{html.escape(piece)}</span>")
        elif isinstance(piece, Image.Image):
            parts.append(_figure(piece, "input", thumbnail))
        elif isinstance(piece, list):
            parts += [_retrieved(hit, thumbnail) for hit in piece]
        else:
            parts.append("<span>[image tensor]</span>")
    return (
        '<div style="display:flex;flex-wrap:wrap;align-items:center;gap:6px">'
        + "".join(parts)
        + "</div>"
    )


def retrieved_image(hit: RetrievedImage) -> Image.Image:
    """What to show for a retrieved image: the bank's stored thumbnail, or (old banks) the
    image opened from its source; raises ``ImageLoadError`` when neither can be had."""
    if hit.thumbnail is not None:
        return decode_thumbnail(hit.thumbnail)
    return open_image(hit.source or hit.id)


def _retrieved(hit: RetrievedImage, thumbnail: int) -> str:
    caption = f"{hit.id} ({hit.score:.2f})"
    try:
        return _figure(retrieved_image(hit), caption, thumbnail)
    except ImageLoadError:
        return f"<span>[{html.escape(caption)}: not loadable]</span>"


def _figure(image: Image.Image, caption: str, size: int) -> str:
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return (
        f'<figure style="margin:0;text-align:center"><img src="data:image/png;base64,{data}"/>'
        f'<figcaption style="font-size:70%">{html.escape(caption)}</figcaption></figure>'
    )
