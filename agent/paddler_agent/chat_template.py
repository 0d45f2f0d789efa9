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

import asyncio
import contextlib
import functools
import json
import logging
import struct
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, BinaryIO, NoReturn

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
MAX_RENDERED_CHARS = 4 * 1024 * 1024
"""Longest prompt a template may render (more than any context holds)."""
RENDER_TIMEOUT_S = 5.0
"""Longest a render may take (real templates take milliseconds)."""
RENDER_MEMORY_BYTES = 1024 * 1024 * 1024
"""Address space of the renderer process (the interpreter itself uses ~150 MB)."""
_HEADER = struct.Struct("!Q")
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
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


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
        return _render_bounded(compiled, variables)
    except ChatTemplateError:
        raise
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
    except MemoryError as e:
        raise ChatTemplateError("The chat template used more memory than a render may use.") from e
    except Exception as e:
        logger.info("chat template failed error=%r", e)
        raise ChatTemplateError(f"The chat template failed: {type(e).__name__}: {e}") from e


def _render_bounded(compiled: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render piece by piece, stopping once the output passes MAX_RENDERED_CHARS."""
    parts: list[str] = []
    size = 0
    for piece in compiled.generate(**variables):
        size += len(piece)
        if size > MAX_RENDERED_CHARS:
            raise ChatTemplateError(
                f"The chat template rendered more than {MAX_RENDERED_CHARS} characters; a prompt cannot be that long."
            )
        parts.append(piece)
    return "".join(parts)


# ---- rendering in a child process -----------------------------------------------------------
#
# A template is a program: ``range(10**5)`` loops nested twice run for hours, and
# ``center``, ``format`` or ``~`` build strings of any size. Python cannot stop a
# thread, so templates render in a child process with an address-space limit; a
# render that passes the time limit kills the child (a fresh one starts for the next
# request) and fails that request only.


def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    return stream.read(size)


def _frame(value: Any) -> bytes:
    data = json.dumps(value).encode()  # ASCII: lone surrogates survive the trip
    return _HEADER.pack(len(data)) + data


def renderer_main() -> None:
    """The renderer process (``python -m paddler_agent.chat_template``): render the jobs
    read from stdin, answer on stdout, until stdin closes."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when we stop
    memory_limit = int(sys.argv[1]) if len(sys.argv) > 1 else RENDER_MEMORY_BYTES
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        data = _read_frame(stdin)
        if data is None:
            return
        reply: list[str]
        try:
            job = json.loads(data)
            reply = [
                "ok",
                render_chat(
                    job["template"],
                    [ConversationMessage.model_validate(m) for m in job["messages"]],
                    add_generation_prompt=job["add_generation_prompt"],
                    enable_thinking=job["enable_thinking"],
                    tools=[Tool.model_validate(t) for t in job["tools"]] if job["tools"] is not None else None,
                    bos_token=job["bos_token"],
                    eos_token=job["eos_token"],
                ),
            ]
        except ChatTemplateError as e:
            reply = ["error", str(e)]
        except MemoryError:
            reply = ["error", "The chat template used more memory than a render may use."]
        try:
            out = _frame(reply)
        except MemoryError:
            out = _frame(["error", "The chat template used more memory than a render may use."])
        stdout.write(out)
        stdout.flush()


class TemplateRenderer:
    """Renders chat templates in a child process, one render at a time, each limited
    in time (``timeout``), memory (``memory_limit`` bytes of address space) and output
    (MAX_RENDERED_CHARS). Use from the event loop; ``close`` stops the child."""

    def __init__(self, timeout: float = RENDER_TIMEOUT_S, memory_limit: int = RENDER_MEMORY_BYTES) -> None:
        self.timeout = timeout
        self.memory_limit = memory_limit
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def render(
        self,
        template: str,
        messages: Sequence[ConversationMessage],
        *,
        add_generation_prompt: bool,
        enable_thinking: bool,
        tools: Sequence[Tool] | None,
        bos_token: str,
        eos_token: str,
    ) -> str:
        """The prompt text; raises ChatTemplateError (also on time-out and crash)."""
        job = _frame(
            {
                "template": template,
                "messages": [m.model_dump(mode="json") for m in messages],
                "add_generation_prompt": add_generation_prompt,
                "enable_thinking": enable_thinking,
                "tools": [t.model_dump(mode="json") for t in tools] if tools else None,
                "bos_token": bos_token,
                "eos_token": eos_token,
            }
        )
        async with self._lock:
            process = await self._started()
            assert process.stdin is not None
            assert process.stdout is not None
            try:
                async with asyncio.timeout(self.timeout):
                    process.stdin.write(job)
                    await process.stdin.drain()
                    (size,) = _HEADER.unpack(await process.stdout.readexactly(_HEADER.size))
                    status, text = json.loads(await process.stdout.readexactly(size))
            except TimeoutError:
                logger.warning("chat template render timed out timeout_s=%.1f", self.timeout)
                await self._kill()
                raise ChatTemplateError(
                    f"The chat template did not finish rendering within {self.timeout:g} s."
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
                await self._kill()
                raise ChatTemplateError("The chat template renderer stopped while rendering.") from e
            except BaseException:
                await self._kill()  # cancelled mid-render: the child's state is unknown
                raise
        if status != "ok":
            raise ChatTemplateError(str(text))
        return str(text)

    async def _started(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "paddler_agent.chat_template",
            str(self.memory_limit),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return self._process

    async def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.kill()
        await process.wait()

    async def close(self) -> None:
        """Stop the renderer process (it also exits by itself when the agent dies)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(2.0):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


if __name__ == "__main__":
    renderer_main()
