from __future__ import annotations

from pathlib import Path

import pytest

from paddler_balancer.settings import parse_addr, parse_duration
from paddler_balancer.state_store import StateStore
from paddler_core.desired_state import BalancerDesiredState, ModelSource
from paddler_core.prefix import request_prefix_keys


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10000", 10.0), ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1.5s", 1.5), ("1h", 3600.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten", "10 parsecs", "-1s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "addr"),
    [("127.0.0.1:8060", ("127.0.0.1", 8060)), ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::1]:80", ("::1", 80))],
)
def test_parse_addr(text: str, addr: tuple[str, int]) -> None:
    assert parse_addr(text) == addr


def test_file_state_store_round_trips(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/s.json"
    store = StateStore(url)
    state = BalancerDesiredState(model=ModelSource.local("/m.gguf"))
    store.put("chat", state, owner="ModelDeployment/ns/chat")
    again = StateStore(url)
    assert again.get("chat") == state
    assert again.groups["chat"].owner == "ModelDeployment/ns/chat"
    assert again.names() == ["chat", "default"]


def test_state_store_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="memory:// or file://"):
        StateStore("redis://x")


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        ("None", "None"),
        ({"LocalToAgent": "/a.gguf"}, "LocalToAgent"),
        ({"Url": {"url": "https://x/y.gguf"}}, "Url"),
        ({"HuggingFace": {"repo_id": "r/m", "filename": "f.gguf", "revision": "main"}}, "HuggingFace"),
    ],
)
def test_model_source_serde_round_trip(wire: object, kind: str) -> None:
    source = ModelSource.model_validate(wire)
    assert source.kind == kind
    assert source.model_dump(mode="json") == wire


def test_shared_conversation_prefix_shares_leading_keys() -> None:
    first = {"conversation_history": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}
    second = {"conversation_history": [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]}
    k1 = request_prefix_keys("ContinueFromConversationHistory", first)
    k2 = request_prefix_keys("ContinueFromConversationHistory", second)
    assert k1[0] == k2[0]
    assert k1[1] != k2[1]


def test_raw_prompt_keys_cover_whole_chunks_only() -> None:
    assert request_prefix_keys("ContinueFromRawPrompt", {"raw_prompt": "x" * 255}) == ()
    assert len(request_prefix_keys("ContinueFromRawPrompt", {"raw_prompt": "x" * 600})) == 2
