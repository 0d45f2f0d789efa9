"""Images of conversation requests, decoded for the multimodal projector (Pillow; no
llama.cpp here).

A request's image parts arrive as ``data:image/<type>;base64,<data>`` URIs (the
balancer refuses remote URLs, malformed URIs and invalid base64 before they reach an
agent). Here they become RGB pixels: decoded, checked against a pixel budget before
the pixels are allocated (a small file may declare a huge picture: a decompression
bomb), and shrunk so the longer side fits the desired state's
``image_resize_to_fit`` (Paddler's field) before the projector sees them.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from paddler_core.inference import ConversationMessage, GenerationError, ImageUrlContentPart, TextContentPart

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Largest picture (width x height) decoded, whatever ``image_resize_to_fit`` says: its
RGB pixels take 192 MiB. A larger one is refused before decoding."""
# decode_image checks the declared size itself, with a clearer message (Pillow's own
# check would refuse first, naming only a pixel count).
Image.MAX_IMAGE_PIXELS = None
IMAGE_DECODING_FAILED = GenerationError.IMAGE_DECODING_FAILED
"""Paddler's GeneratedToken error variant for an image that cannot be used."""


class ImageError(Exception):
    """An image part that cannot be used; ``kind`` is the Paddler error variant."""

    def __init__(self, message: str, kind: GenerationError = IMAGE_DECODING_FAILED) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """RGB pixels, row by row (3 bytes a pixel)."""

    width: int
    height: int
    rgb: bytes


def fit_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """``(width, height)`` scaled so the longer side is at most ``longest`` (aspect ratio
    kept, never enlarged, at least one pixel a side)."""
    side = max(width, height)
    if side <= longest:
        return width, height
    scale = longest / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(url: str, resize_to_fit: int, *, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """The RGB pixels of a ``data:image/...;base64,`` URI; raises ImageError."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError("malformed image data URI; expected data:image/<type>;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data URI is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageError(f"the image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(
                    f"the image is {width}x{height} pixels ({width * height} in all); "
                    f"the largest accepted is {max_pixels} pixels"
                )
            image.draft("RGB", fit_size(width, height, resize_to_fit))  # JPEG: decode at a smaller scale
            rgb = image.convert("RGB")
            size = fit_size(rgb.width, rgb.height, resize_to_fit)
            if size != rgb.size:
                rgb = rgb.resize(size, Image.Resampling.BICUBIC)
            return DecodedImage(rgb.width, rgb.height, rgb.tobytes())
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image cannot be decoded: {e}") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        raise ImageError(f"the image cannot be decoded ({type(e).__name__}: {e})") from None


def image_urls(messages: Sequence[ConversationMessage]) -> list[str]:
    """The data URIs of the image parts of ``messages``, in order."""
    return [
        part.image_url.url
        for message in messages
        if isinstance(message.content, list)
        for part in message.content
        if isinstance(part, ImageUrlContentPart)
    ]


def with_image_markers(messages: Sequence[ConversationMessage], marker: str) -> list[ConversationMessage]:
    """``messages`` with every image part replaced by the text ``marker`` (where the
    projector's tokenizer puts the image), so chat templates render text only."""
    out: list[ConversationMessage] = []
    for message in messages:
        if isinstance(message.content, list) and any(isinstance(p, ImageUrlContentPart) for p in message.content):
            parts = [TextContentPart(text=marker) if isinstance(p, ImageUrlContentPart) else p for p in message.content]
            message = message.model_copy(update={"content": parts})
        out.append(message)
    return out


def decode_images(urls: Sequence[str], resize_to_fit: int) -> list[DecodedImage]:
    """Every image of a request, decoded; raises ImageError naming the failing one."""
    images: list[DecodedImage] = []
    for index, url in enumerate(urls):
        try:
            images.append(decode_image(url, resize_to_fit))
        except ImageError as e:
            raise ImageError(f"image {index}: {e.message}", e.kind) from None
    return images
