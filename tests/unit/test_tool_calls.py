"""tool_calls: the output classifier, the tool-call parser/validator, the grammar."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from paddler_client.inference_message import InferenceMessageKind, parse_inference_client_message
from paddler_client.tool_call_arguments import InvalidJson, ValidJson

from paddler_agent.tool_calls import CONTENT as C
from paddler_agent.tool_calls import REASONING as R
from paddler_agent.tool_calls import TOOL_CALL as T
from paddler_agent.tool_calls import (
    OutputClassifier,
    Piece,
    parse_tool_calls,
    prompt_opens_reasoning,
    tool_call_grammar,
    tool_call_schema,
)
from paddler_core.inference import Tool

CALL = '{"name": "f", "arguments": {"a": "}{\\""}}'


def run(pieces: list[str], **options: Any) -> list[Piece]:
    classifier = OutputClassifier(**options)
    out: list[Piece] = []
    for piece in pieces:
        out += classifier.feed(piece)
    out += classifier.finish()
    return merge(out)


def merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for kind, text in pieces:
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


CLASSIFIER_CASES: list[tuple[str, list[str], dict[str, Any], list[Piece]]] = [
    ("no tags", ["Hello", " world"], {}, [(C, "Hello world")]),
    ("leading whitespace is content", ["\n", "Hi"], {}, [(C, "\nHi")]),
    (
        "think split across pieces",
        ["<th", "ink>", "plan", "</th", "ink>", "\n\nAnswer"],
        {},
        [(R, "plan"), (C, "Answer")],
    ),
    ("text inside think", ["<think>a <b> c</think>d"], {}, [(R, "a <b> c"), (C, "d")]),
    (
        "prompt opened think",
        ["thinking", "</think>", "\n\nok"],
        {"start_in_reasoning": True},
        [(R, "thinking"), (C, "ok")],
    ),
    ("unterminated think", ["<think>never ends"], {}, [(R, "never ends")]),
    ("reasoning off", ["<think>x</think>"], {"reasoning": False}, [(C, "<think>x</think>")]),
    ("lone angle brackets", ["a < b", " <thin", "g>"], {}, [(C, "a < b <thing>")]),
    (
        "tagged tool call split",
        ["Sure.", "<tool", "_call>\n" + CALL + "\n</tool_", "call>"],
        {"tools": True},
        [(C, "Sure."), (T, "<tool_call>\n" + CALL + "\n</tool_call>")],
    ),
    (
        "tool tags without tools are content",
        ["<tool_call>" + CALL + "</tool_call>"],
        {},
        [(C, "<tool_call>" + CALL + "</tool_call>")],
    ),
    (
        "two tagged calls",
        [f"<tool_call>{CALL}</tool_call>\n<tool_call>{CALL}</tool_call>"],
        {"tools": True},
        [(T, f"<tool_call>{CALL}</tool_call>\n<tool_call>{CALL}</tool_call>")],
    ),
    (
        "content after a tool call",
        [f"<tool_call>{CALL}</tool_call>", "\n\nDone."],
        {"tools": True},
        [(T, f"<tool_call>{CALL}</tool_call>"), (C, "Done.")],
    ),
    ("bare JSON call", [CALL[:12], CALL[12:]], {"tools": True}, [(T, CALL)]),
    ("bare JSON after whitespace", ["\n ", CALL], {"tools": True}, [(T, "\n " + CALL)]),
    ("bare JSON without tools", [CALL], {}, [(C, CALL)]),
    ("brace later is content", ["Here: ", CALL], {"tools": True}, [(C, "Here: " + CALL)]),
    (
        "reasoning then bare call",
        ["<think>x</think>\n", CALL],
        {"tools": True},
        [(R, "x"), (T, "\n" + CALL)],
    ),
    (
        "unfinished tagged call",
        ['<tool_call>{"name": "f"'],
        {"tools": True},
        [(T, '<tool_call>{"name": "f"')],
    ),
    ("partial tag at the end", ["abc <tool"], {"tools": True}, [(C, "abc <tool")]),
    ("only whitespace", [" ", "\n"], {}, [(C, " \n")]),
    ("empty", [], {"tools": True}, []),
]


@pytest.mark.parametrize(
    ("pieces", "options", "expected"),
    [c[1:] for c in CLASSIFIER_CASES],
    ids=[c[0] for c in CLASSIFIER_CASES],
)
def test_classifier(pieces: list[str], options: dict[str, Any], expected: list[Piece]) -> None:
    assert run(pieces, **options) == expected
    # The result does not depend on how the text is cut into pieces.
    assert run(list("".join(pieces)), **options) == expected
    assert run(["".join(pieces)], **options) == expected


def test_classifier_holds_back_only_a_possible_tag() -> None:
    classifier = OutputClassifier(tools=True)
    assert classifier.feed("Hi <") == [(C, "Hi ")]  # "<" may start a tag: held back
    assert classifier.feed("b>") == [(C, "<b>")]
    assert classifier.feed(" <tool_") == [(C, " ")]
    assert classifier.feed("call>") == [(T, "<tool_call>")]
    assert classifier.kind == T
    assert classifier.last_kind == T
    assert classifier.feed(CALL + "</tool_call>") == [(T, CALL + "</tool_call>")]
    assert classifier.finish() == []
    assert classifier.saw_tool_call
    assert classifier.tool_call_text == f"<tool_call>{CALL}</tool_call>"


def test_classifier_last_kind_counts_tags() -> None:
    classifier = OutputClassifier()
    assert classifier.feed("<think>") == []
    assert classifier.last_kind == R
    classifier.feed("hmm")
    assert classifier.feed("</think>") == []
    assert classifier.last_kind == R
    assert classifier.feed("ok") == [(C, "ok")]
    assert classifier.last_kind == C
    assert not classifier.saw_tool_call


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>assistant\n", False),
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<think>old</think> user: hi <|im_start|>assistant\n", False),
        ("<think>\nreasoning already under way", True),
    ],
)
def test_prompt_opens_reasoning(prompt: str, opens: bool) -> None:
    assert prompt_opens_reasoning(prompt) is opens


# ---- parser --------------------------------------------------------------------------------

WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer", "minimum": 1},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
)
NOW = Tool.model_validate({"function": {"name": "now"}})
TOOLS = [WEATHER, NOW]


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"call_{next(counter)}"


def parsed(*calls: tuple[str, Any]) -> dict[str, Any]:
    return {
        "GeneratedToken": {
            "ToolCallParsed": [
                {"id": f"call_{n}", "name": name, "arguments": arguments}
                for n, (name, arguments) in enumerate(calls, 1)
            ]
        }
    }


PARSE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "tagged",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        parsed(("get_weather", {"ValidJson": {"city": "Paris"}})),
    ),
    (
        "bare",
        '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c", "days": 2}}',
        parsed(("get_weather", {"ValidJson": {"city": "Oslo", "unit": "c", "days": 2}})),
    ),
    (
        "two tagged calls",
        '<tool_call>{"name": "now", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
        parsed(("now", {"ValidJson": {}}), ("get_weather", {"ValidJson": {"city": "Rome"}})),
    ),
    (
        "array of calls",
        '[{"name": "now"}, {"name": "now", "arguments": {"x": 1}}]',
        parsed(("now", {"ValidJson": {}}), ("now", {"ValidJson": {"x": 1}})),
    ),
    (
        "arguments as a JSON string",
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}',
        parsed(("get_weather", {"ValidJson": {"city": "Lima"}})),
    ),
    (
        "arguments string that is not JSON",
        '{"name": "get_weather", "arguments": "{city: Lima"}',
        parsed(("get_weather", {"InvalidJson": "{city: Lima"})),
    ),
    (
        "llama-style parameters",
        '{"name": "get_weather", "parameters": {"city": "Bern"}}',
        parsed(("get_weather", {"ValidJson": {"city": "Bern"}})),
    ),
    (
        "OpenAI-style function wrapper",
        '{"type": "function", "function": {"name": "now", "arguments": {}}}',
        parsed(("now", {"ValidJson": {}})),
    ),
    (
        "invalid JSON",
        '<tool_call>{"name": "now", "arguments": {</tool_call>',
        {
            "GeneratedToken": {
                "ToolCallParseFailed": "tool call 1 is not valid JSON: "
                "Expecting property name enclosed in double "
                "quotes: line 1 column 31 (char 30)"
            }
        },
    ),
    ("empty", "  \n", {"GeneratedToken": {"ToolCallParseFailed": "the output has no tool call"}}),
    (
        "no name",
        '{"arguments": {}}',
        {"GeneratedToken": {"ToolCallParseFailed": 'tool call 1 has no "name"'}},
    ),
    (
        "not an object",
        '"get_weather"',
        {"GeneratedToken": {"ToolCallParseFailed": "tool call 1 is not a JSON object"}},
    ),
    (
        "schema violations",
        '{"name": "get_weather", "arguments": {"city": 7, "unit": "k", "days": 0, "x": 1}}',
        {
            "GeneratedToken": {
                "ToolCallValidationFailed": [
                    "get_weather: $.city: 7 is not of type 'string'",
                    "get_weather: $.unit: 'k' is not one of ['c', 'f']",
                    "get_weather: $.days: 0 is less than the minimum of 1",
                    "get_weather: $: Additional properties are not allowed ('x' was unexpected)",
                ]
            }
        },
    ),
    (
        "missing required",
        '{"name": "get_weather", "arguments": {}}',
        {
            "GeneratedToken": {
                "ToolCallValidationFailed": [
                    "get_weather: $: 'city' is a required property",
                ]
            }
        },
    ),
    (
        "arguments not an object",
        '{"name": "now", "arguments": [1]}',
        {
            "GeneratedToken": {
                "ToolCallValidationFailed": [
                    "now: arguments must be a JSON object, got array",
                ]
            }
        },
    ),
    (
        "unknown tool",
        '{"name": "launch", "arguments": {}}',
        {
            "GeneratedToken": {
                "ToolCallValidationFailed": [
                    "launch: no such tool (available: get_weather, now)",
                ]
            }
        },
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_tool_calls(text: str, expected: dict[str, Any]) -> None:
    outcome = parse_tool_calls(text, TOOLS, make_id=ids())
    assert outcome.payload == expected
    assert outcome.ok == ("ToolCallParsed" in expected["GeneratedToken"])
    # paddler-client reads every outcome.
    message = parse_inference_client_message({"Response": {"request_id": "r", "response": outcome.payload}})
    assert (
        message.kind.value
        == {
            "ToolCallParsed": InferenceMessageKind.TOOL_CALL_PARSED,
            "ToolCallValidationFailed": InferenceMessageKind.TOOL_CALL_VALIDATION_FAILED,
            "ToolCallParseFailed": InferenceMessageKind.TOOL_CALL_PARSE_FAILED,
        }[outcome.kind].value
    )
    if outcome.ok:
        assert message.parsed_tool_calls is not None
        for call, sent in zip(message.parsed_tool_calls, outcome.calls, strict=True):
            kind = ValidJson if sent.arguments_valid_json else InvalidJson
            assert isinstance(call.arguments, kind)


def test_call_ids_are_unique_and_openai_like() -> None:
    outcome = parse_tool_calls('[{"name": "now"}, {"name": "now"}]', TOOLS)
    first, second = (c.id for c in outcome.calls)
    assert first != second
    assert first.startswith("call_")
    assert len(first) == 29


def test_classifier_output_feeds_the_parser() -> None:
    classifier = OutputClassifier(tools=True)
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    for piece in [text[i : i + 3] for i in range(0, len(text), 3)] + ["</tool_call>"]:
        classifier.feed(piece)
    classifier.finish()
    outcome = parse_tool_calls(classifier.tool_call_text, TOOLS, make_id=ids())
    assert outcome.payload == parsed(("get_weather", {"ValidJson": {"city": "Paris"}}))


# ---- grammar -------------------------------------------------------------------------------


def test_tool_call_grammar_admits_exactly_valid_calls() -> None:
    schema = json.loads(tool_call_grammar(TOOLS))
    assert schema == tool_call_schema(TOOLS)
    good: list[dict[str, Any]] = [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "now", "arguments": {"anything": True}},
    ]
    bad: list[dict[str, Any]] = [
        {"name": "get_weather", "arguments": {}},
        {"name": "launch", "arguments": {}},
        {"name": "now"},
        {"name": "now", "arguments": {}, "extra": 1},
    ]
    validator = Draft202012Validator(schema)
    for call in good:
        assert validator.is_valid(call), call
        assert parse_tool_calls(json.dumps(call), TOOLS).ok
    for call in bad:
        assert not validator.is_valid(call), call


def test_tool_call_grammar_for_one_tool_has_no_alternatives() -> None:
    schema = tool_call_schema([WEATHER])
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == WEATHER.function.parameters
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_schema([])
