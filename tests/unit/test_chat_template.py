"""chat_template: real templates rendered in the sandbox, errors, escape attempts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from paddler_agent.chat_template import (
    ChatTemplateError,
    compile_chat_template,
    message_to_template_dict,
    render_chat,
)
from paddler_core.inference import ConversationMessage, Tool

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def msgs(*pairs: tuple[str, str]) -> list[ConversationMessage]:
    return [ConversationMessage(role=r, content=c) for r, c in pairs]


def render(
    text: str,
    messages: list[ConversationMessage],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    tools: list[Tool] | None = None,
) -> str:
    return render_chat(
        text,
        messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        tools=tools,
        bos_token="<s>",
        eos_token="</s>",
    )


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.mark.parametrize(
    ("name", "messages", "add_generation_prompt", "expected"),
    [
        (
            "smollm2.jinja",
            msgs(("user", "Hi")),
            True,
            SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "smollm2.jinja",
            msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")),
            False,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello<|im_end|>\n",
        ),
        (
            "chatml.jinja",
            msgs(("user", "2+2?")),
            True,
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "mistral_alternating.jinja",
            msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
            False,
            "<s>[INST] a [/INST]b</s>[INST] c [/INST]",
        ),
    ],
)
def test_renders_real_templates(
    name: str, messages: list[ConversationMessage], add_generation_prompt: bool, expected: str
) -> None:
    got = render(template(name), messages, add_generation_prompt=add_generation_prompt)
    assert got == expected


def test_content_parts_become_text() -> None:
    message = ConversationMessage.model_validate(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hello "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "world"},
            ],
        }
    )
    got = render(template("chatml.jinja"), [message], add_generation_prompt=False)
    assert got == "<|im_start|>user\nHello world<|im_end|>\n"


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            msgs(("assistant", "first")),
            "Conversation roles must alternate user/assistant/user/assistant/...",
        ),
        (msgs(("system", "x")), "Conversation roles must alternate"),
        (msgs(("user", "a"), ("tool", "b")), "Only user and assistant roles"),
    ],
)
def test_raise_exception(messages: list[ConversationMessage], expected: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        render(template("mistral_alternating.jinja"), messages)
    assert expected in str(info.value)
    assert str(info.value).startswith("The chat template rejected the conversation")


WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
)


def test_tools_template_renders_tools_and_tool_calls() -> None:
    conversation = [
        ConversationMessage(role="user", content="Weather in Paris?"),
        ConversationMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        # OpenAI sends arguments as a JSON string; templates want an object.
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            }
        ),
        ConversationMessage.model_validate({"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}),
    ]
    got = render(template("qwen_tools.jinja"), conversation, tools=[WEATHER])
    tool_json = json.dumps(WEATHER.model_dump(mode="json", exclude_none=True))
    assert got == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{tool_json}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("tools", "enable_thinking", "present", "absent"),
    [
        (None, True, "<|im_start|>assistant\n", "<tools>"),
        (None, False, "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<tools>"),
        ([WEATHER], True, '"name": "get_weather"', "<think>"),
    ],
)
def test_tools_and_thinking_switches(
    tools: list[Tool] | None, enable_thinking: bool, present: str, absent: str
) -> None:
    got = render(
        template("qwen_tools.jinja"),
        msgs(("user", "hi")),
        tools=tools,
        enable_thinking=enable_thinking,
    )
    assert present in got
    assert absent not in got


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{ {'b': 1, 'a': 'é'} | tojson }}", '{"b": 1, "a": "é"}'),
        ("{{ {'b': 1, 'a': 2} | tojson(sort_keys=True) }}", '{"a": 2, "b": 1}'),
        ("{{ ['é'] | tojson(ensure_ascii=True) }}", '["\\u00e9"]'),
        ("{{ {'a': [1]} | tojson(indent=2) }}", '{\n  "a": [\n    1\n  ]\n}'),
        ("{{ '<b>' | tojson }}", '"<b>"'),
        ("{{ strftime_now('%Y') | length }}", "4"),
        ("{{ bos_token }}|{{ eos_token }}", "<s>|</s>"),
        ("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}", "b"),
        ("{% generation %}{{ messages[0].content }}{% endgeneration %}", "a"),
        ("{{ messages[0].content.strip().upper() }}", "A"),
        ("{% if foo is defined %}x{% else %}y{% endif %}", "y"),
        ("  {% if true %}\n    yes\n  {% endif %}\n", "    yes\n"),  # trim/lstrip blocks
    ],
)
def test_helpers_and_environment(text: str, expected: str) -> None:
    messages = msgs(("user", "a"), ("assistant", "b"))
    assert render(text, messages, add_generation_prompt=False) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{% for m in messages %}{{ m.content }", "syntax error at line 1"),
        ("{% if x %}never closed", "syntax error"),
        ("{{ messages[0].nope.deeper }}", "undefined"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_errors_have_clear_messages(text: str, fragment: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        render(text, msgs(("user", "a")))
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        # Reaching Python internals: the sandbox hands back an empty undefined value.
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.system('true') }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ self._TemplateReference__context }}",
        "{{ ''.format.__self__ }}",
        "{{ '{0.__class__}'.format(messages) }}",
        "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
    ],
)
def test_sandbox_hides_python_internals(text: str) -> None:
    try:
        got = render(text, msgs(("user", "a")))
    except ChatTemplateError:
        return
    assert got == ""


@pytest.mark.parametrize(
    "text",
    [
        # Mutating the caller's data, or exhausting memory or CPU: refused outright.
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages[0].pop('role') }}",
        "{{ range(10 ** 9) | list }}",
        "{{ 'x' * 10 ** 9 }}",
        "{{ [0] * 10 ** 9 }}",
        "{{ 7 ** 100000 }}",
    ],
)
def test_sandbox_refuses_mutation_and_exhaustion(text: str) -> None:
    with pytest.raises(ChatTemplateError):
        render(text, msgs(("user", "a")))


def test_messages_are_not_mutated_across_renders() -> None:
    messages = msgs(("user", "a"))
    with pytest.raises(ChatTemplateError):
        render("{{ messages.append(1) }}", messages)
    assert render(template("chatml.jinja"), messages, add_generation_prompt=False) == (
        "<|im_start|>user\na<|im_end|>\n"
    )


def test_compiled_templates_are_cached() -> None:
    text = template("smollm2.jinja")
    assert compile_chat_template(text) is compile_chat_template(text)
    with pytest.raises(ChatTemplateError):
        compile_chat_template("{% endfor %}")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
            },
        ),
        (
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "not json"}]},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "not json"}]},
        ),
        (
            {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "f"},
            {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "f"},
        ),
    ],
)
def test_message_to_template_dict(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    assert message_to_template_dict(ConversationMessage.model_validate(raw)) == expected
