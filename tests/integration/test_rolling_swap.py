"""Rolling model swaps on a plain balancer: real processes, simulated agents with a
load time longer than the buffer timeout, continuous load over plain HTTP."""

from __future__ import annotations

from pathlib import Path

from tests.harness import Processes
from tests.rolling import (
    Load,
    ServingMonitor,
    agents,
    put_state,
    rollout,
    wait_for_rollout,
    wait_for_serving,
)

LOAD_TIME = "3s"
BUFFER_TIMEOUT = "1s"  # shorter than a load: one agent alone would turn a swap into 504s
AGENTS = 3


def gguf(path: Path) -> str:
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


def local(path: str) -> dict[str, object]:
    return {"model": {"LocalToAgent": path}}


def start_pool(paddler: Processes, *balancer_args: str):  # type: ignore[no-untyped-def]
    balancer = paddler.balancer("--buffered-request-timeout", BUFFER_TIMEOUT, *balancer_args)
    return balancer


def start_agents(paddler: Processes, balancer, count: int = AGENTS) -> None:  # type: ignore[no-untyped-def]
    for i in range(count):
        paddler.agent(
            balancer,
            slots=2,
            name=f"agent-{i}",
            extra=("--simulated-load-time", LOAD_TIME, "--simulated-tokens-per-second", "50"),
        )


async def test_swap_under_load_fails_no_request_and_keeps_all_but_one_agent_serving(
    paddler: Processes, tmp_path: Path
) -> None:
    old, new = gguf(tmp_path / "old.gguf"), gguf(tmp_path / "new.gguf")
    balancer = start_pool(paddler, "--max-unavailable", "1")
    await put_state(balancer, local(old))  # before the agents join: they all load it at once
    start_agents(paddler, balancer)
    await wait_for_serving(balancer, AGENTS, old, timeout=30)

    async with Load(balancer, workers=3, max_tokens=4) as load, ServingMonitor(balancer) as monitor:
        await load.wait_for_answers(10)
        before_put = len(load.outcomes)
        await put_state(balancer, local(new))
        progressing = await rollout(balancer)
        done = await wait_for_rollout(balancer, "Complete", timeout=60)
        after_done = len(load.outcomes)
        await load.wait_for_answers(10)

    failed = [o for o in load.outcomes if not o.ok]
    assert failed == []
    assert monitor.samples > 50
    assert monitor.fewest == AGENTS - 1
    assert progressing["phase"] == "Progressing"
    assert progressing["total"] == AGENTS
    assert progressing["applied"] < AGENTS
    assert (done["applied"], done["total"], done["max_unavailable"]) == (AGENTS, AGENTS, "1")
    assert load.outcomes[before_put - 1].text.startswith("old.gguf:")  # the last answer before the PUT
    assert load.outcomes[after_done].text.startswith("new.gguf:")  # the first one after the rollout
    assert all(o.text.startswith("new.gguf:") for o in load.outcomes[after_done:])
    assert {o.text.split(":")[0] for o in load.outcomes[before_put:after_done]} == {"old.gguf", "new.gguf"}
    assert all(a["model_path"] == new and not a["draining"] for a in await agents(balancer))


async def test_model_that_fails_to_load_stops_the_rollout_and_the_old_model_keeps_serving(
    paddler: Processes, tmp_path: Path
) -> None:
    old = gguf(tmp_path / "old.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model at all")
    balancer = start_pool(paddler, "--max-unavailable", "1")
    await put_state(balancer, local(old))
    start_agents(paddler, balancer)
    await wait_for_serving(balancer, AGENTS, old, timeout=30)

    async with Load(balancer, workers=3, max_tokens=4) as load:
        await load.wait_for_answers(5)
        await put_state(balancer, local(str(broken)))
        failed_rollout = await wait_for_rollout(balancer, "Failed", timeout=30)
        after_failure = len(load.outcomes)
        await load.wait_for_answers(15)

    assert [o for o in load.outcomes if not o.ok] == []
    assert failed_rollout["applied"] == 0
    assert failed_rollout["total"] == AGENTS
    assert "is not a GGUF file" in failed_rollout["message"]
    assert all(o.text.startswith("old.gguf:") for o in load.outcomes[after_failure:])
    found = await agents(balancer)
    assert [a["model_path"] for a in found] == [old] * AGENTS  # one attempted it, the others never did
    assert sum(a["state_application_status"] == "AttemptedAndNotAppliable" for a in found) == 1
    assert all(a["slots_total"] == 2 and not a["draining"] for a in found)


async def test_agent_joining_after_a_failed_rollout_gets_the_old_model(paddler: Processes, tmp_path: Path) -> None:
    old = gguf(tmp_path / "old.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"garbage")
    balancer = start_pool(paddler)
    await put_state(balancer, local(old))
    start_agents(paddler, balancer, count=2)
    await wait_for_serving(balancer, 2, old, timeout=30)
    await put_state(balancer, local(str(broken)))
    await wait_for_rollout(balancer, "Failed", timeout=30)

    paddler.agent(balancer, slots=2, name="latecomer", extra=("--simulated-load-time", LOAD_TIME))

    await wait_for_serving(balancer, 3, old, timeout=30)


async def test_single_agent_swap_holds_requests_in_the_buffer_during_the_load(
    paddler: Processes, tmp_path: Path
) -> None:
    old, new = gguf(tmp_path / "old.gguf"), gguf(tmp_path / "new.gguf")
    balancer = paddler.balancer("--buffered-request-timeout", "10s")
    await put_state(balancer, local(old))
    start_agents(paddler, balancer, count=1)
    await wait_for_serving(balancer, 1, old, timeout=30)

    async with Load(balancer, workers=2, max_tokens=4) as load:
        await load.wait_for_answers(4)
        await put_state(balancer, local(new))
        await wait_for_rollout(balancer, "Complete", timeout=30)
        await load.wait_for_answers(4)

    assert [o for o in load.outcomes if not o.ok] == []
    assert load.outcomes[-1].text.startswith("new.gguf:")
    assert max(o.finished - o.started for o in load.outcomes) >= 2.5  # held through the 3 s load


async def test_put_with_an_invalid_max_unavailable_is_refused(paddler: Processes) -> None:
    import httpx

    balancer = paddler.balancer()
    async with httpx.AsyncClient() as http:
        response = await http.put(
            f"{balancer.management_url}/api/v1/balancer_desired_state",
            params={"max_unavailable": "150%"},
            json=local("/models/a.gguf"),
        )
    assert response.status_code == 400
    assert "at most 100%" in response.json()["error"]["message"]


async def test_stopped_agent_finishes_its_in_flight_request_and_takes_no_new_ones(
    paddler: Processes, tmp_path: Path
) -> None:
    """SIGTERM, as a pod replaced by a rolling update gets: drain, then exit."""
    import asyncio

    import httpx

    from tests.harness import wait_until
    from tests.rolling import generate

    balancer = paddler.balancer()
    slow = ("--simulated-tokens-per-second", "10")
    leaving, staying = (paddler.agent(balancer, slots=1, name=n, extra=slow) for n in ("leaving", "staying"))
    await wait_for_serving(balancer, 2, None, timeout=30)
    async with httpx.AsyncClient(timeout=30) as http:
        first, second = (asyncio.create_task(generate(http, balancer, f"p{i}", 30)) for i in range(2))

        async def both_busy() -> bool:
            return all(a["slots_processing"] == 1 for a in await agents(balancer))

        await wait_until(both_busy, timeout=10, what="one request on each agent")
        leaving.popen.terminate()

        async def leaving_reports_no_slots() -> bool:
            return any(a["name"] == "leaving" and a["slots_total"] == 0 for a in await agents(balancer))

        await wait_until(leaving_reports_no_slots, timeout=10, what="the stopping agent reports no slots")
        third = await generate(http, balancer, "p3", 2)  # waits for the staying agent, never the leaving one
        outcomes = [await first, await second, third]

    assert [o.ok for o in outcomes] == [True, True, True]
    assert [len(o.text) > 0 for o in outcomes] == [True, True, True]
    assert leaving.popen.wait(15) == 0
    assert "stopping: draining in-flight requests count=1" in leaving.output()
    assert staying.alive
    assert [a["name"] for a in await agents(balancer)] == ["staying"]
