"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models`` and ``/v1/responses``.

Modules, from the wire in to the wire out:

* ``api`` / ``responses_api``: the HTTP handlers (aiohttp).
* ``errors``: OpenAI's error envelope and the body parse that answers in it.
* ``request_models`` / ``responses_request``: the request bodies (pydantic); a
  Responses request is mapped to a chat completion request.
* ``model_groups``: which model group ``model`` names; the ``/v1/models`` listing.
* ``mapping``: OpenAI requests to Paddler's native requests (tools, grammars, sampling).
* ``events``: agent payloads read as events, and what a generation accumulated.
* ``output`` / ``responses_output``: response bodies, chunks and Responses events.
* ``stream``: the renderers and the SSE encoder that ``relay.forward`` streams through.

Everything but ``api``, ``responses_api`` and ``stream`` is pure (no I/O) and tested
with tables.

Decisions:

* ``model`` is a model group name; a group's model display names (the desired
  state's model description, its file name and file stem, its Hugging Face repo
  id) are accepted too. While the pool serves one group, any name (or none) is
  served by it (clients hard-code names; Paddler ignores the field); with several,
  an unknown name is a 404 listing them.
* Unsupported features fail loudly with 400 (``n > 1``, logprobs, ``echo``,
  token-id prompts) instead of being silently ignored.
* ``tool_choice`` ``"required"`` or a named function forces the call with a JSON
  schema grammar; the balancer parses the JSON output into ``tool_calls``.
  ``"auto"`` hands the tools to the agent's chat template; the agent reports
  parsed calls as ``ToolCallParsed``.
"""
