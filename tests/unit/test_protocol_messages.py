"""paddler_core.protocol: the generate/embed messages as the balancer builds them and the
agent parses them (once, where they enter it)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from paddler_core.desired_state import SamplingOverrides
from paddler_core.inference import ContinueFromConversationHistoryParams, ContinueFromRawPromptParams, ErrorKind
from paddler_core.prefix import request_prefix_keys
from paddler_core.protocol import (
    EmbedMessage,
    embed_message,
    encode_message,
    error_kind_of,
    generate_message,
    parse_generate_message,
    received_payload,
)

CONVERSATION = {
    "conversation_history": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "max_tokens": 4,
}


def wire(message: dict[str, Any]) -> Any:
    return json.loads(encode_message(message))


def test_the_variant_chooses_the_param_model() -> None:
    raw = parse_generate_message(
        wire(generate_message("r1", "ContinueFromRawPrompt", {"raw_prompt": "x", "max_tokens": 2}))
    )
    chat = parse_generate_message(wire(generate_message("r2", "ContinueFromConversationHistory", CONVERSATION)))
    assert isinstance(raw.params, ContinueFromRawPromptParams)
    assert raw.params.max_tokens == 2
    assert isinstance(chat.params, ContinueFromConversationHistoryParams)


def test_overrides_travel_without_their_unset_fields() -> None:
    message = generate_message(
        "r", "ContinueFromRawPrompt", {"raw_prompt": "x", "max_tokens": 2}, SamplingOverrides(temperature=0.5)
    )
    assert message["overrides"] == {"temperature": 0.5}
    parsed = parse_generate_message(wire(message))
    assert parsed.overrides is not None
    assert parsed.overrides.temperature == 0.5


@pytest.mark.parametrize(
    ("variant", "params"),
    [
        ("ContinueFromRawPrompt", {"raw_prompt": "x"}),
        ("ContinueFromRawPrompt", {"raw_prompt": "x", "max_tokens": 0}),
        ("ContinueFromConversationHistory", {"conversation_history": [], "max_tokens": 2}),
        ("ContinueFromConversationHistory", {"raw_prompt": "x", "max_tokens": 2}),
        ("GenerateEmbeddingBatch", {"input_batch": [{"id": "a", "content": "x"}]}),
    ],
)
def test_params_that_do_not_fit_their_variant_are_refused(variant: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse_generate_message(wire(generate_message("r", variant, params)))


def test_prefix_keys_are_the_ones_the_balancer_routed_by() -> None:
    parsed = parse_generate_message(wire(generate_message("r", "ContinueFromConversationHistory", CONVERSATION)))
    assert parsed.prefix_keys == request_prefix_keys("ContinueFromConversationHistory", CONVERSATION)
    assert parsed.prefix_keys


def test_embed_params_are_the_embedding_model() -> None:
    message = EmbedMessage.model_validate(wire(embed_message("e", {"input_batch": [{"id": "a", "content": "x"}]})))
    assert message.params.input_batch[0].content == "x"


def test_a_received_payload_keeps_its_error_kind_on_the_balancers_side_only() -> None:
    payload = received_payload(
        {
            "type": "response",
            "request_id": "r",
            "response": {"GeneratedToken": {"SamplerError": "x"}},
            "final": True,
            "error_kind": ErrorKind.INVALID_REQUEST.value,
        }
    )
    assert error_kind_of(payload) is ErrorKind.INVALID_REQUEST
    assert json.dumps(payload) == '{"GeneratedToken": {"SamplerError": "x"}}'
    plain = received_payload(
        {"type": "response", "request_id": "r", "response": {"GeneratedToken": {"ContentToken": "a"}}}
    )
    assert error_kind_of(plain) is None
    assert type(plain) is dict
