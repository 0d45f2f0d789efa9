"""Prompt page: a chat over the inference WebSocket; tokens stream in, Stop
cancels on the balancer and frees the agent's slot."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from playwright.sync_api import Browser, Page, WebSocket, expect

from tests.browser.conftest import agents, fake_agent, open_panel, wait_for, wait_for_agents
from tests.harness import Balancer, Processes

pytestmark = pytest.mark.browser

SLOW = ("--simulated-tokens-per-second", "20", "--simulated-max-tokens", "1000")


def test_reply_streams_and_stop_frees_the_slot(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    paddler.agent(balancer, slots=1, name="slow", extra=SLOW)
    wait_for_agents(balancer, {"slow"})
    open_panel(page, balancer, "/prompt")
    expect(page.locator("#capacity")).to_have_text("1 of 1 slots free on 1 agent.")

    page.locator("#max-tokens").fill("1000")  # 50 s at 20 tokens/s: only Stop can end it early
    page.get_by_label("Message", exact=True).fill("What does Paddler do?")
    page.get_by_role("button", name="Send").click()

    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-state", "streaming")
    expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    # Tokens arrive one by one: the text grows while the request runs.
    wait_for(lambda: len(reply.locator(".bubble").inner_text()) > 0, what="first tokens")
    first = reply.locator(".bubble").inner_text()
    wait_for(lambda: len(reply.locator(".bubble").inner_text()) > len(first) + 10, what="more tokens")
    assert agents(balancer)[0]["slots_in_flight"] == 1
    expect(page.locator("#m-ttft")).to_have_text(re.compile(r"^\d+ ms$"))

    stopped_at = time.monotonic()
    page.get_by_role("button", name="Stop").click()
    expect(reply).to_have_attribute("data-state", "stopped")
    wait_for(
        lambda: (agents(balancer)[0]["slots_in_flight"], agents(balancer)[0]["slots_processing"]) == (0, 0),
        timeout=5,
        what="the balancer and the agent freed the slot",
    )
    assert time.monotonic() - stopped_at < 5  # long before the 50 s reply would have ended
    expect(reply.locator(".meta")).to_contain_text("Stopped")
    expect(reply.locator(".meta")).to_contain_text("Time to first token")
    text = reply.locator(".bubble").inner_text()
    page.wait_for_timeout(300)
    assert reply.locator(".bubble").inner_text() == text  # nothing arrives after Stop
    expect(page.locator("#capacity")).to_have_text("1 of 1 slots free on 1 agent.")


def test_conversation_continues_with_usage_and_thinking_flag(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    paddler.agent(balancer, slots=2, name="fast", extra=("--simulated-tokens-per-second", "50"))
    wait_for_agents(balancer, {"fast"})
    sent: list[dict[str, object]] = []

    def on_socket(ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

    page.on("websocket", on_socket)
    open_panel(page, balancer, "/prompt")
    page.locator("#max-tokens").fill("6")
    page.get_by_label("Enable thinking").check()
    page.get_by_label("System prompt").fill("Answer briefly.")
    page.get_by_label("Message", exact=True).fill("Hello")
    page.keyboard.press("Enter")
    first = page.locator(".message.assistant").nth(0)
    expect(first).to_have_attribute("data-state", "done")
    expect(first.locator(".meta")).to_contain_text("6 tokens")
    expect(first.locator(".usage")).to_contain_text("+ 6 reply tokens")
    expect(page.locator("#m-content")).to_have_text("6")
    expect(page.locator("#m-agent")).to_have_text("fast")

    page.get_by_label("Message", exact=True).fill("And then?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".message.assistant").nth(1)).to_have_attribute("data-state", "done")

    requests = [m["Request"] for m in sent if "Request" in m]
    assert len(requests) == 2
    params = requests[1]["request"]["ContinueFromConversationHistory"]  # type: ignore[index]
    assert params["enable_thinking"] is True
    assert params["max_tokens"] == 6
    history = params["conversation_history"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[2]["content"] == first.locator(".bubble").inner_text()


def test_buffer_timeout_is_explained(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer("--buffered-request-timeout", "300ms", admin_panel=True)
    open_panel(page, balancer, "/prompt")
    expect(page.locator("#capacity")).to_contain_text("No agent serves the default group")
    page.get_by_label("Message", exact=True).fill("Anyone there?")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-state", "error")
    expect(reply.locator("[role=alert]")).to_have_text(
        "No agent answered in time: the request waited in the buffer, or the agent stopped sending tokens."
    )
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_reasoning_is_shown_apart_from_the_reply(paddler: Processes, page: Page, browser: Browser) -> None:
    balancer = paddler.balancer(admin_panel=True)
    agent_page = browser.new_context().new_page()
    usage = {"prompt_tokens": 12, "cached_prompt_tokens": 4, "content_tokens": 2, "reasoning_tokens": 3}
    try:
        fake_agent(
            agent_page,
            balancer,
            "thinker-1",
            "thinker",
            {"version": 1, "slots_total": 1, "model_path": "/models/qwen3.gguf", "state_application_status": "Applied"},
            replies=[
                {"GeneratedToken": {"ReasoningToken": "The user"}},
                {"GeneratedToken": {"ReasoningToken": " greets"}},
                {"GeneratedToken": {"ReasoningToken": " me."}},
                {"GeneratedToken": {"ContentToken": "Hello"}},
                {"GeneratedToken": {"ContentToken": " there!"}},
                {"GeneratedToken": {"Done": {"usage": usage}}},
            ],
        )
        open_panel(page, balancer, "/prompt")
        page.get_by_label("Enable thinking").check()
        page.get_by_label("Message", exact=True).fill("Hi")
        page.get_by_role("button", name="Send").click()
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-state", "done")
        expect(reply.locator(".bubble")).to_have_text("Hello there!")
        expect(reply.locator(".thinking div")).to_have_text("The user greets me.")
        expect(reply.locator(".usage")).to_have_text("Usage: 12 prompt + 2 reply + 3 reasoning tokens")
        expect(page.locator("#m-reasoning")).to_have_text("3")
        expect(page.locator("#m-cached")).to_have_text("4")
        expect(page.locator("#m-agent")).to_have_text("thinker")
    finally:
        agent_page.context.close()


def test_agent_errors_are_shown(paddler: Processes, page: Page, browser: Browser) -> None:
    balancer = paddler.balancer(admin_panel=True)
    agent_page = browser.new_context().new_page()
    try:
        fake_agent(
            agent_page,
            balancer,
            "broken-1",
            "broken",
            {"version": 1, "slots_total": 1, "model_path": "/models/x.gguf", "state_application_status": "Applied"},
            replies=[{"GeneratedToken": {"ChatTemplateError": "undefined variable 'messages'"}}],
        )
        open_panel(page, balancer, "/prompt")
        page.get_by_label("Message", exact=True).fill("Hi")
        page.get_by_role("button", name="Send").click()
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-state", "error")
        expect(reply.locator("[role=alert]")).to_have_text("Chat template error: undefined variable 'messages'")
    finally:
        agent_page.context.close()


def test_stop_while_buffered_leaves_the_buffer(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer("--buffered-request-timeout", "60s", admin_panel=True)
    open_panel(page, balancer, "/prompt")
    page.get_by_label("Message", exact=True).fill("Is anyone there?")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".message.assistant").last
    expect(reply.locator(".meta")).to_have_text("Waiting for a free slot…")
    wait_for(lambda: buffered(balancer) == 1, what="the request waits in the buffer")
    page.get_by_role("button", name="Stop").click()
    expect(reply).to_have_attribute("data-state", "stopped")
    wait_for(lambda: buffered(balancer) == 0, timeout=5, what="the stopped request left the buffer")


def buffered(balancer: Balancer) -> int:
    response = httpx.get(balancer.management_url + "/api/v1/buffered_requests", timeout=5)
    count: int = response.json()["buffered_requests_current"]
    return count


def test_prompt_page_sends_to_the_chosen_model_group(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    paddler.agent(balancer, slots=1, name="plain", extra=("--simulated-tokens-per-second", "50"))
    paddler.agent(balancer, slots=1, name="alpha-agent", extra=("--model-group", "alpha"))
    wait_for_agents(balancer, {"plain", "alpha-agent"})
    open_panel(page, balancer, "/prompt")
    select = page.get_by_label("Model group")
    expect(select.locator("option")).to_have_count(2)
    select.select_option("alpha")
    expect(page.locator("#capacity")).to_have_text("1 of 1 slots free on 1 agent.")
    page.locator("#max-tokens").fill("3")
    page.get_by_label("Message", exact=True).fill("Hello")
    page.keyboard.press("Enter")
    expect(page.locator(".message.assistant").last).to_have_attribute("data-state", "done")
    expect(page.locator("#m-agent")).to_have_text("alpha-agent")

    select.select_option("default")
    page.get_by_label("Message", exact=True).fill("Again")
    page.keyboard.press("Enter")
    expect(page.locator(".message.assistant").nth(1)).to_have_attribute("data-state", "done")
    expect(page.locator("#m-agent")).to_have_text("plain")
