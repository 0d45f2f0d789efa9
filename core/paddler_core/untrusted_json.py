"""JSON from untrusted peers (clients, WebSocket messages), parsed with limits.

``json.loads`` alone accepts things that later break a request in surprising
places: ``NaN``/``Infinity`` and ``1e999`` (not JSON, and served back as
``Infinity``), integers of thousands of digits (Python refuses to convert more
than 4,300 digits with a ``ValueError``), nesting a thousand levels deep (a
``RecursionError`` here or in the next ``json.dumps``), and lone UTF-16
surrogates such as ``"\\ud800"`` (valid JSON escapes, but not Unicode text: any
later ``.encode()`` of them raises). :func:`parse_untrusted_json` turns each of
these into an :class:`UntrustedJsonError` with a message for people.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted (real requests use < 10)."""
MAX_INTEGER_DIGITS = 40
"""Longest integer literal accepted (2**128 has 39 digits)."""

_SURROGATE = re.compile("[\ud800-\udfff]")


class UntrustedJsonError(ValueError):
    """The text is not JSON we accept; ``str()`` says why, for people."""


def _reject_constant(name: str) -> Any:
    raise UntrustedJsonError(f"{name} is not a JSON number; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedJsonError(f"the number {text[:40]} is out of range (it overflows a 64-bit float)")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise UntrustedJsonError(f"an integer with {digits} digits is too large (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def surrogate_position(text: str) -> int | None:
    """Index of the first lone UTF-16 surrogate in ``text``, or None."""
    if text.isascii():
        return None
    match = _SURROGATE.search(text)
    return match.start() if match else None


def check_text(value: Any, where: str = "body") -> None:
    """Raise UntrustedJsonError if ``value`` nests deeper than MAX_DEPTH or holds a
    string (or key) that is not valid Unicode text."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item, where)
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise UntrustedJsonError(f"the {where} nests arrays/objects deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, inner in item.items():
                    _check_string(key, where)
                    stack.append((inner, depth + 1))
            else:
                stack.extend((inner, depth + 1) for inner in item)


def _check_string(text: str, where: str) -> None:
    position = surrogate_position(text)
    if position is not None:
        code = f"\\u{ord(text[position]):04x}"
        raise UntrustedJsonError(
            f"the {where} holds a lone UTF-16 surrogate ({code}) at character {position} of a string; "
            "strings must be valid Unicode text"
        )


def parse_untrusted_json(raw: bytes | bytearray | str, where: str = "body") -> Any:
    """The JSON value of ``raw`` (bytes must be UTF-8); raises UntrustedJsonError."""
    if isinstance(raw, bytes | bytearray):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UntrustedJsonError(f"the {where} is not UTF-8 text: {err}") from None
    else:
        text = raw
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except UntrustedJsonError:
        raise
    except json.JSONDecodeError as err:
        raise UntrustedJsonError(f"the {where} is not valid JSON: {err}") from None
    except RecursionError:
        raise UntrustedJsonError(f"the {where} nests arrays/objects deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # e.g. a number the hooks refused in another form
        raise UntrustedJsonError(f"the {where} is not acceptable JSON: {err}") from None
    check_text(value, where)
    return value
