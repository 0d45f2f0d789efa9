"""Headless Chromium (Debian's, driven by Playwright) against a real balancer.

``make browser`` installs /usr/bin/chromium; never ``playwright install``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.harness import Balancer

CHROMIUM = os.environ.get("PADDLER_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 900}
expect.set_options(timeout=15_000)

# The browser logs every 4xx/5xx fetch; the model page provokes a 400 on purpose.
_EXPECTED_CONSOLE = ("Failed to load resource", "net::ERR_")


@pytest.fixture(autouse=True)
def no_leaked_tasks() -> None:
    """Overrides the root check for leaked asyncio tasks: these tests are synchronous and
    own no asyncio tasks, and Playwright's sync API keeps its own event loop running in
    this thread, where the root fixture (async) cannot run."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (installs Debian's chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context; any script error or CSP violation fails the test."""
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    context.set_default_timeout(15_000)
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith(_EXPECTED_CONSOLE):
            errors.append(message.text)

    page = context.new_page()
    page.on("console", on_console)
    page.on("pageerror", lambda err: errors.append(f"page error: {err}"))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page logged errors: {errors}"


def open_panel(page: Page, balancer: Balancer, path: str = "/") -> None:
    page.goto(balancer.admin_panel_url + path)
    page.wait_for_selector("main[data-ready=true]")


def agents(balancer: Balancer) -> list[dict[str, Any]]:
    response = httpx.get(balancer.management_url + "/api/v1/agents", timeout=5)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["agents"]
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what}")
        time.sleep(0.05)


def wait_for_agents(balancer: Balancer, names: set[str]) -> list[dict[str, Any]]:
    wait_for(lambda: {a["name"] for a in agents(balancer)} >= names, what=f"agents {names} registered")
    return agents(balancer)


_FAKE_AGENT_JS = """
([url, register, metadata, replies]) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.onopen = () => ws.send(JSON.stringify(register));
  ws.onerror = () => reject(new Error("fake agent could not connect"));
  ws.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    for (const m of Array.isArray(frame) ? frame : [frame]) {
      if (m.type === "registered") resolve(m.agent_id);
      if (m.type === "generate") {
        replies.forEach((response, i) => ws.send(JSON.stringify(
          {type: "response", request_id: m.request_id, response, final: i === replies.length - 1})));
      }
      if (m.type === "query") {
        const body = m.what === "model_metadata" ? {metadata} : null;
        ws.send(JSON.stringify({type: "reply", request_id: m.request_id, body}));
      }
    }
  };
  window.fakeAgent = ws;
})
"""


def fake_agent(
    page: Page,
    balancer: Balancer,
    agent_id: str,
    name: str,
    status: dict[str, Any],
    metadata: dict[str, str] | None = None,
    model_group: str = "default",
    replies: list[Any] | None = None,
) -> None:
    """An agent that speaks the real protocol from a browser page: it registers with
    ``status`` (download progress, issues, ...), answers metadata queries and each
    generation request with ``replies`` (response payloads). It stays connected while
    ``page`` is open."""
    url = balancer.management_url.replace("http://", "ws://") + f"/api/v1/agent_socket/{agent_id}"
    register = {"type": "register", "protocol_version": 1, "name": name, "model_group": model_group, "status": status}
    # Chromium blocks about:blank from dialing loopback (local network access checks): run
    # the script from a page of the panel's origin.
    page.goto(balancer.admin_panel_url + "/health")
    page.evaluate(_FAKE_AGENT_JS, [url, register, metadata or {}, replies or []])
    wait_for(lambda: any(a["id"] == agent_id for a in agents(balancer)), what=f"fake agent {name} registered")


def put_state(balancer: Balancer, group: str, state: dict[str, Any], owner: str | None = None) -> None:
    headers = {"X-Paddler-Owner": owner} if owner else {}
    response = httpx.put(
        f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state",
        content=json.dumps(state),
        headers={"Content-Type": "application/json", **headers},
        timeout=5,
    )
    assert response.status_code == 204, response.text
