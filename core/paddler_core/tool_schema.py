"""A tool's JSON Schema (its ``parameters``) and a model's call arguments, checked by
``jsonschema``: pure, no I/O.

* :func:`tool_schema_problem`: why a tool's ``parameters`` is not a schema we accept, or
  None. First Paddler 4.1's own checks (its ``RawParametersSchema``: every required
  field is a property, every property and ``additionalProperties`` is a valid schema;
  Paddler's messages), then the whole document against the meta-schema of its
  ``$schema`` (2020-12 when absent), then every ``$ref`` must resolve inside the
  document.
* :func:`tool_arguments_problems`: what is wrong with a call's arguments against that
  schema, one message per problem: ``"<tool>: <JSON path>: <what>"``.
* :func:`tool_call_schema`: the grammar schema of a forced call, with each tool's local
  ``$ref`` rewritten to where its parameters sit in it.

Bounded work: a schema nests at most :data:`MAX_SCHEMA_DEPTH` levels and holds at most
:data:`MAX_SCHEMA_VALUES` JSON values (request bodies are bounded the same way); a
``$ref`` resolves only inside the schema or to the bundled JSON Schema meta-schemas,
nothing is ever fetched. ``format`` is asserted only for formats checked without a
network or an optional library (:data:`CHECKED_FORMATS`); other formats are
annotations. Verdicts and validators are cached by the schema's JSON text
(:data:`CACHED_SCHEMAS` of at most :data:`CACHED_SCHEMA_CHARS`), so the tools an agent
framework sends with every request are compiled once, on the balancer and on the agent.
``pattern`` and ``patternProperties`` run on RE2 (linear time, whatever the pattern and
the text), not on Python's backtracking ``re``: a model's arguments are checked on the
agent, and a pattern such as ``(a+)+$`` must not stall it. A pattern RE2 cannot run
(lookaround, backreferences) is refused with the schema, and so is ``patternProperties``
beside ``unevaluatedProperties`` (jsonschema would match those with ``re``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import re2
import referencing.exceptions
from jsonschema import FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as META_SCHEMAS
from referencing import Registry, Resource
from referencing.jsonschema import Schema, SchemaRegistry, specification_with

from paddler_core.untrusted_json import MAX_DEPTH

MAX_SCHEMA_DEPTH = MAX_DEPTH
"""Deepest nesting of arrays and objects in a tool's schema (as in a request body)."""
MAX_SCHEMA_VALUES = 20_000
"""Most JSON values (objects, arrays, strings, numbers...) in one tool's schema."""
MAX_ARGUMENT_PROBLEMS = 20
"""Most problems reported for one call's arguments."""
MAX_MESSAGE_CHARS = 300
"""Longest single message (jsonschema quotes the offending value, which may be long)."""
CACHED_SCHEMAS = 128
"""Schemas whose verdict and validator are kept (agent frameworks send the same tools
with every request)."""
CACHED_SCHEMA_CHARS = 32 * 1024
"""Longest schema (as JSON text) that is cached; a longer one is checked each time, so the
cache holds a few megabytes at most."""
DEFAULT_DIALECT = "https://json-schema.org/draft/2020-12/schema"
"""The meta-schema of a schema without ``$schema``: JSON Schema 2020-12."""


def _is_date_time(instance: object) -> bool:
    """RFC 3339 date-time (with its offset), by the standard library."""
    if not isinstance(instance, str):
        return True
    try:
        parsed = datetime.fromisoformat(instance)
    except ValueError:
        return False
    return len(instance) >= 20 and instance[10] in "Tt " and parsed.tzinfo is not None


_DIALECTS: dict[str, type[Validator]] = {
    str(cls.META_SCHEMA["$schema"]).rstrip("#"): cls
    for cls in (
        validators.Draft3Validator,
        validators.Draft4Validator,
        validators.Draft6Validator,
        validators.Draft7Validator,
        validators.Draft201909Validator,
        validators.Draft202012Validator,
    )
}
KNOWN_DIALECTS = "draft-03, draft-04, draft-06, draft-07, 2019-09, 2020-12"
"""The ``$schema`` meta-schemas known (``http(s)://json-schema.org/...``, as jsonschema spells them)."""

CHECKED_FORMATS = ("date", "date-time", "email", "idn-email", "ipv4", "ipv6", "regex", "uuid")
"""The formats asserted (by the standard library only); any other ``format`` is an annotation."""
_FORMATS = FormatChecker(formats=[f for f in CHECKED_FORMATS if f != "date-time"])
_FORMATS.checks("date-time")(_is_date_time)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@lru_cache(maxsize=1024)
def _linear_regex(pattern: str) -> Any:
    """``pattern`` compiled by RE2, or the reason RE2 cannot run it (a str)."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as err:
        reason = err.args[0] if err.args else err
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)


def _matches(pattern: str, text: str) -> bool:
    compiled = _linear_regex(pattern)
    return not isinstance(compiled, str) and compiled.search(text) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """jsonschema's ``additionalProperties``, with ``patternProperties`` matched by RE2."""
    patterns = schema.get("patternProperties")
    if not isinstance(patterns, dict) or not patterns:
        yield from validators.Draft202012Validator.VALIDATORS["additionalProperties"](
            validator, additional, instance, schema
        )
        return
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    extras = [key for key in instance if key not in properties and not any(_matches(p, key) for p in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        verb = "does" if len(extras) == 1 else "do"
        joined = ", ".join(repr(each) for each in sorted(extras))
        listed = ", ".join(repr(each) for each in sorted(patterns))
        yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")


_LINEAR_KEYWORDS = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
}


class _Refused(LookupError):
    """A ``$ref`` outside the schema: never fetched."""


def _refuse(uri: str) -> Resource[Schema]:
    raise _Refused(uri)


_REGISTRY: SchemaRegistry = Registry(retrieve=_refuse).combine(META_SCHEMAS)  # type: ignore[call-arg]
"""The bundled meta-schemas and nothing else: any other URI is refused, not fetched."""

_SCHEMA_KEYWORDS = frozenset(
    {"items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames",
     "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
)  # fmt: skip
_SCHEMA_LIST_KEYWORDS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SCHEMA_MAP_KEYWORDS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"}
)
_ARGUMENT_VALIDATORS: dict[type[Validator], type[Validator]] = {
    cls: validators.extend(cls, _LINEAR_KEYWORDS)  # type: ignore[no-untyped-call]
    for cls in _DIALECTS.values()
}
"""Each dialect's validator with its regex keywords on RE2 (for arguments; the
meta-schemas' own patterns are fixed and safe)."""


def tool_schema_problem(tool_name: str, schema: Any) -> str | None:
    """Why ``schema`` is not a valid ``parameters`` schema of the tool ``tool_name``
    (the message names the tool and, past Paddler's own checks, the JSON path), or None."""
    if not isinstance(schema, dict | bool):
        return f"tool {tool_name!r}: the parameters schema must be an object or a boolean"
    size = _size_problem(schema)
    if size is not None:
        return f"tool {tool_name!r}: {size}"
    text = json.dumps(schema, ensure_ascii=False)
    problem = _schema_problem(text) if len(text) <= CACHED_SCHEMA_CHARS else _schema_problem.__wrapped__(text)
    return None if problem is None else f"tool {tool_name!r}: {problem}"


def tool_arguments_problems(tool_name: str, schema: Any, arguments: Any) -> list[str]:
    """Problems of a call's ``arguments`` against its tool's (valid) ``parameters``
    schema, as ``"<tool>: <JSON path>: <what>"``; empty when they are valid. No schema
    (None or ``{}``) admits any arguments object."""
    if not isinstance(arguments, dict):
        return [f"{tool_name}: arguments must be a JSON object, got {_json_type(arguments)}"]
    if schema is None or schema == {} or schema is True:
        return []
    problem = tool_schema_problem(tool_name, schema)
    if problem is not None:
        return [problem]
    text = json.dumps(schema, ensure_ascii=False)
    validator = _validator(text) if len(text) <= CACHED_SCHEMA_CHARS else _validator.__wrapped__(text)
    problems = []
    try:
        for error in validator.iter_errors(arguments):
            problems.append(_clip(f"{tool_name}: {error.json_path}: {_describe(error)}"))
            if len(problems) == MAX_ARGUMENT_PROBLEMS:
                break
    except RecursionError:
        problems.append(f"{tool_name}: $: the schema's references loop without end")
    except referencing.exceptions.Unresolvable as err:  # checked already; kept for safety
        problems.append(f"{tool_name}: $: {err}")
    return problems


def tool_call_schema(tools: Sequence[tuple[str, Mapping[str, Any] | None]]) -> dict[str, Any]:
    """A JSON schema admitting exactly one valid call ``{"name": ..., "arguments": {...}}``
    of one of ``tools`` (``(name, parameters)`` pairs; pass one to force that tool): the
    JSON-schema grammar of a forced tool call. Each tool's local references (``#/$defs/...``)
    are rewritten to where its parameters now sit, so ``$defs`` + ``$ref`` keep working."""
    if not tools:
        raise ValueError("tool_call_schema needs at least one tool")
    options = []
    for i, (name, parameters) in enumerate(tools):
        at = "" if len(tools) == 1 else f"/anyOf/{i}"
        arguments = _relocated(dict(parameters or {"type": "object"}), f"{at}/properties/arguments")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


# ---- internals -------------------------------------------------------------------------------


def _size_problem(schema: Any) -> str | None:
    """Depth and size bounds, checked without recursion."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_SCHEMA_VALUES:
            return f"the parameters schema holds more than {MAX_SCHEMA_VALUES} values"
        if isinstance(value, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                return f"the parameters schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return None


@lru_cache(maxsize=CACHED_SCHEMAS)
def _schema_problem(text: str) -> str | None:
    schema = json.loads(text)
    dialect = _dialect(schema)
    if isinstance(dialect, str):
        return dialect
    if isinstance(schema, dict):
        paddler = _paddler_problem(schema, dialect)
        if paddler is not None:
            return paddler
    error = best_match(_meta_validator(dialect).iter_errors(schema))
    if error is not None:
        return f"{error.json_path}: {_describe(error)}"
    regex = _regex_problem(schema, "$")
    if regex is not None:
        return regex
    return _reference_problem(schema, dialect)


def _regex_problem(schema: Any, path: str) -> str | None:
    """The first ``pattern``/``patternProperties`` key RE2 cannot run, or
    ``patternProperties`` beside ``unevaluatedProperties``, in the subschemas of ``schema``."""
    for where, subschema in _subschemas(schema, path):
        pattern = subschema.get("pattern")
        if isinstance(pattern, str) and isinstance(_linear_regex(pattern), str):
            reason = _linear_regex(pattern)
            return _clip(f"{where}.pattern: {pattern!r} cannot run in linear time here (RE2: {reason})")
        keys = subschema.get("patternProperties")
        if isinstance(keys, dict):
            for key in keys:
                if isinstance(_linear_regex(key), str):
                    reason = _linear_regex(key)
                    return _clip(f"{where}.patternProperties: {key!r} cannot run in linear time here (RE2: {reason})")
            if keys and _uses_keyword(schema, "unevaluatedProperties"):
                return f"{where}.patternProperties: not supported together with unevaluatedProperties"
    return None


def _uses_keyword(schema: Any, keyword: str) -> bool:
    return any(keyword in subschema for _where, subschema in _subschemas(schema, "$"))


def _subschemas(schema: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``schema`` and each subschema under a schema keyword, with its JSON path."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key, value in schema.items():
        where = path + _json_path([key])[1:]
        if key in _SCHEMA_KEYWORDS:
            yield from _subschemas(value, where)
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            for i, item in enumerate(value):
                yield from _subschemas(item, where + _json_path([i])[1:])
        elif key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            for name, item in value.items():
                yield from _subschemas(item, where + _json_path([str(name)])[1:])


def _dialect(schema: Any) -> type[Validator] | str:
    """The validator class of the schema's ``$schema``, or why there is none."""
    uri = schema.get("$schema", DEFAULT_DIALECT) if isinstance(schema, dict) else DEFAULT_DIALECT
    if not isinstance(uri, str):
        return f"$['$schema']: {uri!r} is not a string"
    found = _DIALECTS.get(uri.rstrip("#"))
    if found is None:
        return _clip(f"$['$schema']: {uri!r} is not a JSON Schema dialect known here ({KNOWN_DIALECTS})")
    return found


def _paddler_problem(schema: dict[str, Any], dialect: type[Validator]) -> str | None:
    """Paddler 4.1's ``RawParametersSchema`` checks, with its messages (and the JSON path
    of the offending keyword after them)."""
    properties = schema.get("properties")
    required = schema.get("required")
    if isinstance(required, list) and isinstance(properties, dict):
        for field in required:
            if field not in properties:
                return f"Required field '{field}' not found in properties"
    meta = _meta_validator(dialect)
    if isinstance(properties, dict):
        for key, sub in properties.items():
            error = best_match(meta.iter_errors(sub))
            if error is not None:
                where = _json_path(["properties", key, *error.absolute_path])
                return f"Invalid schema for property '{key}': {error.message} (at {where})"
    additional = schema.get("additionalProperties")
    if additional is not None and not isinstance(additional, bool):
        error = best_match(meta.iter_errors(additional))
        if error is not None:
            where = _json_path(["additionalProperties", *error.absolute_path])
            return f"Invalid additionalProperties schema: {error.message} (at {where})"
    return None


_PLAIN_NAME = re.compile("^[a-zA-Z][a-zA-Z0-9_]*$")


def _json_path(parts: list[str | int]) -> str:
    """``$.properties.x[0]['odd key']``, as jsonschema writes an error's path."""
    path = "$"
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_NAME.match(part):
            path += f".{part}"
        else:
            path += "['" + part.replace("\\", "\\\\").replace("'", "\\'") + "']"
    return path


@lru_cache(maxsize=8)
def _meta_validator(dialect: type[Validator]) -> Validator:
    """A validator of schemas of ``dialect`` (against its meta-schema)."""
    meta = _dialect(dialect.META_SCHEMA)
    assert not isinstance(meta, str), meta
    return meta(dialect.META_SCHEMA, registry=_REGISTRY, format_checker=_FORMATS)


@lru_cache(maxsize=CACHED_SCHEMAS)
def _validator(text: str) -> Validator:
    """The validator of one (valid) schema, by its JSON text."""
    schema = json.loads(text)
    dialect = _dialect(schema)
    assert not isinstance(dialect, str), dialect
    return _ARGUMENT_VALIDATORS[dialect](schema, registry=_REGISTRY, format_checker=_FORMATS)


def _reference_problem(schema: Any, dialect: type[Validator]) -> str | None:
    """The first ``$ref`` that does not resolve inside the schema, or None."""
    spec = specification_with(dialect.META_SCHEMA["$schema"])
    root = spec.create_resource(schema)
    resolver: Any = _REGISTRY.resolver_with_root(root)
    for path, ref, scope in _references(schema, "$", resolver, spec):
        try:
            scope.lookup(ref)
        except referencing.exceptions.Unresolvable as err:
            if isinstance(err.__cause__, referencing.exceptions.Unretrievable):
                return _clip(f"{path}['$ref']: {ref!r} is outside the schema; references are never fetched")
            return _clip(f"{path}['$ref']: {ref!r} does not resolve inside the schema")
    return None


def _references(schema: Any, path: str, resolver: Any, spec: Any) -> Iterator[tuple[str, str, Any]]:
    """Each ``$ref`` (its JSON path, value and resolver) in the subschemas of ``schema``."""
    if not isinstance(schema, dict):
        return
    scope = resolver.in_subresource(spec.create_resource(schema))
    ref = schema.get("$ref")
    if isinstance(ref, str):
        yield path, ref, scope
    for key, value in schema.items():
        where = path + _json_path([key])[1:]
        if key in _SCHEMA_KEYWORDS and isinstance(value, dict | bool):
            yield from _references(value, where, scope, spec)
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            for i, item in enumerate(value):
                yield from _references(item, where + _json_path([i])[1:], scope, spec)
        elif key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            for name, item in value.items():
                yield from _references(item, where + _json_path([str(name)])[1:], scope, spec)


def _relocated(schema: Any, pointer: str) -> Any:
    """``schema`` moved to JSON pointer ``pointer`` of a larger document: its local
    references (``#`` and ``#/...``) point into the new place. Subschemas with their own
    ``$id`` keep theirs (their references are relative to themselves)."""
    if not isinstance(schema, dict) or _owns_id(schema):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + pointer + value[1:]
        elif key in _SCHEMA_KEYWORDS:
            out[key] = value if _owns_id(value) else _relocated(value, pointer)
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            out[key] = [item if _owns_id(item) else _relocated(item, pointer) for item in value]
        elif key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {k: v if _owns_id(v) else _relocated(v, pointer) for k, v in value.items()}
        else:
            out[key] = value
    return out


def _owns_id(schema: Any) -> bool:
    return isinstance(schema, dict) and "$id" in schema


def _describe(error: ValidationError) -> str:
    """jsonschema's message; for ``anyOf``/``oneOf``, also the closest alternative's."""
    if error.context:
        closest = best_match(error.context)
        if closest is not None:
            return f"{error.message} (closest: {closest.json_path}: {closest.message})"
    return error.message


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__
