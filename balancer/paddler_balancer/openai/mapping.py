"""OpenAI requests mapped to Paddler's native requests (conversation, raw prompt,
embedding batch): messages, tools and their grammars, sampling overrides."""

from __future__ import annotations

import json
from typing import Any

from paddler_balancer.openai.errors import OpenAIError
from paddler_balancer.openai.request_models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    EmbeddingRequest,
    NamedToolChoice,
    SamplingRequest,
    TextPart,
    ToolDefinition,
)
from paddler_core.desired_state import SamplingOverrides
from paddler_core.inference import (
    IMAGES_CHECKED,
    ContinueFromConversationHistoryParams,
    ContinueFromRawPromptParams,
    ConversationMessage,
    EmbeddingInputDocument,
    GbnfGrammar,
    GenerateEmbeddingBatchParams,
    GrammarConstraint,
    JsonSchemaGrammar,
    Tool,
)
from paddler_core.tool_schema import tool_call_schema

# ---- request mapping ------------------------------------------------------------------------

# JSON value grammar (llama.cpp's json.gbnf with an object root and at most one space
# between tokens, so small models cannot loop on whitespace).
JSON_OBJECT_GBNF = r"""root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number ::= "-"? ( [0-9] | [1-9] [0-9]{0,15} ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9] [0-9]{0,15} )? ws
ws ::= " "?
"""


def sampling_overrides(req: SamplingRequest) -> SamplingOverrides | None:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    fields: dict[str, Any] = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": stop or None,
        "penalty_presence": req.presence_penalty,
        "penalty_frequency": req.frequency_penalty,
    }
    present = {k: v for k, v in fields.items() if v is not None}
    return SamplingOverrides(**present) if present else None


def _message_text(content: str | list[ContentPart] | None) -> str | list[dict[str, Any]] | None:
    """Text-only content becomes one string (what chat templates expect); image parts
    keep the list shape for multimodal agents."""
    if content is None or isinstance(content, str):
        return content
    if all(isinstance(p, TextPart) for p in content):
        return "".join(p.text for p in content if isinstance(p, TextPart))
    return [p.model_dump() for p in content]


def _arguments_value(arguments: str) -> Any:
    """Tool-call arguments as the object chat templates iterate over, when they are JSON."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def conversation(messages: list[ChatMessage]) -> list[ConversationMessage]:
    out = []
    for m in messages:
        entry: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": _message_text(m.content) or "",
        }
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments_value(c.function.arguments)},
                }
                for c in m.tool_calls
            ]
        out.append(ConversationMessage.model_validate(entry, context=IMAGES_CHECKED))  # by the OpenAI models
    return out


def forced_tools(req: ChatCompletionRequest) -> list[ToolDefinition]:
    """The tools the model must choose from (``required`` or a named function); empty
    when the model is free to answer in text."""
    tools = req.tools or []
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise OpenAIError(
                400,
                f"tool_choice names function {choice.function.name!r}, which is not in tools",
                code="invalid_tool_choice",
                param="tool_choice",
            )
        return named
    if choice == "required":
        if not tools:
            raise OpenAIError(400, 'tool_choice "required" needs tools', code="invalid_tool_choice", param="tools")
        return tools
    return []


def chat_grammar(req: ChatCompletionRequest, forced: list[ToolDefinition]) -> GrammarConstraint | None:
    fmt = req.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if forced:
        if wants_json:
            raise OpenAIError(
                400,
                "response_format cannot be combined with a forced tool_choice",
                code="invalid_request",
                param="response_format",
            )
        schema = tool_call_schema([(t.function.name, t.function.parameters) for t in forced])
        return JsonSchemaGrammar(schema_value=json.dumps(schema))
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GbnfGrammar(grammar=JSON_OBJECT_GBNF)
    if fmt.json_schema is None:
        raise OpenAIError(
            400, 'response_format "json_schema" needs a json_schema object', param="response_format.json_schema"
        )
    return JsonSchemaGrammar(schema_value=json.dumps(fmt.json_schema.schema_value))


def chat_params(req: ChatCompletionRequest, default_max_tokens: int) -> tuple[dict[str, Any], list[ToolDefinition]]:
    """Native ContinueFromConversationHistory params (as JSON) and the forced tools."""
    forced = forced_tools(req)
    grammar = chat_grammar(req, forced)
    # Forced calls keep the tools in the prompt (the template describes them) and add
    # the grammar; the agent may parse the call itself, else the balancer parses it.
    offered = [] if req.tool_choice == "none" else (req.tools or [])
    params = ContinueFromConversationHistoryParams(
        conversation_history=conversation(req.messages),
        max_tokens=req.token_limit or default_max_tokens,
        grammar=grammar,
        tools=[Tool.model_validate(t.model_dump(exclude_none=True)) for t in offered],
    )
    return params.model_dump(mode="json", by_alias=True, exclude_none=True), forced


def completion_params(req: CompletionRequest, default_max_tokens: int) -> dict[str, Any]:
    params = ContinueFromRawPromptParams(raw_prompt=req.prompt_text, max_tokens=req.token_limit or default_max_tokens)
    return params.model_dump(mode="json", by_alias=True, exclude_none=True)


def embedding_params(req: EmbeddingRequest) -> GenerateEmbeddingBatchParams:
    docs = [EmbeddingInputDocument(id=str(i), content=text) for i, text in enumerate(req.inputs)]
    return GenerateEmbeddingBatchParams.model_validate({"input_batch": docs, "normalization_method": "L2"})
