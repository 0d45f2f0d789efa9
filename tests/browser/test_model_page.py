"""Model page: edits of the desired state reach the agents; the API's validation
messages land next to the field they name; owned groups are read only."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import agents, fake_agent, open_panel, put_state, wait_for, wait_for_agents
from tests.harness import Balancer, Processes

pytestmark = pytest.mark.browser

TEMPLATE = "{% for message in messages %}<|{{ message.role }}|>{{ message.content }}\n{% endfor %}<|assistant|>"


def state(balancer: Balancer, group: str = "default") -> dict[str, Any]:
    response = httpx.get(f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state", timeout=5)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def source(page: Page) -> Any:
    return page.locator("#model-source")


def field(page: Page, path: str) -> Any:
    return page.locator(f'[data-field="{path}"]')


def test_model_edit_reaches_the_agents(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    paddler.agent(balancer, slots=2, name="a1")
    paddler.agent(balancer, slots=2, name="a2")
    wait_for_agents(balancer, {"a1", "a2"})
    open_panel(page, balancer, "/model")
    expect(page.locator("#rollout tr")).to_have_count(2)
    expect(page.locator("#param-temperature")).to_have_value("0.8")

    source(page).get_by_label("Hugging Face").check()
    source(page).get_by_label("Repository").fill("bartowski/SmolLM2-135M-Instruct-GGUF")
    source(page).get_by_label("File", exact=True).fill("SmolLM2-135M-Instruct-Q4_K_M.gguf")
    page.locator("#param-temperature").fill("0.3")
    page.locator("#param-k_cache_dtype").select_option("F16")
    expect(page.locator("#save-status")).to_have_text("Unsaved changes.")
    page.get_by_role("button", name="Save desired state").click()
    expect(page.locator("#save-status")).to_contain_text("Saved")

    expected = "bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf"
    wait_for(
        lambda: [a["model_path"] for a in agents(balancer)] == [expected, expected],
        what="both agents report the new model",
    )
    saved = state(balancer)
    assert saved["model"] == {
        "HuggingFace": {
            "repo_id": "bartowski/SmolLM2-135M-Instruct-GGUF",
            "filename": "SmolLM2-135M-Instruct-Q4_K_M.gguf",
            "revision": "main",
        }
    }
    assert saved["inference_parameters"]["temperature"] == 0.3
    assert saved["inference_parameters"]["k_cache_dtype"] == "F16"
    assert saved["inference_parameters"]["top_k"] == 80  # untouched fields keep their values
    # The live table shows the agents on the new model.
    expect(page.locator("#rollout .rollout-model").first).to_have_text(expected)

    # A reload shows what the balancer holds.
    open_panel(page, balancer, "/model")
    expect(page.locator("#param-temperature")).to_have_value("0.3")
    expect(source(page).get_by_label("Repository")).to_have_value("bartowski/SmolLM2-135M-Instruct-GGUF")


def test_invalid_parameter_shows_the_api_message_next_to_the_field(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    open_panel(page, balancer, "/model")
    page.locator("#param-temperature").fill("-1")
    page.locator("#param-top_p").fill("0")
    page.get_by_role("button", name="Save desired state").click()

    temperature = field(page, "inference_parameters.temperature")
    expect(temperature.locator(".error")).to_have_text("Input should be greater than or equal to 0")
    expect(page.locator("#param-temperature")).to_have_attribute("aria-invalid", "true")
    expect(field(page, "inference_parameters.top_p").locator(".error")).to_have_text("Input should be greater than 0")
    expect(field(page, "inference_parameters.top_k").locator(".error")).to_be_empty()
    expect(page.locator("#error-summary [role=alert]")).to_contain_text("Temperature")
    expect(page.locator("#save-status")).to_contain_text("Not saved")
    assert state(balancer)["inference_parameters"]["temperature"] == 0.8

    # Fixing the fields clears the messages and saves.
    page.get_by_role("button", name="Reset Temperature to its default, 0.8").click()
    page.locator("#param-top_p").fill("0.9")
    page.get_by_role("button", name="Save desired state").click()
    expect(page.locator("#save-status")).to_contain_text("Saved")
    expect(temperature.locator(".error")).to_be_empty()
    expect(page.locator("#param-temperature")).not_to_have_attribute("aria-invalid", "true")
    assert state(balancer)["inference_parameters"]["top_p"] == 0.9


def test_invalid_model_source_shows_the_message_at_its_field(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    open_panel(page, balancer, "/model")
    source(page).get_by_role("radio", name="URL").check()
    page.locator("#model-url").fill("ftp://example.com/model.gguf")
    page.get_by_role("button", name="Save desired state").click()
    expect(field(page, "model.url.url").locator(".error")).to_contain_text("String should match pattern")
    assert state(balancer)["model"] == "None"

    page.get_by_role("button", name="Discard changes").click()
    expect(source(page).get_by_role("radio", name="None")).to_be_checked()
    expect(field(page, "model.url.url").locator(".error")).to_be_empty()
    expect(page.locator("#error-summary")).to_be_empty()


def test_group_owned_by_a_model_deployment_is_read_only(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    put_state(balancer, "default", {"model": {"LocalToAgent": "/models/qwen.gguf"}}, owner="ModelDeployment/prod/qwen")
    open_panel(page, balancer, "/model")
    notice = page.locator("#owner-notice")
    expect(notice).to_contain_text("ModelDeployment/prod/qwen")
    expect(notice).to_contain_text("kubectl edit modeldeployment qwen -n prod")
    expect(page.locator("#state-fields")).to_have_attribute("disabled", "")
    expect(page.get_by_role("button", name="Save desired state")).to_be_disabled()
    expect(page.locator("#param-temperature")).to_be_disabled()
    expect(source(page).get_by_label("Path on each agent")).to_have_value("/models/qwen.gguf")


def test_model_template_is_shown_beside_the_override_editor(paddler: Processes, page: Page, browser: Browser) -> None:
    balancer = paddler.balancer(admin_panel=True)
    agent_page = browser.new_context().new_page()
    try:
        fake_agent(
            agent_page,
            balancer,
            "fake-template",
            "templated",
            {"version": 1, "slots_total": 2, "model_path": "/models/smol.gguf", "state_application_status": "Applied"},
            metadata={"general.name": "smol", "tokenizer.chat_template": TEMPLATE},
        )
        open_panel(page, balancer, "/model")
        expect(page.locator("#model-template")).to_have_text(TEMPLATE)
        page.get_by_role("button", name="Copy into the editor").click()
        expect(page.locator("#template-override")).to_have_value(TEMPLATE)
        expect(page.get_by_label("Use a chat template override")).to_be_checked()
        page.locator("#template-override").fill("{{ messages[-1].content }}")
        page.get_by_role("button", name="Save desired state").click()
        expect(page.locator("#save-status")).to_contain_text("Saved")
        saved = state(balancer)
        assert saved["use_chat_template_override"] is True
        assert saved["chat_template_override"] == {"content": "{{ messages[-1].content }}"}
    finally:
        agent_page.context.close()


def test_each_model_group_is_edited_on_its_own(paddler: Processes, page: Page) -> None:
    balancer = paddler.balancer(admin_panel=True)
    paddler.agent(balancer, slots=1, name="chat")
    paddler.agent(balancer, slots=1, name="embedder", extra=("--model-group", "embeddings"))
    wait_for_agents(balancer, {"chat", "embedder"})
    open_panel(page, balancer, "/model")
    page.get_by_label("Model group").select_option("embeddings")
    expect(page.locator("#rollout tr")).to_have_count(1)
    expect(page.locator("#rollout tr")).to_contain_text("embedder")
    source(page).get_by_label("Local path").check()
    source(page).get_by_label("Path on each agent").fill("/models/embedder.gguf")
    page.get_by_role("checkbox", name="Enable embeddings").check()
    page.get_by_role("button", name="Save desired state").click()
    expect(page.locator("#save-status")).to_contain_text("Saved")
    wait_for(
        lambda: (
            {a["name"]: a["model_path"] for a in agents(balancer)}
            == {"chat": None, "embedder": "/models/embedder.gguf"}
        ),
        what="only the embeddings group changed",
    )
    assert state(balancer, "embeddings")["inference_parameters"]["enable_embeddings"] is True
    assert page.url.endswith("/model?group=embeddings")
