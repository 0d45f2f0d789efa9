"""tool_schema: tool schemas and call arguments checked by jsonschema, with schemas real
clients send (pydantic's ``$defs``/``$ref``, zod's draft-07, OpenCode's 2020-12)."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from paddler_core.inference import ContinueFromConversationHistoryParams, Tool
from paddler_core.tool_schema import (
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_VALUES,
    tool_arguments_problems,
    tool_call_schema,
    tool_schema_problem,
)


class Address(BaseModel):
    street: str
    postcode: str = Field(pattern=r"^[0-9]{4,5}$")


class Parcel(BaseModel):
    weight_kg: float = Field(gt=0)
    items: list[dict[str, int]]


class Shipment(BaseModel):
    """What pydantic (and so most Python agent frameworks) sends: ``$defs`` + ``$ref``."""

    to: Address
    speed: Literal["standard", "express"]
    parcels: list[Parcel] = Field(min_length=1)


PYDANTIC = Shipment.model_json_schema()

ZOD_DRAFT_07 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "file to read"},
        "offset": {"type": "integer", "minimum": 0},
        "encoding": {"$ref": "#/definitions/encoding"},
    },
    "required": ["path"],
    "additionalProperties": False,
    "definitions": {"encoding": {"type": "string", "enum": ["utf-8", "latin-1"]}},
}

OPENCODE_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "command": {"type": "string"},
        "mode": {"const": "run"},
        "timeout": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "pattern": "^[A-Z_]+$"}, "value": {"type": "string"}},
                "required": ["name", "value"],
                "additionalProperties": False,
            },
        },
        "when": {"type": "string", "format": "date-time"},
    },
    "required": ["command", "mode"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("schema", [PYDANTIC, ZOD_DRAFT_07, OPENCODE_2020_12], ids=["pydantic", "zod", "opencode"])
def test_schemas_real_clients_send_are_accepted(schema: dict[str, Any]) -> None:
    assert tool_schema_problem("t", schema) is None


def test_arguments_that_follow_a_ref_into_defs_are_valid() -> None:
    arguments = {
        "to": {"street": "Main", "postcode": "3011"},
        "speed": "express",
        "parcels": [{"weight_kg": 1.5, "items": [{"a": 1}]}],
    }
    assert tool_arguments_problems("ship", PYDANTIC, arguments) == []


def test_arguments_are_checked_through_ref_pattern_enum_and_nested_arrays() -> None:
    arguments = {
        "to": {"street": "Main", "postcode": "x"},
        "speed": "slow",
        "parcels": [{"weight_kg": 0, "items": [{"a": "1"}]}],
    }
    assert tool_arguments_problems("ship", PYDANTIC, arguments) == [
        "ship: $.to.postcode: 'x' does not match '^[0-9]{4,5}$'",
        "ship: $.speed: 'slow' is not one of ['standard', 'express']",
        "ship: $.parcels[0].weight_kg: 0 is less than or equal to the minimum of 0",
        "ship: $.parcels[0].items[0].a: '1' is not of type 'integer'",
    ]


def test_const_one_of_format_and_closed_objects_are_checked() -> None:
    arguments = {
        "command": "ls",
        "mode": "dry",
        "timeout": 0,
        "env": [{"name": "path", "value": "/"}],
        "when": "soon",
        "x": 1,
    }
    assert tool_arguments_problems("bash", OPENCODE_2020_12, arguments) == [
        "bash: $.mode: 'run' was expected",
        "bash: $.timeout: 0 is not valid under any of the given schemas (closest: $.timeout: 0 is not of type 'null')",
        "bash: $.env[0].name: 'path' does not match '^[A-Z_]+$'",
        "bash: $.when: 'soon' is not a 'date-time'",
        "bash: $: Additional properties are not allowed ('x' was unexpected)",
    ]


def test_draft_07_definitions_are_followed() -> None:
    assert tool_arguments_problems("read", ZOD_DRAFT_07, {"path": "a", "encoding": "ascii"}) == [
        "read: $.encoding: 'ascii' is not one of ['utf-8', 'latin-1']"
    ]


@pytest.mark.parametrize(
    ("arguments", "problems"),
    [
        ([1], ["f: arguments must be a JSON object, got array"]),
        ("x", ["f: arguments must be a JSON object, got string"]),
        ({"anything": True}, []),
    ],
)
def test_arguments_must_be_an_object_and_no_schema_admits_any(arguments: Any, problems: list[str]) -> None:
    assert tool_arguments_problems("f", None, arguments) == problems


INVALID = [
    (
        "required field not a property (Paddler's message)",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city", "country"]},
        "tool 'get_weather': Required field 'country' not found in properties",
    ),
    (
        "unknown type (Paddler's message, and where)",
        {"type": "object", "properties": {"x": {"type": "nope"}}},
        "tool 'get_weather': Invalid schema for property 'x': 'nope' is not valid under any of the given schemas"
        " (at $.properties.x.type)",
    ),
    (
        "keyword of the wrong type inside a property",
        {"type": "object", "properties": {"x": {"type": "string", "minLength": "3"}}},
        "tool 'get_weather': Invalid schema for property 'x': '3' is not of type 'integer'"
        " (at $.properties.x.minLength)",
    ),
    (
        "invalid additionalProperties (Paddler's message)",
        {"type": "object", "additionalProperties": {"type": 5}},
        "tool 'get_weather': Invalid additionalProperties schema: 5 is not valid under any of the given schemas"
        " (at $.additionalProperties.type)",
    ),
    (
        "keyword of the wrong type at the root",
        {"type": "object", "required": "city"},
        "tool 'get_weather': $.required: 'city' is not of type 'array'",
    ),
    (
        "wrong keyword type deep in $defs",
        {"type": "object", "$defs": {"a": {"type": "object", "properties": {"b": {"maxItems": -1}}}}},
        "tool 'get_weather': $['$defs'].a.properties.b.maxItems: -1 is less than the minimum of 0",
    ),
    (
        "a pattern that is not a regular expression",
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}},
        "tool 'get_weather': Invalid schema for property 'x': '(unclosed' is not a 'regex' (at $.properties.x.pattern)",
    ),
    (
        "a $ref to nothing",
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
        "tool 'get_weather': $.properties.x['$ref']: '#/$defs/missing' does not resolve inside the schema",
    ),
    (
        "a $ref to another document",
        {"type": "object", "properties": {"x": {"$ref": "other.json#/a"}}},
        "tool 'get_weather': $.properties.x['$ref']: 'other.json#/a' is outside the schema; references are never"
        " fetched",
    ),
    (
        "an unknown $schema",
        {"$schema": "https://example.com/my-dialect", "type": "object"},
        "tool 'get_weather': $['$schema']: 'https://example.com/my-dialect' is not a JSON Schema dialect known here"
        " (draft-03, draft-04, draft-06, draft-07, 2019-09, 2020-12)",
    ),
]


@pytest.mark.parametrize(("schema", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_schemas_are_refused_naming_the_tool(schema: dict[str, Any], message: str) -> None:
    assert tool_schema_problem("get_weather", schema) == message


def test_a_keyword_valid_in_draft_07_is_checked_by_draft_07() -> None:
    draft_07 = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "exclusiveMinimum": True}
    assert tool_schema_problem("f", draft_07) == "tool 'f': $.exclusiveMinimum: True is not of type 'number'"


def test_a_conversation_names_its_first_tool_with_an_invalid_schema() -> None:
    """Parsing keeps the tools (Paddler streams ``ToolSchemaInvalid``, it does not refuse the
    body); the check names the tool."""
    good = {"function": {"name": "ok", "parameters": {"type": "object"}}}
    bad = {"function": {"name": "lookup", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}
    params = ContinueFromConversationHistoryParams.model_validate(
        {"conversation_history": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [good, bad]}
    )
    problem = params.tool_schema_problem()
    assert problem is not None
    assert problem.startswith("tool 'lookup': Invalid schema for property 'x'")


def test_a_conversation_whose_tools_are_valid_has_no_tool_schema_problem() -> None:
    tool = Tool.model_validate({"function": {"name": "ok", "parameters": {"type": "object"}}})
    params = ContinueFromConversationHistoryParams(
        conversation_history=[{"role": "user", "content": "hi"}], max_tokens=2, tools=[tool]
    )
    assert params.tool_schema_problem() is None


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A listening socket a fetch of ``http://127.0.0.1:PORT/...`` would reach, and every
    way out of the process closed: a connection attempt fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        yield listener


def test_a_remote_ref_is_refused_without_a_connection(no_network: socket.socket) -> None:
    port = no_network.getsockname()[1]
    url = f"http://127.0.0.1:{port}/schemas/address.json"
    schema = {"type": "object", "properties": {"to": {"$ref": url}}}
    assert tool_schema_problem("ship", schema) == (
        f"tool 'ship': $.properties.to['$ref']: '{url}' is outside the schema; references are never fetched"
    )
    with pytest.raises(BlockingIOError):
        no_network.accept()  # nobody knocked


def test_a_remote_ref_under_a_remote_id_is_refused_without_a_connection(no_network: socket.socket) -> None:
    port = no_network.getsockname()[1]
    schema = {"$id": f"http://127.0.0.1:{port}/root.json", "type": "object", "properties": {"to": {"$ref": "a.json"}}}
    problem = tool_schema_problem("ship", schema)
    assert problem is not None
    assert "'a.json' is outside the schema; references are never fetched" in problem
    with pytest.raises(BlockingIOError):
        no_network.accept()


def test_refs_to_anchors_embedded_ids_and_the_bundled_meta_schemas_resolve(no_network: socket.socket) -> None:
    schema = {
        "$id": "https://example.com/tool",
        "type": "object",
        "$defs": {"name": {"$anchor": "name", "type": "string"}, "id": {"$id": "id.json", "type": "integer"}},
        "properties": {
            "a": {"$ref": "#name"},
            "b": {"$ref": "id.json"},
            "c": {"$ref": "https://json-schema.org/draft/2020-12/schema"},
        },
    }
    assert tool_schema_problem("f", schema) is None
    assert tool_arguments_problems("f", schema, {"a": 1, "b": "x", "c": {"type": "x"}}) == [
        "f: $.a: 1 is not of type 'string'",
        "f: $.b: 'x' is not of type 'integer'",
        "f: $.c.type: 'x' is not valid under any of the given schemas (closest: $.c.type: 'x' is not one of"
        " ['array', 'boolean', 'integer', 'null', 'number', 'object', 'string'])",
    ]


def test_a_ref_that_loops_is_reported_not_raised() -> None:
    schema = {"type": "object", "$defs": {"a": {"$ref": "#/$defs/a"}}, "properties": {"x": {"$ref": "#/$defs/a"}}}
    assert tool_arguments_problems("f", schema, {"x": 1}) == ["f: $: the schema's references loop without end"]


def test_a_schema_deeper_than_a_request_body_may_be_is_refused() -> None:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH):
        schema = {"type": "object", "properties": {"x": schema}}
    assert (
        tool_schema_problem("f", schema)
        == f"tool 'f': the parameters schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
    )


def test_a_schema_with_too_many_values_is_refused() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_VALUES // 2)}}
    assert (
        tool_schema_problem("f", schema)
        == f"tool 'f': the parameters schema holds more than {MAX_SCHEMA_VALUES} values"
    )


def test_long_values_are_clipped_in_messages() -> None:
    [problem] = tool_arguments_problems(
        "f", {"type": "object", "properties": {"s": {"type": "integer"}}}, {"s": "x" * 5000}
    )
    assert len(problem) <= 300


def test_forced_call_schema_keeps_defs_refs_working_where_parameters_now_sit() -> None:
    schema = tool_call_schema([("ship", PYDANTIC), ("read", ZOD_DRAFT_07)])
    assert tool_schema_problem("call", schema) is None
    validator = Draft202012Validator(schema)
    good = {
        "name": "ship",
        "arguments": {
            "to": {"street": "a", "postcode": "1234"},
            "speed": "standard",
            "parcels": [{"weight_kg": 1, "items": []}],
        },
    }
    bad = {
        "name": "ship",
        "arguments": {
            "to": {"street": "a", "postcode": "no"},
            "speed": "standard",
            "parcels": [{"weight_kg": 1, "items": []}],
        },
    }
    assert validator.is_valid(good)
    assert not validator.is_valid(bad)
    assert validator.is_valid({"name": "read", "arguments": {"path": "a", "encoding": "utf-8"}})
    assert json.dumps(PYDANTIC) == json.dumps(Shipment.model_json_schema())  # the tool's own schema is untouched


def test_conditionals_tuples_and_dependent_required_are_checked() -> None:
    at = {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}]}
    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["card", "cash"]}, "number": {"type": "string"}, "at": at},
        "if": {"properties": {"kind": {"const": "card"}}},
        "then": {"required": ["number"]},
        "dependentRequired": {"at": ["kind"]},
        "propertyNames": {"pattern": "^[a-z]+$"},
    }
    assert tool_schema_problem("pay", schema) is None
    assert tool_arguments_problems("pay", schema, {"kind": "card", "at": [1, "2"]}) == [
        "pay: $.at[1]: '2' is not of type 'number'",
        "pay: $: 'number' is a required property",
    ]
    assert tool_arguments_problems("pay", schema, {"at": [1, 2], "number": "4", "Zip": 1}) == [
        "pay: $: 'kind' is a dependency of 'at'",
        "pay: $: 'Zip' does not match '^[a-z]+$'",
    ]


# --- regexes run in linear time ------------------------------------------------------------

CATASTROPHIC = "(a+)+$"
"""Exponential on Python's backtracking ``re`` for 'aaa…b' (2^n steps); linear on RE2."""


def test_a_catastrophic_pattern_is_checked_in_linear_time() -> None:
    """A hostile client's pattern must not stall the agent that checks a model's arguments:
    on Python's ``re`` this input takes about 2^40 steps (hours); on RE2 it takes microseconds,
    so the test ends at all."""
    schema = {"type": "object", "properties": {"q": {"type": "string", "pattern": CATASTROPHIC}}}
    problems = tool_arguments_problems("search", schema, {"q": "a" * 40 + "b"})
    assert len(problems) == 1
    assert "does not match" in problems[0]
    assert tool_arguments_problems("search", schema, {"q": "aaaa"}) == []


def test_pattern_properties_and_closed_objects_match_keys_in_linear_time() -> None:
    schema = {
        "type": "object",
        "patternProperties": {CATASTROPHIC: {"type": "integer"}},
        "additionalProperties": False,
    }
    assert tool_arguments_problems("t", schema, {"aaa": 1}) == []
    (wrong_type,) = tool_arguments_problems("t", schema, {"aaa": "x"})
    assert "is not of type 'integer'" in wrong_type
    (extra,) = tool_arguments_problems("t", schema, {"a" * 40 + "b": 1})
    assert "does not match any of the regexes" in extra


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        pytest.param(
            {"type": "object", "properties": {"q": {"type": "string", "pattern": "(?=a)b"}}},
            "$.properties.q.pattern: '(?=a)b' cannot run in linear time here",
            id="lookahead",
        ),
        pytest.param(
            {"type": "object", "properties": {"q": {"type": "string", "pattern": r"(a)\1"}}},
            "cannot run in linear time here",
            id="backreference",
        ),
        pytest.param(
            {"type": "object", "patternProperties": {"(?<=x)y": {}}},
            "$.patternProperties: '(?<=x)y' cannot run in linear time here",
            id="lookbehind-key",
        ),
        pytest.param(
            {"type": "object", "patternProperties": {"^x": {}}, "unevaluatedProperties": False},
            "not supported together with unevaluatedProperties",
            id="pattern-properties-beside-unevaluated",
        ),
    ],
)
def test_a_pattern_that_needs_backtracking_is_refused_with_the_schema(schema: dict[str, Any], message: str) -> None:
    problem = tool_schema_problem("search", schema)
    assert problem is not None
    assert problem.startswith("tool 'search': ")
    assert message in problem
