"""Decoding of request images for the projector (agent/paddler_agent/images.py)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from paddler_agent.images import (
    ImageError,
    decode_image,
    decode_images,
    fit_size,
    image_urls,
    with_image_markers,
)
from paddler_core.inference import ConversationMessage


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def declared_png(width: int, height: int) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("size", "longest", "expected"),
    [
        ((4000, 3000), 1024, (1024, 768)),
        ((3000, 4000), 1024, (768, 1024)),
        ((100, 50), 1024, (100, 50)),  # never enlarged
        ((1024, 1024), 1024, (1024, 1024)),
        ((5000, 1), 100, (100, 1)),  # at least one pixel a side
    ],
)
def test_fit_size_scales_the_longer_side_down_to_fit(
    size: tuple[int, int], longest: int, expected: tuple[int, int]
) -> None:
    assert fit_size(*size, longest) == expected


def test_large_image_is_shrunk_to_fit_and_becomes_rgb() -> None:
    decoded = decode_image(data_uri(Image.new("RGBA", (800, 400), (255, 0, 0, 128))), 200)
    assert (decoded.width, decoded.height) == (200, 100)
    assert len(decoded.rgb) == 200 * 100 * 3
    assert decoded.rgb[:3] == bytes([255, 0, 0])


def test_small_jpeg_and_grayscale_images_keep_their_size() -> None:
    jpeg = decode_image(data_uri(Image.new("RGB", (64, 48), (0, 0, 255)), "JPEG"), 1024)
    gray = decode_image(data_uri(Image.new("L", (10, 20), 128)), 1024)
    assert (jpeg.width, jpeg.height) == (64, 48)
    assert (gray.width, gray.height, len(gray.rgb)) == (10, 20, 600)


def test_image_declaring_more_pixels_than_the_budget_is_refused_before_decoding() -> None:
    with pytest.raises(ImageError) as error:
        decode_image(declared_png(100_000, 100_000), 1024)
    assert error.value.kind == "ImageDecodingFailed"
    assert "100000x100000" in error.value.message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64," + base64.b64encode(b"plain text").decode(), "cannot be decoded"),
        (declared_png(8, 8), "cannot be decoded"),  # a header, then truncated pixel data
        ("data:image/png;base64,@@@", "not valid base64"),
        ("http://example.com/cat.png", "malformed image data URI"),
    ],
)
def test_unusable_image_is_refused_with_a_clear_reason(url: str, reason: str) -> None:
    with pytest.raises(ImageError) as error:
        decode_image(url, 1024)
    assert reason in error.value.message


def test_decode_images_names_the_failing_image() -> None:
    good = data_uri(Image.new("RGB", (4, 4)))
    with pytest.raises(ImageError) as error:
        decode_images([good, "data:image/png;base64,AAAA"], 1024)
    assert error.value.message.startswith("image 1:")


def test_image_parts_become_markers_in_order() -> None:
    message = ConversationMessage.model_validate(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": " with "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}},
            ],
        }
    )
    plain = ConversationMessage(role="assistant", content="ok")
    assert image_urls([message, plain]) == ["data:image/png;base64,AAAA", "data:image/png;base64,BBBB"]
    marked = with_image_markers([message, plain], "<IMG>")
    assert marked[0].text() == "Compare <IMG> with <IMG>"
    assert marked[1] is plain
