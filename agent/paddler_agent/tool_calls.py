"""Reasoning and tool calls in generated text: pure functions, no I/O.

* :class:`OutputClassifier` splits the stream of generated pieces into
  ``ContentToken`` / ``ReasoningToken`` / ``ToolCallToken`` text: reasoning is
  between ``<think>`` and ``</think>``; a tool call is between ``<tool_call>`` and
  ``</tool_call>`` (Hermes / Qwen style) or, when tools are offered, a bare JSON
  object the answer starts with. Tags split across pieces are recognised (a
  piece that might be the start of a tag is held back until the next one).
* :func:`parse_tool_calls` turns the tool-call text into the Paddler payload to
  emit (``ToolCallParsed`` / ``ToolCallValidationFailed`` / ``ToolCallParseFailed``),
  validating arguments against each tool's JSON-schema ``parameters`` with
  ``jsonschema`` (:mod:`paddler_core.tool_schema`).
* :func:`tool_call_grammar` is a JSON schema that only admits a valid call, for
  the JSON-schema grammar when a tool call is required.

Markup: the ``<think>``/``</think>`` tags are dropped (reasoning text is just the
reasoning); ``<tool_call>`` tags stay in the ``ToolCallToken`` text, which is the
raw call as the model wrote it and what :func:`parse_tool_calls` reads.
Whitespace between regions: before a reasoning block it is dropped; before a
tool call it belongs to the tool call; at the start of the answer after
reasoning or a tool call it is dropped; at the very start of the output it is
content.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from paddler_core.generated_output import tool_call_result
from paddler_core.inference import GeneratedTokenPayload, Tool
from paddler_core.tool_schema import tool_arguments_problems
from paddler_core.tool_schema import tool_call_schema as core_tool_call_schema

logger = logging.getLogger(__name__)

TokenKind = Literal["ContentToken", "ReasoningToken", "ToolCallToken"]
Piece = tuple[TokenKind, str]

CONTENT: TokenKind = "ContentToken"
REASONING: TokenKind = "ReasoningToken"
TOOL_CALL: TokenKind = "ToolCallToken"

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


class _Mode(Enum):
    BEGIN = "begin"  # start of output, or after </think> or a tool call: undecided
    CONTENT = "content"
    REASONING = "reasoning"
    TAGGED_CALL = "tagged_call"
    BARE_CALL = "bare_call"


def _partial_tag_suffix(text: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a tag."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def _find_first(text: str, tags: Sequence[str]) -> tuple[int, str] | None:
    found: tuple[int, str] | None = None
    for tag in tags:
        i = text.find(tag)
        if i >= 0 and (found is None or i < found[0]):
            found = (i, tag)
    return found


@dataclass
class _JsonScanner:
    """Finds where a JSON object that starts at the first ``{`` fed ends."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def end_of_object(self, text: str) -> int | None:
        """Index just past the closing brace in ``text``, or None if not there yet."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        return None


@dataclass
class OutputClassifier:
    """Classifies generated pieces; one instance per generation.

    ``tools``: tools were offered, so ``<tool_call>`` tags and a leading bare JSON
    object are tool calls (otherwise they are plain content). ``reasoning``:
    recognise ``<think>`` blocks. ``start_in_reasoning``: the prompt already opened
    a ``<think>`` block (templates that put it in the generation prompt).
    """

    tools: bool = False
    reasoning: bool = True
    start_in_reasoning: bool = False
    tool_call_text: str = field(default="", init=False)
    """All ``ToolCallToken`` text so far: the input of :func:`parse_tool_calls`."""
    last_kind: TokenKind = field(default=CONTENT, init=False)
    """The kind of the text (or tag) consumed most recently: how to count a token
    whose piece emitted nothing (a tag, or text held back)."""
    _mode: _Mode = field(default=_Mode.BEGIN, init=False)
    _buf: str = field(default="", init=False)
    _held_ws: str = field(default="", init=False)
    _started: bool = field(default=False, init=False)
    _scanner: _JsonScanner = field(default_factory=_JsonScanner, init=False)

    def __post_init__(self) -> None:
        if self.start_in_reasoning:
            self._mode = _Mode.REASONING
            self._started = True
            self.last_kind = REASONING

    @property
    def saw_tool_call(self) -> bool:
        return bool(self.tool_call_text.strip())

    @property
    def kind(self) -> TokenKind:
        """The kind of the region the classifier is in now."""
        if self._mode is _Mode.REASONING:
            return REASONING
        if self._mode in (_Mode.TAGGED_CALL, _Mode.BARE_CALL):
            return TOOL_CALL
        return CONTENT

    def feed(self, piece: str) -> list[Piece]:
        """Classify one generated piece; returns what can be emitted now."""
        self._buf += piece
        out: list[Piece] = []
        self._drain(out, final=False)
        return self._merge(out)

    def finish(self) -> list[Piece]:
        """Flush what was held back at the end of generation."""
        out: list[Piece] = []
        self._drain(out, final=True)
        if self._buf:
            self._emit(out, self.kind, self._buf)
            self._buf = ""
        if self._held_ws:
            if not self._started:
                self._emit(out, CONTENT, self._held_ws)
            self._held_ws = ""
        return self._merge(out)

    # -- internals ------------------------------------------------------------------------

    def _emit(self, out: list[Piece], kind: TokenKind, text: str) -> None:
        if not text:
            return
        out.append((kind, text))
        self.last_kind = kind
        self._started = True
        if kind == TOOL_CALL:
            self.tool_call_text += text

    @staticmethod
    def _merge(out: list[Piece]) -> list[Piece]:
        merged: list[Piece] = []
        for kind, text in out:
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + text)
            else:
                merged.append((kind, text))
        return merged

    def _open_tags(self) -> list[str]:
        tags = []
        if self.reasoning:
            tags.append(THINK_OPEN)
        if self.tools:
            tags.append(TOOL_OPEN)
        return tags

    def _drain(self, out: list[Piece], final: bool) -> None:
        steps = {
            _Mode.BEGIN: self._step_begin,
            _Mode.CONTENT: self._step_content,
            _Mode.REASONING: self._step_reasoning,
            _Mode.TAGGED_CALL: self._step_tagged_call,
            _Mode.BARE_CALL: self._step_bare_call,
        }
        while self._buf and steps[self._mode](out, final):
            pass

    def _step_begin(self, out: list[Piece], final: bool) -> bool:
        stripped = self._buf.lstrip()
        self._held_ws += self._buf[: len(self._buf) - len(stripped)]
        self._buf = stripped
        if not stripped:
            return False
        for tag in self._open_tags():
            if stripped.startswith(tag):
                self._buf = stripped[len(tag) :]
                self._enter_tag(out, tag)
                return True
            if tag.startswith(stripped) and not final:
                return False  # maybe a tag: wait for more
        if self.tools and stripped.startswith("{"):
            self._emit(out, TOOL_CALL, self._held_ws)
            self._held_ws = ""
            self._scanner = _JsonScanner()
            self._mode = _Mode.BARE_CALL
            return True
        if not self._started:
            self._emit(out, CONTENT, self._held_ws)
        self._held_ws = ""
        self._mode = _Mode.CONTENT
        return True

    def _enter_tag(self, out: list[Piece], tag: str) -> None:
        if tag == THINK_OPEN:
            self._held_ws = ""
            self._mode = _Mode.REASONING
            self.last_kind = REASONING
            self._started = True
        else:
            self._emit(out, TOOL_CALL, self._held_ws + tag)
            self._held_ws = ""
            self._mode = _Mode.TAGGED_CALL

    def _until(self, out: list[Piece], kind: TokenKind, tags: Sequence[str], final: bool) -> str | None:
        """Emit ``kind`` text up to the first of ``tags``; returns the tag, if found
        (consumed from the buffer but not emitted), else holds a partial tag back."""
        found = _find_first(self._buf, tags)
        if found is not None:
            i, tag = found
            self._emit(out, kind, self._buf[:i])
            self._buf = self._buf[i + len(tag) :]
            return tag
        hold = 0 if final else _partial_tag_suffix(self._buf, tags)
        self._emit(out, kind, self._buf[: len(self._buf) - hold])
        self._buf = self._buf[len(self._buf) - hold :]
        return None

    def _step_content(self, out: list[Piece], final: bool) -> bool:
        tag = self._until(out, CONTENT, self._open_tags(), final)
        if tag is None:
            return False
        self._enter_tag(out, tag)
        return True

    def _step_reasoning(self, out: list[Piece], final: bool) -> bool:
        if self._until(out, REASONING, [THINK_CLOSE], final) is None:
            return False
        self.last_kind = REASONING
        self._mode = _Mode.BEGIN
        return True

    def _step_tagged_call(self, out: list[Piece], final: bool) -> bool:
        if self._until(out, TOOL_CALL, [TOOL_CLOSE], final) is None:
            return False
        self._emit(out, TOOL_CALL, TOOL_CLOSE)
        self._mode = _Mode.BEGIN
        return True

    def _step_bare_call(self, out: list[Piece], final: bool) -> bool:
        end = self._scanner.end_of_object(self._buf)
        if end is None:
            self._emit(out, TOOL_CALL, self._buf)
            self._buf = ""
            return False
        self._emit(out, TOOL_CALL, self._buf[:end])
        self._buf = self._buf[end:]
        self._mode = _Mode.BEGIN
        return True


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open ``<think>`` block (templates
    such as Qwen3's or DeepSeek-R1's start the answer with it): then build the
    classifier with ``start_in_reasoning=True``."""
    opened = prompt.rfind(THINK_OPEN)
    return opened >= 0 and prompt.rfind(THINK_CLOSE) < opened


# ---- parsing and validating tool calls ------------------------------------------------------


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: Any
    """The decoded arguments object, or the raw string when it is not valid JSON."""
    arguments_valid_json: bool = True

    def to_payload(self) -> dict[str, Any]:
        arguments = {"ValidJson": self.arguments} if self.arguments_valid_json else {"InvalidJson": self.arguments}
        return {"id": self.id, "name": self.name, "arguments": arguments}


ToolCallOutcomeKind = Literal["ToolCallParsed", "ToolCallValidationFailed", "ToolCallParseFailed"]


@dataclass(frozen=True)
class ToolCallOutcome:
    """What the model's tool-call text amounts to, and the payload to emit.

    ``payload`` is ``{"GeneratedToken": {kind: ...}}``. paddler-client treats all
    three kinds as terminal (the stream ends there for its reader).
    """

    kind: ToolCallOutcomeKind
    calls: tuple[ParsedCall, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.kind == "ToolCallParsed"

    @property
    def payload(self) -> GeneratedTokenPayload:
        if self.kind == "ToolCallParsed":
            body: Any = [c.to_payload() for c in self.calls]
        elif self.kind == "ToolCallValidationFailed":
            body = list(self.errors)
        else:
            body = "; ".join(self.errors)
        return tool_call_result(self.kind, body)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _ParseError(ValueError):
    pass


def split_tool_call_text(text: str) -> list[Any]:
    """The JSON values of the calls in ``text``: each ``<tool_call>`` block, or the
    bare JSON values one after another (an array counts as several calls)."""
    if TOOL_OPEN in text:
        bodies = []
        for chunk in text.split(TOOL_OPEN)[1:]:
            body = chunk.split(TOOL_CLOSE, 1)[0].strip()
            if not body:
                raise _ParseError("a <tool_call> block is empty")
            bodies.append(body)
        values: list[Any] = []
        for n, body in enumerate(bodies, 1):
            try:
                values.append(json.loads(body))
            except ValueError as e:
                raise _ParseError(f"tool call {n} is not valid JSON: {e}") from e
        return values
    values = []
    decoder = json.JSONDecoder()
    i = 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in ",;"):
            i += 1
        if i >= len(text):
            break
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError as e:
            raise _ParseError(f"the tool call is not valid JSON: {e}") from e
        if isinstance(value, list):
            values.extend(value)
        else:
            values.append(value)
    return values


def _call_fields(value: Any, n: int) -> tuple[str, Any]:
    """(name, arguments) of one call in any of the common shapes."""
    if not isinstance(value, dict):
        raise _ParseError(f"tool call {n} is not a JSON object")
    if isinstance(value.get("function"), dict):
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise _ParseError(f'tool call {n} has no "name"')
    if "arguments" in value:
        return name, value["arguments"]
    return name, value.get("parameters", {})


def parse_tool_calls(
    text: str,
    tools: Sequence[Tool],
    *,
    make_id: Callable[[], str] = new_call_id,
) -> ToolCallOutcome:
    """Parse and validate the tool calls the model wrote (``OutputClassifier.tool_call_text``)."""
    try:
        values = split_tool_call_text(text)
        if not values:
            raise _ParseError("the output has no tool call")
        fields = [_call_fields(v, n) for n, v in enumerate(values, 1)]
    except _ParseError as e:
        logger.info("tool call parse failed error=%s", e)
        return ToolCallOutcome("ToolCallParseFailed", errors=(str(e),))
    by_name = {t.function.name: t for t in tools}
    calls: list[ParsedCall] = []
    errors: list[str] = []
    for name, arguments in fields:
        valid_json = True
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                valid_json = False
        calls.append(ParsedCall(make_id(), name, arguments, valid_json))
        tool = by_name.get(name)
        if tool is None:
            known = ", ".join(sorted(by_name)) or "none"
            errors.append(f"{name}: no such tool (available: {known})")
        elif valid_json:
            errors.extend(validate_arguments(arguments, tool))
    if errors:
        logger.info("tool call validation failed errors=%s", "; ".join(errors))
        return ToolCallOutcome("ToolCallValidationFailed", tuple(calls), tuple(errors))
    return ToolCallOutcome("ToolCallParsed", tuple(calls))


def validate_arguments(arguments: Any, tool: Tool) -> list[str]:
    """Problems of ``arguments`` against the tool's parameters schema (empty: valid), by
    ``jsonschema`` (paddler_core.tool_schema), as ``"<tool>: <JSON path>: <what>"``."""
    return tool_arguments_problems(tool.function.name, tool.function.parameters, arguments)


# ---- grammar -------------------------------------------------------------------------------


def tool_call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """A JSON schema admitting exactly one valid call ``{"name": ..., "arguments": {...}}``
    of one of ``tools`` (pass a single tool to force that one)."""
    return core_tool_call_schema([(t.function.name, t.function.parameters) for t in tools])


def tool_call_grammar(tools: Sequence[Tool]) -> str:
    """:func:`tool_call_schema` serialised, for ``JsonSchemaGrammar(schema=...)``.

    The model then writes a bare JSON object, which :class:`OutputClassifier` (with
    ``tools=True``) classifies as a tool call and :func:`parse_tool_calls` reads.
    """
    return json.dumps(tool_call_schema(tools), separators=(",", ":"))
