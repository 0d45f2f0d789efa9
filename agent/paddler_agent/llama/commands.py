"""What the event loop asks of the decode thread: one typed command per request event.

The engine posts them (``DecodeWorker.submit`` / ``cancel``); the decode thread takes them
all at the top of a turn, in order. A conversation's prompt travels inside its
:class:`Generate` (rendered beforehand: templates never run on the decode thread).
"""

from __future__ import annotations

from dataclasses import dataclass

from paddler_agent.images import DecodedImage
from paddler_core.protocol import EmbedMessage, GenerateMessage


@dataclass(frozen=True)
class Generate:
    message: GenerateMessage
    rendered: str | None = None
    """A conversation's prompt, rendered on the event loop (None for a raw prompt)."""
    images: list[DecodedImage] | None = None
    """The conversation's decoded images, in the order of the projector's markers in ``rendered``."""


@dataclass(frozen=True)
class Embed:
    message: EmbedMessage


@dataclass(frozen=True)
class Cancel:
    request_id: str


Command = Generate | Embed | Cancel
