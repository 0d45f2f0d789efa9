"""Parsing untrusted JSON and framing agent messages (core, no I/O)."""

from __future__ import annotations

import json

import pytest

from paddler_core.inference import response_payload_problem
from paddler_core.protocol import BATCH_FRAME_CHARS, batch_frames, encode_message
from paddler_core.untrusted_json import UntrustedJsonError, parse_untrusted_json


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": Infinity}', "Infinity is not a JSON number"),
        ('{"a": 1e999}', "1e999 is out of range"),
        ('{"a": ' + "7" * 5000 + "}", "5000 digits is too large"),
        ("[" * 100 + "]" * 100, "deeper than 64 levels"),
        ("[" * 5000 + "]" * 5000, "deeper than 64 levels"),
        ('{"a": "\\ud800"}', "lone UTF-16 surrogate (\\ud800) at character 0"),
        ('{"\\udfff": 1}', "lone UTF-16 surrogate"),
        ('{"a": ', "is not valid JSON"),
    ],
)
def test_refuses_what_later_code_cannot_handle(text: str, expected: str) -> None:
    with pytest.raises(UntrustedJsonError) as raised:
        parse_untrusted_json(text)
    assert expected in str(raised.value)


def test_refuses_bytes_that_are_not_utf8() -> None:
    with pytest.raises(UntrustedJsonError, match="not UTF-8"):
        parse_untrusted_json(b'{"a": "\xff"}')


def test_accepts_real_unicode_and_pairs_of_surrogates() -> None:
    assert parse_untrusted_json('{"a": "\\ud83d\\ude00 é", "n": [1, 2.5, -3]}') == {"a": "😀 é", "n": [1, 2.5, -3]}


def test_messages_keep_utf8_and_escape_lone_surrogates() -> None:
    assert encode_message({"p": "é"}) == '{"p": "é"}'
    escaped = encode_message({"p": "a\ud800"})
    assert escaped.isascii()
    assert json.loads(escaped) == {"p": "a\ud800"}


def test_frames_stay_under_the_batch_size_and_keep_every_message() -> None:
    messages = [encode_message({"i": i, "t": "x" * 100_000}) for i in range(40)]
    frames = batch_frames(messages)
    assert all(len(f) <= BATCH_FRAME_CHARS + 2 for f in frames if f.startswith("["))
    decoded = [m for f in frames for m in (json.loads(f) if f.startswith("[") else [json.loads(f)])]
    assert [m["i"] for m in decoded] == list(range(40))


@pytest.mark.parametrize(
    "payload",
    [
        {"GeneratedToken": 5},
        {"GeneratedToken": {"ContentToken": 5}},
        {"Bogus": 1},
        [1],
        "Whatever",
        {"Embedding": {"Embedding": {"embedding": ["x"], "source_document_id": "d"}}},
    ],
)
def test_invalid_agent_payloads_are_named(payload: object) -> None:
    assert response_payload_problem(payload) is not None


@pytest.mark.parametrize(
    "payload",
    [
        {"GeneratedToken": {"ContentToken": "hi"}},
        {"GeneratedToken": {"Done": {"usage": {}}}},
        {"GeneratedToken": {"ChatTemplateError": "x"}},
        {"Embedding": "Done"},
        "Timeout",
        {"Embedding": {"Embedding": {"embedding": [0.5, 1], "source_document_id": "d"}}},
    ],
)
def test_valid_agent_payloads_pass(payload: object) -> None:
    assert response_payload_problem(payload) is None
