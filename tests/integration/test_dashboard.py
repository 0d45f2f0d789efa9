"""``paddler dashboard`` driven by Textual's pilot against a real balancer with real
simulated agents (processes, WebSockets, the management API's SSE streams)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from textual.widgets import DataTable, Static

from paddler_cli.dashboard_app import DashboardApp
from tests.harness import Balancer, Processes

SIZE = (130, 36)


async def until(pilot: Any, condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"dashboard never showed: {what}"
        await pilot.pause(0.05)


def text_of(app: Any, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def table_rows(app: Any) -> list[list[str]]:
    table = app.query_one("#agents", DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def start_pool(paddler: Processes) -> Balancer:
    balancer = paddler.balancer("--buffered-request-timeout", "30s")
    paddler.agent(balancer, slots=2, name="alpha", extra=("--simulated-tokens-per-second", "5"))
    paddler.agent(balancer, slots=4, name="bravo", extra=("--simulated-tokens-per-second", "5"))
    return balancer


async def test_dashboard_shows_agents_slots_and_buffered_requests_live(paddler: Processes) -> None:
    balancer = start_pool(paddler)
    app = DashboardApp(balancer.management_addr)
    async with app.run_test(size=SIZE) as pilot, httpx.AsyncClient(timeout=30) as http:
        await until(pilot, lambda: len(table_rows(app)) == 2, "two agents")
        assert [row[0] for row in table_rows(app)] == ["alpha", "bravo"]
        assert "0/2" in table_rows(app)[0][2]
        assert "0/4" in table_rows(app)[1][2]
        assert "live" in text_of(app, "#banner")

        # 8 slow requests on 6 slots: every slot busy, 2 buffered; the screen follows.
        body = {"raw_prompt": "hello", "max_tokens": 40}
        url = balancer.inference_url + "/api/v1/continue_from_raw_prompt"
        requests = [asyncio.create_task(http.post(url, json=body)) for _ in range(8)]
        try:
            await until(pilot, lambda: "buffered requests 2" in text_of(app, "#totals"), "2 buffered requests")
            await until(pilot, lambda: "████████████████ 2/2" in table_rows(app)[0][2], "alpha's bar full")
            assert "6/6" in text_of(app, "#totals")
            save_screenshot(app)
        finally:
            for request in requests:
                request.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
        await until(pilot, lambda: "buffered requests 0" in text_of(app, "#totals"), "buffer drained")


async def test_dashboard_sorts_selects_an_agent_and_quits_with_the_keyboard(paddler: Processes) -> None:
    balancer = start_pool(paddler)
    async with httpx.AsyncClient() as http:
        state = {"model": {"LocalToAgent": "/models/tiny.gguf"}}
        put = await http.put(balancer.management_url + "/api/v1/model_groups/default/desired_state", json=state)
        assert put.status_code == 204
    app = DashboardApp(balancer.management_addr)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(table_rows(app)) == 2, "two agents")
        await until(pilot, lambda: "default" in str(app.query_one("#groups", DataTable).get_row_at(0)[0]), "group")

        await pilot.press("s")  # name -> group
        await pilot.press("s")  # group -> busy: bravo has more slots, so it comes first
        await until(pilot, lambda: "sort: busy" in text_of(app, "#totals"), "sort by busy")
        assert [row[0] for row in table_rows(app)] == ["bravo", "alpha"]

        await pilot.press("up", "up")
        await until(pilot, lambda: text_of(app, "#detail").startswith("bravo"), "bravo selected")
        await pilot.press("down")
        await until(pilot, lambda: text_of(app, "#detail").startswith("alpha"), "alpha selected")
        await until(pilot, lambda: "model /models/tiny.gguf" in text_of(app, "#detail"), "the agent's model")

        await pilot.press("q")
        await pilot.pause(0.1)
    assert app.return_code == 0


async def test_dashboard_says_the_balancer_is_unreachable_and_recovers_when_it_is_back(paddler: Processes) -> None:
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    app = DashboardApp(address)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "unreachable" in text_of(app, "#banner"), "unreachable banner")
        assert "cannot connect" in text_of(app, "#banner")
        assert app.query_one("#banner").has_class("down")
        assert table_rows(app) == []

        balancer = paddler.balancer("--management-addr", address)
        paddler.agent(balancer, slots=2, name="alpha")
        await until(pilot, lambda: "live" in text_of(app, "#banner"), "live banner", timeout=30)
        await until(pilot, lambda: len(table_rows(app)) == 1, "the agent")
        assert not app.query_one("#banner").has_class("down")


async def test_dashboard_keeps_the_last_data_marked_stale_when_the_balancer_dies(paddler: Processes) -> None:
    balancer = start_pool(paddler)
    app = DashboardApp(balancer.management_addr)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(table_rows(app)) == 2, "two agents")
        balancer.process.kill()
        await until(pilot, lambda: "unreachable" in text_of(app, "#banner"), "unreachable banner")
        assert "last data" in text_of(app, "#banner")
        assert len(table_rows(app)) == 2


def save_screenshot(app: Any) -> None:
    """PADDLER_DASHBOARD_SCREENSHOT=path.svg keeps the screen for the README."""
    target = os.environ.get("PADDLER_DASHBOARD_SCREENSHOT")
    if target:
        path = Path(target)
        app.save_screenshot(filename=path.name, path=str(path.parent))
