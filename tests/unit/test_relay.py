"""The request runners' pure helpers, and relay.forward through every encoder (a table:
what each transport sends for the same batches)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from paddler_balancer.openai.errors import OpenAIError
from paddler_balancer.openai.events import Accumulated
from paddler_balancer.openai.responses_output import ResponseHeader, ResponsesStream
from paddler_balancer.openai.responses_request import ResponsesRequest
from paddler_balancer.openai.stream import SSE_DONE, ChatRenderer, SseEncoder, TextRenderer, sse
from paddler_balancer.relay import (
    EMBEDDING_DONE,
    NO_EMBEDDINGS_PRODUCED,
    Batch,
    NdjsonEncoder,
    Runner,
    WebSocketEncoder,
    embedding_end,
    forward,
    part_payloads,
    split_evenly,
)
from paddler_balancer.streams import InferenceFailure

EMBEDDING = {"Embedding": {"Embedding": {"embedding": [1.0], "source_document_id": "a"}}}
ERROR = {"Embedding": {"Error": "context full"}}
OVERSIZED = {"Embedding": {"DocumentExceedsBatchSize": {"document_tokens": 9, "n_batch": 4, "source_document_id": "a"}}}


@pytest.mark.parametrize(
    ("batch", "forwarded"),
    [
        ([(EMBEDDING, False), (EMBEDDING_DONE, True)], [(EMBEDDING, False)]),
        ([(EMBEDDING, False), (ERROR, True)], [(EMBEDDING, False), (ERROR, True)]),
        ([(ERROR, True)], [(ERROR, True)]),
        ([(EMBEDDING_DONE, True)], []),
        ([(OVERSIZED, False), (NO_EMBEDDINGS_PRODUCED, False), (EMBEDDING_DONE, True)], [(OVERSIZED, False)]),
    ],
)
def test_part_payloads_forward_each_payload_once_and_drop_the_parts_done(
    batch: list[tuple[Any, bool]], forwarded: list[tuple[Any, bool]]
) -> None:
    assert part_payloads(batch) == forwarded


@pytest.mark.parametrize(
    ("produced", "end"),
    [
        (True, [(EMBEDDING_DONE, True)]),
        (False, [(NO_EMBEDDINGS_PRODUCED, False), (EMBEDDING_DONE, True)]),
    ],
)
def test_a_batch_without_embeddings_ends_with_no_embeddings_produced_then_done(
    produced: bool, end: list[tuple[Any, bool]]
) -> None:
    assert embedding_end(produced) == end


@pytest.mark.parametrize(
    ("items", "parts", "sizes"),
    [(list(range(6)), 2, [3, 3]), (list(range(7)), 3, [3, 2, 2]), (list(range(2)), 5, [1, 1]), ([1], 1, [1])],
)
def test_split_evenly(items: list[int], parts: int, sizes: list[int]) -> None:
    chunks = split_evenly(items, parts)
    assert [len(c) for c in chunks] == sizes
    assert [x for c in chunks for x in c] == items


# ---- relay.forward through each encoder ------------------------------------------------------

HI = {"GeneratedToken": {"ContentToken": "Hi"}}
THERE = {"GeneratedToken": {"ContentToken": " there"}}
DONE = {"GeneratedToken": {"Done": {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}}}
GRAMMAR_ERROR = {"GeneratedToken": {"GrammarSyntaxError": "bad grammar"}}
ITEM_TIMEOUT = InferenceFailure(504, "no token", "item_timeout")
BUFFER_FULL = InferenceFailure(503, "buffer full", "buffer_full")


class MemorySink:
    """What a transport would have sent, in order (``open`` marks the headers)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def open(self) -> None:
        self.sent.append("<open>")

    async def write(self, frames: list[Any]) -> None:
        if frames:  # bytes: one HTTP write; str: WebSocket messages, one per frame
            self.sent.append(b"".join(frames) if isinstance(frames[0], bytes) else frames)

    async def close(self) -> None:
        self.sent.append("<close>")


def runner_of(batches: list[Batch], failure: InferenceFailure | None, closed: list[bool]) -> Runner:
    async def run() -> Runner:
        try:
            for batch in batches:
                yield batch
            if failure is not None:
                raise failure
        finally:
            closed.append(True)

    return run()


def ndjson(request_id: str, payloads: list[Any], agent: str | None = "a1") -> bytes:
    return b"".join(
        (
            json.dumps(
                {"Response": {"request_id": request_id, "response": p, **({"generated_by": agent} if agent else {})}}
            )
            + "\n"
        ).encode()
        for p in payloads
    )


def message(request_id: str, payload: Any, agent: str | None = "a1") -> str:
    return ndjson(request_id, [payload], agent).decode().removesuffix("\n")


def chat_sse(*chunks: tuple[dict[str, Any] | None, str | None]) -> bytes:
    return b"".join(
        sse({"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m", "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
        for delta, finish in chunks
    )  # fmt: skip


def text_sse(text: str, finish: str | None) -> bytes:
    return sse({"id": "t1", "object": "text_completion", "created": 7, "model": "m", "system_fingerprint": None,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})  # fmt: skip


def chat_encoder() -> SseEncoder:
    return SseEncoder(ChatRenderer("c1", "m", 7, False, 50, [], Accumulated()))


def text_encoder() -> SseEncoder:
    return SseEncoder(TextRenderer("t1", "m", 7, False, 50, Accumulated()))


NDJSON_ERROR_LINE = b'{"Error": {"request_id": "r1", "error": {"code": 504, "description": "no token"}}}\n'

CASES: list[tuple[str, Callable[[], Any], list[Batch], InferenceFailure | None, list[Any]]] = [
    (
        "ndjson streams one line per payload",
        lambda: NdjsonEncoder("r1"),
        [("a1", [(HI, False)]), ("a1", [(THERE, False), (DONE, True)])],
        None,
        ["<open>", ndjson("r1", [HI]), ndjson("r1", [THERE, DONE]), "<close>"],
    ),
    (
        "ndjson ends with an error line when the runner fails mid-stream",
        lambda: NdjsonEncoder("r1"),
        [("a1", [(HI, False)])],
        ITEM_TIMEOUT,
        ["<open>", ndjson("r1", [HI]), NDJSON_ERROR_LINE, "<close>"],
    ),
    (
        "websocket sends one message per payload",
        lambda: WebSocketEncoder("r1"),
        [("a1", [(HI, False), (DONE, True)])],
        None,
        ["<open>", [message("r1", HI), message("r1", DONE)], "<close>"],
    ),
    (
        "websocket answers an item timeout mid-stream with Paddler's Timeout response",
        lambda: WebSocketEncoder("r1"),
        [("a1", [(HI, False)])],
        ITEM_TIMEOUT,
        ["<open>", [message("r1", HI)], [message("r1", "Timeout", agent=None)], "<close>"],
    ),
    (
        "chat sse opens with the role, streams deltas, ends with a finish chunk and [DONE]",
        chat_encoder,
        [("a1", [(HI, False)]), ("a1", [(DONE, True)])],
        None,
        [
            "<open>",
            chat_sse(({"role": "assistant", "content": ""}, None), ({"content": "Hi"}, None)),
            chat_sse(({}, "stop")) + SSE_DONE,
            "<close>",
        ],
    ),
    (
        "chat sse ends with an error chunk and [DONE] when the runner fails mid-stream",
        chat_encoder,
        [("a1", [(HI, False)])],
        ITEM_TIMEOUT,
        [
            "<open>",
            chat_sse(({"role": "assistant", "content": ""}, None), ({"content": "Hi"}, None)),
            sse(OpenAIError(504, "no token", code="item_timeout").body()) + SSE_DONE,
            "<close>",
        ],
    ),
    (
        "chat sse stops at an agent error after output, without reading further",
        chat_encoder,
        [("a1", [(HI, False), (GRAMMAR_ERROR, True)]), ("a1", [(THERE, False)])],
        None,
        [
            "<open>",
            chat_sse(({"role": "assistant", "content": ""}, None), ({"content": "Hi"}, None)),
            sse(OpenAIError(400, "GrammarSyntaxError: bad grammar", code="grammar_syntax_error").body()) + SSE_DONE,
            "<close>",
        ],
    ),
    (
        "text sse streams text chunks and a finish chunk",
        text_encoder,
        [("a1", [(HI, False), (DONE, True)])],
        None,
        [
            "<open>",
            text_sse("Hi", None),
            text_sse("", "stop") + SSE_DONE,
            "<close>",
        ],
    ),
]


@pytest.mark.parametrize(
    ("make_encoder", "batches", "failure", "sent"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_forward_sends_each_encoders_frames(
    make_encoder: Callable[[], Any], batches: list[Batch], failure: InferenceFailure | None, sent: list[Any]
) -> None:
    sink, closed = MemorySink(), list[bool]()
    await forward(runner_of(batches, failure, closed), make_encoder(), sink)
    assert sink.sent == sent
    assert closed == [True]


@pytest.mark.parametrize(
    "make_encoder", [lambda: NdjsonEncoder("r1"), lambda: WebSocketEncoder("r1"), chat_encoder, text_encoder]
)
async def test_forward_raises_a_failure_before_the_first_batch_and_sends_nothing(
    make_encoder: Callable[[], Any],
) -> None:
    sink, closed = MemorySink(), list[bool]()
    with pytest.raises(InferenceFailure) as raised:
        await forward(runner_of([], BUFFER_FULL, closed), make_encoder(), sink)
    assert (raised.value.status, sink.sent, closed) == (503, [], [True])


async def test_forward_answers_a_runner_that_ends_without_a_batch_as_agent_lost() -> None:
    sink, closed = MemorySink(), list[bool]()
    with pytest.raises(InferenceFailure) as raised:
        await forward(runner_of([], None, closed), NdjsonEncoder("r1"), sink)
    assert (raised.value.status, raised.value.kind, sink.sent) == (502, "agent_lost", [])


async def test_an_sse_stream_whose_first_batch_is_an_agent_error_is_refused_before_the_headers() -> None:
    sink, closed = MemorySink(), list[bool]()
    with pytest.raises(OpenAIError) as raised:
        await forward(runner_of([("a1", [(GRAMMAR_ERROR, True)])], None, closed), chat_encoder(), sink)
    assert (raised.value.status, sink.sent, closed) == (400, [], [True])


async def test_a_responses_stream_ends_with_response_failed_when_the_runner_fails_mid_stream() -> None:
    header = ResponseHeader("resp_1", "m", 7, ResponsesRequest.model_validate({"input": "x"}))
    sink, closed = MemorySink(), list[bool]()
    encoder = SseEncoder(ResponsesStream(header, 50, [], Accumulated()))
    await forward(runner_of([("a1", [(HI, False)])], ITEM_TIMEOUT, closed), encoder, sink)
    events = [
        line.split(b"\n")[0].removeprefix(b"event: ").decode()
        for frame in sink.sent[1:-1]
        for line in frame.split(b"\n\n")
        if line
    ]
    assert events == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "error", "response.failed",
    ]  # fmt: skip
    assert closed == [True]


async def test_a_client_that_goes_away_mid_stream_closes_the_runner() -> None:
    class GoneSink(MemorySink):
        async def write(self, frames: list[Any]) -> None:
            raise ConnectionResetError

    closed: list[bool] = []
    with pytest.raises(ConnectionResetError):
        await forward(runner_of([("a1", [(HI, False)])], None, closed), NdjsonEncoder("r1"), GoneSink())
    assert closed == [True]
