"""The agent's slots on llama.cpp (through llama-cpp-python's low-level API).

Only this subpackage imports ``llama_cpp`` (tests/unit/test_agent_layering.py).

Design
------
* **Continuous batching.** One generation context with ``n_seq_max = slots``; the KV
  cache of slot *i* is sequence id *i*. A decode thread runs steps; each step is one
  ``llama_decode`` of a batch that holds one token per generating sequence plus
  prompt chunks of new sequences, bounded by ``n_batch``. ``llama_decode`` releases
  the GIL, so the event loop stays responsive; the payloads of one step reach the
  loop in one ``loop.call_soon_threadsafe``.
* **One KV cache shared by the slots** (Paddler's and llama-server's semantics):
  ``context_size`` is the whole agent's cache (llama.cpp's unified KV), so one long
  conversation may use far more than ``context_size / slots`` while others are short.
  :class:`KvLedger` mirrors which cells each slot holds. A request starts when a slot
  is free and the cache has room for its prompt beside what the running sequences
  still need; otherwise it waits, oldest first. When generation fills the cache, idle
  slots' cached prefixes are evicted (least recently used first), then the youngest
  running sequence is preempted: its cells are freed and it resumes later by
  re-evaluating its prompt and generated tokens, with its sampler and output state
  intact. A prompt longer than the whole cache is refused on arrival; a sequence alone
  in a full cache ends with "context full" (a length stop).
* **Sampling** per sequence with llama.cpp's sampler chain (grammar, penalties,
  top-k, top-p, min-p, temperature, dist; greedy when temperature is 0).
* **Prefix reuse.** A slot keeps its KV cache after a request. A new request goes to
  the free slot whose cached tokens share the longest prefix with its prompt; a longer
  prefix held by another slot (busy or not) is shared with it (the cells get both
  sequence ids); only the rest is evaluated (``cached_prompt_tokens``). The board's ``prefix_hashes`` lists
  the prefix keys (:func:`paddler_core.prefix.request_prefix_keys`) of the requests
  whose KV cache the slots hold, so the balancer can route repeats here.
* **Output classes.** Conversation requests go through the chat template module and
  their output through :class:`paddler_agent.tool_calls.OutputClassifier`
  (content / reasoning / tool-call tokens, parsed tool calls at the end).
* **Embeddings** run in a second context (embeddings on, explicit pooling type) on
  the same decode thread, one batch between generation steps.
* **Model swap.** Download while the old model serves; then ``slots_total = 0``,
  finish in-flight requests, free the old model, load and warm up the new one,
  serve again. Requests that arrive meanwhile are held and started afterwards. A
  model that cannot be loaded becomes an issue on the board and the previous model
  keeps serving.
"""
