"""bench/routing_quality.py end to end at tiny sizes, on simulated agents: every scenario
runs under both policies and reports what docs/benchmarks.md quotes (the full benchmark,
on real llama agents, is not part of make test); and the desired state it gives
gemma-3-270m (whose GGUF has no chat template) renders its conversations."""

from __future__ import annotations

from pathlib import Path

from bench import routing_quality
from paddler_agent.chat_template import render_chat
from paddler_core.desired_state import BalancerDesiredState
from paddler_core.inference import ConversationMessage


def test_routing_benchmark_runs_every_scenario_under_both_policies(tmp_path: Path) -> None:
    out = routing_quality.main(
        ["--engine", "simulated", "--rounds", "1", "--agents", "2", "--slots", "2", "--turns", "2",
         "--conversations-per-agent", "1", "--system-words", "20", "--note-words", "5", "--max-tokens", "4",
         "--single-requests", "4", "--max-seconds", "30",
         "--out", str(tmp_path / "routing.json"), "--plot", str(tmp_path / "routing.png")]
    )  # fmt: skip

    rows = out["rows"]
    assert sorted((r["scenario"], r["policy"]) for r in rows) == sorted(
        (s, p) for s in routing_quality.SCENARIOS for p in routing_quality.POLICIES
    )
    assert [r["success_rate"] for r in rows] == [1.0] * len(rows)
    assert all(r["ttft_p99_s"] >= r["ttft_p50_s"] > 0 for r in rows)
    assert (tmp_path / "routing.png").stat().st_size > 0


def test_gemma_gets_a_chat_template_override_that_renders_every_scenario() -> None:
    sizes = routing_quality.Sizes(system_words=20, note_words=5)
    state = routing_quality.desired_state("gemma", "/models/gemma.gguf", sizes)
    parsed = BalancerDesiredState.model_validate(state)
    assert parsed.use_chat_template_override
    assert parsed.chat_template_override is not None
    assert parsed.inference_parameters.context_size == sizes.context_size
    assert "chat_template_override" not in routing_quality.desired_state("smollm2", "/m.gguf", sizes)

    for scenario in routing_quality.SCENARIOS:
        history = routing_quality.conversation_plan(scenario, sizes, "t")[0][0]
        if history[-1]["role"] != "user":
            history = [*history, {"role": "user", "content": "Turn 1: tell me more."}]
        prompt = render_chat(
            parsed.chat_template_override.content,
            [ConversationMessage.model_validate(m) for m in history],
            add_generation_prompt=True,
            enable_thinking=False,
            tools=None,
            bos_token="<bos>",
            eos_token="<eos>",
        )
        assert prompt.startswith("<bos><start_of_turn>user\n"), prompt
        assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n"), prompt
        if history[0]["role"] == "system":
            assert prompt.startswith(f"<bos><start_of_turn>user\n{history[0]['content']}\n\n")
