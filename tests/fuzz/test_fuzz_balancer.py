"""Fuzz tier: hypothesis against a real balancer with real simulated agents.

Every endpoint (native, OpenAI, management, the inference WebSocket) gets generated
bodies: random JSON (huge and non-finite numbers, lone surrogates, deep nesting),
near-valid requests with one field mutated, raw bytes, odd content types. The rules:
no 5xx but the documented 502/503/504 (a 500 is a bug), the socket never closes on a
bad message, and afterwards no slot is held, nothing is buffered and both agents are
still connected. The budget is bounded (FUZZ_EXAMPLES per test, one seed per run) so
``make test`` stays fast; raise it with ``PADDLER_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from tests.harness import Balancer, Processes, wait_until

FUZZ_EXAMPLES = int(os.environ.get("PADDLER_FUZZ_EXAMPLES", "150"))
ALLOWED_5XX = {502, 503, 504}
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    processes = Processes(tmp_path_factory.mktemp("fuzz"))
    try:
        balancer = processes.balancer(
            "--inference-item-timeout", "5s", "--buffered-request-timeout", "5s", "--max-buffered-requests", "8"
        )
        for name in ("f1", "f2"):
            processes.agent(
                balancer,
                slots=2,
                name=name,
                extra=("--simulated-max-tokens", "3", "--simulated-tokens-per-second", "1000"),
            )
        asyncio.run(wait_until(lambda: _settled(balancer), timeout=20, what="agents connected"))
        yield balancer
        asyncio.run(wait_until(lambda: _settled(balancer), timeout=30, what="no slot held, both agents connected"))
    finally:
        processes.close()


async def _settled(balancer: Balancer) -> bool:
    async with httpx.AsyncClient() as http:
        agents = (await http.get(f"{balancer.management_url}/api/v1/agents")).json()["agents"]
        buffered = (await http.get(f"{balancer.management_url}/api/v1/buffered_requests")).json()
    return (
        sorted(a["name"] for a in agents) == ["f1", "f2"]
        and all(a["slots_in_flight"] == 0 and a["slots_total"] == 2 for a in agents)
        and buffered["buffered_requests_current"] == 0
    )


# ---- strategies ------------------------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "é" * 50, "{{ x }}", "<|im_start|>", ""])
TEXT = st.one_of(st.text(max_size=40), HOSTILE_TEXT)
NUMBER = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([10**30, -(10**30), 2**63, 10**50]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON_VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


def _message() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), TEXT), "content": st.one_of(TEXT, SCALAR)}
    )


REQUESTS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/api/v1/continue_from_raw_prompt": st.fixed_dictionaries(
        {"raw_prompt": TEXT, "max_tokens": NUMBER}, optional={"grammar": JSON_VALUE, "extra": JSON_VALUE}
    ),
    "/api/v1/continue_from_conversation_history": st.fixed_dictionaries(
        {"conversation_history": st.lists(_message(), max_size=3), "max_tokens": NUMBER},
        optional={"tools": JSON_VALUE, "enable_thinking": SCALAR, "add_generation_prompt": SCALAR},
    ),
    "/api/v1/generate_embedding_batch": st.fixed_dictionaries(
        {"input_batch": st.lists(st.fixed_dictionaries({"id": TEXT, "content": TEXT}), max_size=3)},
        optional={"normalization_method": st.one_of(JSON_VALUE, st.just({"RmsNorm": {"epsilon": float("inf")}}))},
    ),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(_message(), max_size=3)},
        optional={
            "max_tokens": NUMBER,
            "temperature": NUMBER,
            "top_p": NUMBER,
            "seed": NUMBER,
            "stop": JSON_VALUE,
            "stream": SCALAR,
            "tools": JSON_VALUE,
            "tool_choice": JSON_VALUE,
            "response_format": JSON_VALUE,
            "model": TEXT,
        },
    ),
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": st.one_of(TEXT, JSON_VALUE)},
        optional={"max_tokens": NUMBER, "stream": SCALAR, "logit_bias": JSON_VALUE, "n": NUMBER, "echo": SCALAR},
    ),
    "/v1/embeddings": st.fixed_dictionaries(
        {"input": st.one_of(TEXT, st.lists(TEXT, max_size=3), JSON_VALUE)},
        optional={"encoding_format": TEXT, "dimensions": NUMBER, "model": TEXT},
    ),
}
STATE = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(
            st.just("None"), st.fixed_dictionaries({"LocalToAgent": TEXT}), st.fixed_dictionaries({"Url": JSON_VALUE})
        ),
        "inference_parameters": st.dictionaries(
            st.sampled_from(["context_size", "n_batch", "temperature", "penalty_repeat", "top_k", "min_p", "bogus"]),
            NUMBER,
            max_size=3,
        ),
        "chat_template_override": st.one_of(st.none(), st.fixed_dictionaries({"content": TEXT}), JSON_VALUE),
        "use_chat_template_override": SCALAR,
    },
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=bogus",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        None,
    ]
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # ASCII: surrogates stay \u escapes


def _body(structured: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        structured.map(_encode),
        JSON_VALUE.map(_encode),
        st.binary(max_size=64),
        st.just(b"[" * 2000 + b"]" * 2000),
        st.just(b'{"max_tokens": ' + b"9" * 5000 + b"}"),
    )


def _check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500 or response.status_code in ALLOWED_5XX, (
        f"{what}: {response.status_code} {response.text[:300]}"
    )


# ---- HTTP ------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_inference_endpoints_answer_any_body_without_a_500(stack: Balancer, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(sorted(REQUESTS)), label="path")
    body = data.draw(_body(REQUESTS[path]), label="body")
    content_type = data.draw(CONTENT_TYPES, label="content_type")
    headers = {"Content-Type": content_type} if content_type is not None else {}

    with httpx.Client(timeout=30) as http:
        response = http.post(f"{stack.inference_url}{path}", content=body, headers=headers)
        if response.status_code == 200 and path.startswith("/api/"):
            for line in response.text.splitlines():
                json.loads(line)  # every NDJSON line is JSON

    _check(response, f"POST {path} {body[:200]!r}")


@FUZZ
@given(data=st.data())
def test_management_endpoints_answer_any_body_without_a_500(stack: Balancer, data: st.DataObject) -> None:
    path = data.draw(
        st.sampled_from(
            ["/api/v1/balancer_desired_state", "/api/v1/model_groups/fuzz/desired_state", "/api/v1/model_groups/x/y"]
        ),
        label="path",
    )
    body = data.draw(_body(STATE), label="body")
    content_type = data.draw(CONTENT_TYPES, label="content_type")
    headers = {"Content-Type": content_type} if content_type is not None else {}

    with httpx.Client(timeout=30) as http:
        response = http.put(f"{stack.management_url}{path}", content=body, headers=headers)
        served = http.get(f"{stack.management_url}/api/v1/balancer_desired_state")

    _check(response, f"PUT {path} {body[:200]!r}")
    assert served.status_code == 200
    served.json()  # what is stored is always JSON (no Infinity, no NaN)
    assert "Infinity" not in served.text
    assert "NaN" not in served.text


# ---- the inference WebSocket --------------------------------------------------------------------------

SOCKET_MESSAGES = st.one_of(
    st.fixed_dictionaries(
        {
            "Request": st.fixed_dictionaries(
                {
                    "id": st.one_of(TEXT, SCALAR),
                    "request": st.one_of(st.dictionaries(TEXT, JSON_VALUE, max_size=2), JSON_VALUE),
                }
            )
        }
    ).map(lambda m: json.dumps(m, allow_nan=True)),
    st.fixed_dictionaries(
        {
            "Request": st.fixed_dictionaries(
                {
                    "id": TEXT,
                    "request": st.fixed_dictionaries(
                        {"ContinueFromRawPrompt": REQUESTS["/api/v1/continue_from_raw_prompt"]}
                    ),
                }
            )
        }
    ).map(lambda m: json.dumps(m, allow_nan=True)),
    JSON_VALUE.map(lambda v: json.dumps(v, allow_nan=True)),
    st.text(max_size=40),
    st.just('{"Request": {"id": "deep", "request": ' + "[" * 2000 + "]" * 2000 + "}}"),
    st.just('{"Request": {"id": "big", "request": {"ContinueFromRawPrompt": {"max_tokens": ' + "9" * 5000 + "}}}}"),
)


@settings(FUZZ, max_examples=max(10, FUZZ_EXAMPLES // 3))
@given(messages=st.lists(SOCKET_MESSAGES, min_size=1, max_size=6))
def test_inference_socket_survives_any_messages(stack: Balancer, messages: list[str]) -> None:
    probe = {"Request": {"id": "probe", "request": {"ContinueFromRawPrompt": {"raw_prompt": "hi", "max_tokens": 2}}}}
    url = stack.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    with connect(url, max_size=None, open_timeout=10) as ws:
        for message in messages:
            ws.send(message)
        ws.send(json.dumps(probe))
        while True:  # every reply is JSON; the socket stays open until the probe is done
            reply = json.loads(ws.recv(timeout=30))
            for kind in ("Response", "Error"):
                if kind in reply and reply[kind]["request_id"] == "probe":
                    assert kind == "Response" or reply["Error"]["error"]["code"] in ALLOWED_5XX, reply
            if "Error" in reply:
                assert reply["Error"]["error"]["code"] < 500 or reply["Error"]["error"]["code"] in ALLOWED_5XX, reply
            if "Response" in reply and reply["Response"]["request_id"] == "probe" and "Done" in str(reply):
                return
