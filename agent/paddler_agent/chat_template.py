"""Render a model's Jinja chat template the way Hugging Face transformers does.

The template comes from the GGUF's ``tokenizer.chat_template`` metadata or from
the desired state's override, so it is untrusted text: it runs in Jinja's
``ImmutableSandboxedEnvironment`` (no attribute escapes, no mutation of the
messages), with ``trim_blocks``/``lstrip_blocks`` and the ``loopcontrols``
extension like transformers, and with the variables and helpers real templates
use: ``messages``, ``add_generation_prompt``, ``enable_thinking``, ``tools``,
``bos_token``, ``eos_token``, ``raise_exception(msg)``, ``strftime_now(fmt)`` and
a ``tojson`` filter that takes transformers' keyword arguments.

Every failure (syntax, an exception the template raises, an undefined value, a
sandbox violation) is a :class:`ChatTemplateError` with a message for people; the
engine answers it as Paddler's ``ChatTemplateError`` payload.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from paddler_core.inference import ConversationMessage, Tool

logger = logging.getLogger(__name__)

TEMPLATE_CACHE_SIZE = 32
MAX_REPEAT_LENGTH = 1_000_000
"""Longest string or list a template may build with ``*`` (guards memory)."""
MAX_POWER_EXPONENT = 1024


class ChatTemplateError(Exception):
    """The chat template cannot be compiled or rendered; ``str()`` is for people."""


class _TemplateRaised(jinja2.TemplateError):
    """What ``raise_exception(msg)`` raises inside a template."""


def _raise_exception(message: Any) -> NoReturn:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: plain ``json.dumps`` (no HTML escaping, unicode kept)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask
    marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus limits on ``*`` and ``**`` so a template cannot
    allocate gigabytes or compute enormous integers."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(count, int)
                    and len(seq) * count > MAX_REPEAT_LENGTH
                ):
                    raise SecurityError("the template tried to build a value that is too large")
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_POWER_EXPONENT:
            raise SecurityError("the template tried to compute a power that is too large")
        return super().call_binop(context, operator, left, right)


def _make_environment() -> jinja2.Environment:
    env = _ChatSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[loopcontrols, _GenerationTag],
        keep_trailing_newline=False,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


@functools.lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def compile_chat_template(template: str) -> jinja2.Template:
    """The compiled template (cached by its text); raises ChatTemplateError.

    Call it when a model or override is applied, to report a broken template
    before the first request needs it.
    """
    try:
        return _compile(template)
    except jinja2.TemplateSyntaxError as e:
        where = f" at line {e.lineno}" if e.lineno else ""
        raise ChatTemplateError(f"The chat template has a syntax error{where}: {e.message}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"The chat template cannot be compiled: {e}") from e


def message_to_template_dict(message: ConversationMessage) -> dict[str, Any]:
    """A message as templates expect it: ``role``, text ``content``, and the extra
    keys (``tool_calls``, ``tool_call_id``, ``name``, ...) as given.

    A tool call's ``function.arguments`` that is a JSON string (the OpenAI shape) is
    decoded to an object, because templates write it with ``tojson``.
    """
    out: dict[str, Any] = {}
    for key, value in (message.model_extra or {}).items():
        out[key] = value
    out["role"] = message.role
    out["content"] = message.text()
    tool_calls = out.get("tool_calls")
    if isinstance(tool_calls, list):
        out["tool_calls"] = [_normalize_tool_call(call) for call in tool_calls]
    return out


def _normalize_tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if isinstance(function, dict):
        function = dict(function)
        function["arguments"] = _decode_arguments(function.get("arguments"))
        call = {**call, "function": function}
    elif "arguments" in call:
        call = {**call, "arguments": _decode_arguments(call["arguments"])}
    return call


def _decode_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except ValueError:
            return arguments
        if isinstance(decoded, dict):
            return decoded
    return arguments


def tool_to_template_dict(tool: Tool) -> dict[str, Any]:
    return tool.model_dump(mode="json", exclude_none=True)


def render_chat(
    template: str,
    messages: Sequence[ConversationMessage],
    *,
    add_generation_prompt: bool,
    enable_thinking: bool,
    tools: Sequence[Tool] | None,
    bos_token: str,
    eos_token: str,
) -> str:
    """The prompt text for ``messages``; raises ChatTemplateError."""
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = {
        "messages": [message_to_template_dict(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
        "enable_thinking": enable_thinking,
        "tools": [tool_to_template_dict(t) for t in tools] if tools else None,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    try:
        return compiled.render(**variables)
    except _TemplateRaised as e:
        raise ChatTemplateError(f"The chat template rejected the conversation: {e.message}") from e
    except SecurityError as e:
        raise ChatTemplateError(f"The chat template did something unsafe: {e}") from e
    except jinja2.UndefinedError as e:
        raise ChatTemplateError(f"The chat template used an undefined value: {e.message}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"The chat template failed: {e}") from e
    except RecursionError as e:
        raise ChatTemplateError("The chat template recursed too deeply.") from e
    except Exception as e:
        logger.info("chat template failed", extra={"error": repr(e)})
        raise ChatTemplateError(
            f"The chat template failed: {type(e).__name__}: {e}"
        ) from e
