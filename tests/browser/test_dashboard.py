"""Dashboard: live agent cards over SSE, buffered requests, plain-words status."""

from __future__ import annotations

import time

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from paddler_balancer.admin_panel import parameter_fields, public_url
from paddler_core.desired_state import InferenceParameters
from tests.browser.conftest import VIEWPORT, fake_agent, open_panel, put_state, wait_for_agents
from tests.harness import Processes

pytestmark = pytest.mark.browser


def test_config_points_the_pages_at_the_bound_api_addresses(paddler: Processes) -> None:
    balancer = paddler.balancer(admin_panel=True)
    config = httpx.get(balancer.admin_panel_url + "/config.json", timeout=5).json()
    assert config["management_url"] == balancer.management_url
    assert config["inference_url"] == balancer.inference_url
    assert config["inference_socket_url"] == balancer.inference_url.replace("http", "ws") + "/api/v1/inference_socket"
    assert config["agent_command"] == f"paddler agent --management-addr {balancer.management_addr} --slots 4"
    # The pages stream SSE from the management address, another origin: its headers must allow
    # the panel's origin (and only listed ones: docs/security.md).
    origin = {"Origin": balancer.admin_panel_url}
    with httpx.stream("GET", balancer.management_url + "/api/v1/agents/stream", headers=origin, timeout=5) as stream:
        assert stream.headers["access-control-allow-origin"] == balancer.admin_panel_url


@pytest.mark.parametrize(
    ("addr", "host", "url"),
    [
        ("127.0.0.1:8060", "panel.example", "http://127.0.0.1:8060"),
        ("0.0.0.0:8060", "panel.example", "http://panel.example:8060"),
        ("[::]:8061", "10.1.2.3", "http://10.1.2.3:8061"),
        ("[::]:8061", "fd00::5", "http://[fd00::5]:8061"),
        ("[::1]:8061", "x", "http://[::1]:8061"),
    ],
)
def test_wildcard_hosts_become_the_host_the_browser_used(addr: str, host: str, url: str) -> None:
    assert public_url(addr, host) == url


def test_every_inference_parameter_is_explained() -> None:
    fields = parameter_fields()
    assert [f["name"] for f in fields if not f["help"]] == []
    assert {f["name"] for f in fields} == set(InferenceParameters.model_fields)
    top_p = next(f for f in fields if f["name"] == "top_p")
    assert (top_p["default"], top_p["exclusiveMinimum"], top_p["maximum"]) == (0.8, 0.0, 1.0)


def test_static_files_are_served_offline(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    open_panel(page, balancer)
    origins = {balancer.admin_panel_url, balancer.management_url, balancer.inference_url}
    assert all(any(url.startswith(o) for o in origins) for url in requested), requested


def test_empty_state_says_how_to_start_an_agent(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    open_panel(page, balancer)
    empty = page.locator("#agents-empty")
    expect(empty).to_be_visible()
    expect(empty).to_contain_text("No agents connected")
    expect(page.locator("#agent-command")).to_have_text(
        f"paddler agent --management-addr {balancer.management_addr} --slots 4"
    )
    expect(page.locator("#management-url")).to_have_text(balancer.management_url)
    expect(page.locator("#inference-url")).to_have_text(balancer.inference_url)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def test_dashboard_follows_agents_joining_and_leaving(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    open_panel(page, balancer)
    expect(page.locator("#agents-empty")).to_be_visible()

    alpha = paddler.agent(balancer, slots=2, name="alpha")
    alpha_card = page.locator(".agent-card", has=page.locator(".agent-name", has_text="alpha"))
    expect(alpha_card).to_be_visible()
    expect(alpha_card.locator(".agent-slots")).to_have_text("0 of 2 busy")
    expect(alpha_card.locator(".agent-state")).to_have_text("Desired state applied")
    expect(page.locator("#agents-empty")).to_be_hidden()

    paddler.agent(balancer, slots=3, name="beta")
    expect(page.locator(".agent-card")).to_have_count(2)
    expect(page.locator("#stat-agents")).to_have_text("2")
    expect(page.locator("#stat-slots")).to_have_text("0 / 5")

    alpha.stop()
    expect(alpha_card).to_have_count(0)
    expect(page.locator(".agent-card")).to_have_count(1)
    expect(page.locator(".agent-card .agent-name")).to_have_text("beta")
    expect(page.locator("#stat-slots")).to_have_text("0 / 3")


def test_busy_slots_and_buffered_requests_update_live(paddler: Processes, page: Page, browser: Browser) -> None:
    balancer = paddler.balancer(admin_panel=True)
    paddler.agent(balancer, slots=1, name="solo", extra=("--simulated-tokens-per-second", "20"))
    wait_for_agents(balancer, {"solo"})
    open_panel(page, balancer)
    card = page.locator(".agent-card", has=page.locator(".agent-name", has_text="solo"))
    expect(card.locator(".agent-slots")).to_have_text("0 of 1 busy")

    # Two long requests from another browser page: one takes the slot, one waits in the buffer.
    client = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    try:
        requests_page = client.new_page()
        requests_page.goto(balancer.admin_panel_url + "/health")
        requests_page.evaluate(
            """(url) => {
                window.sockets = [1, 2].map((n) => {
                    const ws = new WebSocket(url);
                    ws.onopen = () => ws.send(JSON.stringify({Request: {id: `r${n}`, request: {
                        ContinueFromConversationHistory: {
                            conversation_history: [{role: "user", content: `hello ${n}`}], max_tokens: 100}}}}));
                    return ws;
                });
            }""",
            balancer.inference_url.replace("http", "ws") + "/api/v1/inference_socket",
        )
        expect(card.locator(".agent-slots")).to_have_text("1 of 1 busy")
        expect(page.locator("#stat-buffered")).to_have_text("1 / 30")
        expect(page.locator(".stat[data-alert=true]")).to_have_count(1)
    finally:
        client.close()  # the sockets close: the buffered request leaves, the slot frees
    expect(page.locator("#stat-buffered")).to_have_text("0 / 30")
    expect(card.locator(".agent-slots")).to_have_text("0 of 1 busy")


def test_agent_status_in_plain_words(paddler: Processes, page: Page, browser: Browser) -> None:
    balancer = paddler.balancer(admin_panel=True)
    agent_page = browser.new_context().new_page()
    try:
        fake_agent(
            agent_page,
            balancer,
            "fake-1",
            "downloader",
            {
                "version": 1,
                "slots_total": 0,
                "desired_slots_total": 4,
                "download_current": 250_000_000,
                "download_total": 1_000_000_000,
                "download_filename": "Qwen3-0.6B-Q8_0.gguf",
                "state_application_status": "AttemptedAndRetrying",
                "issues": [{"ModelFileDoesNotExist": {"message": "/models/missing.gguf does not exist on this agent"}}],
            },
        )
        open_panel(page, balancer)
        card = page.locator(".agent-card", has=page.locator(".agent-name", has_text="downloader"))
        expect(card.locator(".download-file")).to_have_text("Qwen3-0.6B-Q8_0.gguf")
        expect(card.locator(".download")).to_contain_text("25% · 250 MB of 1.0 GB")
        expect(card.locator(".download [role=progressbar]")).to_have_attribute("aria-valuenow", "25")
        expect(card.locator(".agent-state")).to_have_text("Downloading the model")
        expect(card.locator(".agent-slots")).to_have_text("No slots open yet")
        expect(card.locator(".issues li")).to_have_text(
            "Model file does not exist/models/missing.gguf does not exist on this agent"
        )
        expect(card).to_contain_text("wants 4 slots")
    finally:
        agent_page.context.close()
    expect(page.locator(".agent-card")).to_have_count(0)


def test_lost_connection_is_shown(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    paddler.agent(balancer, slots=1, name="stale")
    wait_for_agents(balancer, {"stale"})
    open_panel(page, balancer)
    expect(page.locator(".agent-card")).to_have_count(1)
    expect(page.locator("#connection")).to_have_text("Live")
    started = time.monotonic()
    balancer.process.stop()  # SIGTERM, with the page's SSE streams open
    assert time.monotonic() - started < 8, "open admin panel streams held the balancer's shutdown"
    expect(page.locator("#connection")).to_have_attribute("data-state", "down")
    expect(page.locator("#connection")).to_have_text("Reconnecting…")
    expect(page.locator("body")).to_have_attribute("data-connection", "down")


def test_model_groups_are_summarised_when_there_are_several(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    embed = {"model": {"LocalToAgent": "/models/embed.gguf"}}
    put_state(balancer, "embeddings", embed, owner="ModelDeployment/ml/embed")
    paddler.agent(balancer, slots=2, name="chat")
    paddler.agent(balancer, slots=1, name="embedder", extra=("--model-group", "embeddings"))
    wait_for_agents(balancer, {"chat", "embedder"})
    open_panel(page, balancer)
    rows = page.locator("#groups tr")
    expect(rows).to_have_count(2)
    embeddings = page.locator('#groups tr[data-group="embeddings"]')
    expect(embeddings).to_contain_text("/models/embed.gguf")
    expect(embeddings).to_contain_text("ModelDeployment/ml/embed")
    expect(embeddings.locator("td").nth(3)).to_have_text("0 / 1")
    expect(page.locator('#groups tr[data-group="default"] td').nth(3)).to_have_text("0 / 2")
    embeddings.get_by_role("link", name="embeddings").click()
    page.wait_for_selector("main[data-ready=true]")
    expect(page.get_by_label("Model group")).to_have_value("embeddings")
    expect(page.locator("#owner-notice")).to_contain_text("ModelDeployment/ml/embed")
