"""LlamaEngine on the real SmolLM2 model: batching, sampling, cache reuse, grammar,
embeddings, swaps and failures, driven directly through a fake host."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import GREEDY, EngineFactory, FakeHost, raw, state_for, wait_for

from paddler_core.desired_state import BalancerDesiredState, ChatTemplate, ModelSource
from paddler_core.inference import ErrorKind
from paddler_core.prefix import request_prefix_keys
from paddler_core.protocol import EmbedMessage, GenerateMessage, StateApplicationStatus, parse_generate_message

pytestmark = pytest.mark.engine

PROMPT = "The capital of France is"
LONG_TEXT = (
    "Paddler is a load balancer for llama.cpp. Applications send inference requests to "
    "the balancer; agents run the model with a fixed number of slots and report how many "
    "are free. The balancer sends each request to an agent with a free slot and buffers "
    "requests while none is free, which lets a pool of agents scale from zero. "
)


def conversation(request_id: str, text: str, max_tokens: int = 24, **params: Any) -> GenerateMessage:
    return parse_generate_message(
        dict(
            request_id=request_id,
            variant="ContinueFromConversationHistory",
            params={"conversation_history": [{"role": "user", "content": text}], "max_tokens": max_tokens, **params},
            overrides=GREEDY,
        )
    )


def test_decodes_a_multi_token_batch(model_path: Path) -> None:
    """Decoding 2+ tokens at once crashes a default (AMX) build on these CPUs; run it
    in a child process so a segfault fails this test instead of the whole session."""
    code = f"""
from paddler_agent.llama.native import LoadConfig, Runtime
from paddler_core.desired_state import InferenceParameters
config = LoadConfig.build({str(model_path)!r}, 2, InferenceParameters(context_size=256), 2)
rt = Runtime.load(config)   # warm-up decodes a multi-token batch
tokens = rt.model.tokenize("one two three four five six seven eight nine ten", add_special=True, parse_special=False)
batch = rt.gen.batch
batch.clear()
batch.add(tokens, 0, 0, last_logits=True)
batch.add(tokens, 0, 1, last_logits=True)
assert batch.decode(rt.gen.handle) == 0
rt.free()
print("decoded", 2 * len(tokens))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, (
        f"multi-token decode failed (rc={result.returncode}); a negative rc is a crash: "
        "rebuild llama-cpp-python with scripts/install-llama.sh (AMX flags off)\n" + result.stderr[-3000:]
    )
    assert "decoded" in result.stdout


def _reference_greedy(model_path: Path, prompt: str, max_tokens: int) -> str:
    """llama-cpp-python's own high-level greedy completion (the reference)."""
    from llama_cpp import GGML_TYPE_Q8_0, Llama

    # Same KV cache as the engine's default (Q8_0, which needs flash attention). Flash
    # attention pads the attended KV to 256 cells, so the numbers do not depend on how
    # much the engine's other slots hold (with 32-cell padding they would, in llama.cpp
    # and llama-server alike, and a near-tie could flip a greedy token).
    llm = Llama(
        str(model_path),
        n_ctx=512,
        n_threads=2,
        flash_attn=True,
        type_k=GGML_TYPE_Q8_0,
        type_v=GGML_TYPE_Q8_0,
        verbose=False,
    )
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, top_k=1)
        text: str = out["choices"][0]["text"]  # type: ignore[index]
        return text
    finally:
        llm.close()


async def test_greedy_output_equals_llama_cpp_python(model_path: Path, make_engine: EngineFactory) -> None:
    prompts = [PROMPT, "Here is a list of fruits: apple,"]
    expected = [await asyncio.to_thread(_reference_greedy, model_path, p, 40) for p in prompts]
    e = await make_engine(slots=4, context_size=512)
    for i, prompt in enumerate(prompts):
        e.engine.generate(raw(f"solo{i}", prompt, 40, **GREEDY))
        assert (await e.host.wait(f"solo{i}")).text == expected[i]
    # The same prompts inside one batch give the same text.
    for i, prompt in enumerate(prompts * 2):
        e.engine.generate(raw(f"batched{i}", prompt, 40, **GREEDY))
    for i in range(4):
        assert (await e.host.wait(f"batched{i}")).text == expected[i % 2]


async def _run(host: FakeHost, engine: Any, messages: list[GenerateMessage]) -> tuple[float, int]:
    started = time.perf_counter()
    for m in messages:
        engine.generate(m)
    tokens = 0
    for m in messages:
        tokens += (await host.wait(m.request_id)).usage["content_tokens"]
    return time.perf_counter() - started, tokens


async def test_four_concurrent_requests_share_decode_steps(make_engine: EngineFactory) -> None:
    """What slots buy: four sequences in one batch advance together, one ``llama_decode``
    a token for all four, where four in a row need one each. Counted in decode steps, not
    timed (the machine is shared); throughput is bench/'s business."""
    e = await make_engine(slots=4)
    starts = ["Once upon a time", "The history of Rome", "Dear diary, today", "In the year 2050"]

    def batch(tag: str) -> list[GenerateMessage]:
        return [raw(f"{tag}{i}", f"{s} ({tag})", 64, **GREEDY) for i, s in enumerate(starts)]

    before = e.engine.decode_steps()
    sequential_s, sequential_tokens = 0.0, 0
    for m in batch("seq-"):
        elapsed, tokens = await _run(e.host, e.engine, [m])
        sequential_s += elapsed
        sequential_tokens += tokens
    sequential_steps = e.engine.decode_steps() - before
    before = e.engine.decode_steps()
    concurrent_s, concurrent_tokens = await _run(e.host, e.engine, batch("par-"))
    concurrent_steps = e.engine.decode_steps() - before
    for i in range(4):
        assert e.host.requests[f"par-{i}"].usage["content_tokens"] > 0
    print(
        f"sequential {sequential_tokens} tokens in {sequential_steps} steps"
        f" ({sequential_tokens / sequential_s:.1f} tok/s),"
        f" concurrent {concurrent_tokens} tokens in {concurrent_steps} steps"
        f" ({concurrent_tokens / concurrent_s:.1f} tok/s)"
    )
    # One request at a time: a step a token (give or take the last token of each).
    assert sequential_steps >= sequential_tokens - len(starts), (sequential_steps, sequential_tokens)
    # Together: about a quarter of the steps (plus the prompts' own); half leaves room for
    # a request that joins a step or two late.
    assert concurrent_steps <= sequential_steps / 2, (sequential_steps, concurrent_steps)


async def test_event_loop_stays_responsive_while_decoding(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=4)
    for i in range(4):
        e.engine.generate(raw(f"r{i}", f"{LONG_TEXT} Question {i}:", 48, **GREEDY))
    worst = 0.0
    loop = asyncio.get_running_loop()
    while not all(e.host.request(f"r{i}").done.is_set() for i in range(4)):
        before = loop.time()
        await asyncio.sleep(0.005)
        worst = max(worst, loop.time() - before)
    assert worst < 0.5, f"event loop blocked for {worst:.3f}s"


async def test_cancellation_frees_the_slot_and_emits_nothing_more(
    make_engine: EngineFactory,
) -> None:
    e = await make_engine(slots=1)
    e.engine.generate(raw("long", "Count to one thousand: 1, 2, 3,", 2000, **GREEDY))
    long = e.host.request("long")
    await wait_for(lambda: len(long.payloads) >= 3)
    e.engine.stop("long")
    seen = len(long.payloads)
    e.engine.generate(raw("next", PROMPT, 8, **GREEDY))
    nxt = await e.host.wait("next")
    assert nxt.usage["content_tokens"] > 0
    assert not long.done.is_set()
    assert len(long.payloads) == seen
    await wait_for(lambda: e.board.slots_processing == 0)


async def test_a_repeated_prompt_reuses_the_cached_prefix(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=2)
    prompt = LONG_TEXT * 2
    e.engine.generate(raw("first", prompt, 8, **GREEDY))
    first = (await e.host.wait("first")).usage
    assert first["cached_prompt_tokens"] == 0
    e.engine.generate(raw("other", "Unrelated words about cooking pasta.", 8, **GREEDY))
    await e.host.wait("other")
    e.engine.generate(raw("again", prompt, 8, **GREEDY))
    again = (await e.host.wait("again")).usage
    assert again["prompt_tokens"] == first["prompt_tokens"]
    assert again["cached_prompt_tokens"] == first["prompt_tokens"] - 1
    assert e.host.requests["again"].text == e.host.requests["first"].text
    e.engine.generate(raw("longer", prompt + " And more text follows here.", 8, **GREEDY))
    longer = (await e.host.wait("longer")).usage
    assert longer["cached_prompt_tokens"] >= first["prompt_tokens"] - 1
    keys = request_prefix_keys("ContinueFromRawPrompt", {"raw_prompt": prompt})
    assert keys
    assert set(keys) <= set(e.board.prefix_hashes)


async def test_json_schema_grammar_output_parses(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=2)
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
            "name": {"type": "string", "maxLength": 12},
        },
        "required": ["color", "ok", "name"],
        "additionalProperties": False,
    }
    grammar = {"type": "json_schema", "schema": json.dumps(schema)}
    e.engine.generate(raw("json", "A person described as JSON:", 80, **GREEDY, params={"grammar": grammar}))
    req = await e.host.wait("json")
    assert "Done" in req.final["GeneratedToken"], req.final
    value = json.loads(req.text)
    assert value["color"] in ("red", "green", "blue")
    assert isinstance(value["ok"], bool)
    e.engine.generate(
        raw("gbnf", "Answer:", 8, **GREEDY, params={"grammar": {"type": "gbnf", "grammar": 'root ::= "yes" | "no"'}})
    )
    assert (await e.host.wait("gbnf")).text in ("yes", "no")
    e.engine.generate(raw("bad", "Answer:", 8, **GREEDY, params={"grammar": {"type": "gbnf", "grammar": "root ::= ("}}))
    assert "GrammarInitializationFailed" in (await e.host.wait("bad")).final["GeneratedToken"]


async def test_stop_strings_max_tokens_and_full_context(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=2, context_size=64)  # llama.cpp pads it to 128 or 256
    e.engine.generate(raw("stop", PROMPT, 30, **GREEDY, stop=["\n"]))
    assert (await e.host.wait("stop")).text == " Paris."
    e.engine.generate(raw("three", PROMPT, 3, **GREEDY))
    assert (await e.host.wait("three")).usage["content_tokens"] == 3
    e.engine.generate(raw("huge", LONG_TEXT * 6, 8, **GREEDY))
    huge = await e.host.wait("huge")
    assert huge.final["GeneratedToken"]["SamplerError"].startswith("context full: the prompt")
    assert huge.error_kind is ErrorKind.PROMPT_EXCEEDS_CONTEXT
    e.engine.generate(raw("fill", PROMPT, 500, **GREEDY))
    fill = await e.host.wait("fill")
    assert fill.final["GeneratedToken"]["SamplerError"].startswith("context full")
    assert fill.error_kind is ErrorKind.CONTEXT_FULL
    assert fill.text


def _reference_chat(model_path: Path, question: str, max_tokens: int) -> tuple[str, int, int]:
    """llama-cpp-python's own greedy chat completion with the model's template: its text,
    prompt tokens and completion tokens."""
    from llama_cpp import GGML_TYPE_Q8_0, Llama

    llm = Llama(
        str(model_path),
        n_ctx=512,
        n_threads=2,
        flash_attn=True,
        type_k=GGML_TYPE_Q8_0,
        type_v=GGML_TYPE_Q8_0,
        verbose=False,
    )
    try:
        out: Any = llm.create_chat_completion(
            [{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            top_k=1,
        )
        usage = out["usage"]
        return out["choices"][0]["message"]["content"], usage["prompt_tokens"], usage["completion_tokens"]
    finally:
        llm.close()


async def test_conversation_is_rendered_with_the_chat_template(model_path: Path, make_engine: EngineFactory) -> None:
    question = "What is the capital of France?"
    text, prompt_tokens, completion_tokens = await asyncio.to_thread(_reference_chat, model_path, question, 24)
    e = await make_engine(slots=2, context_size=512)
    e.engine.generate(conversation("chat", question))
    chat = await e.host.wait("chat")
    assert chat.usage["prompt_tokens"] == prompt_tokens
    assert chat.text == text
    # Same tokens as the reference: all 24, or fewer where both ended at the model's EOS
    # (the portable build answers "The capital of France is Paris." and stops).
    assert chat.usage["content_tokens"] == completion_tokens
    metadata = e.engine.model_metadata()
    assert metadata is not None
    assert metadata["general.architecture"] == "llama"


async def test_a_broken_chat_template_override_is_a_request_error(
    model_path: Path,
    make_engine: EngineFactory,
) -> None:
    e = await make_engine(slots=1)
    state = state_for(model_path).model_copy(
        update={
            "use_chat_template_override": True,
            "chat_template_override": ChatTemplate(content="{% if %}"),
        }
    )
    await e.engine.apply_desired_state(state)
    assert e.board.state_application_status == StateApplicationStatus.APPLIED
    e.engine.generate(conversation("chat", "Hello"))
    assert "ChatTemplateError" in (await e.host.wait("chat")).final["GeneratedToken"]


async def test_embeddings_have_the_model_width_and_unit_norm(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=1, enable_embeddings=True, pooling_type="Mean")
    metadata = e.engine.model_metadata()
    assert metadata is not None
    width = int(metadata["llama.embedding_length"])
    docs = [
        {"id": f"d{i}", "content": text}
        for i, text in enumerate(["a cat sat on the mat", "quantum field theory", LONG_TEXT])
    ]
    e.engine.embed(EmbedMessage(request_id="emb", params={"input_batch": docs, "normalization_method": "L2"}))
    req = await e.host.wait("emb")
    assert req.final == {"Embedding": "Done"}
    vectors = [p["Embedding"]["Embedding"] for p in req.payloads[:-1]]
    assert [v["source_document_id"] for v in vectors] == ["d0", "d1", "d2"]
    for v in vectors:
        assert len(v["embedding"]) == width
        assert math.isclose(math.sqrt(sum(x * x for x in v["embedding"])), 1.0, rel_tol=1e-4)
        assert v["pooling_type"] == "Mean"
        assert v["normalization_method"] == "L2"
    assert vectors[0]["embedding"] != vectors[1]["embedding"]


async def test_embeddings_disabled_is_an_error(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=1)
    e.engine.embed(EmbedMessage(request_id="emb", params={"input_batch": [{"id": "a", "content": "text"}]}))
    assert "Error" in (await e.host.wait("emb")).final["Embedding"]


async def test_swap_under_load_loses_no_request(model_path: Path, tmp_path: Path, make_engine: EngineFactory) -> None:
    e = await make_engine(slots=4)
    copy = tmp_path / "copy.gguf"
    await asyncio.to_thread(shutil.copyfile, model_path, copy)
    before = [raw(f"before{i}", f"{LONG_TEXT} Item {i}:", 24, **GREEDY) for i in range(6)]
    for m in before:
        e.engine.generate(m)
    await wait_for(lambda: e.board.slots_processing > 0)
    swap = asyncio.create_task(e.engine.apply_desired_state(state_for(copy)))
    await wait_for(lambda: e.board.slots_total == 0)
    during = [raw(f"during{i}", f"Swap time {i}:", 16, **GREEDY) for i in range(4)]
    for m in during:
        e.engine.generate(m)
    await swap
    for m in before + during:
        req = await e.host.wait(m.request_id)
        assert "Done" in req.final["GeneratedToken"], (m.request_id, req.final)
        assert req.after_final == 0
    assert e.board.model_path == str(copy)
    assert e.board.state_application_status == StateApplicationStatus.APPLIED
    assert e.board.slots_total == 4
    assert 0 in e.host.slots_seen


async def test_a_bad_model_is_an_issue_and_the_old_model_keeps_serving(
    model_path: Path,
    tmp_path: Path,
    make_engine: EngineFactory,
) -> None:
    e = await make_engine(slots=2)
    not_gguf = tmp_path / "not-a-model.gguf"
    not_gguf.write_bytes(b"this is not a model" * 100)
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as f:
        truncated.write_bytes(f.read(4096))
    cases = [
        (tmp_path / "missing.gguf", "ModelFileDoesNotExist"),
        (not_gguf, "ModelCannotBeLoaded"),
        (truncated, "ModelCannotBeLoaded"),
    ]
    for n, (path, variant) in enumerate(cases):
        await e.engine.apply_desired_state(state_for(path))
        assert e.board.state_application_status == StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        assert [i.variant for i in e.board.issues] == [variant]
        assert e.board.issues[0].message
        assert e.board.slots_total == 2
        assert e.board.model_path == str(model_path)
        e.engine.generate(raw(f"still{n}", PROMPT, 4, **GREEDY))
        assert (await e.host.wait(f"still{n}")).usage["content_tokens"] == 4
    await e.engine.apply_desired_state(state_for(model_path))
    assert e.board.issues == []
    assert e.board.state_application_status == StateApplicationStatus.APPLIED


async def test_model_none_unloads(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=2)
    await e.engine.apply_desired_state(BalancerDesiredState(model=ModelSource.none()))
    assert e.board.slots_total == 0
    assert e.engine.model_metadata() is None
    e.engine.generate(raw("late", PROMPT, 4, **GREEDY))
    assert "SamplerError" in (await e.host.wait("late")).final["GeneratedToken"]


def test_numpy_sampling_matches_the_llama_cpp_sampler_chain(model_path: Path) -> None:
    """The numpy fast path (no grammar) picks what llama.cpp's chain picks: greedy with
    Paddler's default penalties, token by token over a generation."""
    from paddler_agent.llama.native import LoadConfig, Runtime
    from paddler_agent.llama.sampling import FastSampler, Sampler
    from paddler_core.desired_state import InferenceParameters

    params = InferenceParameters(context_size=256, temperature=0.0, penalty_last_n=32)
    runtime = Runtime.load(LoadConfig.build(str(model_path), 1, params, 2))
    try:
        model, gen = runtime.model, runtime.gen
        chain = Sampler(model, params, None, None, gen.n_ctx_seq)
        fast = FastSampler(model.n_vocab, params, None, gen.n_ctx_seq)
        tokens = model.tokenize("Repeat after me: the cat, the cat, the cat,", add_special=True, parse_special=False)
        chain.accept_prompt(tokens)
        fast.accept_prompt(tokens)
        batch, pos, step = gen.batch, 0, tokens
        picked = []
        for _ in range(40):
            batch.clear()
            index = batch.add(step, pos, 0, last_logits=True)
            assert batch.decode(gen.handle) == 0
            pos += len(step)
            expected = chain.sample(gen.handle, index)  # reads the row; fast then edits it
            assert fast.sample(gen.handle, index) == expected
            picked.append(expected)
            step = [expected]
        assert len(set(picked)) > 5, "penalties should keep the output from looping on one token"
        chain.free()
    finally:
        runtime.free()


async def test_reasoning_and_tool_calls_are_classified(make_engine: EngineFactory) -> None:
    """A grammar makes the model write a think block and a tagged tool call; the engine
    streams them as ReasoningToken / ToolCallToken, parses the call, counts the tokens."""
    e = await make_engine(slots=1)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    gbnf = "root ::= " + json.dumps("<think>rain maybe</think>") + " " + json.dumps(call)
    e.engine.generate(
        conversation(
            "tools",
            "What is the weather in Paris?",
            max_tokens=80,
            tools=[tool],
            grammar={"type": "gbnf", "grammar": gbnf},
        )
    )
    req = await e.host.wait("tools")
    kinds: dict[str, str] = {}
    for p in req.payloads:
        ((kind, value),) = p["GeneratedToken"].items()
        if isinstance(value, str):
            kinds[kind] = kinds.get(kind, "") + value
    assert kinds.get("ReasoningToken") == "rain maybe"
    assert kinds.get("ToolCallToken") == call
    assert "ContentToken" not in kinds
    parsed = next(
        p["GeneratedToken"]["ToolCallParsed"] for p in req.payloads if "ToolCallParsed" in p["GeneratedToken"]
    )
    assert parsed[0]["name"] == "get_weather"
    assert parsed[0]["arguments"] == {"ValidJson": {"city": "Paris"}}
    usage = req.usage
    assert usage["reasoning_tokens"] > 0
    assert usage["tool_call_tokens"] > 0
    assert usage["content_tokens"] == 0


def test_lazy_grammar_sampling_matches_the_llama_cpp_chain(model_path: Path) -> None:
    """The grammar is checked on the picked token first and applied to the whole row
    only when it rejects it; greedy picks equal the chain's (grammar first)."""
    from paddler_agent.llama.native import LoadConfig, Runtime
    from paddler_agent.llama.sampling import GrammarSampler, Sampler
    from paddler_core.desired_state import InferenceParameters

    params = InferenceParameters(context_size=256, temperature=0.0)
    grammar = ('root ::= "[" item ("," item){5} "]"\nitem ::= [0-9]{1,3}', "root")
    runtime = Runtime.load(LoadConfig.build(str(model_path), 1, params, 2))
    try:
        model, gen = runtime.model, runtime.gen
        chain = Sampler(model, params, None, grammar, gen.n_ctx_seq)
        lazy = GrammarSampler(model, params, None, grammar, gen.n_ctx_seq)
        tokens = model.tokenize("Six numbers:", add_special=True, parse_special=False)
        chain.accept_prompt(tokens)
        lazy.accept_prompt(tokens)
        batch, pos, step, text = gen.batch, 0, tokens, b""
        for _ in range(40):
            batch.clear()
            index = batch.add(step, pos, 0, last_logits=True)
            assert batch.decode(gen.handle) == 0
            pos += len(step)
            expected = chain.sample(gen.handle, index)
            assert lazy.sample(gen.handle, index) == expected
            if model.is_eog(expected):
                break
            text += model.piece(expected)
            step = [expected]
        values = json.loads(text)
        assert len(values) == 6
        assert all(isinstance(v, int) for v in values)
        chain.free()
        lazy.free()
    finally:
        runtime.free()


async def test_a_busy_slots_prefix_is_copied_to_a_free_slot(make_engine: EngineFactory) -> None:
    """A request whose prompt shares a prefix with another (busy) slot's cache gets that
    prefix copied into its own slot instead of evaluating it, with the same output."""
    e = await make_engine(slots=2)
    shared = LONG_TEXT * 2
    prompt = shared + " Question: what does the balancer do?"
    e.engine.generate(raw("solo", prompt, 24, **GREEDY))
    solo = await e.host.wait("solo")
    # "busy" takes the slot that holds the prefix; "copy" gets the other, empty slot.
    e.engine.generate(raw("busy", shared + " Tell me more:", 60, **GREEDY))
    e.engine.generate(raw("copy", prompt, 24, **GREEDY))
    copied = await e.host.wait("copy")
    await e.host.wait("busy")
    assert copied.usage["cached_prompt_tokens"] >= solo.usage["prompt_tokens"] - 12
    assert copied.text == solo.text


async def test_requests_are_answered_when_the_first_model_cannot_load(
    tmp_path: Path, make_engine: EngineFactory
) -> None:
    from paddler_agent.engine import StatusBoard
    from paddler_agent.llama.engine import LlamaEngine

    host = FakeHost()
    board = StatusBoard()
    engine = LlamaEngine(host, board, 2, model_cache_dir=tmp_path)
    try:
        apply = asyncio.create_task(engine.apply_desired_state(state_for(tmp_path / "missing.gguf")))
        engine.generate(raw("early", PROMPT, 4, **GREEDY))  # arrives while applying: held
        await apply
        assert board.state_application_status == StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        assert board.slots_total == 0
        assert "SamplerError" in (await host.wait("early")).final["GeneratedToken"]
        engine.generate(raw("late", PROMPT, 4, **GREEDY))
        assert "SamplerError" in (await host.wait("late")).final["GeneratedToken"]
    finally:
        await engine.close()
