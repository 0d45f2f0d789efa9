"""Screenshots of the three pages on a busy pool (docs/screenshots/*.png).

Runs in every ``make test`` (into a temporary folder) so the pages keep rendering
without errors; ``make screenshots`` writes them to docs/screenshots/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import VIEWPORT, fake_agent, open_panel, put_state, wait_for_agents
from tests.harness import Balancer, Processes

pytestmark = pytest.mark.browser

MODEL = {
    "HuggingFace": {
        "repo_id": "bartowski/SmolLM2-135M-Instruct-GGUF",
        "filename": "SmolLM2-135M-Instruct-Q4_K_M.gguf",
        "revision": "main",
    }
}
MODEL_PATH = "bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf"
TEMPLATE = r"""{% for message in messages %}
{% if loop.first and messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
{% endif %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' }}
{% endif %}"""


def _start_requests(page: Page, balancer: Balancer, count: int) -> None:
    """Long requests over the inference socket, from a page of the panel's origin."""
    page.goto(balancer.admin_panel_url + "/health")
    page.evaluate(
        """([url, count]) => {
            window.sockets = [...Array(count).keys()].map((n) => {
                const ws = new WebSocket(url);
                ws.onopen = () => ws.send(JSON.stringify({Request: {id: `load-${n}`, request: {
                    ContinueFromConversationHistory: {
                        conversation_history: [{role: "user", content: `question ${n}`}], max_tokens: 1000}}}}));
                return ws;
            });
        }""",
        [balancer.inference_url.replace("http", "ws") + "/api/v1/inference_socket", count],
    )


def _full_page(page: Page, path: Path) -> None:
    """A full-page shot with the viewport as tall as the page, so sticky bars sit where they belong."""
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], int(height))})
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)  # type: ignore[arg-type]


def test_screenshots_of_every_page(paddler: Processes, page: Page, browser: Browser, tmp_path: Path) -> None:
    out = Path(os.environ.get("PADDLER_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    balancer = paddler.balancer("--buffered-request-timeout", "60s", admin_panel=True)
    state = {"model": MODEL, "inference_parameters": {"temperature": 0.6, "context_size": 4096}}
    put_state(balancer, "default", state)
    embed = {"model": {"LocalToAgent": "/models/nomic-embed-text-v1.5.Q8_0.gguf"}}
    put_state(balancer, "embeddings", embed, owner="ModelDeployment/search/nomic-embed")
    slow = ("--simulated-tokens-per-second", "10", "--simulated-max-tokens", "1000")
    paddler.agent(balancer, slots=4, name="gpu-node-a", extra=slow)
    paddler.agent(balancer, slots=4, name="gpu-node-b", extra=slow)
    paddler.agent(balancer, slots=2, name="embed-node", extra=("--model-group", "embeddings"))
    wait_for_agents(balancer, {"gpu-node-a", "gpu-node-b", "embed-node"})

    helpers = browser.new_context()
    try:
        downloader = helpers.new_page()
        fake_agent(
            downloader,
            balancer,
            "7f3c9a51d2e84b06",
            "gpu-node-c",
            {
                "version": 1,
                "slots_total": 0,
                "desired_slots_total": 4,
                "download_current": 61_800_000,
                "download_total": 105_500_000,
                "download_filename": "SmolLM2-135M-Instruct-Q4_K_M.gguf",
                "state_application_status": "Fresh",
            },
        )
        broken = helpers.new_page()
        fake_agent(
            broken,
            balancer,
            "c41d0e7b96a25f18",
            "cpu-node-d",
            {
                "version": 1,
                "slots_total": 0,
                "desired_slots_total": 2,
                "model_path": MODEL_PATH,
                "state_application_status": "AttemptedAndNotAppliable",
                "issues": [
                    {
                        "ModelFileDoesNotExist": {
                            "message": "/models/smollm2.gguf does not exist on this agent; check the volume mount"
                        }
                    }
                ],
            },
            metadata={"general.name": "SmolLM2 135M Instruct", "tokenizer.chat_template": TEMPLATE},
        )
        load = helpers.new_page()
        _start_requests(load, balancer, 10)  # 8 slots busy, 2 requests buffered

        open_panel(page, balancer)
        expect(page.locator(".agent-card")).to_have_count(5)
        expect(page.locator("#groups tr")).to_have_count(2)
        expect(page.locator("#stat-slots")).to_have_text("8 / 10")
        expect(page.locator("#stat-buffered")).to_have_text("2 / 30")
        _full_page(page, out / "dashboard.png")

        open_panel(page, balancer, "/model")
        expect(page.locator("#model-template")).to_contain_text("im_start")
        expect(page.locator("#rollout tr")).to_have_count(4)
        page.locator("#param-temperature").fill("-1")
        page.get_by_role("button", name="Save desired state").click()
        expect(page.locator('[data-field="inference_parameters.temperature"] .error')).not_to_be_empty()
        page.locator("#param-temperature").focus()
        _full_page(page, out / "model.png")
    finally:
        helpers.close()

    open_panel(page, balancer, "/prompt")
    page.locator("#max-tokens").fill("16")
    page.get_by_label("System prompt").fill("You are a concise assistant.")
    # The simulated engine's reply starts where the prompt's hash points; this one starts at "Paddler".
    page.get_by_label("Message", exact=True).fill("Explain Paddler in a sentence.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".message.assistant").last).to_have_attribute("data-state", "done", timeout=20_000)
    page.locator("#max-tokens").fill("1000")
    page.get_by_label("Message", exact=True).fill("And what happens when every slot is busy then?")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".message.assistant").last.locator(".bubble")
    page.wait_for_function("(el) => el.textContent.includes('free.')", arg=reply.element_handle())
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".message.assistant").last).to_have_attribute("data-state", "stopped")
    page.locator("#prompt-input").blur()
    _full_page(page, out / "prompt.png")

    for name in ("dashboard.png", "model.png", "prompt.png"):
        assert (out / name).stat().st_size > 10_000
