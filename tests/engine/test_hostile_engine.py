"""Hostile input that reaches a real llama.cpp agent (SmolLM2): it fails the one request,
never the decode loop; hostile chat templates end in their own time-limited process; a
decode loop that dies anyway is reported, not hidden behind ``Applied``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from paddler_core.desired_state import ChatTemplate
from paddler_core.protocol import GenerateMessage, StateApplicationStatus, parse_generate_message
from tests.engine.conftest import EngineFactory, raw, state_for, wait_for
from tests.harness import Balancer, PaddlerProcess, Processes, wait_until

pytestmark = pytest.mark.engine


def conversation(request_id: str, text: str, max_tokens: int = 8) -> GenerateMessage:
    return parse_generate_message(
        dict(
            request_id=request_id,
            variant="ContinueFromConversationHistory",
            params={"conversation_history": [{"role": "user", "content": text}], "max_tokens": max_tokens},
            overrides={"temperature": 0.0},
        )
    )


# ---- 1. a lone surrogate that reaches the agent ------------------------------------------------


async def test_lone_surrogate_in_a_raw_prompt_fails_that_request_and_the_agent_keeps_serving(
    make_engine: EngineFactory,
) -> None:
    e = await make_engine(slots=2, context_size=512)

    e.engine.generate(raw("bad", "hello \ud800 world"))
    bad = await e.host.wait("bad")
    e.engine.generate(raw("good", "Hello", max_tokens=4))
    good = await e.host.wait("good")

    assert "lone UTF-16 surrogate" in bad.final["GeneratedToken"]["SamplerError"]
    assert good.usage["content_tokens"] == 4
    assert e.board.state_application_status == StateApplicationStatus.APPLIED
    assert e.board.issues == []


async def test_negative_seed_neither_fails_the_request_nor_stops_the_loop(make_engine: EngineFactory) -> None:
    e = await make_engine(slots=1, context_size=512)

    e.engine.generate(raw("seeded", "Hello", max_tokens=4, temperature=0.7, seed=-1))
    seeded = await e.host.wait("seeded")
    e.engine.generate(raw("after", "Hello", max_tokens=4))
    after = await e.host.wait("after")

    assert seeded.usage["content_tokens"] == 4
    assert after.usage["content_tokens"] == 4


# ---- a decode loop that dies anyway --------------------------------------------------------------


async def test_a_decode_loop_that_dies_is_an_issue_and_not_applied(
    make_engine: EngineFactory, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paddler_agent.llama.decode_worker import DecodeWorker

    e = await make_engine(slots=1, context_size=512)
    original = DecodeWorker._step

    def broken_step(self: DecodeWorker) -> None:  # a bug in the loop, injected once
        monkeypatch.setattr(DecodeWorker, "_step", original)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(DecodeWorker, "_step", broken_step)
    e.engine.generate(raw("victim", "Hello", max_tokens=4))
    victim = await e.host.wait("victim")
    await wait_for(lambda: e.board.state_application_status == StateApplicationStatus.STUCK, timeout=10)
    issues = [i.variant for i in e.board.issues]
    slots_while_stuck = e.board.slots_total
    e.engine.generate(raw("meanwhile", "Hello", max_tokens=4))
    meanwhile = await e.host.wait("meanwhile", timeout=10)

    await e.engine.apply_desired_state(state_for(model_path, context_size=512))
    e.engine.generate(raw("reloaded", "Hello", max_tokens=4))
    reloaded = await e.host.wait("reloaded")

    assert "decode loop crashed" in victim.final["GeneratedToken"]["SamplerError"]
    assert issues == ["DecodeLoopStopped"]
    assert slots_while_stuck == 0
    assert "decode loop stopped" in meanwhile.final["GeneratedToken"]["SamplerError"]
    assert e.board.state_application_status == StateApplicationStatus.APPLIED
    assert e.board.issues == []
    assert reloaded.usage["content_tokens"] == 4


# ---- 4. hostile chat templates, through real processes ---------------------------------------------

HOSTILE_TEMPLATES = {
    "center": "{{ 'x'.center(100000000) }}",
    "tilde-doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "format-width": "{{ '%*s'|format(100000000, 'a') }}",
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
}


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Balancer, Path]]:
    processes = Processes(tmp_path_factory.mktemp("hostile-templates"))
    try:
        balancer = processes.balancer("--inference-item-timeout", "60s", "--buffered-request-timeout", "60s")
        processes.agent(balancer, slots=2, name="llama", engine="llama", env={"PADDLER_THREADS": "2"})
        yield balancer, model_path
    finally:
        processes.close()


async def put_template(balancer: Balancer, model_path: Path, template: str, slots: int = 2) -> None:
    state = state_for(model_path, context_size=1024).model_copy(
        update={"use_chat_template_override": True, "chat_template_override": ChatTemplate(content=template)}
    )
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.put(f"{balancer.management_url}/api/v1/balancer_desired_state", json=state.to_json_dict())
        assert response.status_code == 204, response.text

    async def serving() -> bool:
        async with httpx.AsyncClient(timeout=30) as http:
            agents = (await http.get(f"{balancer.management_url}/api/v1/agents")).json()["agents"]
        return (
            len(agents) == 1
            and agents[0]["slots_total"] == slots
            and agents[0]["state_application_status"] == "Applied"
            and agents[0]["uses_chat_template_override"]
        )

    await wait_until(serving, timeout=120, interval=0.2, what="agent serving the template override")


async def raw_completion(balancer: Balancer) -> tuple[int, float]:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{balancer.inference_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0}
        )
    return response.status_code, time.monotonic() - started


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
async def test_hostile_chat_template_fails_its_request_while_raw_prompts_are_served(
    stack: tuple[Balancer, Path], name: str
) -> None:
    balancer, model_path = stack
    await put_template(balancer, model_path, HOSTILE_TEMPLATES[name])

    async with httpx.AsyncClient(timeout=60) as http:
        chat = asyncio.create_task(
            http.post(
                f"{balancer.inference_url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
        )
        raw_status, raw_seconds = await raw_completion(balancer)  # served while the template renders
        response = await chat

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "chat_template_error"
    assert raw_status == 200
    assert raw_seconds < 30.0
    assert (await raw_completion(balancer))[0] == 200


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(c) for c in text)
    return found


async def test_sigterm_stops_an_agent_while_a_template_render_runs(model_path: Path, paddler: Processes) -> None:
    balancer = paddler.balancer("--inference-item-timeout", "60s")
    agent = paddler.agent(balancer, slots=1, name="llama", engine="llama", env={"PADDLER_THREADS": "2"})
    await put_template(balancer, model_path, HOSTILE_TEMPLATES["nested-range"], slots=1)
    async with httpx.AsyncClient(timeout=60) as http:
        chat = asyncio.create_task(
            http.post(
                f"{balancer.inference_url}/api/v1/continue_from_conversation_history",
                json={"conversation_history": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
        )
        await wait_until(lambda: _in_flight(balancer, 1), timeout=30, what="the request reached the agent")
        renderers = await _renderer_pids(agent)
        started = time.monotonic()
        agent.popen.terminate()
        exit_code = await asyncio.to_thread(agent.popen.wait, 30)
        stopped_in = time.monotonic() - started
        response = await chat

    assert exit_code == 0
    assert stopped_in < 10
    assert renderers
    assert not any(alive(pid) for pid in renderers)
    # The agent drains on SIGTERM: the request in flight is answered (its render ends at the
    # render time limit, not with the agent), then the agent leaves.
    assert response.status_code == 200
    assert "ChatTemplateError" in response.text
    assert "did not finish rendering" in response.text


async def _in_flight(balancer: Balancer, count: int) -> bool:
    async with httpx.AsyncClient(timeout=30) as http:
        agents = (await http.get(f"{balancer.management_url}/api/v1/agents")).json()["agents"]
    return len(agents) == 1 and agents[0]["slots_in_flight"] == count


async def _renderer_pids(agent: PaddlerProcess) -> set[int]:
    """The agent's child processes (its template renderer), once one runs (5 s at most)."""
    found: set[int] = set()

    async def spawned() -> bool:
        found.update(children(agent.popen.pid))
        return bool(found)

    with contextlib.suppress(AssertionError):  # none: the assertion on ``renderers`` says so
        await wait_until(spawned, timeout=5, what="the renderer process started")
    return found
