"""``POST /v1/responses``: OpenAI's Responses API on the inference address and on
``--compat-openai-addr``.

A response is a chat completion underneath (``responses_request.chat_request``):
the same model-group resolution, tools, grammars, sampling, buffer (503 full, 504
timeouts, HTTP statuses before the first event), error envelope and log line
(``openai request endpoint=responses ...``); a client that disconnects leaves the
buffer or frees its slot at once. Only the rendering differs.
"""

from __future__ import annotations

from aiohttp import web

from paddler_balancer.openai.api import Outcome, collect_run, endpoint, request_body, start_chat, stream, validate
from paddler_balancer.openai.events import Accumulated
from paddler_balancer.openai.output import now
from paddler_balancer.openai.responses_output import ResponseHeader, ResponsesStream, new_id, output_items
from paddler_balancer.openai.responses_request import ResponsesRequest, chat_request


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", endpoint("responses", create_response))


async def create_response(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    req = validate(ResponsesRequest, await request_body(request))
    run = start_chat(request, chat_request(req), outcome)
    header = ResponseHeader(new_id("resp"), req.model or run.group, now(), req)
    if req.stream:
        renderer = ResponsesStream(header, run.max_tokens, run.forced, Accumulated())
        return await stream(request, run.runner, renderer, outcome)
    acc = await collect_run(run, outcome)
    return web.json_response(header.finished(acc, run.max_tokens, output_items(acc, bool(run.forced))))
