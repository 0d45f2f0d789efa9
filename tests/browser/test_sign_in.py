"""The admin panel on a balancer with a management token and an API key: the pages ask
for them, and the prompt page reaches the inference WebSocket with the key (issue 10)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import open_panel, wait_for
from tests.harness import Balancer, Processes

pytestmark = pytest.mark.browser

TOKEN = "panel-management-token"
API_KEY = "panel-api-key"


def agents_with_token(balancer: Balancer) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{balancer.management_url}/api/v1/agents", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    response.raise_for_status()
    return list(response.json()["agents"])


def locked_pool(paddler: Processes) -> Balancer:
    balancer = paddler.balancer("--management-token", TOKEN, "--api-key", API_KEY, admin_panel=True)
    paddler.agent(balancer, slots=1, name="guarded", env={"PADDLER_MANAGEMENT_TOKEN": TOKEN})
    wait_for(lambda: [a["name"] for a in agents_with_token(balancer)] == ["guarded"], what="agent registered")
    return balancer


def test_prompt_page_asks_for_both_credentials_then_chats_with_the_key(paddler: Processes, page: Page) -> None:
    balancer = locked_pool(paddler)
    open_panel(page, balancer, "/prompt")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    page.get_by_label("Management token").fill(TOKEN)
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("main[data-ready=true] #transcript")

    expect(page.locator("#capacity")).to_have_text("1 of 1 slots free on 1 agent.")
    page.locator("#max-tokens").fill("5")
    page.get_by_label("Message", exact=True).fill("Hello behind a key")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-state", "done")
    expect(reply.locator(".meta")).to_contain_text("5 tokens")


def test_a_wrong_token_is_refused_with_a_message(paddler: Processes, page: Page) -> None:
    balancer = locked_pool(paddler)
    open_panel(page, balancer, "/")
    expect(page.get_by_label("API key")).to_have_count(0)  # the dashboard needs no API key
    page.get_by_label("Management token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()

    expect(page.get_by_role("alert")).to_contain_text("The balancer refused what was entered")
    page.get_by_label("Management token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#main")).to_contain_text("guarded")
