"""Prefix routing across balancer replicas, through real processes: two balancers in
front of the same ``paddler agent --engine simulated`` agents send every turn of a
conversation to the same agent, whichever replica serves the turn."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.harness import Balancer, Processes, wait_until
from tests.integration.test_hostile_peers import agents, generated_by

SYSTEM = "You are a patient assistant for conversation {n}. " * 20


async def registered(balancer: Balancer, count: int) -> bool:
    return len(await agents(balancer)) == count


async def turn(balancer: Balancer, history: list[dict[str, Any]]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(
            f"{balancer.inference_url}/api/v1/continue_from_conversation_history",
            json={"conversation_history": history, "max_tokens": 4},
        )


def answer_text(response: httpx.Response) -> str:
    text = []
    for raw in response.text.splitlines():
        token = json.loads(raw)["Response"]["response"].get("GeneratedToken", {})
        if isinstance(token, dict) and "ContentToken" in token:
            text.append(str(token["ContentToken"]))
    return "".join(text)


async def test_two_replicas_send_every_turn_of_a_conversation_to_the_same_agent(paddler: Processes) -> None:
    first, second = paddler.balancer("--routing", "prefix"), paddler.balancer("--routing", "prefix")
    for name in ("a", "b", "c"):
        paddler.agent(first, slots=2, name=name, replicas=(second,))
    await wait_until(lambda: registered(first, 3), what="3 agents on the first replica")
    await wait_until(lambda: registered(second, 3), what="3 agents on the second replica")

    served: dict[int, list[str]] = {}
    histories = {n: [{"role": "system", "content": SYSTEM.format(n=n)}] for n in range(4)}
    for turn_number in range(4):
        for n, history in histories.items():
            history.append({"role": "user", "content": f"question {turn_number} of conversation {n}"})
            replica = (first, second)[(turn_number + n) % 2]
            response = await turn(replica, history)
            assert response.status_code == 200
            served.setdefault(n, []).append(generated_by(response))
            history.append({"role": "assistant", "content": answer_text(response)})

    assert {n: len(set(ids)) for n, ids in served.items()} == {n: 1 for n in histories}
